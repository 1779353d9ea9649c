"""Layout: the dense mask against hand-written BAGEL and openpi references, RoPE policies, routing helpers."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from vla_blocks.layout import Layout, Part, Segment

from oracles.bagel import prepare_attention_mask_per_sample
from oracles.openpi import make_attn_mask

EXPERTS = ["und", "gen", "act"]


# ------------------------------------------------------------------ strategies
segment_st = st.tuples(st.sampled_from(["causal", "full", "noise"]), st.integers(1, 5),
                       st.sampled_from(EXPERTS), st.sampled_from(["sequential", "block", "block_hold"]))
sample_st = st.lists(segment_st, min_size=1, max_size=5)


def to_sample(spec, valid=None):
    return [Segment.of(mode, e, n, f"l{i}_{e}", rope=rope) for i, (mode, n, e, rope) in enumerate(spec)]


@settings(max_examples=80, deadline=None)
@given(st.lists(sample_st, min_size=1, max_size=3), st.booleans(), st.integers(0, 7))
def test_dense_mask_matches_bagel_per_sample_mask(samples, pack, extra_pad):
    layout = Layout.from_samples([to_sample(s) for s in samples], EXPERTS, pack=pack,
                                 pad_to=None if not extra_pad else
                                 max(sum(n for _, n, _, _ in s) for s in samples) * (len(samples) if pack else 1) + extra_pad)
    dense = layout.dense_mask()
    B, N = layout.batch_size, layout.seq_len
    expect = torch.zeros(B, N, N, dtype=torch.bool)
    rows = [samples] if pack else [[s] for s in samples]
    for b, row in enumerate(rows):
        t = 0
        for s in row:
            m = prepare_attention_mask_per_sample([n for _, n, _, _ in s], [mode for mode, _, _, _ in s])
            L = m.shape[0]
            expect[b, t:t + L, t:t + L] = m  # documents are block-diagonal
            t += L
    assert torch.equal(dense, expect)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=24))
def test_dense_mask_matches_make_attn_mask(tokens):
    """Each openpi ar-block (ar_mask True starts one) is one ``full`` segment of the layout."""
    ar = torch.tensor([True] + [a for a, _ in tokens[1:]])
    valid = torch.tensor([v for _, v in tokens])
    segs, start = [], 0
    bounds = torch.nonzero(ar).squeeze(-1).tolist() + [len(tokens)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        segs.append(Segment.of("full", "und", b - a, f"b{a}", valid=valid[a:b]))
    layout = Layout.from_samples([segs], ["und"])
    ref = make_attn_mask(valid[None], ar[None])
    assert torch.equal(layout.dense_mask(), ref)


def test_pi0_layout_prefix_state_actions_matches_openpi():
    """pi0: [3 cameras (one masked) + text] full prefix, state token, action chunk (noise)."""
    cam, txt, H = 4, 5, 3
    valid_prefix = torch.tensor([1] * cam + [0] * cam + [1] * cam + [1, 1, 1, 0, 0], dtype=torch.bool)
    layout = Layout.from_samples([[Segment.of("full", "und", 3 * cam + txt, "prefix", valid=valid_prefix),
                                   Segment.of("full", "act", 1, "state"),
                                   Segment.of("noise", "act", H, "actions")]], ["und", "act"])
    input_mask = torch.cat([valid_prefix, torch.ones(1 + H, dtype=torch.bool)])
    ar = torch.tensor([False] * (3 * cam + txt) + [True] + [True] + [False] * (H - 1))
    assert torch.equal(layout.dense_mask()[0], make_attn_mask(input_mask[None], ar[None])[0])


def test_rope_positions_follow_bagel_table():
    """§2.1: text consecutive (rope += len); ViT image all = rope then +1; noisy VAE all = rope, no advance;
    the clean copy after it shares that id; an action block shares one id and does not advance."""
    s = [Segment.of("causal", "und", 3, "text"),
         Segment("full", [Part("und", 1, "vs"), Part("und", 4, "vit"), Part("und", 1, "ve")], rope="block"),
         Segment("noise", [Part("und", 1, "ns"), Part("gen", 4, "noisy"), Part("und", 1, "ne")], rope="block_hold"),
         Segment("full", [Part("und", 1, "cs"), Part("gen", 4, "clean"), Part("und", 1, "ce")], rope="block"),
         Segment.of("causal", "und", 2, "text2"),
         Segment("noise", [Part("und", 1, "as"), Part("act", 3, "act"), Part("und", 1, "ae")], rope="block_hold")]
    layout = Layout.from_samples([s, s[:1]], EXPERTS, pack=True)
    pos = layout.position_ids[0].tolist()
    expect = [0, 1, 2] + [3] * 6 + [4] * 6 + [4] * 6 + [5, 6] + [7] * 5 + [0, 1, 2]
    assert pos == expect
    assert layout.doc_id[0].tolist() == [0] * 28 + [1] * 3


def test_sequential_positions_skip_invalid_and_hold():
    s = [Segment.of("full", "und", 5, "p", valid=[1, 0, 1, 1, 0]),
         Segment.of("noise", "act", 3, "ear", rope="sequential_hold"),
         Segment.of("noise", "act", 2, "act")]
    layout = Layout.from_samples([s], EXPERTS)
    assert layout.position_ids[0].tolist() == [0, 0, 1, 2, 2, 3, 4, 5, 3, 4]


def test_assemble_extract_roundtrip_and_tokens():
    s = [Segment("full", [Part("und", 1, "ms"), Part("gen", 3, "lat"), Part("und", 1, "me")]),
         Segment.of("causal", "und", 4, "text")]
    layout = Layout.from_samples([s, s], EXPERTS)
    emb = {"ms": torch.randn(2, 8), "me": torch.randn(2, 8), "text": torch.randn(8, 8), "lat": torch.randn(6, 5)}
    hidden = layout.assemble(emb)
    assert set(hidden) == {"und", "gen"} and hidden["und"].shape == (12, 8)
    for k, v in emb.items():
        assert torch.equal(layout.extract(hidden, k), v)
    # the und tokens of row 0 come first and in token order: ms, text(4), me is at position 4 (after lat)
    assert torch.equal(hidden["und"][0], emb["ms"][0]) and torch.equal(hidden["und"][1], emb["me"][0])
    sub = layout.tokens(5)
    assert torch.equal(sub.index("text"), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    assert "lat" not in sub.label_index
    with pytest.raises(ValueError, match="cover"):
        layout.assemble({"ms": emb["ms"], "text": emb["text"], "lat": emb["lat"]})
    with pytest.raises(KeyError, match="not in this layout"):
        layout.index("nope")


def test_bad_segments_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        Segment.of("bidir", "und", 2, "x")
    with pytest.raises(ValueError, match="rope"):
        Segment.of("full", "und", 2, "x", rope="2d")
    with pytest.raises(KeyError, match="expert"):
        Layout.from_samples([[Segment.of("full", "vision", 2, "x")]], EXPERTS)
    with pytest.raises(ValueError, match="valid"):
        Layout.from_samples([[Segment.of("full", "und", 2, "x", valid=[1, 0, 1])]], EXPERTS)
    with pytest.raises(ValueError, match="pad_to"):
        Layout.from_samples([[Segment.of("full", "und", 4, "x")]], EXPERTS, pad_to=2)


def test_grow_equals_rebuilding_with_a_longer_last_segment():
    """Decoding grows the context's layout token by token; it must equal the layout rebuilt from segments."""
    from vla_blocks.layout import Layout, Part, Segment
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        segs = []
        for i in range(int(torch.randint(1, 5, (1,), generator=g))):
            mode = ["causal", "full", "noise"][int(torch.randint(0, 3, (1,), generator=g))]
            rope = "block" if mode == "full" and trial % 2 else "sequential"
            segs.append(Segment(mode, [Part("und", 1, "text"), Part("gen", int(torch.randint(1, 4, (1,), generator=g)),
                                                                      "img")], rope=rope))
        n0, k = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
        grown = Layout.from_samples([segs + [Segment.of("causal", "und", n0, "text")]], ["und", "gen"]).grow(k, "text")
        ref = Layout.from_samples([segs + [Segment.of("causal", "und", n0 + k, "text")]], ["und", "gen"])
        for f in ("expert_id", "position_ids", "doc_id", "seg_id", "seg_mode", "valid"):
            assert torch.equal(getattr(grown, f), getattr(ref, f)), f
        assert grown.label_index.keys() == ref.label_index.keys()
        for lab in ref.label_index:
            assert torch.equal(grown.label_index[lab], ref.label_index[lab]), lab
        assert torch.equal(grown.mask_meta().dense(), ref.mask_meta().dense())
    with pytest.raises(ValueError, match="causal"):
        Layout.from_samples([[Segment.of("full", "und", 2, "img")]], ["und"]).grow(1, "text")


def test_extend_equals_rebuilding_from_all_segments():
    """A context growing by items extends its layout; it must equal the layout rebuilt from every segment."""
    from vla_blocks.layout import Layout, Part, RopeSkip, Segment
    g = torch.Generator().manual_seed(1)

    def rand_segments(k):
        out = []
        for _ in range(k):
            r = int(torch.randint(0, 6, (1,), generator=g))
            if r == 0:
                out.append(RopeSkip(1))
                continue
            mode, rope = [("causal", "sequential"), ("full", "block"), ("noise", "block_hold"), ("full", "sequential"),
                          ("causal", "sequential_hold")][r - 1]
            n = int(torch.randint(1, 4, (1,), generator=g))
            out.append(Segment(mode, [Part("und", 1, "text"), Part("gen", n, "img", [True] * (n - 1) + [n == 1])],
                               rope=rope))
        return out

    for _ in range(30):
        first, more = rand_segments(int(torch.randint(1, 4, (1,), generator=g))), rand_segments(2)
        ext = Layout.from_samples([first], ["und", "gen"]).extend(more)
        ref = Layout.from_samples([first + more], ["und", "gen"])
        for f in ("expert_id", "position_ids", "doc_id", "seg_id", "seg_mode", "valid"):
            assert torch.equal(getattr(ext, f), getattr(ref, f)), f
        assert ext.label_index.keys() == ref.label_index.keys() and ext.rope_next == ref.rope_next
        for lab in ref.label_index:
            assert torch.equal(ext.label_index[lab], ref.label_index[lab]), lab
        # decoding after an extension still equals a rebuild
        text = [Segment.of("causal", "und", 2, "text")]
        grown = Layout.from_samples([first], ["und", "gen"]).extend(more + text).grow(1, "text")
        ref2 = Layout.from_samples([first + more + [Segment.of("causal", "und", 3, "text")]], ["und", "gen"])
        assert torch.equal(grown.position_ids, ref2.position_ids) and grown.rope_next == ref2.rope_next
    with pytest.raises(ValueError, match="one-row"):
        Layout.from_samples([[Segment.of("causal", "und", 2, "t")]] * 2, ["und"]).extend([])
