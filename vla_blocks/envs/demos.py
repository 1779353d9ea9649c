"""Scripted-expert demonstrations → a LeRobotDataset v3.0 (``vla-blocks demos metaworld ...``).

For each task, the expert runs on the ``train`` configurations in order (``env.configs("train", n)``) until
``episodes`` successful episodes are collected (failed ones are skipped and listed); configurations run in
parallel worker processes and are written in (task, configuration) order, so the dataset does not depend on
``workers``. Each frame is the observation the expert saw *before* its action: ``observation.images.<camera>``
(upright ``uint8`` HWC, stored as video or PNG), ``observation.state`` (the adapter's policy state),
``observation.environment_state`` (the suite's full observation) and ``action`` (clipped), plus the task's
instruction. Episodes stop at the first success (then ``hold`` more expert steps). ``meta/<suite>.json`` records
the settings and, per episode, the task, configuration and length. The state and action entries of
``meta/stats.json`` are dataset-wide statistics (:func:`exact_stats`), not lerobot's average of per-episode
quantiles, which collapses for the goal dims (constant within an episode).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ._workers import cached_env, run_jobs

__all__ = ["expert_episode", "generate_demos", "add_arguments", "run"]


def expert_episode(job: dict) -> dict:
    """Run the expert on one configuration: ``{"success", "length", "images", "state", "env_state", "action"}``
    (frames only when successful)."""
    env = cached_env(job["suite"], job["task"], job["env_kw"])
    rng = np.random.default_rng([int(job["seed"]), *map(int, job["config"])])
    render = job["render"]
    obs = env.reset(job["config"], render=render)
    imgs, states, env_states, actions = [], [], [], []
    success_step, hold = None, int(job["hold"])
    for t in range(env.max_steps):
        a = env.expert_action(obs)
        if job["noise"] > 0:
            a = env.clip_action(a + rng.normal(0.0, job["noise"], size=a.shape))
        if render:
            imgs.append(obs.images[env.cameras[0]])
        states.append(obs.state)
        env_states.append(np.asarray(obs.raw, dtype=np.float32))
        actions.append(a)
        res = env.step(a, render=render)
        obs = res.observation
        if res.success and success_step is None:
            success_step = t + 1
        if success_step is not None and t + 1 >= success_step + hold:
            break
    out = {"task": job["task"], "config": list(job["config"]), "success": success_step is not None,
           "success_step": success_step, "length": len(actions)}
    if out["success"]:
        out.update(images=np.stack(imgs) if render else None, state=np.stack(states),
                   env_state=np.stack(env_states), action=np.stack(actions))
    return out


def generate_demos(out, suite: str = "metaworld", tasks: Sequence[str] = ("reach-v3",), episodes: int = 20,
                   size: int = 96, camera: str = "corner4", state: str = "goal", train_seed: int = 0,
                   horizon: int = 150, noise: float = 0.0, hold: int = 0, workers: int = 1, video: bool = True,
                   max_tries: int | None = None, progress: bool = True) -> dict:
    """Write the dataset to ``out`` and return the summary also saved as ``meta/<suite>.json``."""
    from ..data import LeRobotDatasetWriter
    from . import env_class
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists (demos write a new dataset)")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks")
    cls = env_class(suite)
    env_kw = dict(size=size, camera=camera, state=state, train_seed=train_seed, max_steps=horizon)
    probe = cls(tasks[0], **env_kw)  # validates the settings in this process before spawning workers
    state_names, fps, action_dim = list(probe.state_names), probe.fps, probe.action_dim
    env_state_dim = int(np.asarray(probe.reset(probe.configs("train", 1)[0], render=False).raw).shape[0])
    probe.close()
    for t in tasks[1:]:
        if t not in _known_tasks(suite):
            raise ValueError(f"unknown {suite} task {t!r}")
    max_tries = max_tries or 2 * episodes + 10
    t0 = time.perf_counter()
    done: dict[str, dict[int, dict]] = {t: {} for t in tasks}
    failed: dict[str, list] = {t: [] for t in tasks}
    next_cfg = {t: 0 for t in tasks}
    bar = _bar(progress, episodes * len(tasks), "demos")

    def jobs_for(task, n):
        cfgs = probe.configs("train", next_cfg[task] + n)[next_cfg[task]:]
        next_cfg[task] += n
        return [dict(suite=suite, task=task, config=c, k=next_cfg[task] - n + j, env_kw=env_kw, seed=train_seed,
                     noise=float(noise), hold=int(hold), render=True) for j, c in enumerate(cfgs)]

    pending = [j for t in tasks for j in jobs_for(t, episodes)]
    while pending:
        for i, res in run_jobs(expert_episode, pending, workers):
            job = pending[i]
            if res["success"]:
                done[job["task"]][job["k"]] = res
                bar.update(1) if bar else None
            else:
                failed[job["task"]].append(job["config"])
        pending = []
        for t in tasks:
            need = episodes - len(done[t])
            if need > 0:
                if next_cfg[t] + need > max_tries:
                    raise RuntimeError(f"{suite}/{t}: the expert succeeded on {len(done[t])} of {next_cfg[t]} "
                                       f"configurations; {episodes} needed (failed: {failed[t]})")
                pending += jobs_for(t, need)
    if bar:
        bar.close()
    cam_key = f"observation.images.{camera}"
    features = {
        cam_key: {"dtype": "video" if video else "image", "shape": [size, size, 3],
                  "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [len(state_names)], "names": state_names},
        "observation.environment_state": {"dtype": "float32", "shape": [env_state_dim], "names": None},
        "action": {"dtype": "float32", "shape": [action_dim], "names": ["dx", "dy", "dz", "gripper"][:action_dim]},
    }
    writer = LeRobotDatasetWriter(out, fps=fps, features=features, robot_type=f"{suite}-sawyer", vcodec="libx264")
    rows = []
    for t in tasks:
        instr = _instruction(suite, t)
        for k in sorted(done[t])[:episodes]:
            ep = done[t][k]
            for i in range(ep["length"]):
                writer.add_frame({cam_key: ep["images"][i], "observation.state": ep["state"][i],
                                  "observation.environment_state": ep["env_state"][i], "action": ep["action"][i],
                                  "task": instr})
            writer.save_episode()
            rows.append({"episode_index": len(rows), "task": t, "instruction": instr, "config": ep["config"],
                         "length": ep["length"], "success_step": ep["success_step"]})
    writer.finalize()
    exact_stats(out, ["observation.state", "observation.environment_state", "action"])
    summary = {"suite": suite, "tasks": tasks, "episodes_per_task": episodes, "size": size, "camera": camera,
               "state": state, "state_names": state_names, "train_seed": train_seed, "horizon": horizon,
               "noise": noise, "hold": hold, "fps": fps, "video": video, "stats": "dataset-wide (exact_stats)",
               "failed_configs": {t: v for t, v in failed.items() if v}, "episodes": rows,
               "wall_s": round(time.perf_counter() - t0, 2), "workers": workers}
    (out / "meta" / f"{suite}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def exact_stats(root, keys) -> None:
    """Replace the ``meta/stats.json`` entries of ``keys`` by dataset-wide statistics (one streaming pass).

    lerobot's writer rule averages per-episode quantiles; the goal dims are constant within an episode, so that
    average collapses q01 ≈ q99 ≈ the mean goal and quantile normalisation (pi0.5) saturates them. Mean/std are
    exact either way."""
    from ..data import LeRobotDataset
    from ..data.stats import compute_dataset_stats
    path = Path(root) / "meta" / "stats.json"
    stats = json.loads(path.read_text())
    exact = compute_dataset_stats(LeRobotDataset(root, decode_video=False), keys)
    for k, st in exact.items():
        entry = stats.setdefault(k, {})
        for name, v in st.items():
            if name in entry or name in ("mean", "std", "min", "max", "q01", "q99"):
                entry[name] = np.asarray(v).tolist()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=4))
    tmp.replace(path)


def _known_tasks(suite):
    if suite == "metaworld":
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        return ALL_V3_ENVIRONMENTS
    return ()


def _instruction(suite, task):
    if suite == "metaworld":
        from .metaworld import task_instruction
        return task_instruction(task)
    return task


def _bar(progress, total, desc):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    """Options of ``vla-blocks demos SUITE --tasks … --episodes N --size PX --out DIR``."""
    p.add_argument("suite", choices=["metaworld"], help="simulator suite")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the 5 benchmark tasks)")
    p.add_argument("--episodes", type=int, default=20, help="successful episodes per task")
    p.add_argument("--size", type=int, default=96, help="square image side in pixels")
    p.add_argument("--camera", default="corner4")
    p.add_argument("--state", default="goal", choices=["goal", "proprio", "full"],
                   help="observation.state layout: hand xyz + gripper (+ goal xyz) or the full 39-d vector")
    p.add_argument("--seed", type=int, default=0, help="train configuration seed (MT1 seed; eval uses another)")
    p.add_argument("--horizon", type=int, default=150)
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian action noise sigma added to the expert")
    p.add_argument("--hold", type=int, default=0, help="expert steps kept after the first success")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--images", action="store_true", help="store PNG images in the parquet instead of mp4 video")
    p.add_argument("--out", required=True, help="new dataset folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    """``vla-blocks demos``: run the scripted experts in worker processes and write a LeRobotDataset v3;
    exit status (errors reach the CLI's one-line report, or a traceback with ``--debug``)."""
    from .metaworld import METAWORLD_TASKS
    tasks = [t for t in (args.tasks.split(",") if args.tasks else METAWORLD_TASKS) if t]
    s = generate_demos(args.out, args.suite, tasks, args.episodes, args.size, args.camera, args.state, args.seed,
                       args.horizon, args.noise, args.hold, args.workers, not args.images, progress=not args.quiet)
    n = len(s["episodes"])
    frames = sum(r["length"] for r in s["episodes"])
    print(f"wrote {n} episodes ({frames} frames) of {len(tasks)} tasks to {args.out} in {s['wall_s']:.1f} s")
    return 0
