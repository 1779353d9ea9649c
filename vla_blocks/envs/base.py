"""The simulator adapter interface: what demos, evaluation and tracing need from an environment suite.

An adapter wraps one task of a suite at a time. Episodes start from *numbered configurations* so that the
training and the held-out lists are fixed and reproducible (``configs(split, n)``); observations are plain
numpy (``images``: camera → upright ``uint8`` HWC, ``state``: the policy's state vector, ``raw``: the suite's
full observation), and :meth:`EnvAdapter.frame` turns one into a lerobot-style frame, the input of a model's
:class:`~vla_blocks.data.PolicyProcessor`. A new gymnasium suite (LIBERO, ...) is one more subclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["EnvAdapter", "Observation", "StepResult", "frame_from_observation"]


@dataclass
class Observation:
    """One observation: ``images`` (camera name → ``uint8`` [H, W, 3], upright; empty when not rendered),
    ``state`` (float32, the policy's state), ``raw`` (the suite's full observation vector)."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    raw: np.ndarray


@dataclass
class StepResult:
    """One environment step: the next observation, the reward, the success signal and the raw info dict."""
    observation: Observation
    reward: float
    success: bool
    info: dict = field(default_factory=dict)


def frame_from_observation(obs: Observation, task: str, image_keys: Mapping[str, str],
                           state_key: str = "observation.state") -> dict:
    """A lerobot-style frame (what ``LeRobotDataset.__getitem__`` returns): cameras float32 CHW in [0, 1],
    the state as float32 ``[S]`` and the ``task`` string. ``image_keys``: camera name → dataset key."""
    import torch
    out: dict[str, Any] = {}
    for cam, key in image_keys.items():
        if cam not in obs.images:
            raise KeyError(f"camera {cam!r} was not rendered (have {sorted(obs.images)})")
        out[key] = torch.from_numpy(np.ascontiguousarray(obs.images[cam])).permute(2, 0, 1).float() / 255.0
    out[state_key] = torch.from_numpy(np.asarray(obs.state, dtype=np.float32))
    out["task"] = task
    return out


class EnvAdapter:
    """One task of a simulator suite, reset to numbered configurations.

    Subclasses set ``suite``, ``task``, ``instruction``, ``cameras``, ``action_dim``, ``state_dim``,
    ``state_names``, ``fps``, ``max_steps`` and implement :meth:`configs`, :meth:`reset`, :meth:`step`,
    :meth:`render`, optionally :meth:`expert_action` (a scripted policy for demonstrations) and :meth:`close`.
    """

    suite: str = ""
    task: str = ""
    instruction: str = ""
    cameras: tuple[str, ...] = ()
    action_dim: int = 0
    state_dim: int = 0
    state_names: Sequence[str] = ()
    fps: int = 0
    max_steps: int = 0
    action_low: float = -1.0
    action_high: float = 1.0

    # -- configurations -------------------------------------------------------------------------------
    def configs(self, split: str, n: int) -> list[Any]:
        """The first ``n`` configurations of ``split`` (``"train"``: demonstrations, ``"eval"``: held out)."""
        raise NotImplementedError

    # -- episode --------------------------------------------------------------------------------------
    def reset(self, config: Any, render: bool = True) -> Observation:
        """Reset to ``config`` (one of :meth:`configs`) and return the first observation (cameras rendered if ``render``)."""
        raise NotImplementedError

    def step(self, action: np.ndarray, render: bool = True) -> StepResult:
        """Apply one action (clipped to the bounds by :meth:`clip_action`) → :class:`StepResult`."""
        raise NotImplementedError

    def render(self) -> dict[str, np.ndarray]:
        """Every camera of the adapter, upright ``uint8`` [H, W, 3]."""
        raise NotImplementedError

    def expert_action(self, obs: Observation) -> np.ndarray:
        """The scripted expert's action for ``obs`` (suites without an expert raise)."""
        raise NotImplementedError(f"{type(self).__name__} has no scripted expert")

    def clip_action(self, action) -> np.ndarray:
        """``action`` as float32 ``[action_dim]`` clipped to the bounds; wrong width or non-finite values are errors."""
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape[0] != self.action_dim:
            raise ValueError(f"{self.suite}/{self.task}: action has {a.shape[0]} dims, the env takes {self.action_dim}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{self.suite}/{self.task}: non-finite action {a.tolist()}")
        return np.clip(a, self.action_low, self.action_high).astype(np.float32)

    def frame(self, obs: Observation, image_keys: Mapping[str, str] | None = None) -> dict:
        """``obs`` as a lerobot-style frame (see :func:`frame_from_observation`); default keys
        ``observation.images.<camera>``."""
        keys = image_keys or {c: f"observation.images.{c}" for c in obs.images}
        return frame_from_observation(obs, self.instruction, keys)

    def close(self) -> None:
        """Release the simulator (renderers, processes)."""
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
