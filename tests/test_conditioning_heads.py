"""Time conditioning, sinusoidal tables and the flow heads, against hand-written upstream formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vla_blocks.conditioning import (AdaRMSTimeMLP, ConcatTimeMLP, TimestepEmbedder, posemb_sincos,
                                     sincos_1d_table, sincos_2d_table, timestep_sinusoid)
from vla_blocks.flow import flow_loss
from vla_blocks.heads import ActionHead, PositionEmbedding2D, VisualLatentHead
from vla_blocks.mot import AdaRMSNorm

from oracles.bagel import patchify as bagel_patchify
from oracles.bagel import sincos_2d_pos_embed as np_mae_2d
from oracles.bagel import timestep_embedding as np_dit_timestep
from oracles.halo import sincos_1d as np_halo_1d
from oracles.nn import ada_rms_norm
from oracles.openpi import posemb_sincos as np_posemb_sincos


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- tables
def test_posemb_sincos_matches_openpi():
    t = torch.tensor([0.001, 0.25, 0.5, 0.999, 1.0])
    for dim in (8, 64, 1024):
        out = posemb_sincos(t, dim)
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), np_posemb_sincos(t.double().numpy(), dim, 4e-3, 4.0), atol=1e-6)
    np.testing.assert_allclose(posemb_sincos(t, 16, 1e-2, 10.0).numpy(),
                               np_posemb_sincos(t.double().numpy(), 16, 1e-2, 10.0), atol=1e-6)


def test_timestep_sinusoid_matches_dit_raw_t():
    t = torch.tensor([0.0, 0.1, 0.5, 1.0])
    for dim in (256, 33):
        np.testing.assert_allclose(timestep_sinusoid(t, dim).numpy(), np_dit_timestep(t.double().numpy(), dim),
                                   atol=1e-6)
    # raw t in [0, 1]: t = 0 gives cos = 1, sin = 0
    e0 = timestep_sinusoid(torch.zeros(1))
    assert torch.equal(e0[0, :128], torch.ones(128)) and torch.equal(e0[0, 128:], torch.zeros(128))


def test_sincos_1d_table_matches_halo():
    np.testing.assert_allclose(sincos_1d_table(16, 64).numpy(), np_halo_1d(16, 64), atol=1e-6)
    # different from the MAE/DiT exponent (divides by half − 1, not half)
    assert not np.allclose(np_halo_1d(16, 64)[:, :32], np.sin(np.arange(16)[:, None] *
                           np.exp(-np.arange(32) * math.log(1e4) / 32)[None]))


def test_sincos_2d_table_matches_bagel_mae_and_is_size_independent():
    for side, dim in ((4, 16), (7, 32)):
        np.testing.assert_allclose(sincos_2d_table(side, dim).numpy(), np_mae_2d(dim, side), atol=1e-6)
    big, small = sincos_2d_table(32, 64), sincos_2d_table(8, 64)
    for h, w in ((0, 0), (3, 5), (7, 2)):
        torch.testing.assert_close(big[h * 32 + w], small[h * 8 + w])
    # first half encodes the column (w), second half the row (h)
    assert torch.equal(big[0 * 32 + 5, :32], big[9 * 32 + 5, :32])
    assert torch.equal(big[4 * 32 + 0, 32:], big[4 * 32 + 9, 32:])


def test_table_bad_input():
    with pytest.raises(ValueError):
        posemb_sincos(torch.rand(2), 7)
    with pytest.raises(ValueError, match="NaN"):
        posemb_sincos(torch.tensor([float("nan")]), 8)
    with pytest.raises(ValueError, match="NaN"):
        timestep_sinusoid(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError):
        sincos_2d_table(4, 6)
    with pytest.raises(ValueError):
        sincos_1d_table(4, 2)


# ---------------------------------------------------------------------------------------------- time modules
def test_timestep_embedder_keys_and_values():
    emb = TimestepEmbedder(32)
    assert sorted(emb.state_dict()) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    assert emb.mlp[0].weight.shape == (32, 256)
    t = torch.tensor([0.0, 0.3, 1.0])
    s = torch.from_numpy(np_dit_timestep(t.double().numpy(), 256)).float()
    ref = F.linear(F.silu(F.linear(s, emb.mlp[0].weight, emb.mlp[0].bias)), emb.mlp[2].weight, emb.mlp[2].bias)
    torch.testing.assert_close(emb(t), ref)


def test_concat_time_mlp_is_pi0():
    W, B, H = 16, 2, 5
    m = ConcatTimeMLP(W)
    a = torch.randn(B, H, W, generator=gen(0))
    t = torch.tensor([0.2, 0.9])
    temb = torch.from_numpy(np_posemb_sincos(t.double().numpy(), W, 4e-3, 4.0)).float()
    x = torch.cat([a, temb[:, None].expand(B, H, W)], -1)
    ref = m.action_time_mlp_out(F.silu(m.action_time_mlp_in(x)))
    torch.testing.assert_close(m(a, t), ref)
    assert m.action_time_mlp_in.weight.shape == (W, 2 * W)
    with pytest.raises(ValueError):
        m(a, torch.rand(3))
    with pytest.raises(ValueError):
        m(a[..., :8], t)


def test_adarms_time_mlp_is_pi05_and_drives_adarms_norm():
    W = 16
    m = AdaRMSTimeMLP(W)
    t = torch.tensor([0.1, 0.7])
    temb = torch.from_numpy(np_posemb_sincos(t.double().numpy(), W, 4e-3, 4.0)).float()
    ref = F.silu(m.time_mlp_out(F.silu(m.time_mlp_in(temb))))
    cond = m(t)
    torch.testing.assert_close(cond, ref)
    norm = AdaRMSNorm(W, W)
    nn_init = torch.nn.init
    nn_init.normal_(norm.dense.weight, std=0.1)
    x = torch.randn(2, 5, W, generator=gen(1))
    y, gate = norm(x, cond[:, None, :].expand(2, 5, W))
    y_ref, gate_ref = ada_rms_norm(x, norm.dense.weight, norm.dense.bias, cond[:, None, :].expand(2, 5, W), norm.eps)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gate, gate_ref)


# ---------------------------------------------------------------------------------------------- action head
def test_action_head_pad_embed_decode_and_loss_mask():
    head = ActionHead(32, 24, horizon=10, state_dim=32)
    a = torch.randn(2, 10, 7, generator=gen(0))
    padded = head.pad(a)
    assert torch.equal(padded[..., :7], a) and torch.equal(padded[..., 7:], torch.zeros(2, 10, 25))
    torch.testing.assert_close(head.embed(a), F.linear(padded, head.in_proj.weight, head.in_proj.bias))
    h = torch.randn(2, 10, 24, generator=gen(1))
    assert torch.equal(head.decode(h), torch.zeros(2, 10, 32))  # zero-initialised output projection
    dm = head.dim_mask(7)
    assert dm.tolist() == [True] * 7 + [False] * 25
    v, u = torch.randn(2, 10, 32, generator=gen(2)), torch.randn(2, 10, 32, generator=gen(3))
    torch.testing.assert_close(flow_loss(v, u, dim_mask=dm, reduction="mean"), ((v - u)[..., :7] ** 2).mean())
    s = torch.randn(2, 8, generator=gen(4))
    torch.testing.assert_close(head.embed_state(s), F.linear(F.pad(s, (0, 24)), head.state_proj.weight,
                                                             head.state_proj.bias)[:, None])


def test_action_head_halo_sincos_time_and_init():
    head = ActionHead(14, 32, zero_init_out=False, pos_embed="sincos", time_embedder=True)
    a = torch.randn(3, 16, 14, generator=gen(0))
    ref = head.in_proj(a) + torch.from_numpy(np_halo_1d(16, 32)).float()
    torch.testing.assert_close(head.embed(a), ref)
    # HALO: input_linear_layer(a_t) + action_time_embedder(t) + sincos(arange(L))
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(head.embed(a, t), ref + head.time_embedder(t)[:, None])
    torch.testing.assert_close(head.embed(a, torch.tensor(0.5)), ref + head.time_embedder(t[1:2].expand(3))[:, None])
    assert head.out_proj.weight.abs().sum() > 0 and head.state_proj is None
    with pytest.raises(ValueError, match="NaN"):
        head.embed(a, torch.tensor([0.1, float("nan"), 0.2]))
    with pytest.raises(ValueError, match="time_embedder"):
        ActionHead(14, 32).embed(a, t)


def test_action_head_bad_input():
    head = ActionHead(8, 16, horizon=4)
    with pytest.raises(ValueError, match="horizon"):
        head.embed(torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="more than"):
        head.embed(torch.zeros(1, 4, 9))
    with pytest.raises(ValueError):
        head.embed(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="state_proj"):
        head.embed_state(torch.zeros(1, 8))
    with pytest.raises(ValueError):
        head.dim_mask(9)
    with pytest.raises(ValueError):
        ActionHead(8, 16, pos_embed="rope")


# ---------------------------------------------------------------------------------------------- visual latent head
def test_visual_latent_patchify_matches_bagel_and_round_trips():
    head = VisualLatentHead(32, latent_channels=16, patch_size=2, max_latent_size=8)
    lat = torch.randn(2, 16, 9, 6, generator=gen(0))  # odd height is cropped
    tok = head.patchify(lat)
    assert tok.shape == (2, 4 * 3, 64)
    for b in range(2):
        torch.testing.assert_close(tok[b], bagel_patchify(lat[b], 2), rtol=0, atol=0)
    back = head.unpatchify(tok, 4, 3)
    torch.testing.assert_close(back, lat[:, :, :8, :6], rtol=0, atol=0)
    # channel-last inside the patch: the first 16 values are the 16 channels of the top-left pixel
    torch.testing.assert_close(tok[0, 0, :16], lat[0, :, 0, 0], rtol=0, atol=0)


def test_visual_latent_embed_decode_and_keys():
    head = VisualLatentHead(32, max_latent_size=8)
    keys = set(head.state_dict())
    assert {"vae2llm.weight", "llm2vae.weight", "time_embedder.mlp.0.weight",
            "latent_pos_embed.pos_embed"} <= keys
    assert head.latent_pos_embed.pos_embed.shape == (64, 32) and not head.latent_pos_embed.pos_embed.requires_grad
    ids = head.position_ids(3, 4)
    assert ids.tolist() == [i * 8 + j for i in range(3) for j in range(4)]
    x = torch.randn(2, 12, 64, generator=gen(1))
    t = torch.tensor([0.2, 0.8])
    ref = head.vae2llm(x) + head.time_embedder(t)[:, None] + torch.from_numpy(np_mae_2d(32, 8)).float()[ids]
    torch.testing.assert_close(head.embed(x, t, ids), ref)
    assert torch.equal(head.decode(torch.randn(2, 12, 32)), torch.zeros(2, 12, 64))  # llm2vae zero-init


def test_visual_latent_bad_input():
    head = VisualLatentHead(32, max_latent_size=4)
    with pytest.raises(ValueError):
        head.patchify(torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="smaller"):
        head.patchify(torch.zeros(1, 16, 1, 4))
    with pytest.raises(ValueError, match="max_latent_size"):
        head.position_ids(5, 2)
    with pytest.raises(ValueError):
        head.unpatchify(torch.zeros(1, 6, 64), 2, 2)
    with pytest.raises(ValueError, match="position ids"):
        PositionEmbedding2D(4, 8)(torch.tensor([16]))
    with pytest.raises(ValueError):
        head.embed(torch.zeros(1, 4, 63), None, torch.arange(4))
