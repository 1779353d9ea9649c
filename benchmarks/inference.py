"""Inference benchmark: prefix-cache reuse on a pi0-proportioned MoT stack, and every policy recipe's latency.

1. **Prefix cache** (the CPU target): a two-expert MoT stack proportioned like pi0 (a 968-token image+text
   prefix through the VLM expert; a state token and 10 or 50 noisy action tokens through a narrower action
   expert; 10 flow steps). *With the cache*: one prefix pass keeping per-layer K/V, then 10 suffix passes
   that read it. *Without*: 10 full passes over prefix + suffix. Both run the same Euler updates and must give
   the same actions (checked). Target: with ≥ 5× faster than without. The two are timed call by call in turn.
2. **Recipes** (tiny on CPU; full size with random weights on a GPU, bf16): through the public API only —
   total latency of ``predict_action_chunk(batch)`` (``demo_inference`` when the recipe's demo batch is a
   training batch), per-stage times from forward hooks (MoT prefix pass = a stack call without a cache;
   flow step = a stack call reading the cache, split by the experts it runs; EAR = suffix passes of the
   ``ear`` expert; IAR = ``implicit_action_reasoner*``; AGP = ``explicit_action_reasoner``,
   ``action_reasoning_fusion`` and the ``*_reason_proj`` layers; plus each top-level child module), peak
   memory, and a training step (forward, backward, AdamW step) with MoT tokens per second. Hooks run in a
   separate instrumented call so they never inflate the timed latency. The recipes expose no switch to
   run without the prefix cache; the cache ratio is measured on the generic stack (section 1).

Run ``vla-blocks bench inference [--smoke] [--device cuda] [--set recipes=pi0-tiny,acot-tiny]``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch

from vla_blocks.bench import fmt_bytes, fmt_ms, fmt_num, header_markdown, md_table
from vla_blocks.layout import Layout, Part, Segment
from vla_blocks.mot import ExpertConfig, MoTConfig, MoTStack

POLICY_RECIPES_TINY = ("pi0-tiny", "pi05-tiny", "acot-tiny", "halo-tiny")
TARGET_CACHE_SPEEDUP = 5.0


# ---------------------------------------------------------------------------------------------- settings
def resolve_settings(ctx) -> dict:
    gpu = ctx.device.type == "cuda"
    if ctx.smoke:
        s = dict(stack=dict(layers=1, vlm_width=64, vlm_ffn=128, act_width=32, act_ffn=64, heads=4, kv_heads=1,
                            head_dim=16, prefix=96, actions=[8], steps=3, batch=1, dtype="float32"),
                 recipes=["pi0-tiny", "acot-tiny", "halo-tiny"],  # each inference path once (pi0.5 = pi0's)
                 train_batch=2, infer_batch=1, optimizer="adamw",
                 dtype="float32", stage_calls=1)
    elif gpu:
        s = dict(stack=dict(layers=18, vlm_width=2048, vlm_ffn=16384, act_width=1024, act_ffn=4096, heads=8,
                            kv_heads=1, head_dim=256, prefix=968, actions=[10, 50], steps=10, batch=1,
                            dtype="bfloat16"),
                 recipes=[r.removesuffix("-tiny") for r in POLICY_RECIPES_TINY], train_batch=1, infer_batch=1,
                 optimizer="adamw", dtype="bfloat16", stage_calls=3,
                 # HALO reasons for up to 1000 tokens by default: cap the text so one call stays in seconds
                 recipe_overrides={"halo": {"inference.max_new_tokens": 32}})
    else:
        s = dict(stack=dict(layers=6, vlm_width=512, vlm_ffn=2048, act_width=256, act_ffn=1024, heads=8, kv_heads=1,
                            head_dim=64, prefix=968, actions=[10, 50], steps=10, batch=1, dtype="float32"),
                 recipes=list(POLICY_RECIPES_TINY), train_batch=4, infer_batch=1, optimizer="adamw",
                 dtype="float32", stage_calls=3)
    o = ctx.options
    if "recipes" in o:
        s["recipes"] = [r for r in o["recipes"].split(",") if r]
    for k in ("layers", "vlm_width", "vlm_ffn", "act_width", "act_ffn", "heads", "kv_heads", "head_dim", "prefix",
              "steps", "batch"):
        if f"stack.{k}" in o:
            s["stack"][k] = int(o[f"stack.{k}"])
    if "stack.actions" in o:
        s["stack"]["actions"] = [int(x) for x in o["stack.actions"].split(",")]
    for k in ("optimizer", "dtype"):
        if k in o:
            s[k] = o[k]
    for k in ("train_batch", "infer_batch"):
        if k in o:
            s[k] = int(o[k])
    return s


# ---------------------------------------------------------------------------------------------- 1. stack
def pi0_stack(st: dict) -> MoTStack:
    """pi0's geometry scaled down: Gemma-style norms/activation, MQA, a narrower action expert."""
    e = dict(norm="gemma_rms", ffn_act="gelu_tanh")
    cfg = MoTConfig(st["layers"], st["heads"], st["kv_heads"], st["head_dim"],
                    {"vlm": ExpertConfig(st["vlm_width"], st["vlm_ffn"], **e),
                     "act": ExpertConfig(st["act_width"], st["act_ffn"], **e)})
    return MoTStack(cfg)


def pi0_layout(P: int, A: int, B: int) -> Layout:
    """``[prefix P (full, vlm) | state 1 (full, act) | actions A (noise, act)]`` per row."""
    sample = [Segment("full", [Part("vlm", P, "prefix")]), Segment.of("full", "act", 1, "state"),
              Segment.of("noise", "act", A, "actions")]
    return Layout.from_samples([sample] * B, ["vlm", "act"])


def bench_prefix_cache(ctx, st: dict) -> list[dict]:
    dev, dtype = ctx.device, getattr(torch, st["dtype"])
    torch.manual_seed(0)
    stack = pi0_stack(st).to(dev, dtype).eval()
    n_params = sum(p.numel() for p in stack.parameters())
    rows = []
    for A in st["actions"]:
        B, P, steps = st["batch"], st["prefix"], st["steps"]
        layout = pi0_layout(P, A, B).to(dev)
        prefix_layout = layout.tokens(0, P)
        g = torch.Generator().manual_seed(1)
        x_prefix = torch.randn(B * P, st["vlm_width"], generator=g).to(dev, dtype)
        x_state = torch.randn(B, 1, st["act_width"], generator=g).to(dev, dtype)
        x0 = torch.randn(B, A, st["act_width"], generator=g).to(dev, dtype)
        dt = 1.0 / steps

        def suffix_tokens(x):  # [B, 1 + A, W] in layout order (state, then actions, per row)
            return torch.cat([x_state, x], dim=1).reshape(B * (1 + A), -1)

        def velocity(h):
            return h.view(B, 1 + A, -1)[:, 1:]

        @torch.no_grad()
        def with_cache():
            cache = stack({"vlm": x_prefix}, prefix_layout, return_kv=True).cache(prefix_layout)
            x = x0
            for _ in range(steps):
                h = stack({"act": suffix_tokens(x)}, layout, start=P, cache=cache).hidden["act"]
                x = x - dt * velocity(h)
            return x

        @torch.no_grad()
        def without_cache():
            x = x0
            for _ in range(steps):
                h = stack({"vlm": x_prefix, "act": suffix_tokens(x)}, layout).hidden["act"]
                x = x - dt * velocity(h)
            return x

        cache = stack({"vlm": x_prefix}, prefix_layout, return_kv=True).cache(prefix_layout)
        with torch.no_grad():
            parts = {
                "prefix_pass": lambda: stack({"vlm": x_prefix}, prefix_layout, return_kv=True),
                "suffix_pass_cached": lambda: stack({"act": suffix_tokens(x0)}, layout, start=P, cache=cache),
                "full_pass": lambda: stack({"vlm": x_prefix, "act": suffix_tokens(x0)}, layout),
            }
            a, b = with_cache(), without_cache()
            diff = float((a.float() - b.float()).abs().max())
            scale = float(b.float().abs().max())
            times = ctx.time_interleaved({"with_cache": with_cache, "without_cache": without_cache})
            part_times = {k: ctx.time(f) for k, f in parts.items()}
            mem = {"with_cache": ctx.memory(with_cache)["peak_bytes"],
                   "without_cache": ctx.memory(without_cache)["peak_bytes"]}
        ratio = times["without_cache"]["median_ms"] / times["with_cache"]["median_ms"]
        row = {"actions": A, "prefix": P, "batch": B, "steps": steps, "tokens_full": layout.seq_len,
               "params": n_params, "time": times, "parts": part_times, "peak_mem_bytes": mem,
               "speedup": ratio, "target": TARGET_CACHE_SPEEDUP, "target_met": ratio >= TARGET_CACHE_SPEEDUP,
               "actions_max_abs_diff": diff, "actions_max_abs": scale,
               "predicted_speedup_from_parts": (steps * part_times["full_pass"]["median_ms"]) /
               (part_times["prefix_pass"]["median_ms"] + steps * part_times["suffix_pass_cached"]["median_ms"])}
        rows.append(row)
        ctx.log(f"  stack A={A}: with cache {fmt_ms(times['with_cache'])} ms, without {fmt_ms(times['without_cache'])} ms"
                f" -> {ratio:.2f}x (target {TARGET_CACHE_SPEEDUP}x); |Δ| {diff:.2e}")
    return rows


# ---------------------------------------------------------------------------------------------- 2. recipes
def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None):
    """Tensors (and Layouts) of a batch moved to ``device``; floating tensors cast to ``dtype`` when given."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device, dtype)
        return obj.to(device)
    if isinstance(obj, Layout):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, dtype) for v in obj)
    return obj


AGP_NAMES = ("explicit_action_reasoner", "action_reasoning_fusion", "explicit_action_reason_proj",
             "implicit_action_reason_proj")
IAR_NAMES = ("implicit_action_reasoner", "implicit_action_reasoner_interact")


class StageRecorder:
    """Forward pre/post hooks: time per MoT stack call (prefix vs cached suffix, by experts), per named
    reasoner module and per top-level child. Synchronises CUDA in the hooks (instrumented calls only)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from vla_blocks.mot import MoTStack as _Stack
        self.device = device
        self.records: list[tuple[str, float, int]] = []  # (category, seconds, tokens)
        self.handles = []
        self._t: dict[int, list] = defaultdict(list)
        for name, mod in model.named_modules():
            if isinstance(mod, _Stack):
                self._hook(mod, self._stack_category)
            elif name in IAR_NAMES:
                self._hook(mod, lambda *a, n=name: ("IAR", 0))
            elif name in AGP_NAMES:
                self._hook(mod, lambda *a, n=name: ("AGP", 0))
        for name, mod in model.named_children():
            if not isinstance(mod, _Stack) and name not in IAR_NAMES + AGP_NAMES:
                self._hook(mod, lambda *a, n=name: (f"module:{n}", 0))

    @staticmethod
    def _stack_category(mod, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden")
        tokens = sum(int(v.shape[0]) for v in hidden.values())
        experts = ",".join(hidden)
        if kwargs.get("cache") is None:
            return f"MoT pass, no cache [{experts}]", tokens
        return f"MoT pass reading cache [{experts}]", tokens

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _hook(self, mod, categorize):
        def pre(m, args, kwargs):
            self._sync()
            self._t[id(m)].append((time.perf_counter(), *categorize(m, args, kwargs)))

        def post(m, args, kwargs, out):
            self._sync()
            t0, cat, tok = self._t[id(m)].pop()
            self.records.append((cat, time.perf_counter() - t0, tok))

        self.handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(mod.register_forward_hook(post, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()

    def summary(self, calls: int = 1) -> dict:
        out: dict[str, dict] = {}
        for cat, sec, tok in self.records:
            d = out.setdefault(cat, {"calls": 0, "total_ms": 0.0, "tokens": 0})
            d["calls"] += 1
            d["total_ms"] += sec * 1e3
            d["tokens"] += tok
        for d in out.values():
            d["per_call_ms"] = d["total_ms"] / d["calls"]
            d["calls"] /= calls
            d["total_ms"] /= calls
            d["tokens"] /= calls
        return out


def _experts(category: str) -> set[str]:
    return set(category.split("[", 1)[1].rstrip("]").split(",")) if "[" in category else set()


def _stage_view(stages: dict) -> dict:
    """Prefix time, time per flow step and EAR / IAR / AGP overheads from the recorded categories."""
    def total(pred):
        return sum(v["total_ms"] for k, v in stages.items() if pred(k)) or None

    prefix = total(lambda k: k.startswith("MoT pass, no cache"))
    step_cats = {k: v for k, v in stages.items() if k.startswith("MoT pass reading cache")}
    act_steps = {k: v for k, v in step_cats.items() if "act" in _experts(k)}  # action flow steps
    ear_steps = {k: v for k, v in step_cats.items() if "ear" in _experts(k) and k not in act_steps}
    flow_step = None
    if act_steps:
        calls = sum(v["calls"] for v in act_steps.values())
        flow_step = sum(v["total_ms"] for v in act_steps.values()) / calls if calls else None
    mot_all = total(lambda k: k.startswith("MoT pass")) or 0.0
    accounted = (prefix or 0.0) + sum(v["total_ms"] for v in act_steps.values()) + \
        sum(v["total_ms"] for v in ear_steps.values())
    return {"prefix_ms": prefix, "flow_step_ms": flow_step, "other_mot_ms": mot_all - accounted,
            "flow_steps": sum(v["calls"] for v in act_steps.values()) if act_steps else 0,
            "ear_ms": sum(v["total_ms"] for v in ear_steps.values()) if ear_steps else None,
            "ear_steps": sum(v["calls"] for v in ear_steps.values()) if ear_steps else 0,
            "iar_ms": total(lambda k: k == "IAR"), "agp_ms": total(lambda k: k == "AGP")}


def bench_recipe(ctx, name: str, s: dict) -> dict:
    from vla_blocks import create_model
    from vla_blocks.model import VLAModel
    dev = ctx.device
    dtype = getattr(torch, s["dtype"])
    row: dict[str, Any] = {"recipe": name}
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        overrides = s.get("recipe_overrides", {}).get(name, {})
        row["overrides"] = overrides
        if dev.type == "cuda":  # full size: random weights created on the GPU directly
            with torch.device(dev):
                model = create_model(name, **overrides)
        else:
            model = create_model(name, **overrides)
        if dev.type != "cpu" or dtype != torch.float32:  # models are built on CPU in fp32
            model = model.to(dev, dtype)
        row["build_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a recipe not (yet) buildable is reported, not fatal
        return {**row, "status": "skipped", "reason": f"cannot build: {type(e).__name__}: {str(e)[:300]}"}
    row["params"] = sum(p.numel() for p in model.parameters())
    row["model"] = type(model).__name__
    if type(model).predict_action_chunk is VLAModel.predict_action_chunk:
        return {**row, "status": "skipped", "reason": "not a policy (no predict_action_chunk)"}
    try:
        g = torch.Generator().manual_seed(0)
        batch = to_device(model.demo_batch(batch_size=s["infer_batch"], generator=g), dev, None)
        model.eval()
        api = "predict_action_chunk"

        def infer():
            with torch.no_grad():
                return model.predict_action_chunk(batch) if api == "predict_action_chunk" else model.demo_inference(batch)
        try:
            out = infer()
        except (KeyError, TypeError):
            api = "demo_inference"  # the demo batch is a training batch (e.g. HALO's collate)
            out = infer()
        row["inference_api"] = api
        if isinstance(out, torch.Tensor):
            row["output_shape"] = list(out.shape)
        elif isinstance(out, dict) and isinstance(out.get("timings"), dict):
            row["model_timings_ms"] = {k: v * 1e3 for k, v in out["timings"].items()}
        row["latency"] = ctx.time(infer)
        row["peak_mem_bytes"] = ctx.memory(infer)["peak_bytes"]
        rec = StageRecorder(model, dev)
        try:
            for _ in range(s["stage_calls"]):
                infer()
        finally:
            rec.remove()
        row["stages"] = rec.summary(s["stage_calls"])
        row.update(_stage_view(row["stages"]))
        # training step
        tb = to_device(model.demo_batch(batch_size=s["train_batch"], generator=torch.Generator().manual_seed(1)),
                       dev, None)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.AdamW(params, lr=1e-6) if s["optimizer"] == "adamw" else torch.optim.SGD(params, lr=1e-6))

        def train_step():
            loss, _ = model(tb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rec = StageRecorder(model, dev)
        try:
            train_step()
        finally:
            rec.remove()
        mot_tokens = sum(v["tokens"] for k, v in rec.summary().items() if k.startswith("MoT pass"))
        row["train"] = {"batch_size": s["train_batch"], "optimizer": s["optimizer"], "mot_tokens": mot_tokens,
                        "time": ctx.time(train_step), "peak_mem_bytes": ctx.memory(train_step)["peak_bytes"]}
        ms = row["train"]["time"]["median_ms"]
        row["train"]["tokens_per_s"] = mot_tokens / (ms * 1e-3)
        row["train"]["samples_per_s"] = s["train_batch"] / (ms * 1e-3)
        row["status"] = "ok"
        model.eval()
        ctx.log(f"  {name}: latency {fmt_ms(row['latency'])} ms (prefix {fmt_num(row['prefix_ms'])}, flow step "
                f"{fmt_num(row['flow_step_ms'])} ms), train step {fmt_ms(row['train']['time'])} ms")
    except Exception as e:  # noqa: BLE001
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:400]}")
        ctx.log(f"  {name}: error {row['error']}")
    finally:
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run(ctx) -> dict:
    s = resolve_settings(ctx)
    ctx.log(f"inference: settings {s}")
    stack_rows = bench_prefix_cache(ctx, s["stack"])
    recipes = [bench_recipe(ctx, r, s) for r in s["recipes"]]
    return {"settings": s, "prefix_cache": stack_rows, "recipes": recipes,
            "notes": ["Recipe latencies go through predict_action_chunk / demo_inference only; stage times come "
                      "from a separate instrumented call (forward hooks) and are per inference call.",
                      "The recipes have no option to run without the prefix cache: 'with vs without the cache' is "
                      "measured on the generic pi0-proportioned stack (prefix_cache section)."]}


def merge(old: dict, new: dict) -> dict:
    out = dict(new)
    names = {r["recipe"] for r in new.get("recipes", [])}
    out["recipes"] = [r for r in old.get("recipes", []) if r["recipe"] not in names] + new.get("recipes", [])
    acts = {r["actions"] for r in new.get("prefix_cache", [])}
    out["prefix_cache"] = [r for r in old.get("prefix_cache", []) if r["actions"] not in acts] + new.get("prefix_cache", [])
    return out


# ---------------------------------------------------------------------------------------------- rendering
def summary_markdown(payload: dict) -> str:
    st = payload["settings"]["stack"]
    rows = [[f"{r['prefix']} + 1 + {r['actions']}", r["steps"], fmt_ms(r["time"]["with_cache"]),
             fmt_ms(r["time"]["without_cache"]), f"{r['speedup']:.2f}×",
             f"{'met' if r['target_met'] else 'MISSED'} (≥ {r['target']:.0f}×)"] for r in payload["prefix_cache"]]
    out = [f"Prefix cache on a pi0-proportioned MoT stack ({st['layers']} layers, VLM {st['vlm_width']}/"
           f"{st['vlm_ffn']}, action expert {st['act_width']}/{st['act_ffn']}, {st['heads']} heads × {st['head_dim']}, "
           f"{st['kv_heads']} kv head, {st['dtype']}):", "",
           md_table(["tokens (prefix + state + actions)", "flow steps", "with cache ms", "without ms", "speedup",
                     "target"], rows), ""]
    rec = []
    for r in payload["recipes"]:
        if r.get("status") != "ok":
            rec.append([r["recipe"], f"{r.get('status')}: {r.get('reason') or r.get('error')}"] + ["–"] * 9)
            continue
        rec.append([r["recipe"], fmt_num(r["params"] / 1e6, 3) + "M", fmt_ms(r["latency"]), fmt_num(r["prefix_ms"]),
                    fmt_num(r["flow_step_ms"]) + f" ×{fmt_num(r['flow_steps'])}", fmt_num(r["ear_ms"]),
                    fmt_num(r["iar_ms"]), fmt_num(r["agp_ms"]), fmt_num(r.get("other_mot_ms")), fmt_ms(r["train"]["time"]),
                    fmt_num(r["train"]["tokens_per_s"])])
    out.append(md_table(["recipe", "params", "latency ms", "prefix ms", "flow step ms × steps", "EAR ms", "IAR ms",
                         "AGP ms", "other MoT ms", "train step ms", "train MoT tokens/s"], rec))
    return "\n".join(out)


def render_markdown(payload: dict) -> str:
    out = [header_markdown(payload), "", "## Summary", "", summary_markdown(payload), ""]
    out += ["## Prefix cache, details", ""]
    out.append(md_table(["actions", "prefix pass ms", "cached suffix pass ms", "full pass ms",
                         "speedup predicted from parts", "measured speedup", "peak mem with / without",
                         "max |Δ actions| (cache vs none)", "stack params"],
                        [[r["actions"], fmt_ms(r["parts"]["prefix_pass"]), fmt_ms(r["parts"]["suffix_pass_cached"]),
                          fmt_ms(r["parts"]["full_pass"]), f"{r['predicted_speedup_from_parts']:.2f}×",
                          f"{r['speedup']:.2f}×", f"{fmt_bytes(r['peak_mem_bytes']['with_cache'])} / "
                          f"{fmt_bytes(r['peak_mem_bytes']['without_cache'])}",
                          f"{r['actions_max_abs_diff']:.2e} (of {r['actions_max_abs']:.2g})", f"{r['params']:,}"]
                         for r in payload["prefix_cache"]]))
    out += ["", "## Recipes, details", ""]
    for r in payload["recipes"]:
        out.append(f"### {r['recipe']}")
        out.append("")
        if r.get("status") != "ok":
            out.append(f"{r.get('status')}: {r.get('reason') or r.get('error')}")
            out.append("")
            continue
        out.append(f"{r['model']}, {r['params']:,} parameters, via `{r['inference_api']}`; latency "
                   f"{fmt_ms(r['latency'])} ms, peak memory {fmt_bytes(r['peak_mem_bytes'])}; training step "
                   f"(batch {r['train']['batch_size']}, {r['train']['optimizer']}) {fmt_ms(r['train']['time'])} ms, "
                   f"{fmt_num(r['train']['mot_tokens'])} MoT tokens → {fmt_num(r['train']['tokens_per_s'])} tokens/s, "
                   f"peak memory {fmt_bytes(r['train']['peak_mem_bytes'])}.")
        out.append("")
        out.append(md_table(["stage (instrumented call)", "calls", "total ms", "per call ms", "tokens"],
                            [[k, fmt_num(v["calls"]), fmt_num(v["total_ms"]), fmt_num(v["per_call_ms"]),
                              fmt_num(v["tokens"])] for k, v in sorted(r["stages"].items(),
                                                                       key=lambda kv: -kv[1]["total_ms"])]))
        if r.get("model_timings_ms"):
            out += ["", "The model's own trace timings (ms): " +
                    ", ".join(f"{k} {fmt_num(v)}" for k, v in r["model_timings_ms"].items())]
        out.append("")
    out += ["## Notes", ""] + [f"- {n}" for n in payload.get("notes", [])]
    return "\n".join(out) + "\n"


def plot(payload: dict):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    pc = payload["prefix_cache"]
    xs = range(len(pc))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["time"]["with_cache"]["median_ms"] for r in pc], w, label="with prefix cache")
    ax.bar([x + w / 2 for x in xs], [r["time"]["without_cache"]["median_ms"] for r in pc], w, label="recompute prefix")
    for x, r in zip(xs, pc):
        ax.annotate(f"{r['speedup']:.1f}×", (x, r["time"]["without_cache"]["median_ms"]), ha="center", va="bottom")
    ax.set_xticks(list(xs), [f"{r['prefix']}+1+{r['actions']} tok, {r['steps']} steps" for r in pc])
    ax.set_ylabel("ms per inference")
    ax.set_title("pi0-proportioned MoT stack")
    ax.legend()
    ax = axes[1]
    ok = [r for r in payload["recipes"] if r.get("status") == "ok"]
    comps = [("prefix", "prefix_ms"), ("flow steps", None), ("EAR", "ear_ms"), ("IAR", "iar_ms"), ("AGP", "agp_ms"),
             ("other MoT passes (text decoding, latent flow)", "other_mot_ms")]
    bottom = [0.0] * len(ok)
    for lab, key in comps:
        vals = []
        for r in ok:
            v = (r["flow_step_ms"] or 0) * r["flow_steps"] if key is None else (r.get(key) or 0)
            vals.append(v)
        ax.bar(range(len(ok)), vals, 0.6, bottom=bottom, label=lab)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(range(len(ok)), [r["latency"]["median_ms"] for r in ok], color="k", zorder=3, label="total latency")
    ax.set_xticks(range(len(ok)), [r["recipe"] for r in ok])
    ax.set_ylabel("ms (stages from an instrumented call)")
    ax.set_title("recipes: inference stages")
    ax.legend(fontsize=8)
    fig.suptitle(f"inference — {payload['device']['name']} ({payload['device']['slug']})")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    import sys
    from vla_blocks.cli import main
    sys.exit(main(["bench", "inference", *sys.argv[1:]]))
