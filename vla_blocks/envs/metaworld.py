"""Meta-World (MuJoCo, ``metaworld`` 3.x, ``*-v3`` tasks) as an :class:`~vla_blocks.envs.EnvAdapter`.

Needs the ``metaworld`` extra (``pip install 'vla-blocks[metaworld]'``). Rendering is headless: ``MUJOCO_GL``
defaults to ``egl`` (Mesa's software llvmpipe on a GPU-less machine) and must be set before mujoco is imported,
which this module does on first use. Three model fields make llvmpipe renders ~10× faster (no MSAA, no shadow
maps, no reflections) and are set before the first render. The ``corner*`` cameras are defined upside down;
images are rotated by 180° (``img[::-1, ::-1]``, not a vertical flip, which would mirror them).

Configurations: ``MT1(task, seed).train_tasks`` holds 50 goal-observable initial configurations (object and
goal positions) per seed. A configuration here is ``(mt1_seed, index)``; the ``train`` split draws from seeds
``train_seed, train_seed + 2, ...`` and the ``eval`` split from ``eval_seed, eval_seed + 2, ...`` (50 per seed),
so with the defaults (0 and 1) the two never share a configuration. ``reset(seed=...)`` of the env itself is
ignored by Meta-World; episodes are fixed by the configuration alone (bit-identical states and images).

Observation: the 39-d Meta-World vector (``raw``); the policy state is ``hand xyz, gripper, goal xyz``
(``state="goal"``, 7-d, the default), ``hand xyz, gripper`` (``"proprio"``) or all 39 (``"full"``).
Actions: 4-d in [-1, 1] (Δxyz of the mocap ×1 cm, gripper effort), clipped. Control runs at 80 Hz.
Success is ``info["success"]`` at any step; the env never terminates by itself and refuses to step past 500.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from typing import Any

import numpy as np

from .base import EnvAdapter, Observation, StepResult

__all__ = ["MetaWorldEnv", "METAWORLD_INSTRUCTIONS", "METAWORLD_TASKS", "import_metaworld"]

# One fixed instruction per task (Meta-World has none).
METAWORLD_INSTRUCTIONS = {
    "reach-v3": "reach the red goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button down from the top",
    "button-press-v3": "press the button",
    "door-open-v3": "open the door",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
    "plate-slide-v3": "slide the plate into the goal",
    "coffee-button-v3": "press the coffee machine button",
    "handle-press-v3": "press the handle down",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
}
# The recommended benchmark (reference metaworld.md §6): expert 100%, random 0%.
METAWORLD_TASKS = ("reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "button-press-topdown-v3")
STATE_LAYOUTS = {
    "goal": (list(range(0, 4)) + list(range(36, 39)),
             ["hand_x", "hand_y", "hand_z", "gripper", "goal_x", "goal_y", "goal_z"]),
    "proprio": (list(range(0, 4)), ["hand_x", "hand_y", "hand_z", "gripper"]),
    "full": (list(range(39)), [f"obs_{i}" for i in range(39)]),
}
CONFIGS_PER_SEED = 50
PATH_LIMIT = 500

_BENCH_CACHE: dict[tuple[str, int], Any] = {}


def import_metaworld():
    """Import metaworld headless (``MUJOCO_GL=egl`` unless set) or fail naming the extra."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    # Mesa's llvmpipe loads its LLVM when the first GL context is made; importing triton (its own LLVM; torch
    # and transformers import it lazily) after that segfaults the process. Loaded first, both coexist.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    try:
        import metaworld  # noqa: F401
        from metaworld.policies import ENV_POLICY_MAP  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError(f"Meta-World needs the metaworld extra: pip install 'vla-blocks[metaworld]' ({e})") from e
    import metaworld
    return metaworld


def _benchmark(task: str, seed: int):
    key = (task, int(seed))
    if key not in _BENCH_CACHE:
        mw = import_metaworld()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BENCH_CACHE[key] = mw.MT1(task, seed=int(seed))
    return _BENCH_CACHE[key]


def _close_at_exit(ref):
    env = ref()
    if env is not None:
        env.close()


def task_instruction(task: str) -> str:
    """The instruction given to policies for a Meta-World task (one per task, e.g. ``pick-place-v3``)."""
    return METAWORLD_INSTRUCTIONS.get(task) or task.removesuffix("-v3").replace("-", " ")


class MetaWorldEnv(EnvAdapter):
    """One Meta-World task (``reach-v3``, ...) with one camera (default ``corner4``, upright) of ``size`` px."""

    suite = "metaworld"
    action_dim = 4
    fps = 80

    def __init__(self, task: str, size: int = 96, camera: str = "corner4", state: str = "goal",
                 train_seed: int = 0, eval_seed: int = 1, max_steps: int = 150, fast_render: bool = True):
        import_metaworld()  # the extra check, and triton before the renderer (a segfault otherwise)
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        if task not in ALL_V3_ENVIRONMENTS:
            near = [n for n in ALL_V3_ENVIRONMENTS if task.split("-v")[0] in n][:5]
            raise ValueError(f"unknown Meta-World task {task!r} (tasks are '*-v3', e.g. "
                             f"{near or sorted(ALL_V3_ENVIRONMENTS)[:5]})")
        if state not in STATE_LAYOUTS:
            raise ValueError(f"state={state!r}: one of {sorted(STATE_LAYOUTS)}")
        if not 1 <= int(max_steps) <= PATH_LIMIT:
            raise ValueError(f"max_steps={max_steps}: Meta-World episodes are 1..{PATH_LIMIT} steps")
        if train_seed % 2 == eval_seed % 2:
            raise ValueError(f"train_seed={train_seed} and eval_seed={eval_seed} must differ in parity "
                             "(their configuration seeds are seed, seed+2, ...; same parity can overlap)")
        self.task = task
        self.instruction = task_instruction(task)
        self.size = int(size)
        self.camera = camera
        self.cameras = (camera,)
        self.state_mode = state
        self._state_idx, self.state_names = STATE_LAYOUTS[state]
        self.state_dim = len(self._state_idx)
        self.train_seed, self.eval_seed = int(train_seed), int(eval_seed)
        self.max_steps = int(max_steps)
        bench = _benchmark(task, self.train_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.env = bench.train_classes[task](render_mode="rgb_array", camera_name=camera,
                                                 width=self.size, height=self.size)
        if fast_render:  # before the first render() creates the GL context
            m = self.env.model
            m.vis.quality.offsamples = 0
            m.light_castshadow[:] = 0
            m.mat_reflectance[:] = 0
        from metaworld.policies import ENV_POLICY_MAP
        self._expert = ENV_POLICY_MAP[task]() if task in ENV_POLICY_MAP else None
        self._raw: np.ndarray | None = None
        self._rendered = False
        self._t = 0
        self.config: tuple[int, int] | None = None

    # -- configurations -------------------------------------------------------------------------------
    def configs(self, split: str, n: int) -> list[tuple[int, int]]:
        """The first ``n`` (MT1 seed, task index) configurations of ``split``: ``train`` for demonstrations, ``eval`` held out."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        base = self.train_seed if split == "train" else self.eval_seed
        return [(base + 2 * (k // CONFIGS_PER_SEED), k % CONFIGS_PER_SEED) for k in range(int(n))]

    # -- episode --------------------------------------------------------------------------------------
    def _observation(self, raw, render: bool) -> Observation:
        raw = np.asarray(raw, dtype=np.float64)
        self._raw = raw
        images = self.render() if render else {}
        return Observation(images, raw[self._state_idx].astype(np.float32), raw.copy())

    def reset(self, config, render: bool = True) -> Observation:
        """Reset to a fixed MT1 task configuration; returns the first observation."""
        seed, idx = (int(config[0]), int(config[1]))
        if not 0 <= idx < CONFIGS_PER_SEED:
            raise ValueError(f"configuration index {idx} is outside 0..{CONFIGS_PER_SEED - 1}")
        task = _benchmark(self.task, seed).train_tasks[idx]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.env.set_task(task)
            raw, _ = self.env.reset()
        self._t = 0
        self.config = (seed, idx)
        return self._observation(raw, render)

    def step(self, action, render: bool = True) -> StepResult:
        """One simulator step with the clipped 4-D action; success from Meta-World's own signal."""
        if self.config is None:
            raise RuntimeError("step() before reset()")
        if self._t >= self.max_steps:
            raise RuntimeError(f"{self.task}: episode horizon {self.max_steps} reached; reset() first")
        a = self.clip_action(action)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw, rew, _term, _trunc, info = self.env.step(a)
        self._t += 1
        return StepResult(self._observation(raw, render), float(rew), bool(info.get("success", 0.0) >= 1.0),
                          {k: float(v) for k, v in info.items() if np.isscalar(v)})

    def render(self) -> dict[str, np.ndarray]:
        """The adapter's cameras, rendered headless and rotated upright, ``uint8`` [H, W, 3]."""
        first = not self._rendered
        img = self.env.render()
        if first:
            # The first render creates the GL context and mujoco registers the EGL display teardown at exit;
            # free the context before it (atexit is last-in, first-out), or exit prints EGL errors.
            self._rendered = True
            atexit.register(_close_at_exit, weakref.ref(self))
        return {self.camera: np.ascontiguousarray(img[::-1, ::-1])}

    def expert_action(self, obs: Observation | None = None) -> np.ndarray:
        """Meta-World's scripted policy's action for the current state."""
        if self._expert is None:
            raise NotImplementedError(f"no scripted expert for {self.task}")
        raw = self._raw if obs is None else np.asarray(obs.raw, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.clip_action(np.clip(self._expert.get_action(raw), -1.0, 1.0))

    def close(self) -> None:
        """Close the environment and its renderer."""
        env, self.env = getattr(self, "env", None), None
        if env is not None:
            env.close()
