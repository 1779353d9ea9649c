"""Meta-World closed-loop benchmark: demos → train each ``*-mw`` recipe under one budget → 100 held-out episodes.

Protocol (reference metaworld.md §6): 5 tasks (reach, push, pick-place, drawer-open, button-press-topdown),
20 scripted demos per task from ``MT1(task, seed=0)`` configurations 0..19 (96 px ``corner4``, state = hand xyz,
gripper, goal xyz), evaluation on 20 configurations per task of ``MT1(task, seed=1)`` (never seen in training),
horizon 150, success = ``info["success"]`` at any step. References on the same configurations: the scripted
expert, uniform random actions and 1-nearest-neighbour behaviour cloning on the state (``nn:``).

Everything lands in a work folder (``--set work=runs/metaworld``) and is reused when present, so an interrupted
run resumes (training resumes from its latest checkpoint). Run::

    vla-blocks bench metaworld --device cpu                         # the full table (hours on 2 CPU cores)
    vla-blocks bench metaworld --set models=expert,random,nn,pi0-mw --set steps=1500 --set workers=2

HALO rows: ``halo-mw`` (reactive samples) and ``halo-emcot-mw`` (EM-CoT samples; the demos are annotated once with
the rules annotator and the Meta-World phase templates of :mod:`vla_blocks.envs.emcot`). ``--merge`` adds the rows
of a run to the committed table (same settings; rows of the same name are replaced)::

    vla-blocks bench metaworld --set models=halo-mw,halo-emcot-mw --set steps=1500 --set workers=2 --merge

Options (``--set KEY=VALUE``): ``work``, ``models`` (references ``expert``, ``random``, ``nn`` and train recipes),
``tasks``, ``demos`` (per task), ``episodes`` (eval per task), ``steps`` (training steps per recipe, default: the
recipe's), ``batch_size``, ``workers``, ``size``, ``seed``. ``--smoke``: 2 tasks × 3 demos at 64 px, 20 training
steps, 1 evaluation episode per task, in a temporary folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from vla_blocks.bench import md_table

REFERENCES = ("expert", "random", "nn")
DEFAULT_MODELS = "expert,random,nn,pi0-mw,pi05-mw"
DEFAULT_TASKS = "reach-v3,push-v3,pick-place-v3,drawer-open-v3,button-press-topdown-v3"


def settings(ctx) -> dict:
    o = ctx.options
    if ctx.smoke:
        return dict(work=o.get("work") or tempfile.mkdtemp(prefix="vla-blocks-bench-mw-"),
                    models=o.get("models", "expert,random,nn,pi0-mw").split(","), tasks=["reach-v3", "drawer-open-v3"],
                    demos=3, episodes=1, steps=20, batch_size=8, workers=1, size=64, seed=0, horizon=150,
                    train_seed=0, eval_seed=1, temporary=not o.get("work"))
    return dict(work=o.get("work", "runs/metaworld"), models=o.get("models", DEFAULT_MODELS).split(","),
                tasks=o.get("tasks", DEFAULT_TASKS).split(","), demos=int(o.get("demos", 20)),
                episodes=int(o.get("episodes", 20)), steps=int(o["steps"]) if "steps" in o else None,
                batch_size=int(o["batch_size"]) if "batch_size" in o else None, workers=int(o.get("workers", 2)),
                size=int(o.get("size", 96)), seed=int(o.get("seed", 0)), horizon=150, train_seed=0, eval_seed=1,
                temporary=False)


def _eval(ctx, s, ref, out):
    from vla_blocks.envs.evaluate import evaluate
    f = out / "results.json"
    if f.is_file():
        ctx.log(f"[metaworld] reuse {f}")
        return json.loads(f.read_text())
    return evaluate(ref, "metaworld", s["tasks"], s["episodes"], out, seed=s["seed"], horizon=s["horizon"],
                    size=s["size"], train_seed=s["train_seed"], eval_seed=s["eval_seed"], workers=s["workers"],
                    progress=not ctx.quiet)


def run(ctx) -> dict:
    from vla_blocks.envs.demos import generate_demos
    s = settings(ctx)
    work = Path(s["work"])
    demos = work / "demos"
    if not (demos / "meta" / "metaworld.json").is_file():
        if demos.exists():
            shutil.rmtree(demos)  # an interrupted generation: start it over
        generate_demos(demos, "metaworld", s["tasks"], s["demos"], s["size"], train_seed=s["train_seed"],
                       horizon=s["horizon"], workers=s["workers"], progress=not ctx.quiet)
    demo_meta = json.loads((demos / "meta" / "metaworld.json").read_text())
    rows = []
    for name in s["models"]:
        entry = {"name": name, "kind": "reference" if name in REFERENCES else "model"}
        if name in REFERENCES:
            ref = f"nn:{demos}" if name == "nn" else name
            res = _eval(ctx, s, ref, work / "eval" / name)
        else:
            from vla_blocks.train import train
            run_dir = work / "runs" / name
            over = [f"data.root={demos}"] + ([f"train.steps={s['steps']}"] if s["steps"] else []) + \
                   ([f"train.batch_size={s['batch_size']}"] if s["batch_size"] else [])
            budget_f = run_dir / "budget.json"
            if not (run_dir / "final" / "processor_config.json").is_file():
                _annotate_if_needed(ctx, name, over, demos)
                t0 = time.perf_counter()
                r = train(name, over, output_dir=run_dir, resume=(run_dir / "checkpoints").is_dir())
                prev = json.loads(budget_f.read_text())["train_wall_s"] if budget_f.is_file() else 0.0
                budget_f.write_text(json.dumps({"train_wall_s": prev + time.perf_counter() - t0, "steps": r.step,
                                                "overrides": over}) + "\n")
            budget = json.loads(budget_f.read_text()) if budget_f.is_file() else {}
            cfg_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
            entry["training"] = {**budget, "recipe": name, "config": cfg_text,
                                 "checkpoint": str(run_dir / "final")}  # create_model("local-dir:...")
            res = _eval(ctx, s, str(run_dir / "final"), work / "eval" / name)
        entry.update({k: res[k] for k in ("success_rate", "successes", "episodes", "ci95", "per_task",
                                          "inference_ms_mean", "n_action_steps")})
        entry["eval_wall_s"] = res["wall_s"]
        rows.append(entry)
        ctx.log(f"[metaworld] {name}: {entry['success_rate']:.2f} over {entry['episodes']} episodes")
    body = {"settings": {k: v for k, v in s.items() if k != "temporary"},
            "demos": {"episodes": len(demo_meta["episodes"]), "frames": sum(e["length"] for e in demo_meta["episodes"]),
                      "wall_s": demo_meta["wall_s"]},
            "results": rows}
    if s["temporary"]:
        shutil.rmtree(work, ignore_errors=True)
    return body


def _annotate_if_needed(ctx, name, over, demos):
    """A recipe with ``data.emcot: true`` (halo-emcot-mw) trains on the EM-CoT sidecar of the demos: write it once
    (rules annotator, Meta-World phase templates: :mod:`vla_blocks.envs.emcot`)."""
    from vla_blocks.train import load_train_recipe
    if not load_train_recipe(name, over).data.emcot or (demos / "meta" / "emcot" / "info.json").is_file():
        return
    from vla_blocks.envs.emcot import annotate_metaworld
    summary = annotate_metaworld(demos)
    ctx.log(f"[metaworld] EM-CoT annotations: {summary['annotated']} episodes, "
            f"{summary['subtasks_per_episode']} subtasks per episode")


def merge(old: dict, new: dict) -> dict:
    """``--merge``: the new rows replace the old rows of the same name, the others are kept (in the old order, new
    names appended); the settings must agree except for ``models``."""
    keys = [k for k in set(old["settings"]) | set(new["settings"]) if k not in ("models", "work")]
    diff = [k for k in keys if old["settings"].get(k) != new["settings"].get(k)]
    if diff:
        raise ValueError(f"--merge: settings differ in {diff} (old {[old['settings'].get(k) for k in diff]}, "
                         f"new {[new['settings'].get(k) for k in diff]})")
    rows = {r["name"]: r for r in old["results"]}
    order = [r["name"] for r in old["results"]] + [r["name"] for r in new["results"] if r["name"] not in rows]
    rows.update({r["name"]: r for r in new["results"]})
    out = dict(new)
    out["results"] = [rows[n] for n in order]
    out["settings"] = {**new["settings"], "models": order}
    out["merged_runs"] = old.get("merged_runs", [old.get("created")]) + [new.get("created")]
    return out


def _table(payload) -> str:
    tasks = payload["settings"]["tasks"]
    head = ["policy", "mean success", "95% CI", "episodes"] + [t.removesuffix("-v3") for t in tasks] + ["train"]
    rows = []
    for r in payload["results"]:
        tr = r.get("training")
        budget = f"{tr.get('steps', '?')} steps, {tr.get('train_wall_s', 0) / 60:.1f} min" if tr else "—"
        rows.append([r["name"] + (" (ref)" if r["kind"] == "reference" else ""), f"{r['success_rate']:.2f}",
                     f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]", str(r["episodes"])]
                    + [f"{r['per_task'][t]['success_rate']:.2f}" for t in tasks] + [budget])
    return md_table(head, rows)


def summary_markdown(payload: dict) -> str:
    return _table(payload)


def render_markdown(payload: dict) -> str:
    s = payload["settings"]
    return (f"# Meta-World closed-loop benchmark{' (smoke)' if payload.get('smoke') else ''}\n\n"
            f"{len(s['tasks'])} tasks, {s['demos']} scripted demos per task (MT1 seed {s['train_seed']}, {s['size']} px "
            f"corner4), {s['episodes']} held-out episodes per task (MT1 seed {s['eval_seed']}), horizon {s['horizon']}, "
            f"policy seed {s['seed']}, {s['workers']} eval worker(s). 95% Wilson intervals. Device: "
            f"{payload['device']['name']}.\n\n" + _table(payload) + "\n")


def plot(payload):
    import matplotlib.pyplot as plt
    res = [r for r in payload["results"] if r["kind"] == "model"]
    refs = {r["name"]: r["success_rate"] for r in payload["results"] if r["kind"] == "reference"}
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(res) + 2), 3.5))
    xs = range(len(res))
    rates = [r["success_rate"] for r in res]
    err = [[r["success_rate"] - r["ci95"][0] for r in res], [r["ci95"][1] - r["success_rate"] for r in res]]
    ax.bar(xs, rates, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(list(xs), [r["name"] for r in res], rotation=20)
    for name, style in (("expert", "--"), ("nn", "-."), ("random", ":")):
        if name in refs:
            ax.axhline(refs[name], ls=style, color="k", lw=1, label=f"{name} {refs[name]:.2f}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title("Meta-World, held-out episodes")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig
