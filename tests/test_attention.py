"""Attention dispatch, the sdpa and flex backends, and tile summaries against the dense oracle."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from vla_blocks.attention import BackendUnavailable, MaskMeta, TILE_EMPTY, TILE_FULL, attention, choose_backend
from vla_blocks.attention.dispatch import AttentionInputs
from vla_blocks.layout import Layout, Segment

from oracles.nn import attention as attention_oracle

EXPERTS = ["und", "gen", "act"]


def reference_attention(q, k, v, mask):
    """The written-out attention oracle (oracles.nn.attention) in float64 on a ``[B, N, N]`` mask."""
    return attention_oracle(q.double(), k.double(), v.double(), mask)


segment_st = st.tuples(st.sampled_from(["causal", "full", "noise"]), st.integers(1, 40),
                       st.sampled_from(EXPERTS), st.lists(st.booleans(), min_size=1, max_size=3))


def random_layout(spec, pack):
    samples = []
    for s in spec:
        segs = []
        for i, (mode, n, e, vpat) in enumerate(s):
            valid = [vpat[j % len(vpat)] for j in range(n)]
            segs.append(Segment.of(mode, e, n, f"s{i}", valid=valid))
        samples.append(segs)
    return Layout.from_samples(samples, EXPERTS, pack=pack)


layouts = st.builds(random_layout, st.lists(st.lists(segment_st, min_size=1, max_size=5), min_size=1, max_size=3),
                    st.booleans())


@settings(max_examples=40, deadline=None)
@given(layouts, st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.integers(0, 10_000))
def test_sdpa_matches_reference_forward_and_backward(layout, heads, seed):
    g = torch.Generator().manual_seed(seed)
    B, N = layout.batch_size, layout.seq_len
    hq, hk = heads
    q = torch.randn(B, hq, N, 16, generator=g, requires_grad=True)
    k = torch.randn(B, hk, N, 16, generator=g, requires_grad=True)
    v = torch.randn(B, hk, N, 16, generator=g, requires_grad=True)
    meta = layout.mask_meta()
    out = attention(q, k, v, meta, backend="sdpa")
    ref = reference_attention(q, k, v, meta.dense())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), dout)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), dout.double())
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    empty = ~meta.dense().any(-1)
    assert (out.detach()[empty[:, None].expand_as(out[..., 0])] == 0).all()


@settings(max_examples=25, deadline=None)
@given(layouts, st.sampled_from([(2, 2), (4, 1)]), st.integers(0, 10_000))
def test_flex_forward_matches_oracle(layout, heads, seed):
    g = torch.Generator().manual_seed(seed)
    B, N = layout.batch_size, layout.seq_len
    q = torch.randn(B, heads[0], N, 16, generator=g)
    k = torch.randn(B, heads[1], N, 16, generator=g)
    v = torch.randn(B, heads[1], N, 16, generator=g)
    meta = layout.mask_meta()
    out = attention(q, k, v, meta, backend="flex")
    ref = reference_attention(q, k, v, meta.dense())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(layouts, st.sampled_from([(16, 16), (8, 32), (32, 8), (128, 128)]))
def test_tile_summaries_are_sound(layout, blocks):
    """No tile holding an allowed pair is empty; every full tile is allowed everywhere."""
    bm, bn = blocks
    meta = layout.mask_meta()
    dense = meta.dense()
    summ = meta.tile_summary(bm, bn)
    B, N, _ = dense.shape
    mq, mk = -(-N // bm), -(-N // bn)
    pad = torch.zeros(B, mq * bm, mk * bn, dtype=torch.bool)
    pad[:, :N, :N] = dense
    tiles = pad.view(B, mq, bm, mk, bn)
    any_allowed = tiles.any(dim=(2, 4))
    all_allowed = tiles.all(dim=(2, 4))
    assert not (any_allowed & (summ.state == TILE_EMPTY)).any()
    assert all_allowed[summ.state == TILE_FULL].all()


def test_tile_summaries_skip_cross_document_and_noise_tiles():
    """A packed batch of two documents, each a long causal text then a noise chunk: off-diagonal tiles are empty."""
    doc = [Segment.of("causal", "und", 64, "t"), Segment.of("noise", "act", 32, "a")]
    meta = Layout.from_samples([doc, doc], EXPERTS, pack=True).mask_meta()
    s = meta.tile_summary(32, 32).state[0]
    assert (s[3:, :3] == TILE_EMPTY).all() and (s[:3, 3:] == TILE_EMPTY).all()  # cross document
    assert s[1, 0] == TILE_FULL  # causal, strictly below the diagonal
    assert s[2, 2] == TILE_FULL  # noise chunk attends itself
    assert s[2, 1] == TILE_FULL and s[1, 2] == TILE_EMPTY  # noise sees text; nobody sees noise
    assert s[0, 1] == TILE_EMPTY  # future text


def test_prefix_form_equals_concatenated():
    doc = [Segment.of("full", "und", 10, "p", valid=[1] * 8 + [0] * 2), Segment.of("noise", "act", 5, "a")]
    layout = Layout.from_samples([doc, doc], EXPERTS)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 15, 8, generator=g)
    k = torch.randn(2, 2, 15, 8, generator=g)
    v = torch.randn(2, 2, 15, 8, generator=g)
    full = attention(q, k, v, layout.mask_meta(), backend="sdpa")
    meta = layout.mask_meta(slice(10, 15), slice(0, 15))
    for backend in ("sdpa", "flex"):
        suffix = attention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], meta, backend=backend,
                           prefix=(k[:, :, :10], v[:, :, :10]))
        torch.testing.assert_close(suffix, full[:, :, 10:], atol=1e-6, rtol=1e-6)


def test_dispatch_reasons_and_errors():
    layout = Layout.from_samples([[Segment.of("causal", "und", 8, "t")]], EXPERTS)
    meta = layout.mask_meta()
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    k = torch.randn(1, 2, 8, 8)
    inp = AttentionInputs(q, k, k, meta)
    assert choose_backend(inp).name == "sdpa"  # auto on CPU
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):
        attention(q, k, k, meta, backend="flex")
    with pytest.raises(KeyError, match="did you mean 'flex'"):
        attention(q, k, k, meta, backend="flexx")
    with pytest.raises(ValueError, match="kv heads"):
        attention(torch.randn(1, 3, 8, 8), k, k, meta)
    with pytest.raises(ValueError, match="metadata"):
        attention(torch.randn(1, 2, 7, 8), k, k, meta)


def test_mask_meta_validates_shapes():
    v = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="q_doc"):
        MaskMeta(v, torch.zeros(1, 3, dtype=torch.int32), v, v, v, v, v, v)


def test_num_allowed_pairs_matches_dense():
    layout = Layout.from_samples([[Segment.of("full", "und", 30, "p"), Segment.of("causal", "und", 50, "t"),
                                   Segment.of("noise", "act", 20, "a")]] * 2, EXPERTS, pack=True)
    meta = layout.mask_meta()
    assert meta.num_allowed_pairs() == int(meta.dense().sum())
