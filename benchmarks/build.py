"""Build memory: peak resident memory of ``create_model`` against the size of the weights it builds.

Importing a backbone must not hold a second copy of it (issue 11, item 5): the target is a peak growth of
at most 1.2× the final weights (parameters + buffers). Each case runs in a fresh Python process so the
peak is exact: the process imports everything and builds a tiny model of the same families first (module
imports and lazy initialisation are not the build), collects garbage, trims malloc, resets the kernel's
high-water mark (``5`` into ``/proc/self/clear_refs``), then calls ``create_model`` once; the figure is
``VmHWM`` after the call minus ``VmRSS`` before it (``/proc/self/status``).

Cases: ``random`` builds the recipe from its config (random initialisation); ``checkpoint`` first saves the
backbone as a transformers checkpoint (``save_pretrained``, fp32 safetensors, in another process) and
builds with ``backbone.pretrained`` pointing at it. Rows are keyed by ``variant`` (``--set variant=before``
to record a build of an older commit beside the current one with ``--merge``).

Run ``vla-blocks bench build [--smoke] [--set recipe=pi05] [--set variant=after] [--merge]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

TARGET_RATIO = 1.2

# pi0.5 at mid size: Gemma-2B width (2048, FFN 16384, 8 heads x 256) with 2 layers and a 16k vocabulary,
# the gemma_300m adaRMS action expert, a 2-layer SigLIP So400m tower: ~0.33B parameters, 1.3 GB in fp32
MID = {"backbone.config.num_hidden_layers": 2, "backbone.config.vocab_size": 16384,
       "vision.config.num_hidden_layers": 2}
TINY = {}

_CHILD = r"""
import ctypes, gc, json, sys, time
import torch
torch.set_num_threads(1)
from vla_blocks.model import create_model
from vla_blocks.backbones import MoTLanguageModel

args = json.loads(sys.argv[1])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

# warm-up: imports, lazy modules and first-call work of the same families, at toy size
warm = create_model(args["recipe"], **args["warmup_overrides"])
del warm
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
t0 = time.perf_counter()
model = create_model(args["recipe"], **args["overrides"])
build_s = time.perf_counter() - t0
peak = status("VmHWM")
after = status("VmRSS")
params = sum(p.numel() for p in model.parameters())
weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
(lm,) = [m for m in model.modules() if isinstance(m, MoTLanguageModel)]
backbone_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                     if ".experts." not in n or f".experts.{lm.lm_expert}." in n)
print(json.dumps({"base_rss": base, "peak_rss": peak, "rss_after": after, "params": params,
                  "weight_bytes": weight_bytes, "backbone_bytes": backbone_bytes, "build_s": build_s}))
"""

_SAVE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from vla_blocks.model import model_config
args = json.loads(sys.argv[1])
bb = model_config(args["recipe"], **args["overrides"]).backbone
torch.manual_seed(0)
AutoModelForCausalLM.from_config(bb.hf_config(), dtype=torch.float32).save_pretrained(args["folder"])
print(json.dumps({"model_type": bb.model_type}))
"""


def resolve_settings(ctx) -> dict:
    o = ctx.options
    s = {"recipe": o.get("recipe", "pi05-tiny" if ctx.smoke else "pi05"),
         "overrides": dict(TINY if ctx.smoke else MID),
         "cases": (o.get("cases") or ("random" if ctx.smoke else "random,checkpoint")).split(","),
         "variant": str(o.get("variant", "current"))}
    for k, v in o.items():
        if k.startswith("override."):
            s["overrides"][k[len("override."):]] = v
    return s


def _run_child(code: str, payload: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True, env=env,
                         timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"build benchmark child failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _warmup_overrides(recipe: str) -> dict:
    # the same families at toy size: the recipe's own backbone family and vision tower, 1 layer, tiny widths
    from vla_blocks.model import model_config
    cfg = model_config(recipe)
    out = {"backbone.config.num_hidden_layers": 1, "backbone.config.vocab_size": 512}
    if hasattr(cfg, "vision") and getattr(cfg.vision, "config", None):
        out["vision.config.num_hidden_layers"] = 1
    return out


def measure(ctx, s: dict, case: str) -> dict:
    over = dict(s["overrides"])
    with tempfile.TemporaryDirectory(prefix="vla-blocks-build-") as tmp:
        if case == "checkpoint":
            folder = os.path.join(tmp, "backbone")
            _run_child(_SAVE, {"recipe": s["recipe"], "overrides": over, "folder": folder})
            over = {k: v for k, v in over.items() if not k.startswith("backbone.config.")}
            over["backbone.pretrained"] = folder
            over["backbone.config"] = {}  # explicit, so that older commits (before family keys) build it too
        elif case != "random":
            raise ValueError(f"build benchmark: unknown case {case!r} (random, checkpoint)")
        r = _run_child(_CHILD, {"recipe": s["recipe"], "overrides": over,
                                "warmup_overrides": _warmup_overrides(s["recipe"])})
    growth = r["peak_rss"] - r["base_rss"]
    row = {"variant": s["variant"], "case": case, "recipe": s["recipe"],
           "overrides": {k: v for k, v in over.items() if k != "backbone.pretrained"}, **r,
           "peak_growth": growth, "ratio": growth / r["weight_bytes"], "target": TARGET_RATIO}
    row["target_met"] = row["ratio"] <= TARGET_RATIO
    from vla_blocks.bench import git_state
    row["git"] = git_state()
    ctx.log(f"  {s['variant']} {case}: {r['params'] / 1e6:.1f}M params, weights {r['weight_bytes'] / 2**20:.0f} MiB, "
            f"peak growth {growth / 2**20:.0f} MiB ({row['ratio']:.2f}x), {r['build_s']:.1f}s")
    return row


def run(ctx) -> dict:
    s = resolve_settings(ctx)
    ctx.log(f"build: settings {s}")
    rows = [measure(ctx, s, c) for c in s["cases"]]
    return {"settings": s, "rows": rows, "target_ratio": TARGET_RATIO,
            "method": "fresh process per case; VmHWM after create_model minus VmRSS before (HWM reset via "
                      "/proc/self/clear_refs after a toy-size warm-up build)"}


def merge(old: dict, new: dict) -> dict:
    out = dict(new)
    seen = {(r["variant"], r["case"], r["recipe"]) for r in new["rows"]}
    out["rows"] = [r for r in old.get("rows", []) if (r["variant"], r["case"], r["recipe"]) not in seen] + new["rows"]
    return out


def summary_markdown(payload: dict) -> str:
    from vla_blocks.bench import fmt_bytes, md_table
    head = (f"Peak resident memory growth of `create_model` over the final weights (parameters + buffers), fresh "
            f"process per row; target ≤ {payload['target_ratio']}×.")
    rows = [[r["variant"], str(r.get("git", {}).get("commit") or "")[:10], r["recipe"], r["case"],
             f"{r['params'] / 1e6:.1f}M", fmt_bytes(r["weight_bytes"]), fmt_bytes(r["peak_growth"]),
             f"{r['ratio']:.2f}×", "met" if r["target_met"] else "MISSED", f"{r['build_s']:.1f}"]
            for r in payload["rows"]]
    notes = sorted({f"{r['variant']}: {r['note']}" for r in payload["rows"] if r.get("note")})
    return (head + "\n\n" + md_table(["variant", "git", "recipe", "case", "params", "weights", "peak growth",
                                       "peak / weights", "target", "build s"], rows)
            + "".join(f"\n\n{n}" for n in notes))


def render_markdown(payload: dict) -> str:
    from vla_blocks.bench import header_markdown
    s = payload["settings"]
    over = ", ".join(f"`{k}={v}`" for k, v in s["overrides"].items()) or "none"
    return "\n".join([header_markdown(payload), "", "## Summary", "", summary_markdown(payload), "",
                      f"Recipe `{s['recipe']}` with overrides {over}. Method: {payload['method']}.", ""])


def plot(payload: dict):
    import matplotlib.pyplot as plt
    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['variant']}\n{r['case']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["weight_bytes"] / 2**20 for r in rows], 0.4, label="final weights")
    ax.bar([x + 0.2 for x in xs], [r["peak_growth"] / 2**20 for r in rows], 0.4, label="peak growth")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['ratio']:.2f}×", (x + 0.2, r["peak_growth"] / 2**20), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(f"create_model peak memory ({payload['settings']['recipe']}) — {payload['device']['slug']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    from vla_blocks.cli import main
    sys.exit(main(["bench", "build", *sys.argv[1:]]))
