"""Simulator adapters (:class:`EnvAdapter`) for demonstrations and closed-loop evaluation.

    from vla_blocks.envs import make_env
    env = make_env("metaworld", "pick-place-v3", size=96)      # needs the metaworld extra
    obs = env.reset(env.configs("eval", 20)[0])
    frame = env.frame(obs)            # lerobot-style frame -> a model's PolicyProcessor
    res = env.step(env.expert_action(obs))

``SUITES`` (a :class:`~vla_blocks.registry.Registry`) maps a suite name to its adapter class (``"module:Class"``,
imported on use), so LIBERO or another gymnasium suite is one more entry — in this file, or from a plug-in through
the entry-point group ``vla_blocks.envs``.
"""

from __future__ import annotations

import importlib

from ..registry import Registry
from .base import EnvAdapter, Observation, StepResult, frame_from_observation

SUITES: Registry[str] = Registry("environment suite", group="vla_blocks.envs")
SUITES.register("metaworld", "vla_blocks.envs.metaworld:MetaWorldEnv")

__all__ = ["EnvAdapter", "Observation", "StepResult", "frame_from_observation", "SUITES", "make_env", "env_class"]


def env_class(suite: str):
    """The adapter class of ``suite`` (imported on first use); an error naming the known suites otherwise."""
    try:
        target = SUITES.get(suite)
    except KeyError as e:
        raise ValueError(str(e)) from None
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)


def make_env(suite: str, task: str, **kw) -> EnvAdapter:
    """An adapter for one ``task`` of ``suite`` (keyword arguments go to the adapter class)."""
    return env_class(suite)(task, **kw)
