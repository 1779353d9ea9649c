"""Stage C of HALO's EM-CoT pipeline: per-frame subtask, subgoal frame and thought text, and the dataset sidecar.

For frame t of an episode with subtask spans starting at frames ``s_0 = 0 < s_1 < … < s_{K-1}`` (reference
halo_bagel.md §5.3, HALO ``data/robotwin_dataset.py``):

- the current subtask k is the last one with ``s_k ≤ t`` (HALO: the last time key ``≤ step / fps``, with the
  keys at ``s_k / fps``; computed here on integer frames, so no float rounding can move a boundary);
- the subgoal frame is ``s_{k+1} − 1``, the last frame of the current subtask (HALO: ``int(t_next · fps) − 1``),
  and the episode's last frame for the final subtask;
- the thought is :func:`vla_blocks.models.halo.format_thought` of (plan, subtask, left and right primitive
  sentences of frame t). ``plan_mode`` says which plan goes in: ``remaining`` (the subtasks from the current
  one on, HALO's per-frame ``remaining_subtasks``) or ``full``;
- frames from ``first_moving_frame − 1`` on are training frames (HALO samples the step uniformly there;
  ``first_moving_frame`` is the first frame whose state differs from frame 0's by more than 1e-2 anywhere).

The results go into the dataset folder as a sidecar that :class:`EmcotAnnotations` reads::

    meta/emcot/info.json          run settings (annotator identity, stage-A config, state layout), failures
    meta/emcot/episodes.jsonl     one stage-B annotation per line (plan, spans, reasoning, scene)
    meta/emcot/frames.parquet     one row per frame: episode_index, frame_index, index, subtask_index,
                                  subtask, plan, movement_left, movement_right, thought, subgoal_frame_index,
                                  subgoal_index, train
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from .annotation import EpisodeAnnotation
from .primitives import EpisodePrimitives

__all__ = ["EmcotFrame", "current_subtasks", "subgoal_frames", "first_moving_frame", "frame_samples",
           "write_sidecar", "EmcotAnnotations", "SIDECAR_DIR", "MOVING_EPS"]

SIDECAR_DIR = "meta/emcot"
MOVING_EPS = 1e-2
SIDECAR_VERSION = 1


@dataclass
class EmcotFrame:
    """The EM-CoT sample of one frame: its subtask, plan, per-arm movement, the thought text and the subgoal frame
    (``train``: whether HALO trains on it)."""
    episode_index: int
    frame_index: int
    subtask_index: int
    subtask: str
    plan: list[str]
    movement_left: str
    movement_right: str
    thought: str
    subgoal_frame_index: int
    train: bool
    index: int | None = None          # global dataset index of this frame (when the episode offset is known)
    subgoal_index: int | None = None  # global dataset index of the subgoal frame


def current_subtasks(starts: Sequence[int], num_frames: int) -> np.ndarray:
    """Per frame, the index of the last subtask starting at or before it (0 before the first start)."""
    starts = np.asarray(starts, dtype=np.int64)
    k = np.searchsorted(starts, np.arange(num_frames), side="right") - 1
    return np.maximum(k, 0)


def subgoal_frames(starts: Sequence[int], num_frames: int) -> np.ndarray:
    """Per frame, its subgoal frame: the frame before the next subtask's start, the last frame for the final one."""
    k = current_subtasks(starts, num_frames)
    nxt = np.asarray(list(starts[1:]) + [num_frames], dtype=np.int64)
    return np.clip(nxt[k] - 1, 0, num_frames - 1)


def first_moving_frame(states: np.ndarray, eps: float = MOVING_EPS) -> int | None:
    """The first frame where any state value differs from frame 0's by more than ``eps``; None if none does."""
    moved = np.flatnonzero(np.any(np.abs(np.asarray(states) - np.asarray(states)[:1]) > eps, axis=1))
    return int(moved[0]) if len(moved) else None


def frame_samples(ann: EpisodeAnnotation, prims: EpisodePrimitives, states: np.ndarray | None = None,
                  plan_mode: Literal["remaining", "full"] = "remaining", episode_start: int | None = None,
                  format_thought: Callable | None = None) -> list[EmcotFrame]:
    """Stage C for one annotated episode (see the module docstring). ``states`` [T, S] gives the training
    range (all frames train without it); ``episode_start`` the global index of frame 0."""
    if format_thought is None:
        from ..models.halo import format_thought
    if plan_mode not in ("remaining", "full"):
        raise ValueError(f"plan_mode must be 'remaining' or 'full' (got {plan_mode!r})")
    T = ann.num_frames
    if prims.num_frames != T:
        raise ValueError(f"episode {ann.episode_index}: annotation has {T} frames, primitives {prims.num_frames}")
    ann.validate()
    starts = [s.start for s in ann.spans]
    ks = current_subtasks(starts, T)
    goals = subgoal_frames(starts, T)
    first = 0
    if states is not None:
        moving = first_moving_frame(states)
        first = T if moving is None else max(0, moving - 1)
    out = []
    for t in range(T):
        k = int(ks[t])
        sub = ann.spans[k].subtask
        plan = list(ann.plan[ann.plan.index(sub):]) if plan_mode == "remaining" else list(ann.plan)
        left, right = prims.movement(t)
        out.append(EmcotFrame(ann.episode_index, t, k, sub, plan, left, right, format_thought(plan, sub, left, right),
                              int(goals[t]), t >= first,
                              None if episode_start is None else episode_start + t,
                              None if episode_start is None else episode_start + int(goals[t])))
    return out


def _pa():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("the EM-CoT sidecar is parquet: pip install vla-blocks[emcot]") from None
    return pyarrow


def write_sidecar(root: str | os.PathLike, annotations: Sequence[EpisodeAnnotation], frames: Sequence[EmcotFrame],
                  info: dict) -> Path:
    """Write (replace) ``root/meta/emcot``; returns that folder."""
    pa = _pa()
    folder = Path(root) / SIDECAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "info.json").write_text(json.dumps({"version": SIDECAR_VERSION, **info}, indent=1))
    tmp = folder / "episodes.jsonl.tmp"
    with open(tmp, "w") as f:
        for a in sorted(annotations, key=lambda a: a.episode_index):
            f.write(json.dumps(a.to_dict()) + "\n")
    os.replace(tmp, folder / "episodes.jsonl")
    cols = {k: [getattr(fr, k) for fr in frames] for k in EmcotFrame.__dataclass_fields__}
    schema = pa.schema([("episode_index", pa.int64()), ("frame_index", pa.int64()), ("subtask_index", pa.int64()),
                        ("subtask", pa.string()), ("plan", pa.list_(pa.string())), ("movement_left", pa.string()),
                        ("movement_right", pa.string()), ("thought", pa.string()),
                        ("subgoal_frame_index", pa.int64()), ("train", pa.bool_()), ("index", pa.int64()),
                        ("subgoal_index", pa.int64())])
    table = pa.table(cols, schema=schema)
    pa.parquet.write_table(table, folder / "frames.parquet.tmp")
    os.replace(folder / "frames.parquet.tmp", folder / "frames.parquet")
    return folder


class EmcotAnnotations:
    """Reader of a dataset's EM-CoT sidecar (``root/meta/emcot``), for HALO's processor::

        ann = EmcotAnnotations(dataset_root)
        f = ann.frame(episode_index, frame_index)     # EmcotFrame: thought, subtask, subgoal_frame_index, ...
        ann.training_frames()                         # (episode_index, frame_index) pairs HALO samples from
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        folder = self.root / SIDECAR_DIR
        if not (folder / "frames.parquet").exists():
            raise FileNotFoundError(f"{folder}: no EM-CoT annotations (run `vla-blocks annotate {self.root}`)")
        self.info = json.loads((folder / "info.json").read_text())
        self.episodes: dict[int, EpisodeAnnotation] = {}
        for line in (folder / "episodes.jsonl").read_text().splitlines():
            if line.strip():
                a = EpisodeAnnotation.from_dict(json.loads(line))
                self.episodes[a.episode_index] = a
        table = _pa().parquet.read_table(folder / "frames.parquet").to_pydict()
        n = len(table["episode_index"])
        self._rows = {(table["episode_index"][i], table["frame_index"][i]): i for i in range(n)}
        self._table = table

    @property
    def failures(self) -> dict[str, str]:
        """Episodes that failed annotation (episode index as a string -> reason)."""
        return self.info.get("failures", {})

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return (int(key[0]), int(key[1])) in self._rows

    def frame(self, episode_index: int, frame_index: int) -> EmcotFrame:
        """The :class:`EmcotFrame` of a frame; ``KeyError`` says why there is none (failed, not annotated, out of
        range)."""
        key = (int(episode_index), int(frame_index))
        if key not in self._rows:
            why = (f"episode {key[0]} failed annotation: {self.failures[str(key[0])]}" if str(key[0]) in self.failures
                   else f"episode {key[0]} is not annotated" if key[0] not in self.episodes
                   else f"episode {key[0]} has {self.episodes[key[0]].num_frames} frames")
            raise KeyError(f"{self.root / SIDECAR_DIR}: no EM-CoT sample for episode {key[0]} frame {key[1]} ({why})")
        i = self._rows[key]
        return EmcotFrame(**{k: self._table[k][i] for k in EmcotFrame.__dataclass_fields__})

    def training_frames(self) -> list[tuple[int, int]]:
        """``(episode, frame)`` of every frame HALO trains on (from the first moving frame − 1)."""
        t = self._table
        return [(t["episode_index"][i], t["frame_index"][i]) for i in range(len(t["train"])) if t["train"][i]]

    def to_dict(self, episode_index: int, frame_index: int) -> dict:
        """Plain data of :meth:`frame`."""
        return asdict(self.frame(episode_index, frame_index))
