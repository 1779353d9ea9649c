"""Attention benchmark: every backend × Layout masks × sequence lengths × head_dim × dtype, forward and
forward+backward, plus mask preparation, metadata memory and the mask-metadata scaling to 32k tokens.

Methodology (reference/attention_kernels.md §5):

- **useful FLOPs** count only allowed (q, k) pairs, exactly, from the metadata
  (``MaskMeta.num_allowed_pairs``): forward ``4·B·H·D·pairs``, backward 2.5× forward, forward+backward
  3.5×. Tiles visited at 128×128 (``tile_summary``) give the *issued* pairs; pairs / issued is the mask
  efficiency, kept apart from kernel efficiency;
- each rate is also shown as % of the device's dense peak (GPUs with a known peak), % of a matmul of the
  same dtype measured in the same run, % of a dense causal attention at the same (B, H, S, D) measured in
  the same run (flash-attn's ``causal=True`` when installed, else SDPA ``is_causal=True``: the FlashAttention
  comparator), and as a speedup over the dense-mask SDPA route;
- mask preparation (``mask_meta``, ``tile_summary``, the dense mask of ``sdpa``, the ``BlockMask`` of
  ``flex``, the varlen plan of ``flash_attn``/``xformers``, the Triton kernel metadata) and the metadata's
  memory are their own rows, also amortised over ``n_layers``;
- backends that cannot run a configuration are listed with their ``not_supported_reasons``; the Triton
  kernels are not timed on CPU (the interpreter is a correctness tool, far too slow to time).

Layouts (built with ``Layout``/``Segment``; samples packed as documents into rows of S tokens, the tail
filled by a proportionally scaled sample, then padding):

- ``causal``: one causal document per row (the LM baseline);
- ``doc_causal``: causal documents of S/16–S/4 tokens packed per row (seeded);
- ``pi0``: 3 cameras × 256 image tokens + 48 text tokens (one full prefix), 1 state token (full), 50 noisy
  action tokens (noise);
- ``acot``: ACoT-VLA (LIBERO): 3 × 256 image tokens with the third camera masked (invalid) + 200 text (full
  prefix, 968 positions), 15 EAR tokens and 10 action tokens as two parallel noise segments;
- ``halo``: HALO EM-CoT: 2 history frames (clean VAE latent + ViT image, 16×16 tokens each, with markers),
  prompt (34) and thought (50) causal text, the goal as noisy latent, clean latent and ViT image, then a
  16-step action chunk (noise) — several samples packed per row.

Sections (``--set sections=sweep,scaling,sparse``, all by default): ``sweep`` is the backend × layout × S grid
above; ``scaling`` the metadata build at 8k–32k; ``sparse`` the dense-mask ``sdpa`` path against ``sdpa_blocks``
(per-document blocks, no N×N mask) and what ``auto`` runs, on one row per case (``--set
sparse_cases=pi0@8192,halo@32768@fwd+bwd``): per-call time with the batch's mask/plan cached, the first call
of a batch (builds them), and its peak memory growth. The dense path is not run where it would need more than
``sparse_dense_max_gib`` (4 GiB on CPU).

Run ``vla-blocks bench attention [--smoke] [--device cuda] [--set seq_lens=1024,2048 --set layouts=pi0,halo]``
or ``python benchmarks/attention.py`` with the same flags.
"""

from __future__ import annotations

import random
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from vla_blocks.attention import MaskMeta, attention, backends
from vla_blocks.attention.dispatch import AttentionInputs
from vla_blocks.bench import fmt_bytes, fmt_ms, fmt_num, header_markdown, matmul_reference, md_table
from vla_blocks.layout import Layout, Part, Segment

LAYOUTS = ("causal", "doc_causal", "pi0", "acot", "halo")
TILE = 128
N_LAYERS_AMORTISED = 18  # pi0 / ACoT Gemma depth: metadata is built once per batch and shared by every layer


# ---------------------------------------------------------------------------------------------- layouts
def _n(x: int, f: float, lo: int = 1) -> int:
    return max(lo, int(round(x * f)))


def pi0_sample(f: float = 1.0):
    img, txt, act = _n(256, f), _n(48, f), _n(50, f, 4)
    prefix = Segment("full", [Part("vlm", img, "image0"), Part("vlm", img, "image1"), Part("vlm", img, "image2"),
                              Part("vlm", txt, "text")])
    return [prefix, Segment.of("full", "act", 1, "state"), Segment.of("noise", "act", act, "action")]


def acot_sample(f: float = 1.0):
    img, txt, ear, act = _n(256, f), _n(200, f), _n(15, f, 2), _n(10, f, 2)
    prefix = Segment("full", [Part("vlm", img, "image0"), Part("vlm", img, "image1"),
                              Part("vlm", img, "image2", valid=False),  # the masked right-wrist camera
                              Part("vlm", txt, "text")])
    return [prefix, Segment.of("noise", "ear", ear, "ear", rope="sequential_hold"),
            Segment.of("noise", "act", act, "action", rope="sequential_hold")]


def halo_sample(f: float = 1.0):
    g = _n(256, f, 1)  # tokens per image (16×16 at f=1)

    def marked(expert, n, label, mode, rope):
        return Segment(mode, [Part("und", 1, "marker"), Part(expert, n, label), Part("und", 1, "marker")], rope)

    s = []
    for i in range(2):  # history frames: clean VAE latent + ViT image
        s.append(marked("gen", g, "latent", "full", "block"))
        s.append(marked("und", g, "vit", "full", "block"))
    s.append(Segment.of("causal", "und", _n(34, f, 3), "prompt"))
    s.append(Segment.of("causal", "und", _n(50, f, 3), "thought"))
    s.append(marked("gen", g, "latent_noisy", "noise", "block_hold"))  # goal: noisy, then clean copies
    s.append(marked("gen", g, "latent", "full", "block"))
    s.append(marked("und", g, "vit", "full", "block"))
    s.append(marked("act", _n(16, f, 2), "action", "noise", "block_hold"))
    return s


FAMILIES = {"pi0": (pi0_sample, ["vlm", "act"]), "acot": (acot_sample, ["vlm", "ear", "act"]),
            "halo": (halo_sample, ["und", "gen", "act"])}


def sample_len(sample) -> int:
    return sum(seg.length for seg in sample)


def _fit(sample_fn, budget: int):
    """The largest proportionally scaled sample that fits ``budget`` tokens, or None."""
    f = min(1.0, budget / sample_len(sample_fn(1.0)))
    while f > 1e-3:
        s = sample_fn(f)
        if sample_len(s) <= budget:
            return s, f
        f *= 0.97
    return None


def packed_docs(sample_fn, S: int, fill_min: int = 48) -> tuple[list, list[float]]:
    """Full-size samples while they fit in S tokens, then one scaled sample in the tail (if ≥ fill_min tokens)."""
    full = sample_fn(1.0)
    L = sample_len(full)
    k = S // L
    docs, scales = [full] * k, [1.0] * k
    rem = S - k * L
    if rem >= fill_min or not docs:
        fit = _fit(sample_fn, rem)
        if fit is not None:
            docs.append(fit[0])
            scales.append(round(fit[1], 4))
    return docs, scales


def doc_lengths(S: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lo, hi = max(8, S // 16), max(8, S // 4)
    out = []
    while sum(out) < S:
        out.append(rng.randint(lo, hi))
    out[-1] -= sum(out) - S
    if out[-1] < 8 and len(out) > 1:
        last = out.pop()
        out[-1] += last
    return out


def build_layout(name: str, S: int, B: int = 1) -> tuple[Layout, dict]:
    """Layout ``name`` with ``B`` identical rows of ``S`` tokens, and a description of what is in a row."""
    if name == "causal":
        rows = [[[Segment.of("causal", "und", S, "text")]] for _ in range(B)]
        return Layout.from_samples(rows, ["und"]), {"docs": 1, "doc_lengths": [S], "pad": 0}
    if name == "doc_causal":
        lens = doc_lengths(S)
        row = [[Segment.of("causal", "und", n, "text")] for n in lens]
        return Layout.from_samples([row] * B, ["und"]), {"docs": len(lens), "doc_lengths": lens, "pad": 0}
    if name not in FAMILIES:
        raise ValueError(f"unknown layout {name!r}; layouts: {list(LAYOUTS)}")
    fn, experts = FAMILIES[name]
    docs, scales = packed_docs(fn, S)
    lens = [sample_len(d) for d in docs]
    layout = Layout.from_samples([docs] * B, experts, pad_to=S)
    return layout, {"docs": len(docs), "doc_lengths": lens, "doc_scales": scales, "pad": S - sum(lens),
                    "full_sample_segments": [(seg.mode, seg.length) for seg in fn(1.0)]}


# ---------------------------------------------------------------------------------------------- settings
def _list(v, cast):
    if isinstance(v, str):
        return [cast(x) for x in v.split(",") if x]
    return [cast(x) for x in v]


def resolve_settings(ctx) -> dict:
    gpu = ctx.device.type == "cuda"
    if ctx.smoke:
        s = dict(seq_lens=[128], head_dims=[64], dtypes=["float32"], hidden=128, tokens_per_batch=256,
                 layouts=list(LAYOUTS), passes=["fwd", "fwd+bwd"], backends=None, scaling_lens=[512, 1024],
                 scaling_layouts=["halo", "pi0", "doc_causal"], dense_check_max=2 ** 26, prep=True)
    elif gpu:
        s = dict(seq_lens=[1024, 2048, 4096, 8192, 16384, 32768], head_dims=[64, 128, 256], dtypes=["bfloat16"],
                 hidden=2048, tokens_per_batch=32768, layouts=list(LAYOUTS), passes=["fwd", "fwd+bwd"],
                 backends=None, scaling_lens=[8192, 16384, 32768], scaling_layouts=["halo", "pi0", "doc_causal"],
                 dense_check_max=2 ** 31, prep=True)
    else:
        s = dict(seq_lens=[256, 512, 1024, 2048], head_dims=[64, 128, 256], dtypes=["float32", "bfloat16"],
                 hidden=512, tokens_per_batch=None, layouts=list(LAYOUTS), passes=["fwd", "fwd+bwd"],
                 backends=None, scaling_lens=[8192, 16384, 32768], scaling_layouts=["halo", "pi0", "doc_causal"],
                 dense_check_max=2 ** 26, prep=True)
    s["cpu_flex_max_S"] = int(ctx.options.get("cpu_flex_max_S", 1024))
    s["sections"] = ["sweep", "scaling", "sparse"]
    if ctx.smoke:
        s["sparse_cases"] = ["doc_causal@512", "pi0@512@fwd"]
    elif gpu:
        s["sparse_cases"] = ["pi0@8192", "halo@8192", "doc_causal@8192", "pi0@32768@fwd+bwd", "halo@32768@fwd+bwd",
                             "acot@1024", "halo@1024"]
    else:
        s["sparse_cases"] = ["pi0@8192", "halo@8192", "doc_causal@8192", "pi0@32768@fwd+bwd", "halo@32768@fwd+bwd",
                             "acot@1024", "halo@1024"]
    s["sparse_dense_max_gib"] = float(ctx.options.get("sparse_dense_max_gib", 40 if gpu else 4))
    o = ctx.options
    for key, cast in (("seq_lens", int), ("head_dims", int), ("dtypes", str), ("layouts", str), ("passes", str),
                      ("backends", str), ("scaling_lens", int), ("scaling_layouts", str), ("sections", str),
                      ("sparse_cases", str)):
        if key in o:
            s[key] = _list(o[key], cast)
    for key in ("hidden", "tokens_per_batch"):
        if key in o:
            s[key] = int(o[key]) if o[key] not in ("none", "None", "") else None
    if "prep" in o:
        s["prep"] = str(o["prep"]).lower() in ("1", "true", "yes")
    for lay in s["layouts"] + s["scaling_layouts"]:
        if lay not in LAYOUTS:
            raise ValueError(f"unknown layout {lay!r}; layouts: {list(LAYOUTS)}")
    for sec in s["sections"]:
        if sec not in ("sweep", "scaling", "sparse"):
            raise ValueError(f"unknown section {sec!r}; sections: sweep, scaling, sparse")
    parse_sparse_cases(s["sparse_cases"])
    return s


def parse_sparse_cases(cases: list[str]) -> list[tuple[str, int, list[str]]]:
    """``layout@S[@pass]`` → (layout, S, passes); both passes when none is named."""
    out = []
    for c in cases:
        parts = c.split("@")
        if len(parts) not in (2, 3) or parts[0] not in LAYOUTS or not parts[1].isdigit():
            raise ValueError(f"sparse case {c!r} is not layout@S[@pass] with a layout of {list(LAYOUTS)}")
        passes = [parts[2]] if len(parts) == 3 else ["fwd", "fwd+bwd"]
        for p_ in passes:
            if p_ not in ("fwd", "fwd+bwd"):
                raise ValueError(f"sparse case {c!r}: pass {p_!r} is not fwd or fwd+bwd")
        out.append((parts[0], int(parts[1]), passes))
    return out


def batch_for(S: int, settings: dict) -> int:
    tpb = settings["tokens_per_batch"]
    return max(1, tpb // S) if tpb else 1


# ---------------------------------------------------------------------------------------------- helpers
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def tensor_bytes(*ts) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor)))


def block_mask_bytes(bm) -> int:
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
             "full_q_num_blocks", "full_q_indices")
    return tensor_bytes(*(getattr(bm, n, None) for n in names))


def fresh(meta: MaskMeta) -> MaskMeta:
    """A MaskMeta with the same vectors and an empty per-batch cache (to time preparation cold)."""
    return MaskMeta(*meta.vectors())


def _short(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 400 else s[:400] + "…"


def dense_causal_reference(q, k, v):
    """The FlashAttention comparator: flash-attn ``causal=True`` when installed (CUDA), else SDPA ``is_causal``."""
    if q.device.type == "cuda":
        try:
            from flash_attn import flash_attn_func
            if q.dtype in (torch.float16, torch.bfloat16):
                return "flash_attn causal=True", lambda q, k, v: flash_attn_func(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        except ImportError:
            pass
    return "sdpa is_causal=True", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ---------------------------------------------------------------------------------------------- mask prep
def mask_prep_rows(ctx, layout: Layout, meta: MaskMeta, name: str, S: int, B: int, settings: dict) -> list[dict]:
    """Per-step preparation times (cold caches) and the bytes each structure holds."""
    from vla_blocks.attention.builtin import flex_block_mask
    steps: list[tuple[str, str, Any, Any]] = [
        ("mask_meta", "all", lambda: layout.mask_meta(), lambda m: tensor_bytes(*m.vectors())),
        (f"tile_summary({TILE},{TILE})", "flex, triton", lambda: fresh(meta).tile_summary(TILE, TILE),
         lambda s: tensor_bytes(s.state)),
        (f"mask_meta + tile_summary({TILE},{TILE})", "flex, triton",
         lambda: layout.mask_meta().tile_summary(TILE, TILE), None),
    ]
    if B * meta.q_len * meta.k_len <= settings["dense_check_max"] * 4:
        steps.append(("dense mask", "sdpa", lambda: fresh(meta).dense(), lambda m: tensor_bytes(m)))
    steps.append(("BlockMask from tile summaries", "flex", lambda: flex_block_mask(fresh(meta), TILE), block_mask_bytes))
    try:
        from vla_blocks.attention.optional import VarlenPlan, varlen_plan

        def plan_bytes(p):
            if not isinstance(p, VarlenPlan):
                return 0
            return tensor_bytes(p.q_rows, p.q_cols, p.k_rows, p.k_cols, p.cu_seqlens_q, p.cu_seqlens_k)
        steps.append(("varlen plan", "flash_attn, xformers", lambda: varlen_plan(fresh(meta)), plan_bytes))
    except ImportError:
        pass
    try:
        from vla_blocks.kernels import get_config, kernel_meta
        align = get_config(128, "bfloat16").key_align if hasattr(get_config(128, "bfloat16"), "key_align") else TILE
        steps.append(("kernel metadata (kernel_meta)", "triton", lambda: kernel_meta(fresh(meta), 0, align),
                      lambda km: tensor_bytes(*km.q_vecs, *km.k_vecs)))
    except Exception:  # noqa: BLE001 - kernels in progress or triton-free install
        pass
    rows = []
    for step, used_by, fn, nbytes in steps:
        row = {"kind": "mask_prep", "layout": name, "S": S, "B": B, "step": step, "used_by": used_by}
        try:
            out = fn()
            ctx.sync()
            row["time"] = ctx.time(fn)
            row["per_layer_ms"] = row["time"]["median_ms"] / N_LAYERS_AMORTISED
            if nbytes is not None:
                row["bytes"] = int(nbytes(out))
            if step == "varlen plan" and isinstance(out, list):
                row["note"] = "not expressible: " + "; ".join(out)
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            row.update(status="error", error=_short(e))
        rows.append(row)
    return rows


def metadata_memory(meta: MaskMeta, B: int, sdpa: bool = True) -> dict:
    stats = meta.tile_stats(TILE, TILE)
    summ = meta.tile_summary(TILE, TILE)
    lists = summ.kv_lists()
    return {"vectors_bytes": tensor_bytes(*meta.vectors()),
            "tile_stats_bytes": tensor_bytes(*stats.values()),
            "tile_summary_bytes": tensor_bytes(summ.state),
            "kv_lists_bytes": tensor_bytes(*lists),
            "dense_mask_bytes": B * meta.q_len * meta.k_len,
            "sdpa_mask_bytes": sdpa_mask_bytes(meta, B) if sdpa else None}


def sdpa_mask_bytes(meta: MaskMeta, B: int) -> int:
    """What the sdpa backend caches per batch: nothing on its is_causal fast path, else the dense mask (and an
    empty-row-safe copy when some query row attends nothing)."""
    plain = getattr(meta, "is_plain_causal", None)
    if plain is not None and plain():
        return 0
    n = B * meta.q_len * meta.k_len
    if meta.q_len * meta.k_len * B > 2 ** 28:
        return n  # not checked for empty rows at this size
    return 2 * n if bool((~meta.dense().any(-1)).any()) else n


# ---------------------------------------------------------------------------------------------- attention rows
BENCH_ONLY_REASONS = {
    "triton": "not timed on CPU: the Triton kernels run here only under TRITON_INTERPRET=1, a correctness tool "
              "orders of magnitude too slow to benchmark",
}


def backend_reasons(b, q, k, v, meta, need_grad: bool, device: torch.device, settings: dict) -> list[str]:
    """The backend's own ``not_supported_reasons``, else the benchmark's reason not to time it here."""
    qq, kk, vv = (t.detach().requires_grad_(need_grad) for t in (q, k, v))
    with torch.set_grad_enabled(need_grad):
        r = list(b.not_supported_reasons(AttentionInputs(qq, kk, vv, meta)))
    if r:
        return r
    if device.type == "cpu" and b.name in BENCH_ONLY_REASONS:
        return [BENCH_ONLY_REASONS[b.name]]
    if device.type == "cpu" and b.name == "flex" and q.shape[2] > settings["cpu_flex_max_S"]:
        return [f"not timed on CPU above S={settings['cpu_flex_max_S']} (--set cpu_flex_max_S=N): Flex runs unfused "
                f"here (eager, materialising the score matrix), seconds per call; see the smaller S"]
    return []


def measure_attention(ctx, fn_fwd, q, k, v, dO, pass_: str) -> dict:
    """Time and peak memory of the forward (no grad) or forward+backward of ``fn_fwd(q, k, v)``."""
    if pass_ == "fwd":
        def f():
            with torch.no_grad():
                return fn_fwd(q, k, v)
        grads = None
    else:
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))

        def f():
            fn_fwd(q, k, v).backward(dO)
        grads = [q, k, v]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f()  # first call: compilation / caches out of the timing
        ctx.sync()
        t = ctx.time(f, grad_to_none=grads)
        for g in grads or ():
            g.grad = None
        mem = ctx.memory(f)
    out = {"time": t, "peak_mem_bytes": mem["peak_bytes"]}
    msgs = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    if msgs:
        out["warnings"] = msgs
    return out


def run(ctx) -> dict:
    s = resolve_settings(ctx)
    dev = ctx.device
    if dev.type == "cuda":
        import torch._dynamo as dynamo
        dynamo.config.recompile_limit = 10_000
        dynamo.config.accumulated_recompile_limit = 100_000
    all_backends = backends()
    names = [b.name for b in all_backends]
    chosen = [b for b in all_backends if s["backends"] is None or b.name in s["backends"]]
    ctx.log(f"attention: backends {names}; settings {s}")
    matmul = {}
    for dt in s["dtypes"]:
        matmul[dt] = matmul_reference(dev, _dtype(dt), ctx.timer, smoke=ctx.smoke)
        ctx.log(f"  matmul {dt} n={matmul[dt]['n']}: {matmul[dt]['tflops'] * 1e3:.1f} GFLOP/s")
    rows: list[dict] = []
    layouts_info: list[dict] = []
    prep_rows: list[dict] = []
    for S in (s["seq_lens"] if "sweep" in s["sections"] else []):
        B = batch_for(S, s)
        metas = {}
        for name in s["layouts"]:
            t0 = time.perf_counter()
            layout, desc = build_layout(name, S, B)
            build_s = time.perf_counter() - t0
            layout = layout.to(dev)
            meta = layout.mask_meta()
            pairs = meta.num_allowed_pairs()
            info = {"layout": name, "S": S, "B": B, **desc, "allowed_pairs": pairs,
                    "density": pairs / (B * S * S), "layout_build_ms": build_s * 1e3}
            if B * S * S <= s["dense_check_max"]:
                info["allowed_pairs_dense_check"] = int(meta.dense().sum())
                meta = layout.mask_meta()  # drop the cached dense mask: each backend builds what it needs
            counts = meta.tile_summary(TILE, TILE).counts()
            issued = (counts["partial"] + counts["full"]) * TILE * TILE
            info.update(tiles=counts, tile=TILE, issued_pairs=issued, mask_efficiency=pairs / issued if issued else None,
                        memory=metadata_memory(meta, B))
            layouts_info.append(info)
            metas[name] = (layout, meta, pairs)
            if s["prep"]:
                prep_rows += mask_prep_rows(ctx, layout, layout.mask_meta(), name, S, B, s)
            ctx.log(f"  S={S} B={B} {name}: {desc['docs']} docs, pairs {pairs} (density {info['density']:.3f}), "
                    f"tiles {counts}")
        for D in s["head_dims"]:
            H = max(1, s["hidden"] // D)
            for dt in s["dtypes"]:
                dtype = _dtype(dt)
                g = torch.Generator(device="cpu").manual_seed(0)
                q, k, v, dO = (torch.randn(B, H, S, D, generator=g).to(dev, dtype) for _ in range(4))
                for pass_ in s["passes"]:
                    mult = 1.0 if pass_ == "fwd" else 3.5
                    ref_name, ref_fn = dense_causal_reference(q, k, v)
                    ref_pairs = B * S * (S + 1) // 2
                    ref = {"kind": "reference", "backend": ref_name, "layout": "dense causal", "S": S, "B": B, "H": H,
                           "D": D, "dtype": dt, "pass": pass_, "allowed_pairs": ref_pairs,
                           "useful_flops": mult * 4 * B * H * D * ref_pairs}
                    try:
                        ref.update(measure_attention(ctx, ref_fn, q, k, v, dO, pass_), status="ok")
                        ref["useful_tflops"] = ref["useful_flops"] / (ref["time"]["median_ms"] * 1e-3) / 1e12
                        ref["pct_matmul"] = 100 * ref["useful_tflops"] / matmul[dt]["tflops"] if dt in matmul else None
                        pk = ctx_peak_tflops(ctx, dt)
                        ref["pct_peak"] = 100 * ref["useful_tflops"] / pk if pk else None
                    except Exception as e:  # noqa: BLE001
                        ref.update(status="error", error=_short(e))
                    rows.append(ref)
                    for name in s["layouts"]:
                        layout, meta, pairs = metas[name]
                        sdpa_ms = None
                        for b in chosen:
                            row = {"kind": "attention", "backend": b.name, "layout": name, "S": S, "B": B, "H": H,
                                   "D": D, "dtype": dt, "pass": pass_, "allowed_pairs": pairs,
                                   "useful_flops": mult * 4 * B * H * D * pairs}
                            reasons = backend_reasons(b, q, k, v, meta, pass_ != "fwd", dev, s)
                            if reasons:
                                row.update(status="skipped", reasons=reasons)
                                rows.append(row)
                                continue
                            try:
                                fn = (lambda b_: lambda q_, k_, v_: attention(q_, k_, v_, meta, backend=b_.name))(b)
                                row.update(measure_attention(ctx, fn, q, k, v, dO, pass_), status="ok")
                            except Exception as e:  # noqa: BLE001
                                row.update(status="error", error=_short(e))
                                if dev.type == "cuda":
                                    torch.cuda.empty_cache()
                                rows.append(row)
                                continue
                            ms = row["time"]["median_ms"]
                            row["useful_tflops"] = row["useful_flops"] / (ms * 1e-3) / 1e12
                            mm = matmul.get(dt)
                            row["pct_matmul"] = 100 * row["useful_tflops"] / mm["tflops"] if mm else None
                            pk = ctx_peak_tflops(ctx, dt)
                            row["pct_peak"] = 100 * row["useful_tflops"] / pk if pk else None
                            if ref.get("status") == "ok":
                                row["pct_dense_causal"] = 100 * row["useful_tflops"] / ref["useful_tflops"]
                            if b.name == "sdpa":
                                sdpa_ms = ms
                            rows.append(row)
                            ctx.log(f"    {name:10s} S={S} D={D} {dt} {pass_:7s} {b.name:10s} {fmt_ms(row['time'])} ms "
                                    f"{row['useful_tflops'] * 1e3:8.2f} GFLOP/s")
                        for row in rows:
                            if (row["kind"] == "attention" and row["layout"] == name and row["S"] == S and row["D"] == D
                                    and row["dtype"] == dt and row["pass"] == pass_ and row.get("status") == "ok"
                                    and sdpa_ms):
                                row["speedup_vs_sdpa"] = sdpa_ms / row["time"]["median_ms"]
                del q, k, v, dO
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    scaling = mask_meta_scaling(ctx, s) if "scaling" in s["sections"] else {}
    sparse = sparse_vs_dense(ctx, s) if "sparse" in s["sections"] else {}
    return {"settings": {**s, "tile": TILE, "n_layers_amortised": N_LAYERS_AMORTISED,
                         "flop_convention": "forward 4·B·H·D·allowed_pairs; forward+backward 3.5× forward"},
            "backends": names,
            "reference": {"matmul": matmul, "peak_tflops": {dt: ctx_peak_tflops(ctx, dt) for dt in s["dtypes"]}},
            "layouts": layouts_info, "rows": rows, "mask_prep": prep_rows, "scaling": scaling, "sparse": sparse}


def ctx_peak_tflops(ctx, dtype: str) -> float | None:
    if ctx.device.type != "cuda":
        return None
    from vla_blocks.bench import gpu_peak_tflops
    return gpu_peak_tflops(torch.cuda.get_device_name(ctx.device), dtype)


# ---------------------------------------------------------------------------------------------- scaling
def mask_meta_scaling(ctx, s: dict) -> dict:
    """mask_meta + tile_summary(128, 128) of one packed row at 8k/16k/32k tokens: time and bytes (target < 50 ms, O(N))."""
    from vla_blocks.attention.builtin import flex_block_mask
    out = {"target_ms": 50.0, "tile": TILE, "rows": []}
    for name in s["scaling_layouts"]:
        for N in s["scaling_lens"]:
            t0 = time.perf_counter()
            layout, desc = build_layout(name, N, 1)
            build_ms = (time.perf_counter() - t0) * 1e3
            layout = layout.to(ctx.device)
            meta = layout.mask_meta()
            row = {"layout": name, "N": N, "docs": desc["docs"], "layout_from_samples_ms": build_ms,
                   "mask_meta": ctx.time(lambda: layout.mask_meta()),
                   "tile_summary": ctx.time(lambda: fresh(meta).tile_summary(TILE, TILE)),
                   "mask_meta_plus_tile_summary": ctx.time(lambda: layout.mask_meta().tile_summary(TILE, TILE)),
                   "block_mask": ctx.time(lambda: flex_block_mask(fresh(meta), TILE)),
                   "memory": metadata_memory(meta, 1, sdpa=False),
                   "peak_mem_bytes": ctx.memory(lambda: layout.mask_meta().tile_summary(TILE, TILE))["peak_bytes"]}
            row["tiles"] = meta.tile_summary(TILE, TILE).counts()
            m = row["memory"]
            row["o_n_bytes"] = m["vectors_bytes"] + m["tile_stats_bytes"]
            row["bytes_per_token"] = row["o_n_bytes"] / N
            out["rows"].append(row)
            ctx.log(f"  scaling {name} N={N}: mask_meta+tile_summary {fmt_ms(row['mask_meta_plus_tile_summary'])} ms, "
                    f"vectors+stats {fmt_bytes(row['o_n_bytes'])}, summary {fmt_bytes(m['tile_summary_bytes'])}")
    big = [r for r in out["rows"] if r["N"] == max(s["scaling_lens"])]
    if big:
        worst = max(big, key=lambda r: r["mask_meta_plus_tile_summary"]["median_ms"])
        out["largest_N"] = worst["N"]
        out["worst_ms"] = worst["mask_meta_plus_tile_summary"]["median_ms"]
        out["target_met"] = out["worst_ms"] < out["target_ms"]
        out["profile"] = profile_top(lambda: worst_layout_meta(worst, ctx).tile_summary(TILE, TILE))
    return out


def worst_layout_meta(row, ctx):
    layout, _ = build_layout(row["layout"], row["N"], 1)
    return layout.to(ctx.device).mask_meta()


def profile_top(fn, k: int = 8) -> list[dict]:
    """Top operators by self time of one call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fn()
    with profile(activities=acts) as prof:
        fn()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in ev]


# ---------------------------------------------------------------------------------------------- sparse vs dense
SPARSE_VARIANTS = ("sdpa", "sdpa_blocks", "auto")


def sparse_vs_dense(ctx, s: dict) -> dict:
    """The dense-mask ``sdpa`` path against ``sdpa_blocks`` and what ``auto`` picks, side by side, one row of S
    tokens (B=1), D=128: per-call time with the batch's mask/plan cached (what every layer after the first pays,
    timed interleaved A B, B A…), the first call of a batch (builds the mask or the plan; one timing) and the peak
    memory growth of that first call."""
    from vla_blocks.attention import explain
    from vla_blocks.attention.blocks import block_plan
    gpu = ctx.device.type == "cuda"
    dt = "bfloat16" if gpu else "float32"
    dtype = _dtype(dt)
    D = 128
    H = max(1, s["hidden"] // D)
    out = {"D": D, "H": H, "dtype": dt, "B": 1, "rows": [], "cases": []}
    for name, S, passes in parse_sparse_cases(s["sparse_cases"]):
        layout, desc = build_layout(name, S, 1)
        layout = layout.to(ctx.device)
        meta = layout.mask_meta()
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, dO = (torch.randn(1, H, S, D, generator=g).to(ctx.device, dtype) for _ in range(4))
        plan = block_plan(meta)
        blocks_mask_bytes = sum(c.pairs for c in plan.calls if not c.full)
        inp = AttentionInputs(q, k, v, meta)
        why = dict(explain(inp))
        case = {"layout": name, "S": S, "docs": desc["docs"], "doc_lengths": desc["doc_lengths"], "pad": desc["pad"],
                "allowed_pairs": meta.num_allowed_pairs(), "dense_pairs": S * S, "plan": plan.describe(),
                "issued_pairs": plan.issued_pairs, "blocks_mask_bytes": blocks_mask_bytes,
                "dense_mask_bytes": S * S, "auto_reasons_sdpa_blocks": why.get("sdpa_blocks", [])}
        out["cases"].append(case)
        dense_est = S * S * (1 + dtype.itemsize)  # bool mask cached per batch + the float copy SDPA makes per call
        for pass_ in passes:
            need_grad = pass_ != "fwd"
            with torch.set_grad_enabled(need_grad):
                auto_name = choose_backend_name(q, k, v, meta, need_grad)
            variants = list(SPARSE_VARIANTS)
            base = {"kind": "sparse", "layout": name, "S": S, "B": 1, "H": H, "D": D, "dtype": dt, "pass": pass_,
                    "auto_chose": auto_name}
            skipped = {}
            if dense_est > s["sparse_dense_max_gib"] * 2 ** 30:
                skipped["sdpa"] = (f"not run: the dense path needs ≈{dense_est / 2 ** 30:.1f} GiB here (S² B mask + a "
                                   f"float copy per call) > {s['sparse_dense_max_gib']:g} GiB "
                                   f"(--set sparse_dense_max_gib=N)")
                if auto_name == "sdpa":
                    skipped["auto"] = skipped["sdpa"]
            run_ = [x for x in variants if x not in skipped]
            qq, kk, vv = (t.detach().requires_grad_(need_grad) for t in (q, k, v))
            warm_metas = {x: fresh(meta) for x in run_}

            def call(x, m):
                b = "auto" if x == "auto" else x
                if need_grad:
                    attention(qq, kk, vv, m, backend=b).backward(dO)
                else:
                    with torch.no_grad():
                        attention(qq, kk, vv, m, backend=b)
            fns = {x: (lambda x_: lambda: call(x_, warm_metas[x_]))(x) for x in run_}
            for f in fns.values():
                f()  # builds each variant's mask / plan on its own warm metadata
                ctx.sync()
            grads = [qq, kk, vv] if need_grad else None
            warm = ctx.time_interleaved(fns, grad_to_none=grads) if fns else {}
            for x in variants:
                row = dict(base, backend=x)
                if x in skipped:
                    row.update(status="skipped", reasons=[skipped[x]])
                    out["rows"].append(row)
                    continue
                for t_ in grads or ():
                    t_.grad = None
                m = fresh(meta)
                t0 = time.perf_counter()
                call(x, m)
                ctx.sync()
                first_ms = (time.perf_counter() - t0) * 1e3
                for t_ in grads or ():
                    t_.grad = None
                mem = ctx.memory(lambda: call(x, fresh(meta)))
                row.update(status="ok", time=warm[x], first_call_ms=first_ms, peak_mem_bytes=mem["peak_bytes"],
                           mem_method=mem.get("method"))
                out["rows"].append(row)
                ctx.log(f"  sparse {name} S={S} {pass_:7s} {x:11s} per call {fmt_ms(warm[x])} ms, first call "
                        f"{first_ms:.0f} ms, peak +{fmt_bytes(mem['peak_bytes'])}")
            for t_ in grads or ():
                t_.grad = None
        del q, k, v, dO
    return out


def choose_backend_name(q, k, v, meta, need_grad: bool) -> str:
    from vla_blocks.attention import choose_backend
    qq, kk, vv = (t.detach().requires_grad_(need_grad) for t in (q, k, v))
    return choose_backend(AttentionInputs(qq, kk, vv, fresh(meta))).name


def sparse_markdown(payload: dict, compact: bool = False) -> str:
    """Dense mask (``sdpa``) vs per-document blocks (``sdpa_blocks``) and ``auto``, per case and pass."""
    sp = payload.get("sparse") or {}
    rows = sp.get("rows") or []
    if not rows:
        return ""
    by = {}
    for r in rows:
        by.setdefault((r["layout"], r["S"], r["pass"]), {})[r["backend"]] = r
    cases = {(c["layout"], c["S"]): c for c in sp.get("cases", [])}
    body = []
    for (lay, S, ps), d in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        c = cases.get((lay, S), {})

        def cell(x, key):
            r = d.get(x)
            if r is None or r.get("status") != "ok":
                return "not run" if key == "time" else "–"
            if key == "time":
                return fmt_ms(r["time"])
            if key == "first":
                return fmt_num(r["first_call_ms"])
            return fmt_bytes(r["peak_mem_bytes"])
        dense, blocks, auto = d.get("sdpa"), d.get("sdpa_blocks"), d.get("auto")
        ok = lambda r: r is not None and r.get("status") == "ok"  # noqa: E731
        speed = fmt_num(dense["time"]["median_ms"] / blocks["time"]["median_ms"]) if ok(dense) and ok(blocks) else "–"
        memr = (f"{100 * blocks['peak_mem_bytes'] / dense['peak_mem_bytes']:.1f}%"
                if ok(dense) and ok(blocks) and dense["peak_mem_bytes"] else "–")
        auto_vs = (f"{100 * (auto['time']['median_ms'] / dense['time']['median_ms'] - 1):+.1f}%"
                   if ok(dense) and ok(auto) else "–")
        chosen = next(iter(d.values())).get("auto_chose", "?")
        body.append([lay, S, c.get("docs", "?"), ps, cell("sdpa", "time"), cell("sdpa", "first"), cell("sdpa", "mem"),
                     cell("sdpa_blocks", "time"), cell("sdpa_blocks", "first"), cell("sdpa_blocks", "mem"), speed, memr,
                     chosen, auto_vs])
    head = (f"One row of S tokens, B=1, H={sp.get('H')}, D={sp.get('D')}, {sp.get('dtype')}. *per call*: median ±IQR/2 "
            f"ms with the batch's mask or plan cached (every layer after the first), timed interleaved; *1st*: the "
            f"batch's first call, building the mask / plan (ms, one timing); *peak*: memory growth of that first call. "
            f"× = dense / blocks per call; mem = blocks peak / dense peak; auto vs dense = per-call time of what "
            f"`auto` ran against the dense path.")
    tbl = md_table(["layout", "S", "docs", "pass", "dense per call", "dense 1st", "dense peak", "blocks per call",
                    "blocks 1st", "blocks peak", "×", "mem", "auto ran", "auto vs dense"], body)
    notes = sorted({rs for r in rows if r.get("status") == "skipped" for rs in r.get("reasons", [])})
    out = head + "\n\n" + tbl
    if notes:
        out += "\n\n" + "\n".join(f"- {n}" for n in notes)
    if not compact:
        out += "\n\n" + md_table(["layout", "S", "docs", "plan", "blocks mask", "dense mask", "auto's reason to skip sdpa_blocks"],
                                  [[c["layout"], c["S"], c["docs"], c["plan"], fmt_bytes(c["blocks_mask_bytes"]),
                                    fmt_bytes(c["dense_mask_bytes"]), "; ".join(c["auto_reasons_sdpa_blocks"]) or "– (runs)"]
                                   for c in sp.get("cases", [])])
    return out


# ---------------------------------------------------------------------------------------------- merge
def _row_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("kind", "backend", "layout", "S", "B", "H", "D", "dtype", "pass", "step", "N"))


def merge(old: dict, new: dict) -> dict:
    """Rows of ``new`` replace rows of ``old`` with the same identity; the rest of ``old`` is kept."""
    out = dict(new)
    for key in ("rows", "mask_prep", "layouts"):
        seen = {_row_key(r) for r in new.get(key, [])}
        out[key] = [r for r in old.get(key, []) if _row_key(r) not in seen] + list(new.get(key, []))
    old_sc, new_sc = old.get("scaling", {}), new.get("scaling", {})
    seen = {_row_key(r) for r in new_sc.get("rows", [])}
    out["scaling"] = {**old_sc, **new_sc,
                      "rows": [r for r in old_sc.get("rows", []) if _row_key(r) not in seen] + new_sc.get("rows", [])}
    old_sp, new_sp = old.get("sparse") or {}, new.get("sparse") or {}
    seen = {_row_key(r) for r in new_sp.get("rows", [])}
    new_cases = {(c["layout"], c["S"]) for c in new_sp.get("cases", [])}
    out["sparse"] = {**old_sp, **new_sp,
                     "rows": [r for r in old_sp.get("rows", []) if _row_key(r) not in seen] + new_sp.get("rows", []),
                     "cases": [c for c in old_sp.get("cases", []) if (c["layout"], c["S"]) not in new_cases]
                     + new_sp.get("cases", [])}
    if old_sp.get("rows"):
        out["settings"] = {**out.get("settings", {}), "sparse_cases": sorted(
            set(old.get("settings", {}).get("sparse_cases", [])) | set(new.get("settings", {}).get("sparse_cases", [])))}
    if not new.get("scaling"):
        out["scaling"] = old.get("scaling", {})
    out["reference"] = {**old.get("reference", {}), **new.get("reference", {}),
                        "matmul": {**old.get("reference", {}).get("matmul", {}), **new["reference"]["matmul"]}}
    out["merged_runs"] = old.get("merged_runs", [old.get("created")]) + [new.get("created")]
    return out


# ---------------------------------------------------------------------------------------------- rendering
def _rate(tflops: float | None, cpu: bool) -> str:
    if tflops is None:
        return "–"
    return fmt_num(tflops * 1e3) if cpu else fmt_num(tflops)


def _primary(payload: dict) -> tuple[int, int, str]:
    ok = [r for r in payload["rows"] if r["kind"] == "attention" and r.get("status") == "ok"]
    rows = ok or [r for r in payload["rows"] if r["kind"] == "attention"]
    if not rows:
        return None, None, None
    # the largest S among those where the most backends ran (the summary compares backends)
    S = max({r["S"] for r in rows}, key=lambda S_: (len({r["backend"] for r in rows if r["S"] == S_}), S_))
    Ds = sorted({r["D"] for r in rows if r["S"] == S})
    D = 128 if 128 in Ds else Ds[len(Ds) // 2]
    dts = [r["dtype"] for r in rows]
    dt = "bfloat16" if "bfloat16" in dts and payload["device"]["type"] == "cuda" else \
        ("float32" if "float32" in dts else dts[0])
    return S, D, dt


def _skip_reasons(payload: dict) -> dict[str, list[str]]:
    """Per backend: each distinct reason, with the passes it applies to."""
    got: dict[str, dict[str, list[str]]] = {}
    for r in payload["rows"]:
        if r["kind"] == "attention" and r.get("status") in ("skipped", "error"):
            for m in r.get("reasons") or [f"error: {r.get('error', '?')}"]:
                passes = got.setdefault(r["backend"], {}).setdefault(m, [])
                if r["pass"] not in passes:
                    passes.append(r["pass"])
    return {b: [f"{m} ({', '.join(p)})" for m, p in d.items()] for b, d in got.items()}


def noise_calibration(payload: dict) -> dict | None:
    """The causal layout through ``sdpa`` runs the same kernel as the dense-causal reference (its ``is_causal``
    fast path): the spread of their time ratio over the run is a direct measure of timing noise."""
    refs = {(r["S"], r["D"], r["dtype"], r["pass"]): r for r in payload["rows"]
            if r["kind"] == "reference" and r.get("status") == "ok" and r["backend"].startswith("sdpa")}
    ratios = sorted(r["time"]["median_ms"] / refs[k]["time"]["median_ms"] for r in payload["rows"]
                    if r["kind"] == "attention" and r["layout"] == "causal" and r["backend"] == "sdpa"
                    and r.get("status") == "ok" and (k := (r["S"], r["D"], r["dtype"], r["pass"])) in refs)
    if not ratios:
        return None
    return {"n": len(ratios), "min": ratios[0], "median": ratios[len(ratios) // 2], "max": ratios[-1],
            "within_10pct": sum(0.9 <= x <= 1.1 for x in ratios) / len(ratios)}


def summary_markdown(payload: dict) -> str:
    """Compact table (README): the largest S at D=128 in the primary dtype, per layout × backend × pass."""
    cpu = payload["device"]["type"] == "cpu"
    unit = "GFLOP/s" if cpu else "TFLOP/s"
    S, D, dt = _primary(payload)
    if S is None:
        sp = sparse_markdown(payload, compact=True)
        return ("Dense mask vs per-document blocks (`sdpa` vs `sdpa_blocks`):\n\n" + sp) if sp else "_no attention rows_"
    rows = []
    for lay in [x for x in LAYOUTS if any(r.get("layout") == x for r in payload["rows"])]:
        for b in payload["backends"]:
            cells = [lay, b]
            got = False
            for p in ("fwd", "fwd+bwd"):
                r = next((r for r in payload["rows"] if r["kind"] == "attention" and r["layout"] == lay and
                          r["backend"] == b and r["S"] == S and r["D"] == D and r["dtype"] == dt and r["pass"] == p), None)
                if r is None or r.get("status") != "ok":
                    cells += ["–", "–"]
                    continue
                got = True
                cells += [fmt_ms(r["time"]), _rate(r["useful_tflops"], cpu)]
            if got:
                r = next(r for r in payload["rows"] if r["kind"] == "attention" and r["layout"] == lay and
                         r["backend"] == b and r["S"] == S and r["D"] == D and r["dtype"] == dt and r.get("status") == "ok")
                cells += [fmt_num(r.get("pct_matmul")), fmt_num(r.get("pct_peak")), fmt_num(r.get("pct_dense_causal"))]
                rows.append(cells)
    mm = payload["reference"]["matmul"].get(dt, {})
    B = next(li["B"] for li in payload["layouts"] if li["S"] == S)
    head = (f"S={S}, D={D}, {dt}, B={B}, "
            f"H={payload['settings']['hidden'] // D}; time = median ±IQR/2 ms; useful {unit} over allowed pairs; "
            f"% of the {mm.get('n')}³ {dt} matmul ({_rate(mm.get('tflops'), cpu)} {unit}), of the device peak, "
            f"and of dense causal attention at the same shape — the three % columns are for the forward pass.")
    tbl = md_table(["layout", "backend", "fwd ms", f"fwd {unit}", "fwd+bwd ms", f"fwd+bwd {unit}", "% matmul",
                    "% peak", "% dense causal"], rows)
    skipped = _skip_reasons(payload)
    notes = [f"- `{b}`: " + " · ".join(msgs) for b, msgs in skipped.items()]
    sc = payload.get("scaling", {})
    extra = ""
    if sc.get("rows"):
        extra = (f"\n\nMask metadata (mask_meta + tile_summary {TILE}×{TILE}) of a {sc['largest_N']}-token packed row: "
                 f"{fmt_num(sc['worst_ms'])} ms at worst over {sorted({r['layout'] for r in sc['rows']})} "
                 f"(target < {sc['target_ms']:.0f} ms: {'met' if sc['target_met'] else 'MISSED'}); "
                 f"per-token vectors + tile stats {fmt_num(max(r['bytes_per_token'] for r in sc['rows']))} bytes/token.")
    nc = noise_calibration(payload)
    if nc:
        extra += (f"\n\nTiming noise: the causal layout through sdpa and the dense-causal reference run the same kernel; "
                  f"their time ratio over {nc['n']} configurations was {nc['min']:.2f}–{nc['max']:.2f}× (median "
                  f"{nc['median']:.2f}×, {100 * nc['within_10pct']:.0f}% within ±10%): read single cells with that spread.")
    sp = sparse_markdown(payload, compact=True)
    if sp:
        extra += "\n\nDense mask vs per-document blocks (`sdpa` vs `sdpa_blocks`):\n\n" + sp
    return head + "\n\n" + tbl + "\n\nNot run (reasons):\n" + ("\n".join(notes) if notes else "- none") + extra


def render_markdown(payload: dict) -> str:
    cpu = payload["device"]["type"] == "cpu"
    unit = "GFLOP/s" if cpu else "TFLOP/s"
    out = [header_markdown(payload), ""]
    out.append("Useful FLOPs count allowed (q, k) pairs only: forward 4·B·H·D·pairs, forward+backward 3.5× that. "
               + ("CPU: rates in GFLOP/s, compared with a matmul measured in the same run (no device peak). "
                  if cpu else "Rates in TFLOP/s; % peak uses the dense bf16 peak of this GPU. ")
               + "Times are medians ± half the inter-quartile range.")
    out += ["", "## Summary", "", summary_markdown(payload), "", "## Matmul reference (same run)", ""]
    out.append(md_table(["dtype", "n", "time ms", unit, "device peak"],
                        [[dt, m["n"], fmt_ms(m["time"]), _rate(m["tflops"], cpu),
                          payload["reference"]["peak_tflops"].get(dt)] for dt, m in payload["reference"]["matmul"].items()]))
    out += ["", "## Layouts", ""]
    out.append(md_table(["layout", "S", "B", "docs/row", "pad", "allowed pairs", "density", "tiles e/p/f",
                         "mask efficiency", "vectors", "tile summary", "dense mask", "sdpa caches"],
                        [[li["layout"], li["S"], li["B"], li["docs"], li["pad"], li["allowed_pairs"],
                          fmt_num(li["density"]), f"{li['tiles']['empty']}/{li['tiles']['partial']}/{li['tiles']['full']}",
                          fmt_num(li["mask_efficiency"]), fmt_bytes(li["memory"]["vectors_bytes"]),
                          fmt_bytes(li["memory"]["tile_summary_bytes"]), fmt_bytes(li["memory"]["dense_mask_bytes"]),
                          fmt_bytes(li["memory"]["sdpa_mask_bytes"])]
                         for li in payload["layouts"]]))
    out += ["", "## All attention rows", ""]
    body = []
    for r in payload["rows"]:
        if r.get("status") == "ok":
            body.append([r["layout"], r["S"], r["B"], r["H"], r["D"], r["dtype"], r["pass"], r["backend"],
                         fmt_ms(r["time"]), _rate(r.get("useful_tflops"), cpu), fmt_num(r.get("pct_matmul")),
                         fmt_num(r.get("pct_peak")), fmt_num(r.get("pct_dense_causal")), fmt_num(r.get("speedup_vs_sdpa")),
                         fmt_bytes(r.get("peak_mem_bytes"))])
        else:
            why = "; ".join(r.get("reasons") or [r.get("error", "")])
            body.append([r["layout"], r["S"], r["B"], r["H"], r["D"], r["dtype"], r["pass"], r["backend"],
                         f"{r.get('status')}: {why}", "–", "–", "–", "–", "–", "–"])
    out.append(md_table(["layout", "S", "B", "H", "D", "dtype", "pass", "backend", "time ms", unit, "% matmul",
                         "% peak", "% dense causal", "× vs sdpa", "peak mem"], body))
    warned = [r for r in payload["rows"] if r.get("warnings")]
    if warned:
        out += ["", "## Warnings raised while timing (e.g. Flex eager fallback or recompilation)", ""]
        seen: dict[str, list[str]] = {}
        for r in warned:
            for w in r["warnings"]:
                seen.setdefault(w, []).append(f"{r['backend']} {r['layout']} S={r['S']} D={r['D']} {r['dtype']} {r['pass']}")
        out.append(md_table(["warning", "rows", "first rows"],
                            [[w, len(rs), "; ".join(rs[:3])] for w, rs in seen.items()]))
    if (payload.get("sparse") or {}).get("rows"):
        out += ["", "## Dense mask vs per-document blocks (`sdpa` vs `sdpa_blocks`)", "", sparse_markdown(payload)]
    out += ["", f"## Mask preparation (cold caches; per layer = ÷ {N_LAYERS_AMORTISED})", ""]
    out.append(md_table(["layout", "S", "B", "step", "used by", "time ms", "per layer ms", "bytes", "note"],
                        [[r["layout"], r["S"], r["B"], r["step"], r["used_by"],
                          fmt_ms(r.get("time")) if r.get("status") == "ok" else f"error: {r.get('error')}",
                          fmt_num(r.get("per_layer_ms")), fmt_bytes(r.get("bytes")), r.get("note", "")]
                         for r in payload["mask_prep"]]))
    sc = payload.get("scaling", {})
    if sc.get("rows"):
        out += ["", f"## Mask metadata scaling (one packed row; target < {sc['target_ms']:.0f} ms at {sc['largest_N']})", ""]
        out.append(md_table(["layout", "N", "docs", "Layout.from_samples ms", "mask_meta ms", "tile_summary ms",
                             "mask_meta + tile_summary ms", "BlockMask ms", "vectors", "tile stats", "tile summary",
                             "bytes/token (O(N) part)", "dense would be"],
                            [[r["layout"], r["N"], r["docs"], fmt_num(r["layout_from_samples_ms"]), fmt_ms(r["mask_meta"]),
                              fmt_ms(r["tile_summary"]), fmt_ms(r["mask_meta_plus_tile_summary"]), fmt_ms(r["block_mask"]),
                              fmt_bytes(r["memory"]["vectors_bytes"]), fmt_bytes(r["memory"]["tile_stats_bytes"]),
                              fmt_bytes(r["memory"]["tile_summary_bytes"]), fmt_num(r["bytes_per_token"]),
                              fmt_bytes(r["memory"]["dense_mask_bytes"])] for r in sc["rows"]]))
        out.append("")
        out.append(f"Target: {'met' if sc.get('target_met') else 'MISSED'} ({fmt_num(sc.get('worst_ms'))} ms worst at "
                   f"N={sc.get('largest_N')}). The per-token vectors (8 int32 per token: q and k sides) and tile stats "
                   f"are O(N); the tile summary is O((N/{TILE})²) int8 — "
                   f"{fmt_bytes(max(r['memory']['tile_summary_bytes'] for r in sc['rows']))} at the largest N.")
        if sc.get("profile"):
            out += ["", "Profile of the slowest case (top self-time operators):", ""]
            out.append(md_table(["op", "calls", "self ms"], [[p["op"], p["calls"], fmt_num(p["self_cpu_ms"])]
                                                             for p in sc["profile"]]))
    return "\n".join(out) + "\n"


def plot(payload: dict):
    import matplotlib.pyplot as plt
    cpu = payload["device"]["type"] == "cpu"
    scale, unit = (1e3, "GFLOP/s") if cpu else (1.0, "TFLOP/s")
    _, D, dt = _primary(payload)
    lays = [x for x in LAYOUTS if any(r.get("layout") == x for r in payload["rows"])]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, lay in zip(axes.flat, lays):
        series: dict[str, list] = {}
        for r in payload["rows"]:
            if r.get("status") != "ok" or r["D"] != D or r["dtype"] != dt:
                continue
            if r["kind"] == "attention" and r["layout"] == lay:
                series.setdefault(f"{r['backend']} {r['pass']}", []).append((r["S"], r["useful_tflops"] * scale))
            elif r["kind"] == "reference":
                series.setdefault(f"dense causal ({r['backend'].split()[0]}) {r['pass']}", []).append(
                    (r["S"], r["useful_tflops"] * scale))
        for lab, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if "dense" in lab else "-",
                    label=lab)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{lay} (D={D}, {dt})")
        ax.set_xlabel("tokens per row S")
        ax.set_ylabel(f"useful {unit}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes.flat[len(lays)] if len(lays) < 6 else None
    sc = payload.get("scaling", {})
    if ax is not None and sc.get("rows"):
        for lay in sorted({r["layout"] for r in sc["rows"]}):
            pts = sorted((r["N"], r["mask_meta_plus_tile_summary"]["median_ms"]) for r in sc["rows"] if r["layout"] == lay)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{lay}: mask_meta+tile_summary")
        ax.axhline(sc["target_ms"], color="r", linestyle=":", label=f"target {sc['target_ms']:.0f} ms")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N (one packed row)")
        ax.set_ylabel("ms")
        ax.set_title("mask metadata build time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for extra in list(axes.flat)[len(lays) + 1:]:
        extra.axis("off")
    fig.suptitle(f"attention — {payload['device']['name']} ({payload['device']['slug']})")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    import sys
    from vla_blocks.cli import main
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))
