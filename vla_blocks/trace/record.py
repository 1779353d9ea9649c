"""Trace records: plain data for one policy call (:class:`Trace`) and for a rollout (:class:`EpisodeTrace`).

A :class:`Trace` holds what one model computed for one sample at inference: scalar ``meta`` (JSON values),
``text`` (reasoning, prompt), ``arrays`` (numpy: action chunks, denoising trajectories, attention weights),
``images`` (uint8 ``[H, W, 3]``: camera inputs, the imagined subgoal) and per-stage ``timings`` in seconds.

On disk a trace is a folder::

    trace.json          {"kind": "trace", "schema": 1, "model", "meta", "text", "timings",
                         "arrays": {name: "arrays/<name>.npy"}, "images": {name: "images/<name>.png"}}
    arrays/<name>.npy   exact dtype and shape (numpy's own format)
    images/<name>.png   lossless 8-bit RGB

An episode folder holds ``episode.json`` (meta, success, per-step action / reward / success / info and the
relative paths of its frames and policy traces), ``steps/<i>/<camera>.png`` and ``steps/<i>/policy/``
(a trace folder). :class:`TraceRecorder` is the container the evaluation loop fills step by step.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Trace", "StepRecord", "EpisodeTrace", "TraceRecorder", "load", "as_image", "as_array", "SCHEMA"]

SCHEMA = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------- conversions
def as_array(x) -> np.ndarray:
    """A torch tensor / array-like → numpy (bf16/fp16 tensors become float32; detached, on the CPU)."""
    if hasattr(x, "detach"):
        import torch
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def as_image(x, signed: bool = False) -> np.ndarray:
    """An image as uint8 ``[H, W, 3]``: from uint8 HWC / CHW, or float CHW / HWC in [0, 1]
    (``signed=True``: in [−1, 1], the pi0 convention). Grey ``[H, W]`` is repeated to RGB."""
    a = as_array(x)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3:
        raise ValueError(f"an image must be [H, W, 3], [3, H, W] or [H, W], got shape {a.shape}")
    if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[-1] != 3:
        raise ValueError(f"an image needs 1 or 3 channels, got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    a = a.astype(np.float64)
    if signed:
        a = (a + 1.0) / 2.0
    return np.ascontiguousarray(np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8))


def _check_name(name: str, what: str):
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} name {name!r} must match {_NAME.pattern} (it becomes a file name)")


def _json_value(v: Any, path: str):
    """Validate that ``v`` is plain JSON (finite floats) and return it; errors name the key path."""
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{path}: {v} is not a finite number (JSON cannot hold it)")
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return _json_value(float(v), path)
    if isinstance(v, (list, tuple)):
        return [_json_value(x, f"{path}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: key {k!r} is not a string")
            out[k] = _json_value(x, f"{path}.{k}")
        return out
    raise ValueError(f"{path}: {type(v).__name__} is not JSON-serialisable (use arrays/images for tensors)")


def png_bytes(img: np.ndarray) -> bytes:
    """PNG-encoded bytes of an image (any layout :func:`as_image` reads)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(as_image(img), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: Path) -> np.ndarray:
    """An RGB image file as uint8 ``[H, W, 3]``."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _read_json(path: Path, kind: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a {kind} folder)")
    d = json.loads(path.read_text())
    if d.get("kind") != kind:
        raise ValueError(f"{path}: kind is {d.get('kind')!r}, expected {kind!r}")
    if d.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {d.get('schema')!r} is not supported (this version reads {SCHEMA})")
    return d


# ---------------------------------------------------------------------------------------------- one policy call
@dataclass
class Trace:
    """What one policy call computed for one sample (see the module docstring).

    ``model``: ``pi0``, ``pi05``, ``acot`` or ``halo`` (the viewer picks its panels from it and from which
    arrays are present). Build with :func:`vla_blocks.trace.recording` (pi0 / pi0.5 / ACoT) or
    :func:`vla_blocks.trace.from_halo`.
    """

    model: str
    meta: dict[str, Any] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.arrays = {k: as_array(v) for k, v in self.arrays.items()}
        self.images = {k: as_image(v) for k, v in self.images.items()}
        for k in self.arrays:
            _check_name(k, "array")
        for k in self.images:
            _check_name(k, "image")
        for k, v in self.text.items():
            if not isinstance(v, str):
                raise ValueError(f"text.{k}: expected a string, got {type(v).__name__}")
        self.timings = {k: float(v) for k, v in self.timings.items()}

    # -- plain data --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable: arrays as ``{"dtype", "shape", "data"}`` (nested lists), images as uint8 lists."""
        return {
            "kind": "trace", "schema": SCHEMA, "model": self.model,
            "meta": _json_value(self.meta, "meta"),
            "text": dict(self.text),
            "timings": _json_value(self.timings, "timings"),
            "arrays": {k: {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tolist()}
                       for k, a in self.arrays.items()},
            "images": {k: {"dtype": "uint8", "shape": list(a.shape), "data": a.tolist()} for k, a in self.images.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        """The inverse of :meth:`to_dict` (arrays and images inline); ``ValueError`` when it is not a trace."""
        if d.get("kind") != "trace":
            raise ValueError(f"not a trace dict (kind={d.get('kind')!r})")
        arrays = {k: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["shape"]) for k, v in d["arrays"].items()}
        images = {k: np.asarray(v["data"], dtype=np.uint8).reshape(v["shape"]) for k, v in d["images"].items()}
        return cls(d["model"], dict(d["meta"]), dict(d["text"]), arrays, images, dict(d["timings"]))

    # -- files -------------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write ``trace.json``, ``arrays/*.npy`` and ``images/*.png`` into ``directory`` (created)."""
        root = Path(directory)
        (root / "arrays").mkdir(parents=True, exist_ok=True)
        (root / "images").mkdir(parents=True, exist_ok=True)
        doc = {"kind": "trace", "schema": SCHEMA, "model": self.model, "meta": _json_value(self.meta, "meta"),
               "text": dict(self.text), "timings": _json_value(self.timings, "timings"), "arrays": {}, "images": {}}
        for k, a in self.arrays.items():
            rel = f"arrays/{k}.npy"
            np.save(root / rel, a, allow_pickle=False)
            doc["arrays"][k] = rel
        for k, img in self.images.items():
            rel = f"images/{k}.png"
            (root / rel).write_bytes(png_bytes(img))
            doc["images"][k] = rel
        (root / "trace.json").write_text(json.dumps(doc, indent=1))
        return root

    @classmethod
    def load(cls, directory) -> "Trace":
        """Read a trace folder written by :meth:`save` (``trace.json`` + ``.npy`` arrays + PNG images)."""
        root = Path(directory)
        d = _read_json(root / "trace.json", "trace")
        arrays = {k: np.load(root / rel, allow_pickle=False) for k, rel in d["arrays"].items()}
        images = {k: read_png(root / rel) for k, rel in d["images"].items()}
        return cls(d["model"], d["meta"], d["text"], arrays, images, d["timings"])


# ---------------------------------------------------------------------------------------------- rollouts
@dataclass
class StepRecord:
    """One environment step: camera ``frames`` (name → uint8 ``[H, W, 3]``), the ``action`` executed, the
    ``policy`` trace when the policy was called at this step, the simulator's ``reward`` / ``success``."""

    index: int
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    action: np.ndarray | None = None
    policy: Trace | None = None
    reward: float | None = None
    success: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.frames = {k: as_image(v) for k, v in self.frames.items()}
        for k in self.frames:
            _check_name(k, "camera")
        if self.action is not None:
            self.action = as_array(self.action)
        if self.reward is not None:
            self.reward = float(self.reward)
        if self.success is not None:
            self.success = bool(self.success)

    def to_dict(self) -> dict:
        """Plain data of this step (frames, action, policy trace inline)."""
        return {"index": self.index,
                "frames": {k: {"dtype": "uint8", "shape": list(a.shape), "data": a.tolist()}
                           for k, a in self.frames.items()},
                "action": None if self.action is None else self.action.tolist(),
                "policy": None if self.policy is None else self.policy.to_dict(),
                "reward": self.reward, "success": self.success,
                "info": _json_value(self.info, f"steps[{self.index}].info")}


@dataclass
class EpisodeTrace:
    """A rollout: ``meta`` (task, environment, seed, …), the steps in order, and the episode's success."""

    meta: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    success: bool | None = None

    def to_dict(self) -> dict:
        """Plain data of the episode (every step inline)."""
        return {"kind": "episode", "schema": SCHEMA, "meta": _json_value(self.meta, "meta"), "success": self.success,
                "steps": [s.to_dict() for s in self.steps]}

    def save(self, directory) -> Path:
        """Write ``episode.json``, per-step frames (PNG) and policy traces (trace folders)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        steps = []
        for s in self.steps:
            rel = Path("steps") / f"{s.index:06d}"
            (root / rel).mkdir(parents=True, exist_ok=True)
            frames = {}
            for cam, img in s.frames.items():
                (root / rel / f"{cam}.png").write_bytes(png_bytes(img))
                frames[cam] = str(rel / f"{cam}.png")
            policy = None
            if s.policy is not None:
                s.policy.save(root / rel / "policy")
                policy = str(rel / "policy")
            steps.append({"index": s.index, "frames": frames,
                          "action": None if s.action is None else s.action.tolist(),
                          "action_dtype": None if s.action is None else str(s.action.dtype),
                          "policy": policy, "reward": s.reward, "success": s.success,
                          "info": _json_value(s.info, f"steps[{s.index}].info")})
        doc = {"kind": "episode", "schema": SCHEMA, "meta": _json_value(self.meta, "meta"), "success": self.success,
               "steps": steps}
        (root / "episode.json").write_text(json.dumps(doc, indent=1))
        return root

    @classmethod
    def load(cls, directory) -> "EpisodeTrace":
        """Read an episode folder written by :meth:`save` (``episode.json``, frames as PNG, one trace folder per step
        with a policy trace)."""
        root = Path(directory)
        d = _read_json(root / "episode.json", "episode")
        steps = []
        for s in d["steps"]:
            action = None if s["action"] is None else np.asarray(s["action"], dtype=s["action_dtype"])
            steps.append(StepRecord(s["index"], {k: read_png(root / p) for k, p in s["frames"].items()}, action,
                                    None if s["policy"] is None else Trace.load(root / s["policy"]),
                                    s["reward"], s["success"], s["info"]))
        return cls(d["meta"], steps, d["success"])


def load(directory) -> Trace | EpisodeTrace:
    """Read a trace folder or an episode folder (whichever ``trace.json`` / ``episode.json`` it holds)."""
    root = Path(directory)
    if (root / "episode.json").is_file():
        return EpisodeTrace.load(root)
    if (root / "trace.json").is_file():
        return Trace.load(root)
    episodes = sorted(p.name for p in root.glob("episode_*") if (p / "episode.json").is_file()) if root.is_dir() else []
    if episodes:
        raise ValueError(f"{root} holds {len(episodes)} episodes; give one of them, e.g. {root / episodes[0]}")
    raise FileNotFoundError(f"{root}: neither trace.json nor episode.json found")


class TraceRecorder:
    """The rollout container the evaluation loop fills: ``mode`` ``"all"`` keeps every episode,
    ``"failures"`` only unsuccessful ones, ``"none"`` records nothing (``active`` is False, so callers can
    skip building frames and policy traces at all).

    Example::

        rec = TraceRecorder("runs/eval/traces", mode="failures")
        rec.start_episode(task="reach-v3", seed=0)
        for i in range(n):
            rec.record_step(frames={"corner": frame}, action=a, policy=trace_or_None, reward=r, success=s)
        saved = rec.end_episode(success)   # the episode folder, or None when not kept
    """

    MODES = ("none", "failures", "all")

    def __init__(self, directory, mode: str = "failures"):
        if mode not in self.MODES:
            raise ValueError(f"trace mode {mode!r} is not one of {list(self.MODES)}")
        self.directory = Path(directory)
        self.mode = mode
        self.episode: EpisodeTrace | None = None
        self.saved: list[Path] = []
        self._count = 0

    @property
    def active(self) -> bool:
        """Whether this recorder keeps anything (``mode`` is not ``none``)."""
        return self.mode != "none"

    def start_episode(self, **meta):
        """Open a new episode with scalar ``meta`` (task, seed, ...); an error if one is still open."""
        if self.episode is not None:
            raise RuntimeError("start_episode called while an episode is open (call end_episode first)")
        self.episode = EpisodeTrace(meta=meta) if self.active else None

    def record_step(self, frames: dict | None = None, action=None, policy: Trace | None = None, reward=None,
                    success=None, **info) -> None:
        """Append one step (frames, action, the policy's trace, reward, success, extra info) to the open episode."""
        if not self.active:
            return
        if self.episode is None:
            raise RuntimeError("record_step called before start_episode")
        self.episode.steps.append(StepRecord(len(self.episode.steps), frames or {}, action, policy, reward, success,
                                             info))

    def end_episode(self, success: bool | None) -> Path | None:
        """Close the episode; save it (``episode_<n>``) when the mode keeps it. Returns the folder or None."""
        ep, self.episode = self.episode, None
        n = self._count
        self._count += 1
        if ep is None:
            return None
        ep.success = None if success is None else bool(success)
        if self.mode == "failures" and ep.success:
            return None
        path = ep.save(self.directory / f"episode_{n:04d}")
        self.saved.append(path)
        return path
