"""Backbone overhead: a single-expert MoT stack against the transformers model it was imported from.

Same config, same weights (``HFCausalLMBackbone.reference_model()`` is the model the stack imported), same
machine, same input embeddings: the transformers decoder body (``model.model(inputs_embeds=...)``,
``use_cache=False``: layers + final norm) against ``MoTStack`` over a one-document causal ``Layout``
(layers + final norm). Forward (no grad) and forward+backward (``out.backward(g)`` into every parameter)
are timed call by call in turn; the backward time is the difference. Outputs are checked equal first.
If the ratio is above the target (CPU ≤ 1.05×), one call of each is profiled (``torch.profiler``) and the
operators where the stack spends more self time than transformers are listed.

Run ``vla-blocks bench backbone [--smoke] [--device cuda] [--set model_types=qwen2,llama]``.
"""

from __future__ import annotations

import torch

from vla_blocks.backbones import ExpertSpec, HFCausalLMBackbone, build_language_model
from vla_blocks.bench import fmt_ms, fmt_num, header_markdown, md_table
from vla_blocks.layout import Layout, Segment

TARGET_RATIO = 1.05


def resolve_settings(ctx) -> dict:
    if ctx.smoke:
        s = dict(model_types=["qwen2"], layers=1, width=64, heads=4, kv_heads=2, ffn=128, tokens=64, batch=1,
                 dtype="float32", profile_top=8, profile_reps=1, reps=2)
    elif ctx.device.type == "cuda":
        s = dict(model_types=["qwen2", "llama", "gemma"], layers=4, width=2048, heads=16, kv_heads=4, ffn=5632,
                 tokens=4096, batch=4, dtype="bfloat16", profile_top=15, profile_reps=3, reps=20)
    else:
        s = dict(model_types=["qwen2", "llama", "gemma"], layers=4, width=1024, heads=16, kv_heads=4, ffn=2816,
                 tokens=1024, batch=1, dtype="float32", profile_top=15, profile_reps=3, reps=9)
    o = ctx.options
    if "model_types" in o:
        s["model_types"] = [m for m in o["model_types"].split(",") if m]
    for k in ("layers", "width", "heads", "kv_heads", "ffn", "tokens", "batch", "profile_top", "profile_reps", "reps"):
        if k in o:
            s[k] = int(o[k])
    if "dtype" in o:
        s["dtype"] = o["dtype"]
    s["profile"] = str(o.get("profile", "auto"))
    return s


def hf_config(mt: str, s: dict) -> dict:
    c = dict(hidden_size=s["width"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
             num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=1024,
             max_position_embeddings=max(4096, s["tokens"]), tie_word_embeddings=False, rms_norm_eps=1e-6)
    if mt == "gemma":
        c.update(head_dim=s["width"] // s["heads"], hidden_act="gelu_pytorch_tanh")
    return c


def _profile_once(fn) -> dict[str, dict]:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    out = {}
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", 0) or 0
        out[e.key] = {"calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3, "self_device_ms": dev_us / 1e3}
    return out


def profile_pair(fn_a, fn_b, reps: int, clear=lambda: None) -> tuple[dict, dict]:
    """Profiles of ``fn_a`` and ``fn_b`` taken in turn ``reps`` times; per operator the smallest self time seen
    (one-call profiles on a shared machine are noisy; the minimum is the least disturbed)."""
    runs: tuple[list, list] = ([], [])
    fn_a(), fn_b()
    for _ in range(reps):
        for i, f in enumerate((fn_a, fn_b)):
            clear()
            runs[i].append(_profile_once(f))
    clear()

    def best(profiles):
        out = {}
        for op in set().union(*profiles):
            seen = [p[op] for p in profiles if op in p]
            out[op] = {"calls": seen[0]["calls"], **{k: min(x[k] for x in seen) for k in ("self_cpu_ms", "self_device_ms")}}
        return out
    return best(runs[0]), best(runs[1])


def profile_diff(mot: dict, hf: dict, k: int, key: str) -> list[dict]:
    """Operators by (MoT self time − transformers self time), largest first."""
    rows = []
    for op in set(mot) | set(hf):
        a = mot.get(op, {}).get(key, 0.0)
        b = hf.get(op, {}).get(key, 0.0)
        rows.append({"op": op, "mot_ms": a, "hf_ms": b, "diff_ms": a - b,
                     "mot_calls": mot.get(op, {}).get("calls", 0), "hf_calls": hf.get(op, {}).get("calls", 0)})
    rows.sort(key=lambda r: -r["diff_ms"])
    return rows[:k]


def bench_model_type(ctx, mt: str, s: dict) -> dict:
    dev, dtype = ctx.device, getattr(torch, s["dtype"])
    backbone = HFCausalLMBackbone(model_type=mt, config=hf_config(mt, s), seed=0)
    ref = backbone.reference_model().to(dev, dtype).eval()
    lm = build_language_model(backbone, {"und": ExpertSpec()}).to(dev, dtype).eval()
    hf_body, stack = ref.model, lm.stack
    hf_params = sum(p.numel() for n, p in hf_body.named_parameters() if not n.startswith("embed_tokens"))
    mot_params = sum(p.numel() for p in stack.parameters())
    B, N, W = s["batch"], s["tokens"], s["width"]
    layout = Layout.from_samples([[Segment.of("causal", "und", N, "text")]] * B, ["und"]).to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, W, generator=g).to(dev, dtype)
    gout = torch.randn(B, N, W, generator=g).to(dev, dtype)
    x_flat, g_flat = x.reshape(B * N, W), gout.reshape(B * N, W)

    def hf_fwd():
        return hf_body(inputs_embeds=x, use_cache=False).last_hidden_state

    def mot_fwd():
        return stack({"und": x_flat}, layout).hidden["und"]

    with torch.no_grad():
        a, b = hf_fwd().reshape(B * N, W).float(), mot_fwd().float()
    diff, scale = float((a - b).abs().max()), float(a.abs().max())

    def nograd(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    params = list(hf_body.parameters()) + list(stack.parameters())
    # a ratio near 1 needs more repetitions than the default time budget gives seconds-long calls
    more = dict(min_reps=s["reps"], max_time_s=600.0, warmup=1)
    fwd = ctx.time_interleaved({"mot": nograd(mot_fwd), "hf": nograd(hf_fwd)}, **more)
    fwdbwd = ctx.time_interleaved({"mot": lambda: mot_fwd().backward(g_flat), "hf": lambda: hf_fwd().backward(gout)},
                                  grad_to_none=params, **more)
    for p in params:
        p.grad = None
    row = {"model_type": mt, "attn_implementation": getattr(ref.config, "_attn_implementation", None),
           "params_hf_layers_and_norm": hf_params, "params_mot_stack": mot_params,
           "max_abs_diff": diff, "max_abs": scale, "fwd": fwd, "fwd_bwd": fwdbwd,
           "ratio_fwd": fwd["mot"]["median_ms"] / fwd["hf"]["median_ms"],
           "ratio_fwd_bwd": fwdbwd["mot"]["median_ms"] / fwdbwd["hf"]["median_ms"],
           # the fastest call of each is the least disturbed by other load: a second estimate of the ratio
           "ratio_fwd_min": fwd["mot"]["min_ms"] / fwd["hf"]["min_ms"],
           "ratio_fwd_bwd_min": fwdbwd["mot"]["min_ms"] / fwdbwd["hf"]["min_ms"]}
    bwd_mot = fwdbwd["mot"]["median_ms"] - fwd["mot"]["median_ms"]
    bwd_hf = fwdbwd["hf"]["median_ms"] - fwd["hf"]["median_ms"]
    row.update(bwd_ms={"mot": bwd_mot, "hf": bwd_hf}, ratio_bwd=bwd_mot / bwd_hf if bwd_hf > 0 else None)
    row["target"] = TARGET_RATIO
    row["target_met"] = row["ratio_fwd"] <= TARGET_RATIO and row["ratio_fwd_bwd"] <= TARGET_RATIO
    want = s["profile"] == "always" or (s["profile"] == "auto" and not row["target_met"])
    if want:
        key = "self_device_ms" if dev.type == "cuda" else "self_cpu_ms"
        def clear():
            for p in params:
                p.grad = None
        reps = s["profile_reps"]
        pm, ph = profile_pair(nograd(mot_fwd), nograd(hf_fwd), reps)
        pmb, phb = profile_pair(lambda: mot_fwd().backward(g_flat), lambda: hf_fwd().backward(gout), reps, clear)
        row["profile"] = {"key": key, "reps": reps, "statistic": "per-operator minimum over the repetitions",
                          "fwd_total_ms": {"mot": sum(v[key] for v in pm.values()), "hf": sum(v[key] for v in ph.values())},
                          "fwd_bwd_total_ms": {"mot": sum(v[key] for v in pmb.values()),
                                               "hf": sum(v[key] for v in phb.values())},
                          "fwd_diff": profile_diff(pm, ph, s["profile_top"], key),
                          "fwd_bwd_diff": profile_diff(pmb, phb, s["profile_top"], key)}
    ctx.log(f"  {mt}: fwd MoT {fmt_ms(fwd['mot'])} vs HF {fmt_ms(fwd['hf'])} ms ({row['ratio_fwd']:.3f}x); fwd+bwd "
            f"{fmt_ms(fwdbwd['mot'])} vs {fmt_ms(fwdbwd['hf'])} ms ({row['ratio_fwd_bwd']:.3f}x); |Δ| {diff:.1e}")
    return row


def run(ctx) -> dict:
    s = resolve_settings(ctx)
    ctx.log(f"backbone: settings {s}")
    rows = [bench_model_type(ctx, mt, s) for mt in s["model_types"]]
    return {"settings": s, "rows": rows, "target_ratio": TARGET_RATIO}


def merge(old: dict, new: dict) -> dict:
    out = dict(new)
    seen = {r["model_type"] for r in new["rows"]}
    out["rows"] = [r for r in old.get("rows", []) if r["model_type"] not in seen] + new["rows"]
    return out


def summary_markdown(payload: dict) -> str:
    s = payload["settings"]
    head = (f"{s['layers']} layers, width {s['width']}, {s['heads']} heads / {s['kv_heads']} kv heads, FFN {s['ffn']}, "
            f"{s['batch']}×{s['tokens']} tokens, {s['dtype']}; MoT / transformers time (target ≤ {payload['target_ratio']}×)")
    def mn(r, k):
        return f" / {r[k]:.3f}×" if r.get(k) is not None else ""
    rows = [[r["model_type"], r["attn_implementation"], fmt_ms(r["fwd"]["mot"]), fmt_ms(r["fwd"]["hf"]),
             f"{r['ratio_fwd']:.3f}×" + mn(r, "ratio_fwd_min"), fmt_ms(r["fwd_bwd"]["mot"]), fmt_ms(r["fwd_bwd"]["hf"]),
             f"{r['ratio_fwd_bwd']:.3f}×" + mn(r, "ratio_fwd_bwd_min"),
             f"{r['ratio_bwd']:.3f}×" if r.get("ratio_bwd") else "–",
             "met" if r["target_met"] else "MISSED", f"{r['max_abs_diff']:.1e}", r["fwd"]["mot"].get("n")]
            for r in payload["rows"]]
    return head + "\n\n" + md_table(["backbone", "HF attention", "MoT fwd ms", "HF fwd ms", "fwd ratio (median / min)",
                                      "MoT fwd+bwd ms", "HF fwd+bwd ms", "fwd+bwd ratio (median / min)", "bwd ratio",
                                      "target (medians)", "max |Δ| out", "calls each"], rows)


def render_markdown(payload: dict) -> str:
    out = [header_markdown(payload), "", "## Summary", "", summary_markdown(payload), ""]
    for r in payload["rows"]:
        out.append(f"## {r['model_type']}")
        out.append("")
        out.append(f"Parameters: transformers layers + final norm {r['params_hf_layers_and_norm']:,}; MoT stack "
                   f"{r['params_mot_stack']:,}. Outputs agree to {r['max_abs_diff']:.1e} (max |out| "
                   f"{r['max_abs']:.2g}). Backward (fwd+bwd − fwd): MoT {fmt_num(r['bwd_ms']['mot'])} ms, "
                   f"transformers {fmt_num(r['bwd_ms']['hf'])} ms.")
        pr = r.get("profile")
        if pr:
            for label, key in (("forward", "fwd_diff"), ("forward+backward", "fwd_bwd_diff")):
                tot = pr["fwd_total_ms" if key == "fwd_diff" else "fwd_bwd_total_ms"]
                out += ["", f"Profile, {label} ({pr.get('reps', 1)} profiled calls each, taken in turn, "
                            f"{pr.get('statistic', 'one call')}; {pr['key']}; totals MoT {fmt_num(tot['mot'])} ms, "
                            f"transformers {fmt_num(tot['hf'])} ms) — operators where the MoT stack spends more:", ""]
                out.append(md_table(["op", "MoT ms", "MoT calls", "HF ms", "HF calls", "MoT − HF ms"],
                                    [[p["op"], fmt_num(p["mot_ms"]), p["mot_calls"], fmt_num(p["hf_ms"]), p["hf_calls"],
                                      fmt_num(p["diff_ms"])] for p in pr[key]]))
        out.append("")
    return "\n".join(out) + "\n"


def plot(payload: dict):
    import matplotlib.pyplot as plt
    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.2
    xs = range(len(rows))
    for i, (lab, key, who) in enumerate([("MoT fwd", "fwd", "mot"), ("HF fwd", "fwd", "hf"),
                                         ("MoT fwd+bwd", "fwd_bwd", "mot"), ("HF fwd+bwd", "fwd_bwd", "hf")]):
        ax.bar([x + (i - 1.5) * w for x in xs], [r[key][who]["median_ms"] for r in rows], w, label=lab)
    for x, r in zip(xs, rows):
        ax.annotate(f"fwd {r['ratio_fwd']:.2f}×\nfwd+bwd {r['ratio_fwd_bwd']:.2f}×",
                    (x, r["fwd_bwd"]["hf"]["median_ms"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r["model_type"] for r in rows])
    ax.set_ylim(0, 1.25 * max(max(r["fwd_bwd"]["mot"]["median_ms"], r["fwd_bwd"]["hf"]["median_ms"]) for r in rows))
    ax.set_ylabel("ms")
    s = payload["settings"]
    ax.set_title(f"single-expert MoT vs transformers ({s['layers']}L, width {s['width']}, {s['tokens']} tokens) — "
                 f"{payload['device']['slug']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    import sys
    from vla_blocks.cli import main
    sys.exit(main(["bench", "backbone", *sys.argv[1:]]))
