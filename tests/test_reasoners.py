"""ACoT reasoners against hand-written re-implementations of the upstream formulas (per-layer loops)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vla_blocks.reasoners import (AttentionPoolingExtractor, DownsampleExtractor, DownsampleIAR, FusionMLP,
                                  LearnableQueryExtractor, UnifiedAttentionModule, coarse_reference,
                                  reference_chunk_length, stack_prefix_kv)

from oracles.acot import attention_pooling_extractor, downsample_extractor

G = torch.Generator().manual_seed(0)


def lin(m, x):
    return x @ m.weight.T + m.bias


def kv(B=2, L=5, T=9, D=16):
    return torch.randn(B, L, T, D, generator=G), torch.randn(B, L, T, D, generator=G)


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=G) * 0.5)
    return module


@pytest.mark.parametrize("masked", [False, True])
def test_downsample_extractor_matches_per_layer_reference(masked):
    ext = randomize(DownsampleExtractor(16, 24, 5, downsample_dim=8, group_size=3, num_queries=1, num_heads=4))
    assert ext.num_groups == 2 and ext.head_dim == 2
    K, V = kv()
    mask = (torch.rand(2, 9, generator=G) > 0.4) if masked else None
    if masked:
        mask[:, 0] = True
    got = ext(K, V, mask)
    assert got.shape == (2, 5, 24)
    assert (got - downsample_extractor(ext, K, V, mask)).abs().max() < 1e-4
    # several queries per layer are averaged
    ext3 = randomize(DownsampleExtractor(16, 24, 5, downsample_dim=8, group_size=2, num_queries=3, num_heads=4))
    assert (ext3(K, V, mask) - downsample_extractor(ext3, K, V, mask)).abs().max() < 1e-4


def test_learnable_query_and_attention_pooling_match_references():
    K, V = kv()
    lq = randomize(LearnableQueryExtractor(4, 16, 24, 5, num_heads=2, head_dim=8, group_size=3))
    assert (lq(K, V) - downsample_extractor(lq, K, V)).abs().max() < 1e-4  # same formula, 4 queries averaged
    ap = randomize(AttentionPoolingExtractor(16, 24, 5, num_heads=2, head_dim=8, group_size=3))
    mask = torch.rand(2, 9, generator=G) > 0.3
    mask[:, 0] = True
    assert (ap(K, V) - attention_pooling_extractor(ap, K, V)).abs().max() < 1e-4
    assert (ap(K, V, mask) - attention_pooling_extractor(ap, K, V, mask)).abs().max() < 1e-4


def test_mask_padding_ignores_invalid_positions_and_upstream_default_does_not():
    ext = randomize(DownsampleExtractor(16, 24, 5, downsample_dim=8, num_heads=4))
    K, V = kv()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    K2, V2 = K.clone(), V.clone()
    K2[:, :, 6:] += 3.0
    V2[:, :, 6:] -= 5.0
    assert (ext(K, V, mask) - ext(K2, V2, mask)).abs().max() < 1e-5
    assert (ext(K, V) - ext(K2, V2)).abs().max() > 1e-2


def test_full_size_parameter_counts_match_the_reference_arithmetic():
    # reference/acot_pi0.md §1.1: IAR ≈ 1.4M, a 1024-d cross-attention ≈ 8.4M, the fusion ≈ 11.5M
    with torch.device("meta"):
        iar = DownsampleIAR().build(18, 256, 1024, 8, 256)
        cross = UnifiedAttentionModule(1024, 1024, 1024, hidden_dim=1024, num_heads=4)
        fusion = UnifiedAttentionModule(2048, 2048, 1024, hidden_dim=1024, num_heads=4)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert iar.num_groups == 6 and iar.head_dim == 16 and iar.inner == 128
    assert n(iar) == 18 * 256 + 6 * (3 * (256 * 128 + 128) + 128 * 1024 + 1024)
    assert abs(n(iar) - 1.4e6) < 0.05e6
    assert abs(n(cross) - 8.4e6) < 0.05e6
    assert abs(n(fusion) - 11.5e6) < 0.05e6


def test_unified_attention_module_matches_manual_computation():
    m = randomize(UnifiedAttentionModule(6, 10, 5, hidden_dim=8, num_heads=2)).eval()
    f1, f2 = torch.randn(3, 4, 6, generator=G), torch.randn(3, 7, 10, generator=G)
    Q = lin(m.q_proj, f1)
    K, V = lin(m.kv_proj, f2).split(8, dim=-1)
    Wq, Wk, Wv = m.attn.in_proj_weight.split(8)
    bq, bk, bv = m.attn.in_proj_bias.split(8)

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)

    q, k, v = heads(Q @ Wq.T + bq), heads(K @ Wk.T + bk), heads(V @ Wv.T + bv)
    a = (q @ k.transpose(-1, -2) / math.sqrt(4)).softmax(-1) @ v  # no mask
    o = a.transpose(1, 2).reshape(3, 4, 8) @ m.attn.out_proj.weight.T + m.attn.out_proj.bias
    expect = lin(m.fc_out, o)  # no norm, no residual
    assert (m(f1, f2) - expect).abs().max() < 1e-5
    sig = UnifiedAttentionModule(6, 10, 5, hidden_dim=8, num_heads=2, apply_sigmoid=True)
    sig.load_state_dict(m.state_dict())
    assert (sig(f1, f2) - torch.sigmoid(expect)).abs().max() < 1e-5


def test_fusion_mlp_is_three_linear_layers_without_activation():
    m = randomize(FusionMLP(8, 6, 4))
    x = torch.randn(2, 3, 8, generator=G)
    assert (m(x) - lin(m.fc3, lin(m.fc2, lin(m.fc1, x)))).abs().max() < 1e-5
    act = FusionMLP(8, 6, 4, activate=True)
    act.load_state_dict(m.state_dict())
    assert (act(x) - lin(m.fc3, F.silu(lin(m.fc2, F.silu(lin(m.fc1, x)))))).abs().max() < 1e-5


def test_coarse_reference_is_the_stride_two_slice_of_a_30_frame_chunk():
    assert reference_chunk_length(15, 2, 10) == 30
    chunk = torch.arange(30.0)[None, :, None].expand(2, 30, 3)
    ref = coarse_reference(chunk, 15, 2)
    assert ref[0, :, 0].tolist() == list(range(0, 29, 2))
    with pytest.raises(ValueError, match="needs a chunk"):
        coarse_reference(chunk[:, :28], 15, 2)


def test_stack_prefix_kv_flattens_kv_heads_per_position():
    keys = [torch.randn(2, 3, 5, 4, generator=G) for _ in range(6)]
    vals = [torch.randn(2, 3, 5, 4, generator=G) for _ in range(6)]
    K, V = stack_prefix_kv(keys, vals)
    assert K.shape == (2, 6, 5, 12)
    l, t, h = 4, 2, 1
    assert torch.equal(K[1, l, t, h * 4:(h + 1) * 4], keys[l][1, h, t])
    assert torch.equal(V[0, l, t, h * 4:(h + 1) * 4], vals[l][0, h, t])
