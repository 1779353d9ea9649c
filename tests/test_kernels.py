"""The fused Triton mask-attention kernels (vla_blocks.kernels) against the dense oracle.

Oracle everywhere: the dense mask from the formula (``MaskMeta.dense()``) with fp32 SDPA and autograd
(``attention(..., backend="sdpa")`` on fp32 copies of the inputs).

On a machine without CUDA the kernels run under the Triton interpreter. Triton 3.x fixes the mode
when ``triton`` is first imported (its own ``@triton.jit`` library functions are decorated then), so
this module sets ``TRITON_INTERPRET=1`` before importing triton and restores the variable right
after; a module fixture sets it again while these tests run (the backend checks it), so it does
not leak into other test modules. If something imported triton earlier in compiled mode, the
interpreter tests skip: run this file on its own. bf16 is GPU-only (the interpreter's bf16 tl.dot
is wrong). GPU tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

_CUDA = torch.cuda.is_available()

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vla_blocks.attention import FLAG_VALID, MaskMeta, attention  # noqa: E402
from vla_blocks.attention.dispatch import AttentionInputs, BackendUnavailable, get_backend  # noqa: E402
from vla_blocks.kernels import KernelConfig, get_config, mask_attention, triton_available  # noqa: E402
from vla_blocks.kernels.mask_attention import triton_interpreted  # noqa: E402
from vla_blocks.layout import Layout, Segment  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

interp = pytest.mark.skipif(_CUDA or not triton_available() or not triton_interpreted(),
                            reason="interpreter tests need a CPU-only run with triton imported under "
                                   "TRITON_INTERPRET=1 (run tests/test_kernels.py on its own)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def _interpreter_env():
    if _CUDA:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


# ------------------------------------------------------------------------------------------ helpers

MODES = ("causal", "full", "noise")
TILES = [KernelConfig(16, 16, 1, 1, 16, 16, 16, 16, 1, 1),
         KernelConfig(32, 32, 1, 1, 32, 32, 32, 32, 1, 1),
         KernelConfig(32, 16, 1, 1, 16, 32, 32, 16, 1, 1),
         KernelConfig(16, 64, 1, 1, 64, 16, 16, 64, 1, 1),
         KernelConfig(64, 64, 1, 1, 32, 64, 64, 32, 1, 1)]
HEADS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]  # (Hq, Hkv), B·Hq ≤ 4 below


@st.composite
def layouts(draw, max_len: int = 160, max_rows: int = 2):
    """A random packed batch: rows of documents of causal/full/noise segments, invalid tokens, padding.

    Hypothesis draws the knobs (rows, invalid-token regime) and a seed; the seed draws the details,
    so successive examples are independent layouts rather than small mutations of one another.
    """
    rng = random.Random(draw(st.integers(0, 2 ** 32 - 1)))
    n_rows = draw(st.integers(1, max_rows))
    bad_regime = draw(st.sampled_from([(0.0,), (0.0, 0.0, 0.1), (0.0, 0.3, 1.0)]))
    rows = []
    for _ in range(n_rows):
        budget = rng.randint(max(1, max_len // 4), max_len)
        docs = []
        while budget > 0 and len(docs) < 4:
            segs = []
            for _ in range(rng.randint(1, 4)):
                if budget <= 0:
                    break
                n = min(budget, rng.choice([1, rng.randint(2, 8), rng.randint(8, 64)]))
                budget -= n
                p_bad = rng.choice(bad_regime)
                valid = [rng.random() >= p_bad for _ in range(n)]
                segs.append(Segment.of(rng.choice(MODES), "a", n, "x", valid=valid))
            docs.append(segs)
        rows.append(docs)
    longest = max(sum(s.length for d in r for s in d) for r in rows)
    pad_to = min(max_len, longest + rng.randint(0, 24))
    return Layout.from_samples(rows, ["a"], pad_to=max(pad_to, longest))


def make_qkv(meta: MaskMeta, hq: int, hkv: int, d: int, dtype, seed: int, n_prefix: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    B, nq, nk = meta.batch_size, meta.q_len, meta.k_len
    q = torch.randn(B, hq, nq, d, generator=g)
    k = torch.randn(B, hkv, nk, d, generator=g)
    v = torch.randn(B, hkv, nk, d, generator=g)
    do = torch.randn(B, hq, nq, d, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def oracle(q, k, v, meta, do, prefix=None, scale=None):
    """fp32 SDPA on the dense mask with autograd: (out, grads of q, k, v[, k_prefix, v_prefix])."""
    ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
    pre = None
    if prefix is not None:
        pre = tuple(t.detach().float().requires_grad_() for t in prefix)
        ins += list(pre)
    out = attention(ins[0], ins[1], ins[2], meta, backend="sdpa", prefix=pre, scale=scale)
    grads = torch.autograd.grad(out, ins, do.float())
    return out.detach(), grads


def oracle_lse(q, k, v, meta, scale=None):
    """log-sum-exp of the masked scores in float64 (-inf on rows that attend nothing)."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(hq // hkv, dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~meta.dense()[:, None], float("-inf"))
    return torch.logsumexp(s, -1)


def run_kernel(q, k, v, meta, do, prefix=None, config=None, scale=None):
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    pre = None
    if prefix is not None:
        pre = tuple(t.detach().clone().requires_grad_() for t in prefix)
        ins += list(pre)
    out, lse = mask_attention(ins[0], ins[1], ins[2], meta, prefix=pre, scale=scale, return_lse=True, config=config)
    grads = torch.autograd.grad(out, ins, do)
    return out.detach(), lse.detach(), grads


def assert_close(got, want, atol, rtol=0.0, what=""):
    got = got.float()
    want = want.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3g} (atol {atol}, rtol {rtol})"


def check_against_oracle(meta, hq, hkv, d, dtype, cfg, seed, atol, gatol):
    q, k, v, do = make_qkv(meta, hq, hkv, d, dtype, seed)
    out, lse, grads = run_kernel(q, k, v, meta, do, config=cfg)
    ref, ref_grads = oracle(q, k, v, meta, do)
    assert out.dtype == dtype
    assert_close(out, ref, atol, what="out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, gatol, rtol=gatol, what=f"d{name}")
    ref_lse = oracle_lse(q, k, v, meta)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)), "LSE is -inf exactly on rows that attend nothing"
    assert bool((lse[~fin] == float("-inf")).all())
    assert_close(lse[fin], ref_lse[fin], 10 * atol, what="lse")
    empty = meta.row_is_empty()[:, None].expand_as(out[..., 0])
    assert bool((out[empty] == 0).all()), "rows with nothing to attend are 0"


# ------------------------------------------------------------------------------------------ CPU (interpreter)


@interp
@settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layout=layouts(), heads=st.sampled_from(HEADS), d=st.sampled_from([64, 64, 128, 256]),
       cfg=st.sampled_from(TILES), seed=st.integers(0, 1000))
def test_fp32_forward_backward_matches_oracle(layout, heads, d, cfg, seed):
    hq, hkv = heads
    meta = layout.mask_meta()
    if meta.batch_size * hq > 4:
        hq, hkv = 2, 1 if hkv == 1 else 2
    check_against_oracle(meta, hq, hkv, d, torch.float32, cfg, seed, atol=2e-5, gatol=1e-4)


@interp
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layout=layouts(max_len=128, max_rows=1), heads=st.sampled_from([(1, 1), (2, 1)]),
       cfg=st.sampled_from(TILES[1:]), seed=st.integers(0, 1000))
def test_fp16_forward_backward_matches_oracle(layout, heads, cfg, seed):
    """fp16 against the fp32 oracle, within 2× the error of plain PyTorch fp16 attention (+ a small floor)."""
    hq, hkv = heads
    meta = layout.mask_meta()
    q, k, v, do = make_qkv(meta, hq, hkv, 64, torch.float16, seed)
    out, _, grads = run_kernel(q, k, v, meta, do, config=cfg)
    ref, ref_grads = oracle(q, k, v, meta, do)
    plain, plain_grads = plain_low_precision(q, k, v, meta, do)
    for name, got, want, base in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads],
                                     [plain, *plain_grads]):
        tol = 2 * (base.float() - want).abs().max().item() + 2e-3
        assert_close(got, want, tol, what=f"fp16 {name}")


def plain_low_precision(q, k, v, meta, do, scale=None):
    """Attention written out in plain PyTorch in the inputs' dtype (the error yardstick for low precision)."""
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qq, kk, vv = ins
    g = qq.shape[1] // kk.shape[1]
    kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (qq @ kk.transpose(-1, -2)) * scale
    mask = meta.dense()[:, None]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    p = p.masked_fill(~mask, 0.0)  # NaN rows (nothing to attend) -> 0
    out = p @ vv
    grads = torch.autograd.grad(out, ins, do)
    return out.detach(), grads


@interp
def test_fp16_head_dim_128_matches_oracle():
    lay = Layout.from_samples([[Segment.of("full", "a", 40, "img"), Segment.of("causal", "a", 30, "t"),
                                Segment.of("noise", "a", 20, "act")]], ["a"])
    meta = lay.mask_meta()
    q, k, v, do = make_qkv(meta, 2, 1, 128, torch.float16, 3)
    out, _, grads = run_kernel(q, k, v, meta, do, config=TILES[4])
    ref, ref_grads = oracle(q, k, v, meta, do)
    plain, plain_grads = plain_low_precision(q, k, v, meta, do)
    for name, got, want, base in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads],
                                     [plain, *plain_grads]):
        assert_close(got, want, 2 * (base.float() - want).abs().max().item() + 2e-3, what=f"fp16 d128 {name}")


@interp
def test_long_sequence_512_tokens():
    """512 tokens, packed documents with image blocks, text, noisy chunks and padding, many tiles."""
    def sample(n_img, n_txt, n_act):
        return [Segment.of("full", "a", n_img, "img"), Segment.of("causal", "a", n_txt, "txt"),
                Segment.of("full", "a", 1, "state"), Segment.of("noise", "a", n_act, "act")]
    lay = Layout.from_samples([[sample(128, 40, 50), sample(96, 33, 50), sample(64, 17, 20)]], ["a"], pad_to=512)
    meta = lay.mask_meta()
    counts = meta.tile_summary(64, 64).counts()
    assert counts["empty"] and counts["partial"] and counts["full"]
    check_against_oracle(meta, 2, 1, 64, torch.float32, TILES[4], 0, atol=2e-5, gatol=1e-4)


@interp
def test_odd_head_dims_are_padded():
    lay = Layout.from_samples([[Segment.of("causal", "a", 30, "t"), Segment.of("full", "a", 21, "i")]], ["a"])
    meta = lay.mask_meta()
    for d in (40, 80):
        check_against_oracle(meta, 2, 1, d, torch.float32, TILES[1], d, atol=2e-5, gatol=1e-4)


@st.composite
def random_metas(draw, max_len=64):
    """Arbitrary metadata (not from a Layout): unsorted positions, interleaved documents, any flags."""
    B = draw(st.integers(1, 2))
    nq = draw(st.integers(1, max_len))
    nk = draw(st.integers(1, max_len))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    n_doc = draw(st.integers(1, 3))
    n_seg = draw(st.integers(1, 6))

    def side(n):
        idx = torch.randint(0, max_len, (B, n), generator=g, dtype=torch.int32)
        doc = torch.randint(0, n_doc, (B, n), generator=g, dtype=torch.int32)
        seg = torch.randint(0, n_seg, (B, n), generator=g, dtype=torch.int32)
        flags = torch.randint(0, 8, (B, n), generator=g, dtype=torch.int32)
        flags = flags | (torch.rand(B, n, generator=g) < 0.8).int() * FLAG_VALID
        return idx, doc, seg, flags

    return MaskMeta(*side(nq), *side(nk))


@interp
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(meta=random_metas(), cfg=st.sampled_from(TILES[:3]), seed=st.integers(0, 1000))
def test_arbitrary_metadata_matches_oracle(meta, cfg, seed):
    check_against_oracle(meta, 2, 1, 64, torch.float32, cfg, seed, atol=2e-5, gatol=1e-4)


@interp
def test_fully_masked_rows_give_zero_and_finite_grads():
    # invalid tokens everywhere in one row, a row with no valid token at all, and a causal doc
    lay = Layout.from_samples([[[Segment.of("causal", "a", 20, "t", valid=[i % 3 != 0 for i in range(20)]),
                                 Segment.of("full", "a", 12, "i", valid=False)]],
                               [[Segment.of("full", "a", 25, "i", valid=False)]]], ["a"], pad_to=40)
    meta = lay.mask_meta()
    empty = meta.row_is_empty()
    assert empty[1].all() and empty[0].any() and not empty[0].all()
    q, k, v, do = make_qkv(meta, 2, 2, 64, torch.float32, 0)
    out, lse, grads = run_kernel(q, k, v, meta, do, config=TILES[0])
    e = empty[:, None].expand_as(lse)
    assert bool((out[e] == 0).all()) and bool((lse[e] == float("-inf")).all())
    for g in grads:
        assert torch.isfinite(g).all()
    dq = grads[0]
    assert bool((dq[e] == 0).all()), "a row that attends nothing has zero dq"
    ref, ref_grads = oracle(q, k, v, meta, do)
    assert_close(out, ref, 2e-5, what="out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, 1e-4, what="grad")


@interp
def test_lse_gradient_flows():
    """d(loss)/d(inputs) through both outputs: loss = <out, dO> + <lse, dL> (dL only on finite rows)."""
    lay = Layout.from_samples([[Segment.of("causal", "a", 24, "t"), Segment.of("noise", "a", 20, "n"),
                                Segment.of("causal", "a", 9, "u", valid=[True, False] * 4 + [False])]], ["a"])
    meta = lay.mask_meta()
    q, k, v, do = make_qkv(meta, 2, 1, 64, torch.float32, 5)
    dl = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(1))
    fin = ~meta.row_is_empty()[:, None].expand_as(dl)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = mask_attention(*ins, meta, return_lse=True, config=TILES[0])
    loss = (out * do).sum() + (lse[fin] * dl[fin]).sum()
    grads = torch.autograd.grad(loss, ins, retain_graph=True)
    ref_ins = [t.clone().double().requires_grad_() for t in (q, k, v)]
    ref_out = attention(*ref_ins, meta, backend="sdpa")
    ref_lse = oracle_lse(*ref_ins, meta)
    ref_loss = (ref_out * do.double()).sum() + (ref_lse[fin] * dl.double()[fin]).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_ins, retain_graph=True)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, 1e-4, rtol=1e-4, what="grad through lse")
    # lse alone (no gradient on out) also works
    lse_only = torch.autograd.grad((lse[fin] * dl[fin]).sum(), ins)
    ref_lse_only = torch.autograd.grad((ref_lse[fin] * dl.double()[fin]).sum(), ref_ins, allow_unused=True)
    assert ref_lse_only[2] is None  # lse does not depend on v
    assert bool((lse_only[2] == 0).all())
    for g, r in zip(lse_only[:2], ref_lse_only[:2]):
        assert_close(g, r, 1e-4, rtol=1e-4, what="grad of lse alone")


@interp
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layout=layouts(max_len=128), split=st.floats(0.0, 0.95), cfg=st.sampled_from(TILES[:3]),
       heads=st.sampled_from([(1, 1), (2, 1)]), seed=st.integers(0, 1000))
def test_prefix_form_equals_concatenated_form(layout, split, cfg, heads, seed):
    """Suffix queries over (cached prefix K/V, suffix K/V) read through two pointers == one concatenated K/V."""
    n = layout.seq_len
    P = int(split * n)
    meta = layout.mask_meta(slice(P, n), slice(0, n))
    hq, hkv = heads
    q, k, v, do = make_qkv(meta, hq, hkv, 64, torch.float32, seed)
    prefix = (k[:, :, :P], v[:, :, :P])
    out_p, lse_p, g_p = run_kernel(q, k[:, :, P:], v[:, :, P:], meta, do, prefix=prefix, config=cfg)
    out_c, lse_c, g_c = run_kernel(q, k, v, meta, do, config=cfg)
    assert_close(out_p, out_c, 2e-5, what="out")
    assert torch.equal(torch.isinf(lse_p), torch.isinf(lse_c))
    dq_p, dks, dvs, dkp, dvp = g_p
    dq_c, dk_c, dv_c = g_c
    assert_close(dq_p, dq_c, 1e-4, what="dq")
    assert_close(torch.cat([dkp, dks], 2), dk_c, 1e-4, what="dk (prefix ++ suffix)")
    assert_close(torch.cat([dvp, dvs], 2), dv_c, 1e-4, what="dv (prefix ++ suffix)")
    ref, ref_grads = oracle(q, k[:, :, P:], v[:, :, P:], meta, do, prefix=prefix)
    assert_close(out_p, ref, 2e-5, what="out vs oracle")
    for name, g, r in zip(["dq", "dk", "dv", "dk_prefix", "dv_prefix"], g_p, ref_grads):
        assert_close(g, r, 1e-4, rtol=1e-4, what=name)


@interp
@pytest.mark.parametrize("grad_of", ["suffix_only", "prefix_only", "q_only"])
def test_prefix_gradients_only_where_needed(grad_of):
    """A detached KV cache (or frozen suffix) skips those dK/dV tiles; the other gradients still match the oracle."""
    lay = Layout.from_samples([[Segment.of("full", "a", 37, "p"), Segment.of("causal", "a", 20, "t"),
                                Segment.of("noise", "a", 13, "a")]], ["a"])
    P, n = 37, 70
    meta = lay.mask_meta(slice(P, n), slice(0, n))
    q, k, v, do = make_qkv(meta, 2, 1, 64, torch.float32, 4)
    ks, vs, kp, vp = (t.clone() for t in (k[:, :, P:], v[:, :, P:], k[:, :, :P], v[:, :, :P]))
    want = {"suffix_only": (q, ks, vs), "prefix_only": (kp, vp), "q_only": (q,)}[grad_of]
    for t in want:
        t.requires_grad_()
    out = mask_attention(q, ks, vs, meta, prefix=(kp, vp), config=TILES[2])
    grads = torch.autograd.grad(out, want, do)
    _, ref_grads = oracle(q, ks, vs, meta, do, prefix=(kp, vp))
    ref = dict(zip([id(t) for t in (q, ks, vs, kp, vp)], ref_grads))
    for t, g in zip(want, grads):
        assert_close(g, ref[id(t)], 1e-4, rtol=1e-4, what=grad_of)


@interp
def test_prefix_through_dispatch_and_default_config():
    lay = Layout.from_samples([[Segment.of("full", "a", 45, "p"), Segment.of("causal", "a", 10, "t"),
                                Segment.of("noise", "a", 11, "a")]], ["a"])
    P = 45
    meta = lay.mask_meta(slice(P, 66), slice(0, 66))
    q, k, v, do = make_qkv(meta, 2, 2, 64, torch.float32, 2)
    got = attention(q, k[:, :, P:], v[:, :, P:], meta, backend="triton", prefix=(k[:, :, :P], v[:, :, :P]))
    ref, _ = oracle(q, k[:, :, P:], v[:, :, P:], meta, do, prefix=(k[:, :, :P], v[:, :, :P]))
    assert_close(got, ref, 2e-5, what="triton backend, prefix")


@interp
def test_backward_is_deterministic():
    lay = Layout.from_samples([[Segment.of("full", "a", 50, "i"), Segment.of("causal", "a", 30, "t"),
                                Segment.of("noise", "a", 16, "n")]], ["a"])
    meta = lay.mask_meta()
    q, k, v, do = make_qkv(meta, 4, 1, 64, torch.float32, 9)
    runs = [run_kernel(q, k, v, meta, do, config=TILES[1]) for _ in range(2)]
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)
    ref, ref_grads = oracle(q, k, v, meta, do)
    for g, r in zip(runs[0][2], ref_grads):
        assert_close(g, r, 1e-4, what="grad")


@interp
def test_non_contiguous_inputs_and_custom_scale():
    lay = Layout.from_samples([[Segment.of("causal", "a", 33, "t"), Segment.of("full", "a", 20, "i")]], ["a"])
    meta = lay.mask_meta()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 53, 2, 3, 64, generator=g)  # [B, N, H, (q,k,v), D] as a fused projection would give
    q, k, v = (x[..., i, :].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    do = torch.randn(1, 2, 53, 64, generator=g)
    out, _, grads = run_kernel(q, k, v, meta, do, config=TILES[0], scale=0.3)
    ref = attention(q.contiguous(), k.contiguous(), v.contiguous(), meta, backend="sdpa", scale=0.3)
    assert_close(out, ref, 2e-5, what="out")
    _, ref_grads = oracle(q, k, v, meta, do, scale=0.3)
    for gg, r in zip(grads, ref_grads):
        assert_close(gg, r, 1e-4, what="grad")


@interp
def test_no_keys_and_no_queries():
    lay = Layout.from_samples([[Segment.of("causal", "a", 20, "t")]], ["a"])
    meta = lay.mask_meta(slice(0, 20), slice(0, 0))
    q = torch.randn(1, 1, 20, 64, requires_grad=True)
    k = torch.zeros(1, 1, 0, 64, requires_grad=True)
    out, lse = mask_attention(q, k, k, meta, return_lse=True)
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
    out.sum().backward()
    assert bool((q.grad == 0).all())
    meta0 = lay.mask_meta(slice(0, 0), slice(0, 20))
    out0 = mask_attention(q[:, :, :0], q, q, meta0)
    assert out0.shape == (1, 1, 0, 64)


# ------------------------------------------------------------------------------------------ metadata additions


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(layout=layouts(max_len=200), bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32, 64]),
       at=st.floats(0, 1), count=st.integers(0, 40))
def test_q_lists_and_inserted_keys_against_dense(layout, bm, bn, at, count):
    """Tile lists for dK/dV cover exactly the non-empty tiles; inserted invalid keys change nothing else."""
    meta = layout.mask_meta()
    s = meta.tile_summary(bm, bn)
    pc, pi, fc, fi = s.q_lists()
    kc, ki, kfc, kfi = s.kv_lists()
    B, mq, mk = s.state.shape
    for b in range(B):
        for j in range(mk):
            part = set(pi[b, j, :pc[b, j]].tolist())
            full = set(fi[b, j, :fc[b, j]].tolist())
            assert part == {i for i in range(mq) if s.state[b, i, j] == 1}
            assert full == {i for i in range(mq) if s.state[b, i, j] == 2}
            assert part == {i for i in range(mq) if j in set(ki[b, i, :kc[b, i]].tolist())}
    pos = int(at * meta.k_len)
    padded = meta.with_invalid_keys(pos, count)
    dense, pdense = meta.dense(), padded.dense()
    assert torch.equal(torch.cat([pdense[..., :pos], pdense[..., pos + count:]], -1), dense)
    assert not pdense[..., pos:pos + count].any()
    # the kernels' tile classification stays exact against the dense oracle on the padded key space
    ps = padded.tile_summary(bm, bn).state
    for b in range(B):
        for i in range(ps.shape[1]):
            for j in range(ps.shape[2]):
                blk = pdense[b, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                if ps[b, i, j] == 0:
                    assert not blk.any()
                elif ps[b, i, j] == 2:
                    assert blk.shape == (bm, bn) and blk.all()


# ------------------------------------------------------------------------------------------ errors and dispatch


def _small():
    lay = Layout.from_samples([[Segment.of("causal", "a", 20, "t")]], ["a"])
    meta = lay.mask_meta()
    q = torch.randn(1, 2, 20, 64)
    return q, q[:, :1].clone(), q[:, :1].clone(), meta


@pytest.mark.parametrize("case, match", [
    ("dtype", "dtype torch.int64"),
    ("mixed", "k has dtype"),
    ("heads", "not a multiple"),
    ("head_dim", "head_dim 512"),
    ("meta", "mask metadata is"),
    ("rank", "4-D"),
    ("prefix", "k_prefix has shape"),
])
def test_bad_inputs_raise_clear_errors(case, match):
    q, k, v, meta = _small()
    kw = {}
    if case == "dtype":
        q, k, v = q.long(), k.long(), v.long()
    elif case == "mixed":
        k = k.double()
    elif case == "heads":
        q = torch.randn(1, 3, 20, 64)
        k = v = torch.randn(1, 2, 20, 64)
    elif case == "head_dim":
        q, k, v = (torch.randn(t.shape[:3] + (512,)) for t in (q, k, v))
    elif case == "meta":
        q = q[:, :, :10]
    elif case == "rank":
        q = q[0]
    elif case == "prefix":
        kw["prefix"] = (torch.randn(1, 3, 5, 64), torch.randn(1, 1, 5, 64))
    with pytest.raises(ValueError, match=match):
        mask_attention(q, k, v, meta, **kw)


def test_cpu_needs_interpreter_and_bf16_is_refused(monkeypatch):
    q, k, v, meta = _small()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        mask_attention(q, k, v, meta)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        attention(q, k, v, meta, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton_interpreted():
        with pytest.raises(ValueError, match="bfloat16"):
            mask_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), meta)


@interp
def test_backend_registration_and_auto_skip():
    q, k, v, meta = _small()
    b = get_backend("triton")
    inp = AttentionInputs(q, k, v, meta)
    assert b.not_supported_reasons(inp) == []
    assert any("slow" in r for r in b.auto_skip_reasons(inp))
    got = attention(q, k, v, meta, backend="triton")
    ref = attention(q, k, v, meta, backend="sdpa")
    assert_close(got, ref, 2e-5, what="triton backend")


def test_configs_by_capability():
    for cap in [(9, 0), (8, 0), (8, 6)]:
        for d in (64, 128, 256):
            for dt in ("bfloat16", "float16", "float32"):
                c = get_config(d, dt, cap)
                assert c.block_m >= 16 and c.key_align % c.block_n == 0 and c.key_align % c.block_n2 == 0
    assert get_config(128, "bfloat16", (9, 0)) != get_config(128, "bfloat16", (8, 0))
    with pytest.raises(ValueError):
        get_config(512)
    with pytest.raises(ValueError):
        KernelConfig(block_m=48)


# ------------------------------------------------------------------------------------------ GPU


def _pi0_like_layout(n_tokens: int, device) -> Layout:
    """pi0-style samples (3 image blocks, text, state, noisy action chunk) packed into rows of n_tokens."""
    def sample(n_img, n_txt, n_act):
        return [Segment.of("full", "a", n_img, "img"), Segment.of("full", "a", n_img, "img"),
                Segment.of("full", "a", n_img, "img"), Segment.of("causal", "a", n_txt, "txt"),
                Segment.of("full", "a", 1, "state"), Segment.of("noise", "a", n_act, "act")]
    docs, total = [], 0
    while True:
        s = sample(256, 48, 50) if len(docs) % 2 == 0 else sample(196, 20, 50)
        n = sum(x.length for x in s)
        if total + n > n_tokens:
            break
        docs.append(s)
        total += n
    if total < n_tokens:
        docs.append([Segment.of("causal", "a", n_tokens - total, "txt")])
    return Layout.from_samples([docs], ["a"]).to(device)


@gpu
@needs_cuda
@pytest.mark.parametrize("n_tokens", [1024, 4096, 16384])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bf16_against_fp32_oracle(n_tokens, d):
    """bf16 forward+backward within 2× the error of plain PyTorch bf16 attention (FA's criterion)."""
    meta = _pi0_like_layout(n_tokens, "cuda").mask_meta()
    q, k, v, do = make_qkv(meta.to("cpu"), 2, 1, d, torch.bfloat16, 0, device="cuda")
    out, _, grads = run_kernel(q, k, v, meta, do)
    ref, ref_grads = oracle(q, k, v, meta, do)
    plain, plain_grads = plain_low_precision(q, k, v, meta, do)
    for name, got, want, base in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads],
                                     [plain, *plain_grads]):
        base_err = (base.float() - want).abs().max().item()
        err = (got.float() - want).abs().max().item()
        assert err <= 2 * base_err + 1e-6, f"{name}: {err:.3g} > 2 × {base_err:.3g}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_dtypes_head_dims_prefix_and_determinism(dtype, d):
    lay = _pi0_like_layout(2048, "cuda")
    P = 1000
    meta = lay.mask_meta(slice(P, 2048), slice(0, 2048))
    q, k, v, do = make_qkv(meta.to("cpu"), 4, 2, d, dtype, 1, device="cuda")
    prefix = (k[:, :, :P], v[:, :, :P])
    a = run_kernel(q, k[:, :, P:], v[:, :, P:], meta, do, prefix=prefix)
    b = run_kernel(q, k[:, :, P:], v[:, :, P:], meta, do, prefix=prefix)
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y), "backward is deterministic"
    ref, ref_grads = oracle(q, k[:, :, P:], v[:, :, P:], meta, do, prefix=prefix)
    tol = 5e-3 if dtype == torch.float32 else 2e-2
    assert_close(a[0], ref, tol, what="out")
    for g, r in zip(a[2], ref_grads):
        assert_close(g, r, tol, rtol=tol, what="grad")
