"""Processors: dataset frames -> batches that the tiny recipes accept (forward and predict_action_chunk),
statistics installed into the model's normaliser (never applied twice), save/load, augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")
pytest.importorskip("av")

import vla_blocks  # noqa: E402
from vla_blocks.data import LeRobotDataset, PolicyProcessor, make_processor  # noqa: E402
from vla_blocks.data.processor import ImageAugmentation  # noqa: E402
from vla_blocks.encoders import preprocess_images  # noqa: E402
from vla_blocks.models.pi0 import pi05_prompt  # noqa: E402

from test_data import FPS, write  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root, frames = write(tmp_path_factory.mktemp("proc") / "ds", "v3.0")
    return root, frames


@pytest.fixture(scope="module")
def stats(dataset, tmp_path_factory):
    from vla_blocks.data.stats import compute_dataset_stats
    return compute_dataset_stats(LeRobotDataset(dataset[0], decode_video=False))


def _frames(root, proc, idx=(0, 11, 20)):
    ds = LeRobotDataset(root, delta_timestamps=proc.delta_timestamps(FPS))
    return [ds[i] for i in idx]


@pytest.mark.parametrize("recipe", ["pi0-tiny", "pi05-tiny", "acot-tiny"])
def test_pi0_family_batches(recipe, dataset, stats):
    torch.manual_seed(0)
    model = vla_blocks.create_model(recipe)
    proc = make_processor(model, LeRobotDataset(dataset[0], decode_video=False).meta, stats=stats)
    frames = _frames(dataset[0], proc)
    batch = proc(frames)
    demo = model.demo_batch(3)
    assert set(demo) <= set(batch)
    for k in demo:
        assert batch[k].dtype == demo[k].dtype, k
        if k != "actions" and k != "state":
            assert batch[k].shape == demo[k].shape, (k, batch[k].shape, demo[k].shape)
    S = model.vision_tower.image_size
    assert batch["images"].shape == (3, model.config.num_cameras, 3, S, S)
    assert batch["image_masks"][:, :2].all() and not batch["image_masks"][:, 2:].any()  # 2 cameras, 3 slots
    # the image is exactly encoders.preprocess_images of the frame (no private resize)
    expect = preprocess_images(frames[1]["observation.images.top"][None] if frames[1]["observation.images.top"].ndim == 3
                               else frames[1]["observation.images.top"][-1:], size=S, float_range="unit",
                               out_range="unit")
    torch.testing.assert_close(batch["images"][1, 0], expect[0])
    # raw state and actions in, the model's normaliser holds the dataset statistics (no double normalisation)
    assert torch.equal(batch["state"][1], frames[1]["observation.state"])
    assert torch.equal(batch["actions"][0], frames[0]["action"][:proc.config.chunk_length])
    st = model.normalizer.stats("actions")
    key = "q01" if model.config.normalization == "quantile" else "mean"
    np.testing.assert_allclose(st[key].numpy(), stats["action"][key], rtol=1e-6)
    # prompt: BOS + the prompt text of pi05_prompt
    text = proc.prompt(frames[1]["task"], frames[1]["observation.state"])
    if model.config.pi05 and recipe == "pi05-tiny":
        norm_state = model.normalizer.normalize("state", frames[1]["observation.state"][None])[0]
        assert text == pi05_prompt(frames[1]["task"], norm_state) and "State: " in text
    else:
        assert text == pi05_prompt(frames[1]["task"]) + "\n"
    n = int(batch["tokenized_prompt_mask"][1].sum())
    assert n == min(model.config.max_token_len, 1 + len(text))
    decoded = proc.tokenizer.decode(batch["tokenized_prompt"][1, 1:n].tolist(), skip_special_tokens=False)
    assert decoded.replace(" ", "") == text[:n - 1].replace(" ", "")
    loss, metrics = model(batch)
    assert torch.isfinite(loss)
    chunk = model.predict_action_chunk(proc(frames))
    raw = proc.postprocess(chunk)
    assert raw.shape == (3, model.config.action_horizon, 7)
    np_raw = proc.postprocess(chunk.numpy())
    assert isinstance(np_raw, np.ndarray) and np.allclose(np_raw, raw.numpy())


def test_predict_from_raw_observation(dataset, stats):
    """Serving: one un-windowed observation (no action) -> an inference batch."""
    model = vla_blocks.create_model("pi0-tiny")
    proc = make_processor(model, LeRobotDataset(dataset[0], decode_video=False).meta, stats=stats)
    obs = {k: v for k, v in LeRobotDataset(dataset[0])[3].items() if k != "action"}
    batch = proc(obs)
    assert "actions" not in batch and batch["images"].shape[0] == 1
    assert proc.postprocess(model.predict_action_chunk(batch)).shape == (1, model.config.action_horizon, 7)


def test_halo_batches(dataset, stats):
    torch.manual_seed(0)
    model = vla_blocks.create_model("halo-tiny")
    proc = make_processor(model, LeRobotDataset(dataset[0], decode_video=False).meta, stats=stats)
    assert proc.delta_timestamps(FPS)["observation.images.top"] == [-0.1, 0.0]
    frames = _frames(dataset[0], proc, (0, 5))
    batch = proc(frames)
    loss, _ = model(batch)
    assert torch.isfinite(loss)
    s = batch["samples"][0]
    assert len(s.history) == 2 and s.instruction == frames[0]["task"]
    # actions: normalised by the processor (HALO's model has no normaliser), zero-padded to action_dim
    a = frames[0]["action"][:model.config.chunk_size]
    mean, std = torch.tensor(stats["action"]["mean"]).float(), torch.tensor(stats["action"]["std"]).float()
    torch.testing.assert_close(batch["actions"][0, :a.shape[0], :7], (a - mean) / (std + 1e-6))
    assert torch.all(batch["actions"][0, :, 7:] == 0)
    infer = proc([{k: v for k, v in f.items() if k != "action"} for f in frames[:1]])
    assert set(infer) == {"history", "instruction"}
    out = model.predict_action_chunk({**infer, "mode": "reactive"})
    raw = proc.postprocess(out)
    assert raw.shape == (1, model.config.chunk_size, 7)
    torch.testing.assert_close(raw, out[..., :7] * (std + 1e-6) + mean)


def test_save_and_load(dataset, stats, tmp_path):
    model = vla_blocks.create_model("pi05-tiny")
    proc = make_processor(model, LeRobotDataset(dataset[0], decode_video=False).meta, stats=stats,
                          normalization={"action": "min_max"})
    frames = _frames(dataset[0], proc)
    proc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["policy"] == "pi05"
    fresh = vla_blocks.create_model("pi05-tiny")
    loaded = PolicyProcessor.from_pretrained(tmp_path, fresh)
    a, b = proc(frames), loaded(frames)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # min_max = the quantile formula with min/max
    st = fresh.normalizer.stats("actions")
    np.testing.assert_allclose(st["q99"].numpy(), stats["action"]["max"], rtol=1e-6)
    x = torch.tensor(stats["action"]["max"]).float()[None]
    assert torch.allclose(fresh.normalizer.normalize("actions", x), torch.ones(1, 7), atol=1e-4)


def test_errors_name_the_problem(dataset, stats):
    meta = LeRobotDataset(dataset[0], decode_video=False).meta
    model = vla_blocks.create_model("pi05-tiny")
    with pytest.raises(KeyError, match="observation.images.side"):
        make_processor(model, meta, stats=stats, camera_map=["observation.images.side"])
    no_q = {k: {s: v for s, v in st.items() if not s.startswith("q")} for k, st in stats.items()}
    with pytest.raises(ValueError, match="lack \\['q01', 'q99'\\].*vla-blocks stats"):
        make_processor(model, meta, stats=no_q)
    proc = make_processor(model, meta, stats=stats)
    with pytest.raises(ValueError, match="delta_timestamps"):
        proc([LeRobotDataset(dataset[0])[0]])  # a single action step, the model trains on a chunk
    big = vla_blocks.create_model("pi0-tiny", **{"backbone.config.vocab_size": 4096})
    with pytest.raises(ValueError, match="needs its tokenizer"):
        make_processor(big, meta, stats=stats)


def test_augmentation_train_only(dataset, stats):
    model = vla_blocks.create_model("pi0-tiny")
    proc = make_processor(model, LeRobotDataset(dataset[0], decode_video=False).meta, stats=stats, augment=True,
                          wrist_keys=["observation.images.wrist"])
    frames = _frames(dataset[0], proc)
    clean = proc(frames)["images"]
    assert torch.equal(clean, proc(frames)["images"])  # eval: deterministic, no augmentation
    proc.train()
    proc.generator = torch.Generator().manual_seed(0)
    aug = proc(frames)["images"]
    assert not torch.equal(aug, clean) and aug.min() >= -1 and aug.max() <= 1
    x = torch.rand(2, 3, 16, 16)
    same = ImageAugmentation(crop_scale=1.0, rotate_deg=0, brightness=0, contrast=0, saturation=0)(x)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
