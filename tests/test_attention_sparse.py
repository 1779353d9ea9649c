"""``sdpa_blocks`` (attention without an N×N mask) against the dense oracle; empty rows from O(N) metadata;
the automatic dense-vs-blocks choice and its dispatch reasons; the cached backend choice; a 16k-token packed
row in a memory budget the dense path cannot meet."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

from test_attention import reference_attention  # the fp64 softmax oracle, written out
from vla_blocks.attention import AttentionInputs, attention, choose_backend, explain, get_backend
from vla_blocks.attention.blocks import block_plan, blocks_attention
from vla_blocks.layout import Layout, Part, Segment

EXPERTS = ["und", "gen", "act"]


# ------------------------------------------------------------------------------------------ plans
def halo_sample(g: int = 4, act: int = 3, prompt: int = 3, thought: int = 4, valid=True):
    """HALO EM-CoT order: history frames (clean latent + ViT image, with markers), prompt and thought text,
    the goal as noisy latent then clean latent and ViT image, the action chunk (noise)."""
    def marked(expert, n, mode, rope):
        return Segment(mode, [Part("und", 1, "m"), Part(expert, n, "x", valid), Part("und", 1, "m")], rope)
    s = [marked("gen", g, "full", "block"), marked("und", g, "full", "block")]
    s += [Segment.of("causal", "und", prompt, "p"), Segment.of("causal", "und", thought, "t")]
    s += [marked("gen", g, "noise", "block_hold"), marked("gen", g, "full", "block"), marked("und", g, "full", "block")]
    s.append(Segment.of("noise", "act", act, "a", rope="block_hold"))
    return s


def acot_sample(img: int = 6, txt: int = 5, ear: int = 3, act: int = 2):
    """ACoT-VLA: a full prefix with a masked (invalid) camera, then EAR and action chunks as parallel noise."""
    prefix = Segment("full", [Part("und", img, "i0"), Part("und", img, "i1", valid=False), Part("und", txt, "t")])
    return [prefix, Segment.of("noise", "gen", ear, "ear", rope="sequential_hold"),
            Segment.of("noise", "act", act, "a", rope="sequential_hold")]


def pi0_sample(img: int = 8, txt: int = 3, act: int = 4):
    return [Segment("full", [Part("und", img, "i"), Part("und", txt, "t")]), Segment.of("full", "act", 1, "s"),
            Segment.of("noise", "act", act, "a")]


segment_st = st.tuples(st.sampled_from(["causal", "full", "noise"]), st.integers(1, 24),
                       st.sampled_from(EXPERTS), st.lists(st.booleans(), min_size=1, max_size=3))
sample_st = st.one_of(
    st.lists(segment_st, min_size=1, max_size=4).map(
        lambda spec: [Segment.of(m, e, n, f"s{i}", valid=[vp[j % len(vp)] for j in range(n)])
                      for i, (m, n, e, vp) in enumerate(spec)]),
    st.builds(halo_sample, st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5)),
    st.builds(acot_sample, st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3)),
    st.builds(pi0_sample, st.integers(1, 10), st.integers(1, 4), st.integers(1, 5)),
)


@st.composite
def packed_layouts(draw):
    """1–2 rows of 1–4 packed documents, padded (``pad_to``) by 0–7 tokens."""
    rows = draw(st.lists(st.lists(sample_st, min_size=1, max_size=4), min_size=1, max_size=2))
    n = max(sum(seg.length for s in r for seg in s) for r in rows)
    return Layout.from_samples(rows, EXPERTS, pad_to=n + draw(st.integers(0, 7)))


def pass_form(layout, form, cut):
    """(meta, query slice, key slice, uses a prefix) for a self pass, a suffix over a cached prefix, or a
    cross pass (suffix queries reading the prefix keys only: rows of later documents attend nothing)."""
    N = layout.seq_len
    P = max(1, min(N - 1, int(cut * N))) if N > 1 else 0
    if form == "self" or N < 2:
        return layout.mask_meta(), slice(0, N), slice(0, N), False
    if form == "prefix":
        return layout.mask_meta(slice(P, N), slice(0, N)), slice(P, N), slice(0, N), True
    return layout.mask_meta(slice(P, N), slice(0, P)), slice(P, N), slice(0, P), False


def _inputs(B, hq, hk, nq, nk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, nq, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, hk, nk, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, hk, nk, d, generator=g).to(dtype).requires_grad_()
    return q, k, v


def _run_blocks(q, k, v, meta, prefix_len, block):
    """``sdpa_blocks`` through the dispatcher (default blocks) or the planner with small blocks (chunking; a third
    entry 0 runs every contiguous chunk on slices of q, k, v instead of gathered batches)."""
    if block is None:
        if prefix_len:
            return attention(q, k[:, :, prefix_len:], v[:, :, prefix_len:], meta, backend="sdpa_blocks",
                             prefix=(k[:, :, :prefix_len], v[:, :, :prefix_len]))
        return attention(q, k, v, meta, backend="sdpa_blocks")
    return blocks_attention(q, k, v, meta, block_plan(meta, *block))


# ------------------------------------------------------------------------------------------ vs the oracle
@settings(max_examples=60, deadline=None)
@given(packed_layouts(), st.sampled_from(["self", "prefix", "cross"]), st.floats(0.1, 0.9),
       st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.sampled_from([None, (16, 8, 0), (7, 3), (64, 16, 0), (64, 16)]),
       st.integers(0, 10_000))
def test_blocks_match_oracle_fp32_forward_backward(layout, form, cut, heads, block, seed):
    meta, qs, ks, pre = pass_form(layout, form, cut)
    B = layout.batch_size
    q, k, v = _inputs(B, heads[0], heads[1], meta.q_len, meta.k_len, 8, torch.float32, seed)
    out = _run_blocks(q, k, v, meta, meta.k_len - meta.q_len if pre else 0, block)
    dense = meta.dense()
    ref = reference_attention(q, k, v, dense)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    with torch.no_grad():  # inference writes the chunks in place instead of joining them
        torch.testing.assert_close(_run_blocks(q, k, v, meta, meta.k_len - meta.q_len if pre else 0, block), out,
                                   atol=0, rtol=0)
    empty = ~dense.any(-1)
    assert torch.equal(meta.row_is_empty(), empty)  # O(N) empty rows = the oracle's
    assert (out.detach()[empty[:, None].expand_as(out[..., 0])] == 0).all()
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    exp = torch.autograd.grad(ref, (q, k, v), dout.double())
    for a, b in zip(got, exp):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), atol=5e-6, rtol=5e-6)


@settings(max_examples=25, deadline=None)
@given(packed_layouts(), st.sampled_from([torch.float16, torch.bfloat16]), st.sampled_from([None, (16, 8), (16, 8, 0)]),
       st.integers(0, 10_000))
def test_blocks_half_precision_within_twice_dense_error(layout, dtype, block, seed):
    """fp16/bf16: error against the fp64 oracle at most 2× that of the dense sdpa path in the same dtype."""
    meta = layout.mask_meta()
    q, k, v = _inputs(layout.batch_size, 4, 2, meta.q_len, meta.k_len, 16, dtype, seed)
    ref = reference_attention(q, k, v, meta.dense())
    dense = attention(q, k, v, meta, backend="sdpa")
    out = _run_blocks(q, k, v, meta, 0, block)
    assert out.dtype == dtype
    err_dense = (dense.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    assert err <= 2 * err_dense + tol
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for a, b, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(dense, (q, k, v), dout),
                       torch.autograd.grad(ref, (q, k, v), dout.double())):
        assert torch.isfinite(a).all()
        assert (a.double() - r).abs().max().item() <= 2 * (b.double() - r).abs().max().item() + 4 * tol


def test_plan_reads_documents_and_tiles_only():
    """Packed documents: one chunk per document, keys of its own document only; a long document is chunked and a
    chunk of a bidirectional prefix over full tiles needs no mask."""
    docs = [pi0_sample(40, 10, 6)] * 3 + [halo_sample(8, 4, 5, 6)]
    layout = Layout.from_samples([docs], EXPERTS, pad_to=260)
    meta = layout.mask_meta()
    lens = [sum(s.length for s in d) for d in docs]
    plan = block_plan(meta, 64, 16)
    assert plan.documents == 4 and plan.chunks == 3 + -(-lens[3] // 64)
    for call in plan.calls:  # every gathered key is valid and of the chunk's own document
        qd = meta.q_doc.reshape(-1)[call.q_index].view(call.n, call.lq)
        kd = meta.k_doc.reshape(-1)[call.k_index].view(call.n, call.lk)
        assert (kd == qd[:, :1]).all()
    same = [c for c in plan.calls if c.n == 3]
    assert len(same) == 1 and same[0].lq == lens[0]  # the identical pi0 documents run as one batched call
    assert plan.issued_pairs < 0.5 * plan.dense_pairs
    views = [c for c in block_plan(meta, 64, 16, view_min_pairs=0).calls if c.view is not None]
    assert views and all(c.n == 1 for c in views)  # contiguous chunks can run on slices (no gather)
    big = Layout.from_samples([[Segment.of("full", "und", 128, "img"), Segment.of("causal", "und", 64, "t")]], EXPERTS)
    p = block_plan(big.mask_meta(), 32, 32)
    fulls = [c for c in p.calls if c.full]
    assert fulls and all(c.lk == 128 for c in fulls)  # image chunks read the image only, unmasked
    assert sum(c.n * c.lq for c in fulls) == 128


def test_no_valid_query_gives_zeros_with_gradient():
    layout = Layout.from_samples([[Segment.of("causal", "und", 6, "t", valid=False)]], EXPERTS)
    meta = layout.mask_meta()
    q, k, v = _inputs(1, 2, 2, 6, 6, 4, torch.float32, 0)
    out = blocks_attention(q, k, v, meta, block_plan(meta))
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


# ------------------------------------------------------------------------------------------ dispatch
def _packed_meta(n_docs, sample, B=1):
    return Layout.from_samples([[sample] * n_docs] * B, EXPERTS).mask_meta()


def test_auto_chooses_blocks_for_packed_rows_and_dense_for_short_ones():
    def choice(meta, grad=False):
        q = torch.randn(meta.batch_size, 2, meta.q_len, 8, requires_grad=grad)
        k = torch.randn(meta.batch_size, 1, meta.k_len, 8)
        inp = AttentionInputs(q, k, k, meta)
        reasons = dict(explain(inp))
        return choose_backend(inp).name, reasons["sdpa_blocks"]

    packed = _packed_meta(4, pi0_sample(150, 20, 10))  # 4 documents of 181 tokens: 724 tokens
    name, why = choice(packed, grad=True)
    assert name == "sdpa_blocks" and why == []
    name, why = choice(_packed_meta(2, pi0_sample(150, 20, 10)))  # 362 tokens: 362² < 512²
    assert name == "sdpa" and "dense mask is small" in why[0]
    name, why = choice(_packed_meta(1, pi0_sample(900, 50, 50)))  # one 1001-token document: blocks save nothing
    assert name == "sdpa" and "no saving" in why[0]
    causal = Layout.from_samples([[Segment.of("causal", "und", 2048, "t")]], EXPERTS).mask_meta()
    name, why = choice(causal)
    assert name == "sdpa" and "is_causal" in why[0]
    # every backend before the chosen one says why it was passed over
    q = torch.randn(1, 2, packed.q_len, 8)
    reasons = explain(AttentionInputs(q, q, q, packed))
    names = [n for n, _ in reasons]
    assert names[-2:] == ["sdpa_blocks", "sdpa"]
    assert all(r for n, r in reasons[:names.index("sdpa_blocks")])


def test_backend_choice_is_cached_per_batch(monkeypatch):
    meta = _packed_meta(9, pi0_sample(150, 20, 10))
    q = torch.randn(1, 2, meta.q_len, 8)
    blocks = get_backend("sdpa_blocks")
    calls = []
    orig = type(blocks).auto_skip_reasons
    monkeypatch.setattr(blocks, "auto_skip_reasons", lambda inp: calls.append(1) or orig(blocks, inp))
    first = attention(q, q, q, meta)
    for _ in range(3):  # the layers of one batch reuse the choice
        torch.testing.assert_close(attention(q, q, q, meta), first)
    assert len(calls) == 1
    attention(q.double(), q.double(), q.double(), meta)  # a new signature (dtype) chooses again
    assert len(calls) == 2
    attention(q, q, q, _packed_meta(9, pi0_sample(150, 20, 10)))  # a new batch chooses again
    assert len(calls) == 3
    from vla_blocks.attention.optional import _installed
    _installed("flash_attn")
    before = _installed.cache_info().hits
    _installed("flash_attn")
    assert _installed.cache_info().hits == before + 1  # installed-package probes run once per process


# ------------------------------------------------------------------------------------------ 16k tokens
CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_attention import reference_attention
    from test_attention_sparse import halo_sample, EXPERTS
    from vla_blocks.attention import AttentionInputs, attention, choose_backend
    from vla_blocks.layout import Layout
    torch.set_num_threads(1)
    N, H, D = 16384, 2, 32
    doc = halo_sample(256, 16, 34, 50)                  # HALO EM-CoT sample, 16×16-token images (1390 tokens)
    L = sum(s.length for s in doc)
    layout = Layout.from_samples([[doc] * (N // L)], EXPERTS, pad_to=N)
    meta = layout.mask_meta()
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, H, N, D, generator=g) for _ in range(4))
    q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
    chosen = choose_backend(AttentionInputs(q, k, v, meta)).name
    page = resource.getpagesize()
    rss_before = int(open("/proc/self/statm").read().split()[1]) * page
    out = attention(q, k, v, meta)                      # auto
    out.backward(do)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    errs = []
    for d in (0, N // L - 1):                           # first and last document against the fp64 oracle
        sl = slice(d * L, (d + 1) * L)
        sub = Layout.from_samples([[doc]], EXPERTS).mask_meta().dense()
        qq, kk, vv = (t.detach()[:, :, sl].clone().requires_grad_() for t in (q, k, v))
        ref = reference_attention(qq, kk, vv, sub)
        ref.backward(do[:, :, sl].double())
        errs.append(max((out[:, :, sl].double() - ref).abs().max().item(),
                        (q.grad[:, :, sl].double() - qq.grad).abs().max().item(),
                        (k.grad[:, :, sl].double() - kk.grad).abs().max().item()))
    pad = slice((N // L) * L, N)
    print(json.dumps({"chosen": chosen, "extra": peak - rss_before, "errs": errs,
                      "pad_zero": bool((out[:, :, pad] == 0).all()), "docs": N // L}))
""")


@pytest.mark.slow
def test_16k_packed_row_in_a_memory_budget():
    """A 16,384-token packed HALO row, forward + backward, in under 256 MiB of extra memory — the dense path's
    boolean mask alone is 16384² B = 256 MiB (plus a float copy per call, 1 GiB in fp32).

    Memory is measured in a fresh subprocess with ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the peak
    resident set) minus the resident set (``/proc/self/statm``) just before the attention call: an upper bound
    on what the call added (the peak also counts anything resident before it)."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm (Linux)")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD, here], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["chosen"] == "sdpa_blocks"
    L = sum(s.length for s in halo_sample(256, 16, 34, 50))
    assert got["docs"] == 16384 // L == 11 and got["pad_zero"]
    assert max(got["errs"]) < 1e-5
    budget = 256 * 2 ** 20
    print(f"16k packed HALO row, fwd+bwd: extra memory {got['extra'] / 2 ** 20:.0f} MiB (budget 256 MiB)")
    assert got["extra"] < budget, f"extra memory {got['extra'] / 2 ** 20:.0f} MiB"
