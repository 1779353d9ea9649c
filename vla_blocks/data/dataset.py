"""LeRobotDataset v3.0 / v2.1: a reader (a torch ``Dataset`` of lerobot-style frames) and a writer.

Reading (reference lerobot_dataset.md §8)::

    ds = LeRobotDataset("path/to/ds")                       # or "local-dir:path", "hf-hub:org/name[@rev]"
    ds = LeRobotDataset(root, delta_timestamps={"action": [k / 10 for k in range(10)]}, episodes=[0, 2])
    frame = ds[0]   # {"observation.images.top": float [3, H, W] in [0, 1], "observation.state": [S],
                    #  "action": [10, A], ..., "action_is_pad": bool [10], "task": str}

Frames are what lerobot 0.6.1's ``LeRobotDataset.__getitem__`` returns: cameras float32 CHW in [0, 1] (video
decoded with PyAV, nearest frame within ``tolerance_s``), vectors float32 ``[D]``, scalars 0-d tensors, the task
string. With ``delta_timestamps`` each listed key gets a leading time axis and a ``<key>_is_pad`` mask; steps
outside the episode repeat its first/last frame. Parquet columns are read per data file, lazily, with a small
cache (bounded memory); image bytes are decoded on access.

Writing, with lerobot's verbs (§2, §9)::

    w = LeRobotDataset.create(root, fps=10, features={...}, robot_type="arm")   # v3.0 (or codebase_version="v2.1")
    for frame in episode:
        w.add_frame({**frame, "task": "pick up the cube"})
    w.save_episode()
    w.finalize()

Each ``save_episode`` is atomic: data, video and metadata files are written beside their targets and renamed,
and ``meta/info.json`` (whose ``total_episodes`` the reader trusts) is replaced last, so an interrupted write
leaves a dataset that loads with its complete episodes only.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ._deps import require
from .stats import aggregate_stats, episode_stats, stats_from_json, stats_to_json
from .video import decode_frames, encode_video, concat_videos, pick_codec, video_info, ENCODER_DEFAULTS

__all__ = ["LeRobotDataset", "LeRobotDatasetWriter", "DatasetMeta", "ShuffleSampler", "DEFAULT_FEATURES",
           "resolve_root"]

DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
CAMERA_DTYPES = ("image", "video")


def _atomic_write_bytes(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj, indent=4):
    _atomic_write_bytes(path, (json.dumps(obj, indent=indent, ensure_ascii=False)).encode())


def resolve_root(root_or_ref: str | os.PathLike) -> Path:
    """A local folder for ``path``, ``local-dir:path`` or ``hf-hub:org/name[@rev]`` (downloaded with
    huggingface_hub's ``snapshot_download``, repo type dataset)."""
    ref = str(root_or_ref)
    if ref.startswith("local-dir:"):
        ref = ref[len("local-dir:"):]
    elif ref.startswith("hf-hub:"):
        target = ref[len("hf-hub:"):]
        repo, _, rev = target.partition("@")
        if repo.count("/") != 1:
            raise ValueError(f"{root_or_ref!r}: expected hf-hub:org/name[@revision]")
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo, repo_type="dataset", revision=rev or None))
    p = Path(ref)
    if not (p / "meta" / "info.json").is_file():
        raise FileNotFoundError(f"{p}: not a LeRobotDataset folder (no meta/info.json)")
    return p


# ---------------------------------------------------------------------------------------------- metadata
@dataclass
class DatasetMeta:
    """What the reader knows about a dataset: ``info`` (info.json), ``features``, ``tasks`` (list, by task_index),
    ``episodes`` (dict of per-episode numpy arrays / lists, one entry per complete episode), ``stats``."""

    root: Path
    info: dict
    tasks: list[str]
    episodes: dict[str, Any]
    stats: dict | None

    @property
    def version(self) -> str:
        """The dataset's ``codebase_version`` (``v3.0`` or ``v2.1``)."""
        return self.info["codebase_version"]

    @property
    def fps(self) -> int:
        """Frames per second of the recording (``info.json``)."""
        return int(self.info["fps"])

    @property
    def features(self) -> dict:
        """The ``features`` mapping of ``info.json``: key -> dtype, shape, names."""
        return self.info["features"]

    @property
    def video_keys(self) -> list[str]:
        """Features stored as videos (decoded from MP4)."""
        return [k for k, f in self.features.items() if f["dtype"] == "video"]

    @property
    def image_keys(self) -> list[str]:
        """Features stored as images embedded in the parquet files."""
        return [k for k, f in self.features.items() if f["dtype"] == "image"]

    @property
    def camera_keys(self) -> list[str]:
        """Every camera feature, video or image."""
        return [k for k, f in self.features.items() if f["dtype"] in CAMERA_DTYPES]

    @property
    def total_episodes(self) -> int:
        """Number of episodes in the dataset."""
        return len(self.episodes["episode_index"])

    @property
    def total_frames(self) -> int:
        """Number of frames over all episodes."""
        return int(np.sum(self.episodes["length"])) if self.total_episodes else 0

    @classmethod
    def load(cls, root: Path) -> "DatasetMeta":
        """Read ``meta/`` of the dataset at ``root`` (v3.0 or v2.1 layout); ``ValueError`` naming a missing key or an
        unsupported version."""
        info_path = root / "meta" / "info.json"
        info = json.loads(info_path.read_text())
        for k in ("codebase_version", "fps", "features"):
            if k not in info:
                raise ValueError(f"{info_path}: missing {k!r}")
        major = info["codebase_version"].lstrip("v").split(".")[0]
        if major == "3":
            return cls._load_v3(root, info)
        if major == "2":
            return cls._load_v2(root, info)
        raise ValueError(f"{info_path}: codebase_version {info['codebase_version']!r} is not supported (v2.x, v3.x)")

    @classmethod
    def _load_v3(cls, root: Path, info: dict) -> "DatasetMeta":
        pq = require("pyarrow.parquet")
        tpath = root / "meta" / "tasks.parquet"
        if not tpath.is_file():
            raise FileNotFoundError(f"{tpath}: missing")
        t = pq.read_table(tpath)
        if "task" not in t.column_names or "task_index" not in t.column_names:
            raise ValueError(f"{tpath}: needs columns task and task_index, has {t.column_names}")
        if not str(t.schema.field("task").type) in ("string", "large_string"):
            raise ValueError(f"{tpath}: column 'task' is {t.schema.field('task').type}, not a string")
        order = np.argsort(np.asarray(t.column("task_index").to_numpy()))
        tasks = [t.column("task").to_pylist()[i] for i in order]
        files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
        if not files:
            raise FileNotFoundError(f"{root / 'meta' / 'episodes'}: no episode metadata (was finalize() called?)")
        tables = []
        for f in files:
            pf = pq.ParquetFile(f)
            cols = [c for c in pf.schema_arrow.names if not c.startswith("stats/")]
            tables.append(pf.read(columns=cols))
        pa = require("pyarrow")
        table = pa.concat_tables(tables, promote_options="default")
        eps = {c: table.column(c).to_pylist() for c in table.column_names}
        n = int(info.get("total_episodes", len(eps["episode_index"])))
        keep = [i for i, e in enumerate(eps["episode_index"]) if e < n]  # rows past info.json: an interrupted write
        eps = {c: [v[i] for i in keep] for c, v in eps.items()}
        if eps["episode_index"] != list(range(len(keep))):
            raise ValueError(f"{root}/meta/episodes: episode_index must be 0..{len(keep) - 1} in order")
        if len(keep) < n:
            raise ValueError(f"{root}/meta/info.json says {n} episodes, meta/episodes holds {len(keep)}")
        for c in ("length", "dataset_from_index", "dataset_to_index"):
            eps[c] = np.asarray(eps[c], dtype=np.int64)
        stats = None
        spath = root / "meta" / "stats.json"
        if spath.is_file():
            stats = stats_from_json(json.loads(spath.read_text()))
        return cls(root, info, tasks, eps, stats)

    @classmethod
    def _load_v2(cls, root: Path, info: dict) -> "DatasetMeta":
        def jsonl(name):
            p = root / "meta" / name
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing")
            return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

        tasks_rows = sorted(jsonl("tasks.jsonl"), key=lambda r: r["task_index"])
        tasks = [r["task"] for r in tasks_rows]
        rows = sorted(jsonl("episodes.jsonl"), key=lambda r: r["episode_index"])
        n = int(info.get("total_episodes", len(rows)))
        rows = [r for r in rows if r["episode_index"] < n]
        if len(rows) < n:
            raise ValueError(f"{root}/meta/info.json says {n} episodes, meta/episodes.jsonl holds {len(rows)}")
        length = np.asarray([r["length"] for r in rows], dtype=np.int64)
        to = np.cumsum(length)
        chunks = int(info.get("chunks_size", 1000))
        eps: dict[str, Any] = {"episode_index": [r["episode_index"] for r in rows],
                               "tasks": [r.get("tasks", []) for r in rows], "length": length,
                               "dataset_from_index": to - length, "dataset_to_index": to}
        eps["_data_path"] = [info["data_path"].format(episode_chunk=e // chunks, episode_index=e)
                             for e in eps["episode_index"]]
        for k in [k for k, f in info["features"].items() if f["dtype"] == "video"]:
            eps[f"_video_path/{k}"] = [info["video_path"].format(episode_chunk=e // chunks, episode_index=e, video_key=k)
                                       for e in eps["episode_index"]]
            eps[f"videos/{k}/from_timestamp"] = [0.0] * len(rows)
        stats = None
        spath = root / "meta" / "stats.json"
        if spath.is_file():
            stats = stats_from_json(json.loads(spath.read_text()))
        elif (root / "meta" / "episodes_stats.jsonl").is_file():
            per_ep = [stats_from_json(r["stats"]) for r in jsonl("episodes_stats.jsonl") if r["episode_index"] < n]
            stats = aggregate_stats(per_ep) if per_ep else None
        return cls(root, info, tasks, eps, stats)

    # -- file paths ----------------------------------------------------------------------------------
    def data_file(self, ep: int) -> str:
        """The parquet file (relative to the root) holding episode ``ep``'s frames."""
        if "_data_path" in self.episodes:
            return self.episodes["_data_path"][ep]
        return self.info["data_path"].format(chunk_index=self.episodes["data/chunk_index"][ep],
                                             file_index=self.episodes["data/file_index"][ep])

    def video_file(self, ep: int, key: str) -> str:
        """The MP4 file (relative to the root) holding camera ``key`` of episode ``ep``."""
        if f"_video_path/{key}" in self.episodes:
            return self.episodes[f"_video_path/{key}"][ep]
        return self.info["video_path"].format(video_key=key, chunk_index=self.episodes[f"videos/{key}/chunk_index"][ep],
                                              file_index=self.episodes[f"videos/{key}/file_index"][ep])


# ---------------------------------------------------------------------------------------------- reader
class LeRobotDataset(torch.utils.data.Dataset):
    """A LeRobotDataset (v3.0 or v2.1) as a torch ``Dataset`` of frames (see the module docstring).

    - ``root_or_ref``: folder, ``local-dir:path`` or ``hf-hub:org/name[@rev]``.
    - ``delta_timestamps``: ``{feature: [seconds, ...]}``; each offset must be a multiple of 1/fps (within
      ``tolerance_s``).
    - ``episodes``: episode indices to keep (``len`` and indices then run over those episodes' frames).
    - ``tolerance_s``: the largest allowed distance between a queried and a decoded video frame (1e-4 s).
    - ``image_transforms``: a callable applied to every camera tensor after decoding.
    - ``decode_video=False``: skip cameras stored as video (statistics, numeric-only loaders).
    - ``cache_files``: data files whose columns stay decoded in memory (per process).
    """

    def __init__(self, root_or_ref, delta_timestamps: Mapping[str, Sequence[float]] | None = None,
                 episodes: Sequence[int] | None = None, tolerance_s: float = 1e-4, image_transforms=None,
                 decode_video: bool = True, cache_files: int = 4):
        require("pyarrow")
        self.root = resolve_root(root_or_ref)
        self.meta = DatasetMeta.load(self.root)
        self.tolerance_s = float(tolerance_s)
        self.image_transforms = image_transforms
        self.decode_video = decode_video
        self.cache_files = max(1, int(cache_files))
        n_ep = self.meta.total_episodes
        if episodes is None:
            self.episodes = list(range(n_ep))
        else:
            self.episodes = [int(e) for e in episodes]
            bad = [e for e in self.episodes if not 0 <= e < n_ep]
            if bad:
                raise ValueError(f"{self.root}: episodes {bad} do not exist (the dataset has {n_ep}: 0..{n_ep - 1})")
        eps = self.meta.episodes
        self._from = eps["dataset_from_index"][self.episodes] if self.episodes else np.zeros(0, np.int64)
        self._to = eps["dataset_to_index"][self.episodes] if self.episodes else np.zeros(0, np.int64)
        lengths = self._to - self._from
        self._cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.delta_timestamps = None
        self.delta_indices: dict[str, list[int]] | None = None
        if delta_timestamps:
            self._set_deltas(delta_timestamps)
        self._file_first: dict[str, int] = {}
        for e in range(n_ep):
            f = self.meta.data_file(e)
            self._file_first[f] = min(self._file_first.get(f, 1 << 62), int(eps["dataset_from_index"][e]))
        for e in self.episodes:
            p = self.root / self.meta.data_file(e)
            if not p.is_file():
                raise FileNotFoundError(f"{p}: data file of episode {e} is missing")
            if decode_video:
                for k in self.meta.video_keys:
                    v = self.root / self.meta.video_file(e, k)
                    if not v.is_file():
                        raise FileNotFoundError(f"{v}: video of {k!r} for episode {e} is missing")
        self._cache: OrderedDict[str, dict] = OrderedDict()

    def _set_deltas(self, delta_timestamps):
        fps = self.meta.fps
        feats = self.meta.features
        out = {}
        for key, ts in delta_timestamps.items():
            if key not in feats:
                raise KeyError(f"delta_timestamps key {key!r} is not a feature of {self.root} ({list(feats)})")
            idx = []
            for t in ts:
                k = round(float(t) * fps)
                if abs(float(t) * fps - k) / fps > self.tolerance_s:
                    raise ValueError(f"delta_timestamps[{key!r}]: {t} s is not a multiple of 1/fps = {1 / fps:.6g} s "
                                     f"(within tolerance_s={self.tolerance_s})")
                idx.append(k)
            out[key] = idx
        self.delta_timestamps = {k: list(v) for k, v in delta_timestamps.items()}
        self.delta_indices = out

    # -- sizes ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._cum[-1])

    @property
    def fps(self) -> int:
        """Frames per second of the recording."""
        return self.meta.fps

    @property
    def features(self) -> dict:
        """The dataset's feature specs (``info.json``)."""
        return self.meta.features

    @property
    def num_episodes(self) -> int:
        """Number of episodes this dataset reads (the selected ones)."""
        return len(self.episodes)

    def __repr__(self) -> str:
        return (f"LeRobotDataset({str(self.root)!r}, {self.meta.version}, {self.num_episodes} episodes, {len(self)} "
                f"frames, fps={self.fps}, cameras={self.meta.camera_keys})")

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_cache"] = OrderedDict()  # decoded columns are per process
        return st

    # -- columns -------------------------------------------------------------------------------------
    def _columns(self, rel: str) -> dict:
        """The numeric columns (numpy, ``[rows, D]``) and the image column tables of one data file (cached)."""
        if rel in self._cache:
            self._cache.move_to_end(rel)
            return self._cache[rel]
        pq = require("pyarrow.parquet")
        path = self.root / rel
        table = pq.read_table(path, memory_map=True)
        cols: dict[str, Any] = {}
        for name, f in self.meta.features.items():
            if f["dtype"] == "video" or f["dtype"] in ("string", "language"):
                continue
            if name not in table.column_names:
                raise KeyError(f"{path}: column {name!r} (declared in meta/info.json) is missing")
            col = table.column(name)
            if f["dtype"] == "image":
                cols[name] = col.combine_chunks()
            else:
                cols[name] = _column_to_numpy(col, f, path, name)
        self._cache[rel] = cols
        while len(self._cache) > self.cache_files:
            self._cache.popitem(last=False)
        return cols

    def iter_columns(self, keys: Sequence[str], batch_rows: int = 65536) -> Iterator[dict[str, np.ndarray]]:
        """Numeric columns ``keys`` of the selected episodes, in blocks of at most ``batch_rows`` rows."""
        require("pyarrow.parquet")  # the data extra, named in the error if it is missing
        for e in self.episodes:
            rel = self.meta.data_file(e)
            first = self._file_first[rel]
            a = int(self.meta.episodes["dataset_from_index"][e]) - first
            b = int(self.meta.episodes["dataset_to_index"][e]) - first
            cols = self._columns(rel)
            for s in range(a, b, batch_rows):
                yield {k: cols[k][s:min(b, s + batch_rows)] for k in keys}

    # -- items ---------------------------------------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int]:
        """``(episode index, global frame index)`` of item ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} frames")
        i = i % n
        k = int(np.searchsorted(self._cum, i, side="right") - 1)
        return self.episodes[k], int(self._from[k] + (i - self._cum[k]))

    def __getitem__(self, i: int) -> dict:
        ep, g = self.locate(int(i))
        eps = self.meta.episodes
        a, b = int(eps["dataset_from_index"][ep]), int(eps["dataset_to_index"][ep])
        rel = self.meta.data_file(ep)
        first = self._file_first[rel]
        cols = self._columns(rel)
        row = g - first
        deltas = self.delta_indices or {}
        pads = {}
        rows_of = {}
        for key, d in deltas.items():
            q = np.asarray([g + k for k in d])
            rows_of[key] = np.clip(q, a, b - 1) - first
            pads[f"{key}_is_pad"] = torch.from_numpy((q < a) | (q >= b))
        item: dict[str, Any] = {}
        feats = self.meta.features
        if self.decode_video:
            ts = cols["timestamp"]
            for key in self.meta.video_keys:
                r = rows_of.get(key, np.asarray([row]))
                start = float(eps[f"videos/{key}/from_timestamp"][ep])
                query = [start + float(ts[j]) for j in r]
                frames = decode_frames(self.root / self.meta.video_file(ep, key), query, self.tolerance_s)
                item[key] = frames if key in rows_of else frames[0]
        for name, f in feats.items():
            if f["dtype"] in ("video", "string", "language"):
                continue
            r = rows_of.get(name)
            if f["dtype"] == "image":
                imgs = [_decode_png(cols[name][int(j)]) for j in (r if r is not None else [row])]
                item[name] = torch.stack(imgs) if r is not None else imgs[0]
            else:
                v = cols[name][r if r is not None else row]
                t = torch.from_numpy(np.array(v))
                if r is None and tuple(f["shape"]) == (1,):
                    t = t.reshape(())
                item[name] = t
        item.update(pads)
        if self.image_transforms is not None:
            for key in self.meta.camera_keys:
                if key in item:
                    item[key] = self.image_transforms(item[key])
        ti = int(cols["task_index"][row])
        if not 0 <= ti < len(self.meta.tasks):
            raise ValueError(f"{self.root / rel}: row {row} has task_index {ti}, meta has {len(self.meta.tasks)} tasks")
        item["task"] = self.meta.tasks[ti]
        return item

    # -- writer ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root, fps: int, features: Mapping[str, dict], robot_type: str | None = None,
               use_videos: bool = True, codebase_version: str = "v3.0", **kwargs) -> "LeRobotDatasetWriter":
        """A new dataset at ``root`` (must not exist): returns a :class:`LeRobotDatasetWriter`
        (``add_frame`` / ``save_episode`` / ``finalize``). See :class:`LeRobotDatasetWriter` for the options."""
        return LeRobotDatasetWriter(root, fps, features, robot_type=robot_type, use_videos=use_videos,
                                    codebase_version=codebase_version, **kwargs)


def _column_to_numpy(col, feature: dict, path, name) -> np.ndarray:
    pa = require("pyarrow")
    arr = col.combine_chunks()
    shape = tuple(feature["shape"])
    dtype = np.dtype(feature["dtype"])
    if pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type) or pa.types.is_large_list(arr.type):
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        out = flat.reshape(len(arr), -1)
    else:
        out = arr.to_numpy(zero_copy_only=False)
    if shape != (1,) and out.shape[1:] != (int(np.prod(shape)),):
        raise ValueError(f"{path}: column {name!r} has shape {out.shape[1:]}, info.json declares {shape}")
    out = out.astype(dtype, copy=False)
    return out.reshape((len(arr),) + shape) if shape != (1,) else out.reshape(len(arr))


def _decode_png(struct_value) -> torch.Tensor:
    require("PIL")
    from PIL import Image as PILImage
    d = struct_value.as_py() if hasattr(struct_value, "as_py") else struct_value
    data = d["bytes"] if isinstance(d, dict) else d
    if data is None:
        raise ValueError(f"image without embedded bytes (path {d.get('path') if isinstance(d, dict) else None})")
    img = np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float().div_(255.0)


# ---------------------------------------------------------------------------------------------- sampler
class ShuffleSampler(torch.utils.data.Sampler):
    """Deterministic shuffling that a resumed run continues exactly.

    Epoch ``e`` visits ``randperm(n, generator=seed + e)``; :meth:`state_dict` / :meth:`load_state_dict` carry
    ``(epoch, position)``. ``position`` counts the indices handed out in this epoch; with a ``DataLoader``
    that prefetches, save the number of samples the trainer has *consumed* instead
    (``sampler.state_dict(consumed=steps * batch_size)``). Each ``__iter__`` continues from ``position`` and,
    at its end, moves to the next epoch.
    """

    def __init__(self, data_source_or_len, seed: int = 0, shuffle: bool = True):
        self.n = data_source_or_len if isinstance(data_source_or_len, int) else len(data_source_or_len)
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.position = 0, 0

    def order(self, epoch: int) -> torch.Tensor:
        """The visiting order of ``epoch``: ``randperm(n)`` seeded by ``seed + epoch`` (identity without shuffling)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + int(epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        perm = self.order(self.epoch)
        while self.position < self.n:
            i = int(perm[self.position])
            self.position += 1
            yield i
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.n - self.position

    def state_dict(self, consumed: int | None = None) -> dict:
        """``{seed, epoch, position, n}`` to resume from; ``consumed`` (samples the trainer has used) replaces the
        position handed out so far."""
        pos = self.position if consumed is None else int(consumed)
        epoch = self.epoch
        if pos >= self.n:
            epoch, pos = epoch + pos // self.n, pos % self.n
        return {"seed": self.seed, "epoch": epoch, "position": pos, "n": self.n}

    def load_state_dict(self, state: Mapping):
        """Resume from a :meth:`state_dict` (``ValueError`` if it was saved for another dataset size)."""
        if int(state.get("n", self.n)) != self.n:
            raise ValueError(f"sampler state is for {state['n']} samples, this dataset has {self.n}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------- writer
def _arrow_type(name: str, f: dict):
    pa = require("pyarrow")
    if f["dtype"] == "image":
        return pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    shape = tuple(f["shape"])
    base = pa.from_numpy_dtype(np.dtype(f["dtype"]))
    if shape == (1,):
        return base
    if len(shape) == 1:
        return pa.list_(base, shape[0])
    raise ValueError(f"feature {name!r}: shape {shape} — only scalars and 1-D vectors are supported")


def _hf_feature(f: dict) -> dict:
    if f["dtype"] == "image":
        return {"_type": "Image"}
    shape = tuple(f["shape"])
    if shape == (1,):
        return {"dtype": f["dtype"], "_type": "Value"}
    return {"feature": {"dtype": f["dtype"], "_type": "Value"}, "length": shape[0], "_type": "List"}


class LeRobotDatasetWriter:
    """Writes a LeRobotDataset the way lerobot 0.6.1 lays it out (v3.0) or lerobot 0.3.3 (v2.1).

    - ``features``: ``{name: {"dtype", "shape", "names"}}``; ``dtype`` a numpy dtype, ``"image"`` (PNG in the
      parquet) or ``"video"`` (mp4; ``use_videos=False`` stores them as images). The five default features
      (timestamp, frame_index, episode_index, index, task_index) are added.
    - ``vcodec``: ``libsvtav1`` (lerobot's default; ``libx264`` is used where this FFmpeg has no SVT-AV1).
    - v3.0 only: ``chunks_size`` (files per chunk folder), ``data_files_size_in_mb`` /
      ``video_files_size_in_mb`` (roll over to a new file past these).
    """

    def __init__(self, root, fps: int, features: Mapping[str, dict], robot_type: str | None = None,
                 use_videos: bool = True, codebase_version: str = "v3.0", chunks_size: int = 1000,
                 data_files_size_in_mb: float = 100, video_files_size_in_mb: float = 200, vcodec: str = "libsvtav1"):
        require("pyarrow")
        self.root = Path(root)
        if self.root.exists():
            raise FileExistsError(f"{self.root}: already exists (create() writes a new dataset)")
        if codebase_version not in ("v3.0", "v2.1"):
            raise ValueError(f"codebase_version must be 'v3.0' or 'v2.1', got {codebase_version!r}")
        if int(fps) <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.version = codebase_version
        self.fps = int(fps)
        feats: dict[str, dict] = {}
        for name, f in features.items():
            if name in DEFAULT_FEATURES or name == "task":
                raise ValueError(f"feature {name!r} is filled in automatically; do not declare it")
            if "/" in name:
                raise ValueError(f"feature name {name!r} may not contain '/'")
            if "dtype" not in f or "shape" not in f:
                raise ValueError(f"feature {name!r} needs 'dtype' and 'shape'")
            f = {"dtype": f["dtype"], "shape": list(f["shape"]), "names": f.get("names")}
            if f["dtype"] == "video" and not use_videos:
                f["dtype"] = "image"
            if f["dtype"] in CAMERA_DTYPES:
                if len(f["shape"]) != 3 or 3 not in (f["shape"][0], f["shape"][-1]):
                    raise ValueError(f"camera {name!r}: shape must be (H, W, 3) or (3, H, W), got {f['shape']}")
                f["info"] = {"is_depth_map": False} if f["dtype"] == "image" and self.version == "v3.0" else None
                if f["info"] is None:
                    del f["info"]
            else:
                _arrow_type(name, f)  # validates dtype and shape
            feats[name] = f
        feats.update({k: dict(v) for k, v in DEFAULT_FEATURES.items()})
        self.features = feats
        self.robot_type = robot_type
        self.chunks_size = int(chunks_size)
        self.data_mb = data_files_size_in_mb
        self.video_mb = video_files_size_in_mb
        self.vcodec = pick_codec(vcodec) if any(f["dtype"] == "video" for f in feats.values()) else vcodec
        self.tasks: list[str] = []
        self.episodes: list[dict] = []  # metadata rows (v3: with stats/* columns)
        self.episode_stats: list[dict] = []
        self.total_frames = 0
        self.buffer: list[dict] = []
        self.finalized = False
        self.root.mkdir(parents=True)
        (self.root / "meta").mkdir()
        self._staging = self.root / ".staging"
        self._staging.mkdir()
        self._data_pos = (0, 0)
        self._video_pos = {k: (0, 0) for k in self.video_keys}
        self._write_info()

    @property
    def user_keys(self) -> list[str]:
        """The features given by the user (the default index/timestamp features excluded)."""
        return [k for k in self.features if k not in DEFAULT_FEATURES]

    @property
    def video_keys(self) -> list[str]:
        """Features written as videos."""
        return [k for k, f in self.features.items() if f["dtype"] == "video"]

    # -- frames ----------------------------------------------------------------------------------------
    def add_frame(self, frame: Mapping[str, Any]):
        """Buffer one frame: every declared feature plus ``"task"`` (str). Images HWC or CHW, uint8 or float
        in [0, 1] (×255, truncated, as lerobot); tensors become numpy. Values are checked against the features."""
        if self.finalized:
            raise RuntimeError(f"{self.root}: finalize() was called; the dataset is closed")
        auto = [k for k in frame if k in DEFAULT_FEATURES]
        if auto:
            raise ValueError(f"add_frame: {auto} are filled in automatically; leave them out")
        missing = [k for k in self.user_keys + ["task"] if k not in frame]
        extra = [k for k in frame if k not in self.features and k != "task"]
        if missing or extra:
            raise ValueError(f"add_frame: missing features {missing}, unknown features {extra}")
        if not isinstance(frame["task"], str):
            raise TypeError(f"add_frame: 'task' must be a str, got {type(frame['task']).__name__}")
        out = {"task": frame["task"]}
        for k in self.user_keys:
            f = self.features[k]
            v = frame[k]
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            v = np.asarray(v)
            if f["dtype"] in CAMERA_DTYPES:
                out[k] = _to_uint8_hwc(v, k, f["shape"])
            else:
                shape = tuple(f["shape"])
                if v.shape != shape and not (shape == (1,) and v.shape == ()):
                    raise ValueError(f"add_frame: {k!r} has shape {v.shape}, the feature declares {shape}")
                if not np.can_cast(v.dtype, np.dtype(f["dtype"]), casting="same_kind"):
                    raise TypeError(f"add_frame: {k!r} is {v.dtype}, the feature declares {f['dtype']}")
                out[k] = v.astype(f["dtype"]).reshape(shape)
        self.buffer.append(out)

    # -- episodes --------------------------------------------------------------------------------------
    def save_episode(self):
        """Write the buffered frames as the next episode (atomically; see the module docstring)."""
        if not self.buffer:
            raise ValueError(f"{self.root}: save_episode() with no frames (call add_frame first)")
        pa = require("pyarrow")
        ep = len(self.episodes)
        n = len(self.buffer)
        frames, self.buffer = self.buffer, []
        tasks_here = []
        task_index = []
        for fr in frames:
            if fr["task"] not in self.tasks:
                self.tasks.append(fr["task"])
            if fr["task"] not in tasks_here:
                tasks_here.append(fr["task"])
            task_index.append(self.tasks.index(fr["task"]))
        frame_index = np.arange(n, dtype=np.int64)
        cols: dict[str, Any] = {}
        stat_cols: dict[str, Any] = {}
        for k in self.user_keys:
            f = self.features[k]
            if f["dtype"] in CAMERA_DTYPES:
                stat_cols[k] = [fr[k] for fr in frames]
                if f["dtype"] == "image":
                    cols[k] = [{"bytes": _png_bytes(fr[k]), "path": f"frame-{j:06d}.png"} for j, fr in enumerate(frames)]
            else:
                cols[k] = np.stack([fr[k] for fr in frames])
                stat_cols[k] = cols[k].reshape(n, -1)
        cols["timestamp"] = (frame_index / self.fps).astype(np.float32)
        cols["frame_index"] = frame_index
        cols["episode_index"] = np.full(n, ep, dtype=np.int64)
        cols["index"] = self.total_frames + frame_index
        cols["task_index"] = np.asarray(task_index, dtype=np.int64)
        for k in DEFAULT_FEATURES:
            stat_cols[k] = cols[k]
        stat_cols["timestamp"] = frame_index / self.fps  # float64, as lerobot
        st = episode_stats(stat_cols, self.features)
        if self.version == "v2.1":  # 0.3.3 stats: no quantiles; cameras float64 (3,1,1)
            st = {k: {s: v for s, v in d.items() if not s.startswith("q")} for k, d in st.items()}
        arrays, fields = [], []
        for k, f in self.features.items():
            if f["dtype"] == "video":
                continue
            typ = _arrow_type(k, f)
            v = cols[k]
            if f["dtype"] != "image" and tuple(f["shape"]) != (1,):
                arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v).reshape(-1)), f["shape"][0])
            else:
                arr = pa.array(v if f["dtype"] == "image" else np.asarray(v).reshape(n), type=typ)
            arrays.append(arr)
            fields.append(pa.field(k, typ))
        meta = {"huggingface": json.dumps({"info": {"features": {k: _hf_feature(f) for k, f in self.features.items()
                                                                 if f["dtype"] != "video"}}})}
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))
        row: dict[str, Any] = {"episode_index": ep, "tasks": tasks_here, "length": n}
        if self.version == "v3.0":
            self._write_v3(ep, n, table, frames, row, st)
        else:
            self._write_v2(ep, n, table, frames, row, st)
        self.total_frames += n
        self.episode_stats.append(st)
        self._write_info()  # the commit point

    def _next_pos(self, pos):
        chunk, file = pos
        return (chunk + 1, 0) if file >= self.chunks_size - 1 else (chunk, file + 1)

    def _write_v3(self, ep, n, table, frames, row, st):
        pq = require("pyarrow.parquet")
        # data file: append this episode as a new row group, or roll over
        path = self.root / V30_DATA_PATH.format(chunk_index=self._data_pos[0], file_index=self._data_pos[1])
        old = None
        if path.exists():
            size = path.stat().st_size
            rows = pq.ParquetFile(path).metadata.num_rows
            if size + size / max(rows, 1) * n >= self.data_mb * 1024 * 1024:
                self._data_pos = self._next_pos(self._data_pos)
                path = self.root / V30_DATA_PATH.format(chunk_index=self._data_pos[0], file_index=self._data_pos[1])
            else:
                old = path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with pq.ParquetWriter(tmp, table.schema, compression="snappy") as w:
            if old is not None:
                pf = pq.ParquetFile(old)
                for rg in range(pf.num_row_groups):
                    w.write_table(pf.read_row_group(rg))
            w.write_table(table, row_group_size=max(n, 1))
        video_cols = {}
        for k in self.video_keys:
            video_cols.update(self._append_video(k, [fr[k] for fr in frames]))
        os.replace(tmp, path)
        row["data/chunk_index"], row["data/file_index"] = self._data_pos
        row["dataset_from_index"] = self.total_frames
        row["dataset_to_index"] = self.total_frames + n
        row.update(video_cols)
        for k, d in st.items():
            for s, v in d.items():
                row[f"stats/{k}/{s}"] = np.asarray(v).tolist()
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        self.episodes.append(row)
        self._write_episodes_v3()
        self._write_tasks_v3()
        _atomic_write_json(self.root / "meta" / "stats.json", stats_to_json(aggregate_stats(self.episode_stats + [st])))

    def _append_video(self, key: str, frames: list[np.ndarray]) -> dict:
        part = self._staging / f"{key}-episode.mp4"
        enc = encode_video(frames, part, self.fps, self.vcodec)
        self._video_enc = enc
        dur = video_info(part)["duration"]
        pos = self._video_pos[key]
        path = self.root / V30_VIDEO_PATH.format(video_key=key, chunk_index=pos[0], file_index=pos[1])
        start = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        if path.exists():
            if path.stat().st_size + part.stat().st_size >= self.video_mb * 1024 * 1024:
                pos = self._video_pos[key] = self._next_pos(pos)
                path = self.root / V30_VIDEO_PATH.format(video_key=key, chunk_index=pos[0], file_index=pos[1])
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                shutil.copyfile(part, tmp)
            else:
                start = concat_videos([path, part], tmp)[1]
        else:
            shutil.copyfile(part, tmp)
        os.replace(tmp, path)
        part.unlink()
        self._video_probe = self._video_probe if hasattr(self, "_video_probe") else {}
        self._video_probe.setdefault(key, video_info(path) | enc)
        return {f"videos/{key}/chunk_index": pos[0], f"videos/{key}/file_index": pos[1],
                f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": start + dur}

    def _write_episodes_v3(self):
        pa = require("pyarrow")
        pq = require("pyarrow.parquet")
        cols = list(self.episodes[0])
        data = {c: [r.get(c) for r in self.episodes] for c in cols}
        table = pa.Table.from_pydict(data)
        path = self.root / V30_EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def _write_tasks_v3(self):
        pa = require("pyarrow")
        pq = require("pyarrow.parquet")
        # pandas metadata with the task string as the index: lerobot resolves ds[i]["task"] through it
        pandas_meta = {"index_columns": ["task"], "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": {"encoding": "UTF-8"}}],
            "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                         "numpy_type": "int64", "metadata": None},
                        {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                         "metadata": None}],
            "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.3.3"}
        schema = pa.schema([("task_index", pa.int64()), ("task", pa.string())],
                           metadata={"pandas": json.dumps(pandas_meta)})
        table = pa.table({"task_index": np.arange(len(self.tasks), dtype=np.int64), "task": self.tasks}, schema=schema)
        path = self.root / "meta" / "tasks.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def _write_v2(self, ep, n, table, frames, row, st):
        pq = require("pyarrow.parquet")
        chunk = ep // self.chunks_size
        path = self.root / V21_DATA_PATH.format(episode_chunk=chunk, episode_index=ep)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp, compression="snappy")
        for k in self.video_keys:
            vpath = self.root / V21_VIDEO_PATH.format(episode_chunk=chunk, video_key=k, episode_index=ep)
            vpath.parent.mkdir(parents=True, exist_ok=True)
            vtmp = vpath.with_name(f".{vpath.name}.tmp.mp4")
            enc = encode_video([fr[k] for fr in frames], vtmp, self.fps, self.vcodec)
            os.replace(vtmp, vpath)
            self._video_probe = getattr(self, "_video_probe", {})
            self._video_probe.setdefault(k, video_info(vpath) | enc)
        os.replace(tmp, path)
        self.episodes.append(row)
        meta = self.root / "meta"
        _atomic_write_bytes(meta / "episodes.jsonl", "".join(json.dumps(r) + "\n" for r in self.episodes).encode())
        _atomic_write_bytes(meta / "tasks.jsonl", "".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                          for i, t in enumerate(self.tasks)).encode())
        lines = [json.dumps({"episode_index": i, "stats": stats_to_json(s)})
                 for i, s in enumerate(self.episode_stats + [st])]
        _atomic_write_bytes(meta / "episodes_stats.jsonl", ("\n".join(lines) + "\n").encode())

    # -- info.json -------------------------------------------------------------------------------------
    def _features_for_info(self) -> dict:
        feats = {}
        probe = getattr(self, "_video_probe", {})
        for k, f in self.features.items():
            f = dict(f)
            if f["dtype"] == "video" and k in probe:
                p = probe[k]
                info = {"video.height": p["height"], "video.width": p["width"], "video.codec": p["codec"],
                        "video.pix_fmt": p["pix_fmt"]}
                if self.version == "v2.1":
                    info.update({"video.is_depth_map": False, "video.fps": self.fps, "video.channels": 3,
                                 "has_audio": False})
                else:
                    info = {"is_depth_map": False, **info, "video.fps": self.fps, "video.channels": 3,
                            "has_audio": False, "video.g": ENCODER_DEFAULTS["g"], "video.crf": ENCODER_DEFAULTS["crf"],
                            "video.preset": ENCODER_DEFAULTS["preset"],
                            "video.fast_decode": ENCODER_DEFAULTS["fast_decode"], "video.video_backend": "pyav",
                            "video.extra_options": {}}
                f["info"] = info
            feats[k] = f
        return feats

    def _write_info(self):
        n_ep = len(self.episodes)
        has_video = bool(self.video_keys)
        if self.version == "v3.0":
            info = {"codebase_version": "v3.0", "fps": self.fps, "features": self._features_for_info(),
                    "total_episodes": n_ep, "total_frames": self.total_frames, "total_tasks": len(self.tasks),
                    "chunks_size": self.chunks_size, "data_files_size_in_mb": self.data_mb,
                    "video_files_size_in_mb": self.video_mb, "data_path": V30_DATA_PATH,
                    "video_path": V30_VIDEO_PATH if has_video else None, "robot_type": self.robot_type,
                    "splits": {"train": f"0:{n_ep}"}}
        else:
            info = {"codebase_version": "v2.1", "robot_type": self.robot_type, "total_episodes": n_ep,
                    "total_frames": self.total_frames, "total_tasks": len(self.tasks),
                    "total_videos": n_ep * len(self.video_keys),
                    "total_chunks": (n_ep - 1) // self.chunks_size + 1 if n_ep else 0,
                    "chunks_size": self.chunks_size, "fps": self.fps, "splits": {"train": f"0:{n_ep}"},
                    "data_path": V21_DATA_PATH, "video_path": V21_VIDEO_PATH if has_video else None,
                    "features": self._features_for_info()}
        _atomic_write_json(self.root / "meta" / "info.json", info)

    def finalize(self):
        """Close the dataset: unsaved frames are an error; staging files are removed. Idempotent."""
        if self.buffer:
            raise RuntimeError(f"{self.root}: {len(self.buffer)} frames were added but not saved (call save_episode)")
        if self._staging.exists():
            shutil.rmtree(self._staging)
        self.finalized = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.finalize()
        elif self._staging.exists():
            shutil.rmtree(self._staging)


def _to_uint8_hwc(v: np.ndarray, key: str, shape) -> np.ndarray:
    if v.ndim != 3:
        raise ValueError(f"add_frame: camera {key!r} must be 3-D (H, W, 3) or (3, H, W), got {v.shape}")
    if v.shape[0] == 3 and v.shape[-1] != 3:
        v = np.transpose(v, (1, 2, 0))
    hw = tuple(shape[:2]) if shape[-1] == 3 else tuple(shape[1:])
    if v.shape != hw + (3,):
        raise ValueError(f"add_frame: camera {key!r} is {v.shape}, the feature declares {tuple(shape)}")
    if v.dtype == np.uint8:
        return np.ascontiguousarray(v)
    if np.issubdtype(v.dtype, np.floating):
        if v.min() < 0 or v.max() > 1:
            raise ValueError(f"add_frame: float camera {key!r} must be in [0, 1], got [{v.min()}, {v.max()}]")
        return (v * 255).astype(np.uint8)
    raise TypeError(f"add_frame: camera {key!r} must be uint8 or float in [0, 1], got {v.dtype}")


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image as PILImage
    buf = io.BytesIO()
    PILImage.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
