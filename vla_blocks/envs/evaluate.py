"""Closed-loop evaluation: ``vla-blocks eval MODEL --env metaworld --tasks ... --episodes 20``.

Each task runs on the first ``episodes`` held-out configurations (``env.configs("eval", n)``: another MT1
seed than the demonstrations) for at most ``horizon`` steps; the policy is queried when its queue of actions
is empty and ``n_action_steps`` of each chunk are executed. An episode succeeds when the env reports success
at any step. A policy with ``observe(env, obs)`` (HALO's frame history) is handed every rendered observation,
and the loop renders the ``frames_before_query`` steps (default 1) before each query. Every episode seeds the
policy from ``(seed, task, configuration)``, so results are identical for any number of ``workers`` (spawned
processes, one env per task each) and across runs.

Writes ``results.json`` (settings, per-episode and per-task results, mean success with a 95% Wilson interval)
and ``results.md`` into ``--out``; optionally an mp4 per episode (``--video failures|all``) and episode traces
(``--trace failures|all``, :class:`vla_blocks.trace.TraceRecorder`; ``vla-blocks trace view`` renders them).
"""

from __future__ import annotations

import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._workers import cached_env, run_jobs

__all__ = ["evaluate", "run_episode", "wilson_interval", "summarize", "results_markdown", "add_arguments", "run"]

_POLICY: Any = None


def episode_seed(seed: int, task: str, config) -> int:
    """A per-episode seed from the run seed, the task name and the configuration (stable across processes)."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{task}|{list(config)}".encode())) % (2 ** 31)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def _set_policy(spec: dict):
    global _POLICY
    from .policies import load_policy
    _POLICY = load_policy(spec["ref"], spec.get("n_action_steps"), trace=spec.get("trace", "none") != "none")


def run_episode(job: dict, policy=None) -> dict:
    """One episode (see the module docstring); ``policy`` defaults to the worker's policy."""
    policy = policy or _POLICY
    env = cached_env(job["suite"], job["task"], job["env_kw"])
    seed = episode_seed(job["seed"], job["task"], job["config"])
    policy.reset(seed)
    record = job["video"] != "none" or job["trace"] != "none"
    cam = env.cameras[0]
    obs = env.reset(job["config"], render=policy.needs_images or record)
    observe = getattr(policy, "observe", None)  # history policies (HALO) see every rendered observation
    before = int(getattr(policy, "frames_before_query", 1))  # rendered steps the policy needs before each query
    if observe is not None:
        observe(env, obs)
    frames, actions, infer_ms, queue = [], [], [], []
    rec = None
    if job["trace"] != "none":
        from ..trace import TraceRecorder
        rec = TraceRecorder(Path(job["out"]) / "traces" / job["name"], mode=job["trace"])
        rec.start_episode(task=job["task"], instruction=env.instruction, config=list(job["config"]), seed=seed,
                          policy=getattr(policy, "name", "?"))
    success_step, t0 = None, time.perf_counter()
    for t in range(job["horizon"]):
        ptrace = None
        if not queue:
            s = time.perf_counter()
            chunk, ptrace = policy.act(env, obs)
            infer_ms.append((time.perf_counter() - s) * 1e3)
            queue = [np.asarray(a, dtype=np.float32) for a in np.asarray(chunk).reshape(-1, env.action_dim)]
        a = env.clip_action(queue.pop(0))
        if record:
            frames.append(obs.images[cam])
        actions.append(a)
        need = record or (policy.needs_images and len(queue) < before)
        res = env.step(a, render=need)
        if observe is not None and need:
            observe(env, res.observation)
        if rec is not None:
            rec.record_step(frames={cam: frames[-1]}, action=a, policy=ptrace, reward=res.reward, success=res.success)
        obs = res.observation
        if res.success:
            success_step = t + 1
            break
    ok = success_step is not None
    out = {"task": job["task"], "config": list(job["config"]), "seed": seed, "success": ok,
           "steps": len(actions), "steps_to_success": success_step, "inference_calls": len(infer_ms),
           "inference_ms_mean": float(np.mean(infer_ms)) if infer_ms else 0.0,
           "wall_s": round(time.perf_counter() - t0, 3), "n_action_steps": getattr(policy, "chunk", None),
           "video": None, "trace": None}
    if rec is not None:
        saved = rec.end_episode(ok)
        out["trace"] = str(Path(saved).relative_to(job["out"])) if saved else None
    if job["video"] == "all" or (job["video"] == "failures" and not ok):
        from ..data.video import encode_video, pick_codec
        frames.append(obs.images[cam] if cam in obs.images else env.render()[cam])
        path = Path(job["out"]) / "videos" / f"{job['name']}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        encode_video(frames, path, fps=min(env.fps, 30), codec=pick_codec("libx264"))
        out["video"] = str(path.relative_to(job["out"]))
    return out


def summarize(episodes: list[dict], tasks: Sequence[str]) -> dict:
    """Per-task and overall success (with 95% Wilson intervals), steps to success and inference time."""
    per_task = {}
    for t in tasks:
        eps = [e for e in episodes if e["task"] == t]
        k = sum(e["success"] for e in eps)
        steps = [e["steps_to_success"] for e in eps if e["success"]]
        per_task[t] = {"success_rate": k / len(eps) if eps else 0.0, "successes": k, "episodes": len(eps),
                       "ci95": list(wilson_interval(k, len(eps))),
                       "mean_steps_to_success": float(np.mean(steps)) if steps else None,
                       "inference_ms_mean": float(np.mean([e["inference_ms_mean"] for e in eps])) if eps else 0.0}
    k = sum(e["success"] for e in episodes)
    n = len(episodes)
    calls = sum(e["inference_calls"] for e in episodes)
    return {"success_rate": k / n if n else 0.0, "successes": k, "episodes": n, "ci95": list(wilson_interval(k, n)),
            "per_task": per_task,
            "inference_ms_mean": (sum(e["inference_ms_mean"] * e["inference_calls"] for e in episodes) / calls)
            if calls else 0.0}


def results_markdown(res: dict) -> str:
    """The evaluation results as Markdown: per-task success, steps to success, inference time."""
    s = res["settings"]
    lines = [f"# Evaluation of `{res['model']}` on {s['suite']}", "",
             f"{res['episodes']} episodes ({s['episodes_per_task']} held-out configurations per task, eval seed "
             f"{s['eval_seed']}), horizon {s['horizon']}, {res['n_action_steps']} action steps per query, seed "
             f"{s['seed']}, {s['workers']} worker(s), {res['wall_s']:.1f} s.", "",
             "| task | success | 95% CI | episodes | mean steps to success | inference ms |",
             "|---|---|---|---|---|---|"]
    for t, r in res["per_task"].items():
        st = "—" if r["mean_steps_to_success"] is None else f"{r['mean_steps_to_success']:.1f}"
        lines.append(f"| {t} | {r['success_rate']:.2f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['episodes']} "
                     f"| {st} | {r['inference_ms_mean']:.1f} |")
    lines.append(f"| **mean** | **{res['success_rate']:.2f}** | [{res['ci95'][0]:.2f}, {res['ci95'][1]:.2f}] | "
                 f"{res['episodes']} | | {res['inference_ms_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def evaluate(model: str | Any, suite: str = "metaworld", tasks: Sequence[str] = ("reach-v3",), episodes: int = 20,
             out=None, seed: int = 0, horizon: int = 150, n_action_steps: int | None = None, size: int = 96,
             camera: str = "corner4", state: str = "goal", train_seed: int = 0, eval_seed: int = 1,
             workers: int = 1, video: str = "none", trace: str = "none", progress: bool = True) -> dict:
    """Evaluate ``model`` (a reference string for :func:`~vla_blocks.envs.policies.load_policy`, or a policy
    object with ``reset``/``act``, run in this process) and return the results (also written to ``out``)."""
    for name, v in (("video", video), ("trace", trace)):
        if v not in ("none", "failures", "all"):
            raise ValueError(f"{name} must be none, failures or all, got {v!r}")
    tasks = list(tasks)
    if not tasks or episodes < 1:
        raise ValueError("evaluation needs at least one task and one episode per task")
    if (video != "none" or trace != "none") and out is None:
        raise ValueError("--video/--trace need an output folder")
    from . import env_class
    env_kw = dict(size=size, camera=camera, state=state, train_seed=train_seed, eval_seed=eval_seed,
                  max_steps=horizon)
    probe = env_class(suite)(tasks[0], **env_kw)
    configs = probe.configs("eval", episodes)
    probe.close()
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [dict(suite=suite, task=t, config=c, env_kw=env_kw, seed=seed, horizon=horizon, video=video, trace=trace,
                 out=str(out_dir) if out_dir else None, name=f"{t}-s{c[0]}-c{c[1]:02d}")
            for t in tasks for c in configs]
    ref = model if isinstance(model, str) else getattr(model, "name", type(model).__name__)
    t0 = time.perf_counter()
    results: list[dict | None] = [None] * len(jobs)
    if isinstance(model, str):
        spec = {"ref": model, "n_action_steps": n_action_steps, "trace": trace}
        from .policies import check_ref, load_policy
        check_ref(model)
        local = load_policy(model, n_action_steps, trace=trace != "none") if workers <= 1 else None
        chunk = getattr(local, "chunk", None)
        it = run_jobs(run_episode, jobs, workers, init=_set_policy, init_args=(spec,)) if workers > 1 \
            else ((i, run_episode(j, local)) for i, j in enumerate(jobs))
    else:
        local, chunk = model, getattr(model, "chunk", None)
        if workers > 1:
            raise ValueError("an in-process policy object runs with workers=1 (give a model reference for workers)")
        it = ((i, run_episode(j, local)) for i, j in enumerate(jobs))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=f"eval {ref}", file=sys.stderr, dynamic_ncols=True)
    n_ok = 0
    for i, r in it:
        results[i] = r
        n_ok += r["success"]
        if bar:
            bar.update(1)
            bar.set_postfix(success=f"{n_ok}/{bar.n}")
    if bar:
        bar.close()
    eps = [r for r in results if r is not None]
    if chunk is None:  # the workers loaded the policy
        chunk = eps[0]["n_action_steps"] if eps else None
    summary = summarize(eps, tasks)
    res = {"model": ref, **summary, "n_action_steps": chunk,
           "settings": {"suite": suite, "tasks": tasks, "episodes_per_task": episodes, "seed": seed,
                        "horizon": horizon, "size": size, "camera": camera, "state": state,
                        "train_seed": train_seed, "eval_seed": eval_seed, "workers": workers, "video": video,
                        "trace": trace},
           "wall_s": round(time.perf_counter() - t0, 2), "episodes_detail": eps}
    if out_dir is not None:
        (out_dir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        (out_dir / "results.md").write_text(results_markdown(res))
    return res


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    """Options of ``vla-blocks eval MODEL|expert|random|nn:DATASET --env SUITE --tasks … --episodes N``."""
    from .policies import POLICY_HELP
    p.add_argument("model", nargs="?", default=None, help=POLICY_HELP)
    p.add_argument("--server", default=None, metavar="ws://HOST:PORT",
                   help="query a policy server instead of loading MODEL (vla-blocks serve MODEL --observation metaworld)")
    p.add_argument("--env", default="metaworld", choices=["metaworld"], help="simulator suite")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the 5 benchmark tasks)")
    p.add_argument("--episodes", type=int, default=20, help="held-out configurations per task")
    p.add_argument("--horizon", type=int, default=150)
    p.add_argument("--n-action-steps", type=int, default=None,
                   help="actions executed per chunk (default: the model's n_action_steps, else its chunk)")
    p.add_argument("--seed", type=int, default=0, help="policy noise seed (per episode, derived from this)")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--camera", default="corner4")
    p.add_argument("--state", default="goal", choices=["goal", "proprio", "full"])
    p.add_argument("--train-seed", type=int, default=0, help="configuration seed of the demonstrations")
    p.add_argument("--eval-seed", type=int, default=1, help="configuration seed of the held-out episodes")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (each loads the model)")
    p.add_argument("--video", default="none", choices=["none", "failures", "all"], help="mp4 per episode")
    p.add_argument("--trace", default="none", choices=["none", "failures", "all"], help="episode traces")
    p.add_argument("--out", default=None, help="folder for results.json / results.md (default: print only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    """``vla-blocks eval``: closed-loop evaluation in worker processes → JSON + Markdown (+ mp4 / traces);
    exit status (errors reach the CLI's one-line report, or a traceback with ``--debug``)."""
    from .metaworld import METAWORLD_TASKS
    if (args.model is None) == (args.server is None):
        raise ValueError("give MODEL or --server ws://HOST:PORT (one of them)")
    if args.server is not None and not args.server.startswith(("ws://", "wss://")):
        raise ValueError(f"--server {args.server!r}: expected ws://HOST:PORT")
    args.model = args.model or args.server
    tasks = [t for t in (args.tasks.split(",") if args.tasks else METAWORLD_TASKS) if t]
    res = evaluate(args.model, args.env, tasks, args.episodes, args.out, args.seed, args.horizon,
                   args.n_action_steps, args.size, args.camera, args.state, args.train_seed, args.eval_seed,
                   args.workers, args.video, args.trace, progress=not args.quiet)
    print(results_markdown(res), end="")
    if args.out:
        print(f"results in {args.out}/results.json and results.md")
    return 0
