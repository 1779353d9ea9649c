"""Process-pool plumbing shared by demos and evaluation (spawned workers, one env per task and process)."""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any, Callable, Iterator

_ENVS: dict[tuple, Any] = {}


def cached_env(suite: str, task: str, env_kw: dict):
    """One adapter per (suite, task, settings) and process (rendering contexts are per process)."""
    key = (suite, task, tuple(sorted(env_kw.items())))
    if key not in _ENVS:
        from . import make_env
        _ENVS[key] = make_env(suite, task, **env_kw)
    return _ENVS[key]


def close_envs():
    """Close and forget this worker process's cached environments."""
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()


def _init(threads: int, init: Callable | None, init_args: tuple):
    os.environ.setdefault("MUJOCO_GL", "egl")
    import torch
    torch.set_num_threads(threads)
    if init is not None:
        init(*init_args)


def run_jobs(fn: Callable, jobs: list, workers: int, init: Callable | None = None, init_args: tuple = (),
             threads: int = 1) -> Iterator[tuple[int, Any]]:
    """``(job index, fn(job))`` in completion order; ``workers <= 1`` runs in this process (in order).

    Workers are spawned (not forked: GL contexts and torch threads do not survive a fork) and each runs
    ``init(*init_args)`` once."""
    if workers <= 1 or len(jobs) <= 1:
        if init is not None:
            init(*init_args)
        for i, job in enumerate(jobs):
            yield i, fn(job)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs)), initializer=_init, initargs=(threads, init, init_args)) as pool:
        for i, out in pool.imap_unordered(_indexed, [(fn, i, job) for i, job in enumerate(jobs)]):
            yield i, out


def _indexed(arg):
    fn, i, job = arg
    return i, fn(job)
