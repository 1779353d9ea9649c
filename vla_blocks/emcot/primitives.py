"""Stage A of HALO's EM-CoT pipeline: per-arm motion primitives from end-effector xyz and gripper openness.

HALO's rule set (reference halo_bagel.md §5.1, ``data_annotator/src/label.py``), per arm and per frame t ≥ 1
with ``Δxyz_t = xyz_t − xyz_{t−1}`` and ``Δg_t = g_t − g_{t−1}`` (frame 0 has no delta and counts as idle):

1. frame t is *idle* if ``‖Δxyz_t‖ < velocity_threshold`` and ``|Δg_t| < delta_gripper_threshold``;
2. idle runs of at least ``min_idle_frames`` frames separate *action segments* (shorter idle runs stay inside
   a segment; a trajectory with no long idle run is one segment, unless every frame is idle);
3. inside a segment, ``Δg_t ≤ −delta_gripper_threshold`` → ``grasp``, ``Δg_t ≥ +delta_gripper_threshold`` →
   ``release``; every remaining maximal run ``[s, e]`` is a ``move`` whose direction comes from the summed
   displacement ``xyz_e − xyz_s`` (the deltas of frames s+1..e): an axis is named when its share
   ``|Δaxis| / ‖Δ‖ ≥ direction_ratio_threshold`` (x → right/left, y → forward/backward, z → up/down, joined in
   that order, e.g. ``left_forward_up``); no direction when ``‖Δ‖ < direction_eps`` or ``‖Δ‖ = 0``;
4. frames outside every segment stay ``idle``; each (action, direction) maps to a template sentence,
   e.g. "Move the left gripper to the upper-left." or "Close the right gripper.".

Gripper openness is HALO's convention, 0 = closed and 1 = open; :class:`ArmSpec` maps a dataset's raw gripper
value onto it (``gripper_closed`` / ``gripper_open``), and a :class:`StateLayout` says where each arm's xyz and
gripper sit in the state vector, so one- and two-arm datasets work alike::

    layout = StateLayout.from_mapping({"left": {"xyz": [0, 1, 2], "gripper": 6},
                                       "right": {"xyz": [7, 8, 9], "gripper": 13}})
    prims = extract_primitives(states, layout)      # states: [T, S]
    prims.sentences["left"][t], prims.segments["right"]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

__all__ = ["PrimitiveConfig", "ArmSpec", "StateLayout", "PrimitiveSegment", "EpisodePrimitives", "idle_flags",
           "action_segments", "direction_of", "label_arm", "primitive_sentence", "run_segments",
           "extract_primitives", "NO_ARM_SENTENCE"]

ACTIONS = ("idle", "grasp", "release", "move")
# what the movement text says for a side the dataset has no arm for (HALO's fallback for a missing description)
NO_ARM_SENTENCE = "No action."


@dataclass
class PrimitiveConfig:
    """Stage-A thresholds; defaults are HALO's released ``config/config.yaml`` values.

    ``unknown_sentence`` is what a ``move`` without a direction says (a one-frame move run or zero net
    displacement); HALO's sentence table has no entry for it and writes "Unknown action.".
    """

    velocity_threshold: float = 0.01
    delta_gripper_threshold: float = 0.01
    direction_eps: float = 0.0
    direction_ratio_threshold: float = 0.2
    min_idle_frames: int = 3
    unknown_sentence: str = "Unknown action."

    def __post_init__(self):
        for k in ("velocity_threshold", "delta_gripper_threshold", "direction_eps", "direction_ratio_threshold"):
            if getattr(self, k) < 0:
                raise ValueError(f"PrimitiveConfig.{k} must be >= 0 (got {getattr(self, k)})")
        if self.min_idle_frames < 1:
            raise ValueError(f"PrimitiveConfig.min_idle_frames must be >= 1 (got {self.min_idle_frames})")

    @classmethod
    def from_mapping(cls, m: Mapping) -> "PrimitiveConfig":
        """A config from a mapping; unknown keys are an error listing the valid ones."""
        unknown = sorted(set(m) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"primitive config: unknown keys {unknown} (valid: {sorted(cls.__dataclass_fields__)})")
        return cls(**dict(m))

    def to_dict(self) -> dict:
        """Plain data of this config."""
        return asdict(self)


@dataclass
class ArmSpec:
    """Where one arm's end-effector xyz and gripper scalar sit in a state vector, and the raw gripper values
    meaning closed / open (mapped linearly onto HALO's 0 = closed, 1 = open)."""

    xyz: tuple[int, int, int]
    gripper: int
    gripper_closed: float = 0.0
    gripper_open: float = 1.0

    def __post_init__(self):
        self.xyz = tuple(int(i) for i in self.xyz)
        if len(self.xyz) != 3:
            raise ValueError(f"ArmSpec.xyz needs 3 state indices (got {list(self.xyz)})")
        if self.gripper_closed == self.gripper_open:
            raise ValueError("ArmSpec.gripper_closed and gripper_open must differ")

    def openness(self, raw: np.ndarray) -> np.ndarray:
        """Gripper openness (0 closed, 1 open) of raw gripper readings, linear between ``gripper_closed`` and
        ``gripper_open``."""
        return (np.asarray(raw, dtype=np.float64) - self.gripper_closed) / (self.gripper_open - self.gripper_closed)


@dataclass
class StateLayout:
    """The arms of a dataset (name → :class:`ArmSpec`) and the frame key holding the state vector.

    Arm names are used in the sentences ("Move the left gripper …"); HALO's thought text has a ``[LEFT]`` and a
    ``[RIGHT]`` slot, filled from the arms named ``left`` and ``right`` (a single-arm dataset names its arm
    after the side it should fill; the other side says :data:`NO_ARM_SENTENCE`)."""

    arms: dict[str, ArmSpec]
    key: str = "observation.state"

    def __post_init__(self):
        if not self.arms:
            raise ValueError("StateLayout needs at least one arm")

    @classmethod
    def from_mapping(cls, m: Mapping) -> "StateLayout":
        """``{"key": "observation.state", "left": {"xyz": [..], "gripper": i, "gripper_closed": .., ...}, ...}``
        (or the arms under an ``arms`` key)."""
        m = dict(m)
        key = m.pop("key", "observation.state")
        arms_m = m.pop("arms", m)
        arms = {}
        for name, spec in arms_m.items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"state layout: arm {name!r} must be a mapping with 'xyz' and 'gripper'")
            missing = [k for k in ("xyz", "gripper") if k not in spec]
            unknown = sorted(set(spec) - {"xyz", "gripper", "gripper_closed", "gripper_open"})
            if missing or unknown:
                raise ValueError(f"state layout: arm {name!r}: missing {missing}, unknown {unknown}")
            arms[str(name)] = ArmSpec(**spec)
        return cls(arms, key)

    def to_dict(self) -> dict:
        """Plain data of this layout (the ``--state-layout`` format)."""
        return {"key": self.key, "arms": {n: asdict(a) for n, a in self.arms.items()}}

    def check(self, state_dim: int):
        """``ValueError`` naming any arm index outside a state vector of ``state_dim`` values."""
        for name, arm in self.arms.items():
            bad = [i for i in (*arm.xyz, arm.gripper) if not -state_dim <= i < state_dim]
            if bad:
                raise ValueError(f"state layout: arm {name!r} indexes {bad} outside the state vector "
                                 f"({self.key!r} has {state_dim} values)")


# ---------------------------------------------------------------------------------------------- the rules
def idle_flags(xyz: np.ndarray, g: np.ndarray, cfg: PrimitiveConfig) -> np.ndarray:
    """Rule 1: per frame, idle if the step moved less than the speed threshold and the gripper less than its
    threshold; frame 0 is idle."""
    speed = np.linalg.norm(np.diff(xyz, axis=0), axis=-1)
    dg = np.abs(np.diff(g))
    return np.concatenate([[True], (speed < cfg.velocity_threshold) & (dg < cfg.delta_gripper_threshold)])


def action_segments(idle: Sequence[bool], min_idle_frames: int) -> list[tuple[int, int]]:
    """Rule 2: inclusive ``(start, end)`` segments between idle runs of at least ``min_idle_frames`` frames."""
    idle = np.asarray(idle, dtype=bool)
    n = len(idle)
    if n == 0 or idle.all():
        return []
    runs = [(s, e) for s, e in _runs(idle) if idle[s] and e - s + 1 >= min_idle_frames]
    if not runs:
        return [(0, n - 1)]
    out, prev_end = [], -1
    for s, e in runs:
        if s > prev_end + 1:
            out.append((prev_end + 1, s - 1))
        prev_end = e
    if prev_end < n - 1:
        out.append((prev_end + 1, n - 1))
    return out


def direction_of(delta: Sequence[float], cfg: PrimitiveConfig) -> str:
    """Rule 3's direction: axes whose share of the displacement is ≥ the ratio threshold, x → y → z order."""
    d = np.asarray(delta, dtype=np.float64)
    total = float(np.linalg.norm(d))
    if total < cfg.direction_eps or total == 0.0:
        return ""
    names = (("right", "left"), ("forward", "backward"), ("up", "down"))
    return "_".join(pos if v > 0 else neg for v, (pos, neg) in zip(d, names)
                    if abs(v) / total >= cfg.direction_ratio_threshold)


def label_arm(xyz: np.ndarray, g: np.ndarray, cfg: PrimitiveConfig | None = None) -> list[tuple[str, str]]:
    """Rules 1–3 for one arm: per frame ``(action, direction)``; ``xyz`` [T, 3], ``g`` [T] (0 closed, 1 open)."""
    cfg = cfg or PrimitiveConfig()
    xyz = np.asarray(xyz, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or g.shape != (xyz.shape[0],):
        raise ValueError(f"label_arm: need xyz [T, 3] and gripper [T] (got {list(xyz.shape)} and {list(g.shape)})")
    n = len(g)
    labels = [("idle", "")] * n
    dg = np.concatenate([[0.0], np.diff(g)])
    for start, end in action_segments(idle_flags(xyz, g, cfg), cfg.min_idle_frames):
        for t in range(max(1, start), end + 1):
            if dg[t] <= -cfg.delta_gripper_threshold:
                labels[t] = ("grasp", "")
            elif dg[t] >= cfg.delta_gripper_threshold:
                labels[t] = ("release", "")
        t = start
        while t <= end:  # the remaining runs are moves, each with the direction of its net displacement
            if labels[t][0] != "idle":
                t += 1
                continue
            s = t
            while t <= end and labels[t][0] == "idle":
                t += 1
            direction = direction_of(xyz[t - 1] - xyz[s], cfg)
            labels[s:t] = [("move", direction)] * (t - s)
    return labels


_Z = {"up": "upper", "down": "lower"}
_X = {"left": "left", "right": "right"}
_Y = {"forward": "front", "backward": "back"}


def primitive_sentence(arm: str, action: str, direction: str = "", cfg: PrimitiveConfig | None = None) -> str:
    """Rule 4: HALO's template sentence for one (action, direction) of arm ``arm``."""
    if action == "idle":
        return f"Keep the {arm} arm idle."
    if action == "grasp":
        return f"Close the {arm} gripper."
    if action == "release":
        return f"Open the {arm} gripper."
    if action != "move":
        raise ValueError(f"unknown primitive action {action!r} (valid: {list(ACTIONS)})")
    if not direction:
        return (cfg or PrimitiveConfig()).unknown_sentence
    parts = direction.split("_")
    # HALO's table: vertical first; two horizontal words read front/back then left/right ("front-left"),
    # but three read left/right then front/back ("upper-left-front")
    tables = (_Z, _X, _Y) if len(parts) == 3 else (_Z, _Y, _X)
    words = [table[p] for table in tables for p in parts if p in table]
    if len(words) != len(parts):
        raise ValueError(f"unknown direction {direction!r}")
    return f"Move the {arm} gripper to the {'-'.join(words)}."


@dataclass
class PrimitiveSegment:
    """A maximal run of frames with one label (inclusive frame range)."""

    start: int
    end: int
    action: str
    direction: str
    sentence: str


def run_segments(labels: Sequence[tuple[str, str]], sentences: Sequence[str]) -> list[PrimitiveSegment]:
    """Merge per-frame ``(action, direction)`` labels into runs of consecutive equal labels (each keeps its first
    frame's sentence)."""
    out: list[PrimitiveSegment] = []
    for t, (lab, sen) in enumerate(zip(labels, sentences)):
        if out and (out[-1].action, out[-1].direction) == tuple(lab) and out[-1].end == t - 1:
            out[-1].end = t
        else:
            out.append(PrimitiveSegment(t, t, lab[0], lab[1], sen))
    return out


@dataclass
class EpisodePrimitives:
    """Stage-A output for one episode: per arm the per-frame labels and sentences and the run segments."""

    num_frames: int
    labels: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    sentences: dict[str, list[str]] = field(default_factory=dict)
    segments: dict[str, list[PrimitiveSegment]] = field(default_factory=dict)

    def movement(self, t: int) -> tuple[str, str]:
        """The ``[LEFT]`` / ``[RIGHT]`` sentences of frame t (:data:`NO_ARM_SENTENCE` for a missing side)."""
        return tuple(self.sentences[side][t] if side in self.sentences else NO_ARM_SENTENCE
                     for side in ("left", "right"))

    def log_lines(self) -> list[str]:
        """The primitive log as text, one line per run of frames whose sentences are all unchanged."""
        arms = list(self.sentences)
        lines, t = [], 0
        while t < self.num_frames:
            key = tuple(self.sentences[a][t] for a in arms)
            e = t
            while e + 1 < self.num_frames and tuple(self.sentences[a][e + 1] for a in arms) == key:
                e += 1
            span = f"Frame {t}" if e == t else f"Frames {t}-{e}"
            lines.append(f"{span}: " + "; ".join(f"{a.capitalize()}: {s}" for a, s in zip(arms, key)))
            t = e + 1
        return lines


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges - 1, [len(flags) - 1]])
    return list(zip(starts.tolist(), ends.tolist()))


def extract_primitives(states: np.ndarray, layout: StateLayout, cfg: PrimitiveConfig | None = None) -> EpisodePrimitives:
    """Stage A for one episode: ``states`` [T, S] (the ``layout.key`` feature of every frame, in order)."""
    cfg = cfg or PrimitiveConfig()
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2 or states.shape[0] == 0:
        raise ValueError(f"extract_primitives: need states [T, S] with T >= 1 (got {list(states.shape)})")
    layout.check(states.shape[1])
    out = EpisodePrimitives(states.shape[0])
    for name, arm in layout.arms.items():
        labels = label_arm(states[:, list(arm.xyz)], arm.openness(states[:, arm.gripper]), cfg)
        sentences = [primitive_sentence(name, a, d, cfg) for a, d in labels]
        out.labels[name], out.sentences[name] = labels, sentences
        out.segments[name] = run_segments(labels, sentences)
    return out
