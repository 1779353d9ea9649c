"""Optional backends (triton, flash_attn, xformers): registration, reasons, and the varlen mask detection.

flash-attn and xformers have no CPU path, so on CPU the tests check what decides whether they may
run: :func:`varlen_plan` (pure torch). Every accepted plan is checked against the oracle: the mask
it implies (rebuilt here from cu_seqlens and the packing indices) equals ``meta.dense()``, and
per-document attention over the packed tensors, the computation flash-attn varlen and xformers'
block-diagonal biases perform, equals fp32 SDPA on the dense mask, gradients included.
GPU tests (marked ``gpu``) run every backend forward and backward in bf16 against the fp32 oracle.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vla_blocks.attention import MaskMeta, attention, backends
from vla_blocks.attention.dispatch import AttentionInputs, BackendUnavailable, get_backend
from vla_blocks.attention.optional import VarlenPlan, varlen_plan
from vla_blocks.layout import Layout, Segment

_CUDA = torch.cuda.is_available()


def _installed(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


# ------------------------------------------------------------------------------------------ registration


def test_priority_order():
    names = [b.name for b in backends()]
    for n in ("triton", "flash_attn", "xformers", "flex", "sdpa"):
        assert n in names
    order = [names.index(n) for n in ("triton", "flash_attn", "xformers", "flex", "sdpa")]
    assert order == sorted(order)
    assert names[-1] == "sdpa"


def test_importing_vla_blocks_imports_no_optional_library():
    code = ("import sys, torch, vla_blocks\n"
            "from vla_blocks.attention import backends, attention\n"
            "from vla_blocks.layout import Layout, Segment\n"
            "import vla_blocks.kernels\n"
            "backends()\n"
            "m = Layout.from_samples([[Segment.of('causal', 'a', 8, 't')]], ['a']).mask_meta()\n"
            "q = torch.randn(1, 1, 8, 16)\n"
            "attention(q, q, q, m)\n"
            "bad = [n for n in ('triton', 'flash_attn', 'xformers') if n in sys.modules]\n"
            "assert not bad, bad\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def _inputs(n=16, dtype=torch.float16, device="cpu"):
    meta = Layout.from_samples([[Segment.of("causal", "a", n, "t")]], ["a"]).mask_meta().to(device)
    q = torch.randn(1, 2, n, 64, dtype=dtype, device=device)
    return AttentionInputs(q, q[:, :1], q[:, :1], meta)


@pytest.mark.skipif(_installed("flash_attn"), reason="flash-attn is installed here")
def test_flash_attn_reports_not_installed():
    r = get_backend("flash_attn").not_supported_reasons(_inputs())
    assert r and "flash-attn is not installed" in r[0] and "vla-blocks[flash-attn]" in r[0]
    with pytest.raises(BackendUnavailable, match="flash-attn is not installed"):
        inp = _inputs()
        attention(inp.q, inp.k, inp.v, inp.meta, backend="flash_attn")


@pytest.mark.skipif(_installed("xformers"), reason="xformers is installed here")
def test_xformers_reports_not_installed():
    r = get_backend("xformers").not_supported_reasons(_inputs())
    assert r and "xformers is not installed" in r[0] and "vla-blocks[xformers]" in r[0]


@pytest.mark.skipif(_CUDA, reason="CPU-only check")
def test_auto_on_cpu_never_picks_an_optional_backend():
    from vla_blocks.attention import choose_backend

    inp = _inputs(dtype=torch.float32)
    assert choose_backend(inp).name in ("flex", "sdpa")


# ------------------------------------------------------------------------------------------ varlen plans

MODES = ("causal", "full", "noise")


def _valid(draw, n):
    p_bad = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    return (torch.rand(n, generator=g) >= p_bad).tolist()


@st.composite
def causal_family(draw):
    """Documents of causal segments, single-token full segments, and at most a final single-token noise segment."""
    rows = []
    for _ in range(draw(st.integers(1, 2))):
        docs = []
        for _ in range(draw(st.integers(1, 3))):
            segs = []
            for _ in range(draw(st.integers(1, 4))):
                if draw(st.booleans()):
                    n = draw(st.integers(1, 30))
                    segs.append(Segment.of("causal", "a", n, "t", valid=_valid(draw, n)))
                else:
                    segs.append(Segment.of("full", "a", 1, "s"))
            if draw(st.booleans()):
                segs.append(Segment.of("noise", "a", 1, "n"))
            docs.append(segs)
        rows.append(docs)
    longest = max(sum(s.length for d in r for s in d) for r in rows)
    return Layout.from_samples(rows, ["a"], pad_to=longest + draw(st.integers(0, 7)))


@st.composite
def bidir_family(draw):
    """Every document is one full or noise segment."""
    rows = []
    for _ in range(draw(st.integers(1, 2))):
        docs = []
        for _ in range(draw(st.integers(1, 3))):
            n = draw(st.integers(2, 40))
            docs.append([Segment.of(draw(st.sampled_from(["full", "noise"])), "a", n, "x", valid=_valid(draw, n))])
        rows.append(docs)
    longest = max(sum(s.length for d in r for s in d) for r in rows)
    return Layout.from_samples(rows, ["a"], pad_to=longest + draw(st.integers(0, 7)))


@st.composite
def any_layout(draw):
    rows = []
    for _ in range(draw(st.integers(1, 2))):
        docs = []
        for _ in range(draw(st.integers(1, 3))):
            segs = []
            for _ in range(draw(st.integers(1, 3))):
                n = draw(st.integers(1, 20))
                segs.append(Segment.of(draw(st.sampled_from(MODES)), "a", n, "x", valid=_valid(draw, n)))
            docs.append(segs)
        rows.append(docs)
    longest = max(sum(s.length for d in r for s in d) for r in rows)
    return Layout.from_samples(rows, ["a"], pad_to=longest + draw(st.integers(0, 7)))


def plan_mask(plan: VarlenPlan, meta: MaskMeta) -> torch.Tensor:
    """The dense mask a plan stands for: per packed document, bottom-right causal or all-to-all."""
    m = torch.zeros(meta.batch_size, meta.q_len, meta.k_len, dtype=torch.bool)
    cq, ck = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    for i in range(plan.num_docs):
        qr, qc = plan.q_rows[cq[i]:cq[i + 1]], plan.q_cols[cq[i]:cq[i + 1]]
        kr, kc = plan.k_rows[ck[i]:ck[i + 1]], plan.k_cols[ck[i]:ck[i + 1]]
        assert qr.unique().numel() <= 1 and torch.equal(kr.unique(), qr.unique()), "a document spans rows"
        allowed = _doc_mask(len(qr), len(kr), plan.causal)
        m[qr[:, None], qc[:, None], kc[None, :]] = allowed
    return m


def _doc_mask(lq: int, lk: int, causal: bool) -> torch.Tensor:
    if not causal:
        return torch.ones(lq, lk, dtype=torch.bool)
    return torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)  # flash-attn's bottom-right alignment


def varlen_emulation(plan: VarlenPlan, q, k, v, scale=None):
    """What flash_attn_varlen_func computes, in plain torch: attention per packed document."""
    qp, kp, vp = plan.pack_q(q), plan.pack_kv(k), plan.pack_kv(v)
    g = q.shape[1] // k.shape[1]
    cq, ck = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    outs = []
    for i in range(plan.num_docs):
        qd = qp[cq[i]:cq[i + 1]].transpose(0, 1)
        kd = kp[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(g, 0)
        vd = vp[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(g, 0)
        mask = _doc_mask(qd.shape[1], kd.shape[1], plan.causal)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
                    .transpose(0, 1))
    o = torch.cat(outs, 0) if outs else qp  # no document: qp is empty
    return plan.unpack(o, q)


def _check_plan(meta: MaskMeta, expect_causal: bool | None, seed: int):
    plan = varlen_plan(meta)
    assert isinstance(plan, VarlenPlan), plan
    if expect_causal is not None:
        assert plan.causal == expect_causal
    assert torch.equal(plan_mask(plan, meta), meta.dense())
    assert plan.cu_seqlens_q.dtype == torch.int32 and plan.cu_seqlens_k.dtype == torch.int32
    assert plan.max_seqlen_q == max(plan.seqlens_q, default=0)
    # the packed computation equals the oracle, forward and backward
    g = torch.Generator().manual_seed(seed)
    B, nq, nk = meta.batch_size, meta.q_len, meta.k_len
    q = torch.randn(B, 2, nq, 16, generator=g, requires_grad=True)
    k = torch.randn(B, 1, nk, 16, generator=g, requires_grad=True)
    v = torch.randn(B, 1, nk, 16, generator=g, requires_grad=True)
    do = torch.randn(B, 2, nq, 16, generator=g)
    out = varlen_emulation(plan, q, k, v)
    ref = attention(q, k, v, meta, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out, (q, k, v), do, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do, allow_unused=True)
    for x, a, b in zip((q, k, v), grads, ref_grads):  # None: the output does not depend on x (no valid token)
        torch.testing.assert_close(torch.zeros_like(x) if a is None else a, torch.zeros_like(x) if b is None else b,
                                   atol=1e-5, rtol=1e-5)
    return plan


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layout=causal_family(), split=st.floats(0, 0.9), seed=st.integers(0, 100))
def test_causal_documents_are_detected_and_exact(layout, split, seed):
    n = layout.seq_len
    _check_plan(layout.mask_meta(), True, seed)
    P = int(split * n)  # suffix queries over a cached prefix: bottom-right aligned causal
    _check_plan(layout.mask_meta(slice(P, n), slice(0, n)), True, seed)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layout=bidir_family(), split=st.floats(0, 0.9), seed=st.integers(0, 100))
def test_bidirectional_documents_are_detected_and_exact(layout, split, seed):
    n = layout.seq_len
    # where every query also sees exactly the causal set (single-token documents, a last-token suffix)
    # causal is chosen; the mask equality in _check_plan is what matters
    plan = _check_plan(layout.mask_meta(), None, seed)
    if any(x > 1 for x in plan.seqlens_q):
        assert not plan.causal
    P = int(split * n)
    _check_plan(layout.mask_meta(slice(P, n), slice(0, n)), None, seed)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layout=any_layout(), split=st.sampled_from([0.0, 0.0, 0.3, 0.7, 0.95]), seed=st.integers(0, 100))
def test_detection_is_exact_on_any_layout(layout, split, seed):
    """On arbitrary layouts (self-attention or suffix over a prefix): accepted plans give exactly the mask,
    and refusals happen only when the mask is neither causal nor bidirectional within documents."""
    n = layout.seq_len
    P = int(split * n)
    meta = layout.mask_meta(slice(P, n), slice(0, n))
    plan = varlen_plan(meta)
    if isinstance(plan, VarlenPlan):
        _check_plan(meta, None, seed)
    else:
        assert plan and all(isinstance(r, str) for r in plan)
        # the detector is exact: a refusal means the dense mask is neither form over the queried documents
        valid_q = (meta.q_flags & 1) != 0
        valid_k = (meta.k_flags & 1) != 0
        same_doc = (meta.q_doc[:, :, None] == meta.k_doc[:, None, :]) & valid_q[:, :, None] & valid_k[:, None, :]
        causal = same_doc & (meta.k_idx[:, None, :] <= meta.q_idx[:, :, None])
        dense = meta.dense()
        assert not torch.equal(dense, causal) and not torch.equal(dense, same_doc), plan


def test_refusals_explain_why():
    mixed = Layout.from_samples([[Segment.of("full", "a", 10, "i"), Segment.of("causal", "a", 5, "t")]], ["a"])
    r = varlen_plan(mixed.mask_meta())
    assert isinstance(r, list) and "full/noise query sees later tokens" in r[0]
    noisy = Layout.from_samples([[Segment.of("causal", "a", 5, "t"), Segment.of("noise", "a", 1, "n"),
                                  Segment.of("causal", "a", 3, "u")]], ["a"])
    r = varlen_plan(noisy.mask_meta())
    assert isinstance(r, list) and "noise segment is hidden" in r[0]
    causal = Layout.from_samples([[Segment.of("causal", "a", 8, "t")]], ["a"])
    cross = causal.mask_meta(slice(0, 4), slice(0, 8))  # queries are not the row's last keys
    r = varlen_plan(cross)
    assert isinstance(r, list) and "last Nq keys" in r[0]


def test_plan_is_cached_per_batch():
    meta = Layout.from_samples([[Segment.of("causal", "a", 8, "t")]], ["a"]).mask_meta()
    assert varlen_plan(meta) is varlen_plan(meta)


def test_no_valid_token_gives_an_empty_plan():
    meta = Layout.from_samples([[Segment.of("causal", "a", 8, "t", valid=False)]], ["a"]).mask_meta()
    plan = varlen_plan(meta)
    assert isinstance(plan, VarlenPlan) and plan.num_docs == 0
    q = torch.randn(1, 1, 8, 16)
    assert bool((varlen_emulation(plan, q, q, q) == 0).all())


# ------------------------------------------------------------------------------------------ GPU


def _gpu_layouts(n_tokens: int):
    """pi0-like packing (needs the general kernels) and causal documents (expressible by flash/xformers)."""
    def pi0(n_img, n_txt, n_act):
        return [Segment.of("full", "a", n_img, "img"), Segment.of("causal", "a", n_txt, "txt"),
                Segment.of("full", "a", 1, "state"), Segment.of("noise", "a", n_act, "act")]
    docs, total, i = [], 0, 0
    while total + 900 <= n_tokens:
        s = pi0(768, 60 + 7 * (i % 5), 50)
        docs.append(s)
        total += sum(x.length for x in s)
        i += 1
    docs.append([Segment.of("causal", "a", n_tokens - total, "txt")])
    mot = Layout.from_samples([docs], ["a"])
    lens = [n_tokens // 3, n_tokens // 4, n_tokens - n_tokens // 3 - n_tokens // 4]
    text = Layout.from_samples([[[Segment.of("causal", "a", n, "t")] for n in lens]], ["a"])
    return {"mot": mot, "causal_docs": text}


def _plain_bf16(q, k, v, mask, do, scale):
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qq, kk, vv = ins
    g = qq.shape[1] // kk.shape[1]
    kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
    s = (qq @ kk.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).masked_fill(~mask, 0.0)
    out = p @ vv
    return out.detach(), torch.autograd.grad(out, ins, do)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "flash_attn", "xformers", "flex", "sdpa"])
@pytest.mark.parametrize("layout_name", ["mot", "causal_docs"])
@pytest.mark.parametrize("n_tokens", [2048, 16384])
def test_gpu_every_backend_bf16_against_fp32_oracle(backend, layout_name, n_tokens):
    """bf16 forward+backward; error ≤ 2× that of plain PyTorch bf16 attention against the fp32 oracle."""
    meta = _gpu_layouts(n_tokens)[layout_name].to("cuda").mask_meta()
    g = torch.Generator(device="cuda").manual_seed(0)
    d = 128
    q = torch.randn(1, 4, n_tokens, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, 2, n_tokens, d, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, 2, n_tokens, d, device="cuda", generator=g, dtype=torch.bfloat16)
    do = torch.randn(1, 4, n_tokens, d, device="cuda", generator=g, dtype=torch.bfloat16)
    b = get_backend(backend)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    reasons = b.not_supported_reasons(AttentionInputs(*ins, meta))
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    out = attention(*ins, meta, backend=backend)
    grads = torch.autograd.grad(out, ins, do)
    ref_ins = [t.float().requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_ins, meta, backend="sdpa")
    ref_grads = torch.autograd.grad(ref, ref_ins, do.float())
    plain, plain_grads = _plain_bf16(q, k, v, meta.dense()[:, None], do, 1 / math.sqrt(d))
    for name, got, want, base in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads],
                                     [plain, *plain_grads]):
        assert torch.isfinite(got).all()
        err = (got.float() - want).abs().max().item()
        base_err = (base.float() - want).abs().max().item()
        assert err <= 2 * base_err + 1e-6, f"{backend} {name}: {err:.3g} > 2 × {base_err:.3g}"
