"""LeRobotDataset writer -> reader round trips (v3.0 and v2.1), padding, episode filters, atomic episodes,
the resumable sampler, and statistics against numpy. Every dataset is generated here (no network)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pytest.importorskip("av")

from vla_blocks.data import LeRobotDataset, ShuffleSampler  # noqa: E402
from vla_blocks.data import stats as S  # noqa: E402
from vla_blocks.data.dataset import LeRobotDatasetWriter  # noqa: E402

FPS = 10
LENGTHS = (12, 7, 15)
TASKS = ("pick up the red cube", "open the drawer", "pick up the red cube")
FEATURES = {
    "observation.images.top": {"dtype": "video", "shape": [64, 96, 3], "names": ["height", "width", "channels"]},
    "observation.images.wrist": {"dtype": "image", "shape": [64, 96, 3], "names": ["height", "width", "channels"]},
    "observation.state": {"dtype": "float32", "shape": [8], "names": [f"j{i}" for i in range(8)]},
    "action": {"dtype": "float32", "shape": [7], "names": None},
}


def make_image(g: int, e: int) -> np.ndarray:
    """A frame that identifies itself: channel 0 = 17 g mod 256, a ramp, per-episode blue, a moving square."""
    img = np.zeros((64, 96, 3), np.uint8)
    img[..., 0] = (17 * g) % 256
    img[..., 1] = (np.arange(96) * 2)[None]
    img[..., 2] = 60 + 60 * e
    y, x = (g * 7) % 48, (g * 11) % 80
    img[y:y + 16, x:x + 16] = 255
    return img


def source(lengths=LENGTHS):
    rng = np.random.default_rng(0)
    frames, g = [], 0
    for e, n in enumerate(lengths):
        for i in range(n):
            frames.append({"observation.images.top": make_image(g, e), "observation.images.wrist": make_image(g, e),
                           "observation.state": (10 * e + i * 0.1 + rng.normal(size=8) * 0.01).astype(np.float32),
                           "action": (-0.2 * i + rng.normal(size=7)).astype(np.float32), "task": TASKS[e % 3],
                           "_episode": e})
            g += 1
    return frames


def write(root, version="v3.0", lengths=LENGTHS, **kw) -> tuple[str, list]:
    frames = source(lengths)
    w = LeRobotDataset.create(root, fps=FPS, features=FEATURES, robot_type="dummy_arm", codebase_version=version, **kw)
    for e in range(len(lengths)):
        for f in frames:
            if f["_episode"] == e:
                w.add_frame({k: v for k, v in f.items() if k != "_episode"})
        w.save_episode()
    w.finalize()
    return str(root), frames


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    # tiny size limits and 2 files per chunk: several data and video files over two chunk folders
    return write(tmp_path_factory.mktemp("v3") / "ds", "v3.0", data_files_size_in_mb=0.004,
                 video_files_size_in_mb=0.003, chunks_size=2)


@pytest.fixture(scope="module")
def v21(tmp_path_factory):
    return write(tmp_path_factory.mktemp("v21") / "ds", "v2.1")


def _files(root, pattern):
    from pathlib import Path
    return sorted(str(p.relative_to(root)) for p in Path(root).glob(pattern))


def check_round_trip(root, frames):
    ds = LeRobotDataset(root)
    assert len(ds) == sum(LENGTHS) and ds.num_episodes == 3
    tops = torch.from_numpy(np.stack([f["observation.images.top"] for f in frames])).permute(0, 3, 1, 2).float() / 255
    starts = np.cumsum((0,) + LENGTHS)
    for g, f in enumerate(frames):
        item = ds[g]
        e = f["_episode"]
        assert list(item)[:2] == ["observation.images.top", "observation.images.wrist"]  # video keys first
        assert torch.equal(item["observation.state"], torch.from_numpy(f["observation.state"]))
        assert torch.equal(item["action"], torch.from_numpy(f["action"]))
        # PNG is lossless: exact pixels
        wrist = torch.from_numpy(f["observation.images.wrist"]).permute(2, 0, 1).float() / 255
        assert torch.equal(item["observation.images.wrist"], wrist)
        # AV1 is lossy: the decoded frame is nearest to its own source frame
        top = item["observation.images.top"]
        assert top.shape == (3, 64, 96) and top.dtype == torch.float32 and 0 <= top.min() and top.max() <= 1
        assert int(((tops - top[None]) ** 2).mean((1, 2, 3)).argmin()) == g
        assert item["task"] == f["task"] and isinstance(item["task"], str)
        assert int(item["index"]) == g and int(item["episode_index"]) == e
        assert int(item["frame_index"]) == g - starts[e]
        assert item["timestamp"].dtype == torch.float32 and item["timestamp"].ndim == 0
        assert float(item["timestamp"]) == np.float32((g - starts[e]) / FPS)
    return ds


def test_round_trip_v3_multi_file(v3):
    root, frames = v3
    assert len(_files(root, "data/*/*.parquet")) >= 3
    assert "data/chunk-001/file-000.parquet" in _files(root, "data/*/*.parquet")
    assert len(_files(root, "videos/observation.images.top/*/*.mp4")) >= 2
    ds = check_round_trip(root, frames)
    info = json.loads(open(os.path.join(root, "meta/info.json")).read())
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == 34 and info["total_tasks"] == 2
    assert list(info["features"])[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    vinfo = info["features"]["observation.images.top"]["info"]
    assert vinfo["video.pix_fmt"] == "yuv420p" and vinfo["video.codec"] in ("av1", "h264")
    assert ds.meta.tasks == ["pick up the red cube", "open the drawer"]


def test_round_trip_v21(v21):
    root, frames = v21
    assert _files(root, "data/*/*.parquet") == [f"data/chunk-000/episode_{e:06d}.parquet" for e in range(3)]
    assert len(_files(root, "videos/chunk-000/observation.images.top/*.mp4")) == 3
    check_round_trip(root, frames)
    info = json.loads(open(os.path.join(root, "meta/info.json")).read())
    assert info["codebase_version"] == "v2.1" and info["total_videos"] == 3
    ep_stats = [json.loads(x) for x in open(os.path.join(root, "meta/episodes_stats.jsonl"))]
    assert all(not s.startswith("q") for s in ep_stats[0]["stats"]["action"])  # v2.1 has no quantiles


def test_files_as_lerobot_lays_them_out(v3):
    pq = pytest.importorskip("pyarrow.parquet")
    root, _ = v3
    tasks = pq.read_table(os.path.join(root, "meta/tasks.parquet"))
    pandas_meta = json.loads(tasks.schema.metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["task"]  # without it lerobot returns task = int
    assert tasks.column("task_index").to_pylist() == [0, 1]
    data = pq.ParquetFile(os.path.join(root, "data/chunk-000/file-000.parquet"))
    assert data.schema_arrow.field("observation.state").type == pa.list_(pa.float32(), 8)
    assert str(data.schema_arrow.field("observation.images.wrist").type) == "struct<bytes: binary, path: string>"
    assert "observation.images.top" not in data.schema_arrow.names
    eps = pq.read_table(os.path.join(root, "meta/episodes/chunk-000/file-000.parquet")).to_pydict()
    assert eps["dataset_from_index"] == [0, 12, 19] and eps["dataset_to_index"] == [12, 19, 34]
    assert eps["tasks"] == [["pick up the red cube"], ["open the drawer"], ["pick up the red cube"]]
    for key in ("videos/observation.images.top/from_timestamp", "stats/action/q01", "meta/episodes/file_index"):
        assert key in eps
    # a new video file restarts at t = 0; inside a file the episodes run on
    for e in range(3):
        assert eps["videos/observation.images.top/to_timestamp"][e] == pytest.approx(
            eps["videos/observation.images.top/from_timestamp"][e] + LENGTHS[e] / FPS, abs=1e-3)


def test_delta_timestamps_and_padding(v3):
    root, frames = v3
    ds = LeRobotDataset(root, delta_timestamps={"action": [k / FPS for k in range(10)],
                                                "observation.state": [-0.1, 0.0],
                                                "observation.images.top": [-0.2, 0.0],
                                                "observation.images.wrist": [-0.1, 0.0]})
    acts = np.stack([f["action"] for f in frames])
    states = np.stack([f["observation.state"] for f in frames])
    item = ds[9]  # episode 0 (frames 0..11), frame 9
    assert item["action"].shape == (10, 7)
    assert item["action_is_pad"].tolist() == [False] * 3 + [True] * 7
    assert torch.equal(item["action"], torch.from_numpy(acts[[9, 10, 11] + [11] * 7]))
    item = ds[12]  # first frame of episode 1: the history step is padded and repeats frame 0
    assert item["observation.state_is_pad"].tolist() == [True, False]
    assert torch.equal(item["observation.state"], torch.from_numpy(states[[12, 12]]))
    assert item["observation.images.top_is_pad"].tolist() == [True, False]
    assert torch.equal(item["observation.images.top"][0], item["observation.images.top"][1])
    assert item["observation.images.wrist"].shape == (2, 3, 64, 96)
    item = ds[18]  # last frame of the 7-frame episode
    assert int(item["action_is_pad"].sum()) == 9
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 5, 20, 33)])
    assert batch["action"].shape == (4, 10, 7) and batch["action_is_pad"].shape == (4, 10)
    assert batch["observation.images.top"].shape == (4, 2, 3, 64, 96) and len(batch["task"]) == 4


def test_video_decode_in_any_order(v3):
    """Decoders are reused across calls: random access (backward seeks across files) gives the same frames."""
    ds = LeRobotDataset(v3[0])
    forward = [ds[i]["observation.images.top"] for i in range(len(ds))]
    for i in [33, 0, 20, 19, 5, 12, 11, 33, 2]:
        assert torch.equal(ds[i]["observation.images.top"], forward[i]), i


def test_delta_timestamps_must_be_frame_multiples(v3):
    with pytest.raises(ValueError, match="multiple of 1/fps"):
        LeRobotDataset(v3[0], delta_timestamps={"action": [0.0, 0.05]})
    with pytest.raises(KeyError, match="actions"):
        LeRobotDataset(v3[0], delta_timestamps={"actions": [0.0]})


def test_episode_filter(v3, v21):
    for root in (v3[0], v21[0]):
        ds = LeRobotDataset(root, episodes=[1])
        assert len(ds) == 7 and int(ds[0]["index"]) == 12 and int(ds[6]["index"]) == 18
        ds = LeRobotDataset(root, episodes=[2, 0])
        assert len(ds) == 27 and int(ds[0]["index"]) == 19 and int(ds[15]["index"]) == 0
    with pytest.raises(ValueError, match=r"episodes \[5\] do not exist"):
        LeRobotDataset(v3[0], episodes=[5])


def test_interrupted_episode_never_loads_half(tmp_path, monkeypatch):
    root, frames = write(tmp_path / "ds", "v3.0", lengths=(5, 4))
    # reopen as a writer over a copy is not supported; simulate a crash in the third episode of a new dataset
    calls = {"n": 0}
    real = LeRobotDatasetWriter._write_tasks_v3

    def crash(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut")
        return real(self)

    monkeypatch.setattr(LeRobotDatasetWriter, "_write_tasks_v3", crash)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "ds2", "v3.0", lengths=(5, 4, 6))
    ds = LeRobotDataset(tmp_path / "ds2")  # the data file already holds episode 2's rows; they are not visible
    assert ds.num_episodes == 2 and len(ds) == 9
    assert int(ds[8]["index"]) == 8 and ds[8]["task"] == TASKS[1]


def test_writer_validates_frames(tmp_path):
    w = LeRobotDataset.create(tmp_path / "ds", fps=FPS, features=FEATURES)
    good = {k: v for k, v in source((1,))[0].items() if k != "_episode"}
    with pytest.raises(ValueError, match="missing features \\['action'\\]"):
        w.add_frame({k: v for k, v in good.items() if k != "action"})
    with pytest.raises(ValueError, match="'observation.state' has shape \\(7,\\)"):
        w.add_frame({**good, "observation.state": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="filled in automatically"):
        w.add_frame({**good, "timestamp": 0.0})
    w.add_frame({**good, "observation.images.wrist": torch.rand(3, 64, 96)})  # CHW float is accepted
    with pytest.raises(FileExistsError):
        LeRobotDataset.create(tmp_path / "ds", fps=FPS, features=FEATURES)


def test_missing_files_are_named(tmp_path):
    root, _ = write(tmp_path / "ds", "v3.0", lengths=(3,))
    os.remove(os.path.join(root, "videos/observation.images.top/chunk-000/file-000.mp4"))
    with pytest.raises(FileNotFoundError, match="file-000.mp4"):
        LeRobotDataset(root)
    assert len(LeRobotDataset(root, decode_video=False)) == 3


def test_dataloader_workers_and_resumable_sampler(v3):
    ds = LeRobotDataset(v3[0], delta_timestamps={"action": [k / FPS for k in range(4)]})
    sampler = ShuffleSampler(ds, seed=3)
    full = list(ShuffleSampler(ds, seed=3))
    assert sorted(full) == list(range(len(ds))) and full != list(range(len(ds)))
    it = iter(sampler)
    first = [next(it) for _ in range(10)]
    state = sampler.state_dict()
    resumed = ShuffleSampler(ds, seed=0)
    resumed.load_state_dict(state)
    assert first + list(resumed) == full
    assert list(resumed)[:5] == list(ShuffleSampler(ds, seed=4))[:5]  # the next epoch: seed + 1
    assert ShuffleSampler(ds, seed=3).state_dict(consumed=40) == {"seed": 3, "epoch": 1, "position": 6, "n": 34}
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=ShuffleSampler(ds, seed=3), num_workers=2)
    idx = torch.cat([b["index"] for b in loader]).tolist()
    assert idx == full


# ---------------------------------------------------------------------------------------------- statistics
def test_episode_stats_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)) * [1, 10, 0.1]
    st = S.feature_stats(x)
    np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st["std"], x.std(0), rtol=1e-9)
    np.testing.assert_array_equal(st["min"], x.min(0))
    np.testing.assert_array_equal(st["max"], x.max(0))
    width = (x.max(0) - x.min(0)) / S.HIST_BINS
    for q in S.QUANTILES:
        # the histogram quantile is within one bin of the inverse-CDF sample quantile
        ref = np.quantile(x, q, axis=0, method="inverted_cdf")
        assert np.all(np.abs(st[f"q{int(q * 100):02d}"] - ref) <= width + 1e-12), q
    one = S.feature_stats(x[:1])
    assert np.array_equal(one["q99"], x[0]) and one["count"].tolist() == [1]


def test_stats_json_matches_lerobot_rules(v3):
    """stats.json: exact min/max/mean/std/count over all frames; quantiles = count-weighted episode quantiles."""
    root, frames = v3
    stats = json.loads(open(os.path.join(root, "meta/stats.json")).read())
    act = np.stack([f["action"] for f in frames]).astype(np.float64)
    np.testing.assert_allclose(stats["action"]["mean"], act.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["action"]["std"], act.std(0), rtol=1e-9)
    np.testing.assert_allclose(stats["action"]["min"], act.min(0))
    assert stats["action"]["count"] == [34]
    eps = np.cumsum((0,) + LENGTHS)
    per = [S.feature_stats(act[eps[e]:eps[e + 1]]) for e in range(3)]
    q01 = sum(p["q01"] * n for p, n in zip(per, LENGTHS)) / 34
    np.testing.assert_allclose(stats["action"]["q01"], q01, rtol=1e-9)
    ts = np.concatenate([np.arange(n) / FPS for n in LENGTHS])
    np.testing.assert_allclose(stats["timestamp"]["mean"], [ts.mean()], rtol=1e-12)
    cam = stats["observation.images.top"]
    assert np.asarray(cam["mean"]).shape == (3, 1, 1) and cam["count"] == [34]
    pix = np.stack([f["observation.images.top"] for f in frames]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(np.asarray(cam["mean"]).reshape(3), pix.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cam["max"]).reshape(3), pix.max(0), rtol=1e-6)


def test_camera_stats_subsample():
    assert S.sample_frame_indices(50) == list(range(50))
    idx = S.sample_frame_indices(1000)
    assert len(idx) == 177 and idx[0] == 0 and idx[-1] == 999


def test_streaming_stats_and_cli(v3, tmp_path):
    from vla_blocks.cli import main
    root, frames = v3
    out = tmp_path / "normalization.json"
    assert main(["stats", root, "--out", str(out)]) == 0
    st = json.loads(out.read_text())
    state = np.stack([f["observation.state"] for f in frames]).astype(np.float64)
    np.testing.assert_allclose(st["observation.state"]["mean"], state.mean(0), rtol=1e-9)
    np.testing.assert_allclose(st["observation.state"]["std"], state.std(0), rtol=1e-6)
    np.testing.assert_allclose(st["observation.state"]["max"], state.max(0))
    bound = (state.max(0) - state.min(0)) / S.HIST_BINS
    for q in ("q01", "q50", "q99"):  # true dataset quantiles (unlike stats.json), within one bin
        ref = np.quantile(state, int(q[1:]) / 100, axis=0, method="inverted_cdf")
        assert np.all(np.abs(np.asarray(st["observation.state"][q]) - ref) <= bound + 1e-9), q
    # q01 spans the whole dataset (0..21), not the averaged per-episode values that stats.json holds
    assert st["observation.state"]["q01"][0] < 1.0
    openpi = tmp_path / "norm_stats.json"
    assert main(["stats", root, "--out", str(openpi), "--format", "openpi", "--episodes", "0,2"]) == 0
    ns = json.loads(openpi.read_text())["norm_stats"]
    assert set(ns) == {"state", "actions"} and set(ns["actions"]) == {"mean", "std", "q01", "q99"}
    back = S.from_openpi(json.loads(openpi.read_text()))
    keep = [i for i, f in enumerate(frames) if f["_episode"] in (0, 2)]
    np.testing.assert_allclose(back["action"]["mean"], np.stack([frames[i]["action"] for i in keep]).mean(0), rtol=1e-6)
    assert main(["stats", root, "--keys", "nope"]) == 2


def test_missing_extra_names_it(monkeypatch):
    import importlib
    from vla_blocks.data import _deps
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "av":
            raise ModuleNotFoundError("No module named 'av'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ModuleNotFoundError, match=r"vla-blocks\[data\]"):
        _deps.require("av")
