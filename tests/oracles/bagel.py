"""BAGEL (ByteDance-Seed/Bagel) references, re-written from reference/halo_bagel.md; HALO builds on BAGEL."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .nn import attention, rms_norm, rope


def prepare_attention_mask_per_sample(split_lens, attn_modes):
    """BAGEL ``data/data_utils.py`` ``prepare_attention_mask_per_sample`` (halo_bagel.md §2.2) as a bool mask.

    1) rows of split ``[a, b)`` see every column < a; inside the split, ``causal`` → lower triangle,
    ``full`` / ``noise`` → ones. 2) for every ``noise`` split, zero its column block and set its own diagonal
    block back to ones (nothing attends a noisy split but itself)."""
    L = sum(split_lens)
    m = torch.zeros(L, L, dtype=torch.bool)
    a = 0
    for n, mode in zip(split_lens, attn_modes):
        m[a:a + n, :a] = True
        m[a:a + n, a:a + n] = torch.ones(n, n, dtype=torch.bool).tril() if mode == "causal" else True
        a += n
    a = 0
    for n, mode in zip(split_lens, attn_modes):
        if mode == "noise":
            m[:, a:a + n] = False
            m[a:a + n, a:a + n] = True
        a += n
    return m


def cfg(v_t, cfg_text_v_t, cfg_img_v_t, cfg_text_scale, cfg_img_scale, cfg_renorm_type, cfg_renorm_min):
    """BAGEL ``modeling/bagel/bagel.py`` ``_forward_flow`` guidance (halo_bagel.md §3.4): text guidance, image
    guidance nested inside it, then a ``global`` / ``channel`` / ``text_channel`` norm clamp."""
    if cfg_text_scale <= 1.0:
        return v_t
    if cfg_renorm_type == "text_channel":
        v_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
        s = (v_t.norm(dim=-1, keepdim=True) / (v_text_.norm(dim=-1, keepdim=True) + 1e-8)).clamp(cfg_renorm_min, 1.0)
        v_text = v_text_ * s
        return cfg_img_v_t + cfg_img_scale * (v_text - cfg_img_v_t) if cfg_img_scale > 1.0 else v_text
    v_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
    v_ = cfg_img_v_t + cfg_img_scale * (v_text_ - cfg_img_v_t) if cfg_img_scale > 1.0 else v_text_
    if cfg_renorm_type == "global":
        n, n_ = v_t.norm(), v_.norm()
    else:
        n, n_ = v_t.norm(dim=-1, keepdim=True), v_.norm(dim=-1, keepdim=True)
    return v_ * (n / (n_ + 1e-8)).clamp(cfg_renorm_min, 1.0)


def guided_euler(velocity, noise, grid, scales, interval):
    """BAGEL ``generate_image`` / HALO's action sampler: Euler on ``grid`` (``x ← x + (t_{i+1} − t_i)·v``) with
    two-condition CFG and global renorm (renorm_min 0) while ``interval[0] < t ≤ interval[1]``.

    ``velocity(ctx, x, t)`` gives the velocity under context ``"full"``, ``"no_text"`` or ``"no_image"``;
    ``scales = (text_scale, image_scale)``; guidance is off unless the text scale is above one."""
    x = noise.clone()
    st, si = scales
    for i in range(len(grid) - 1):
        t, dt = grid[i], grid[i + 1] - grid[i]
        v = velocity("full", x, t)
        if interval[0] < t <= interval[1] and st > 1:
            v_nt = velocity("no_text", x, t)
            v_ni = velocity("no_image", x, t) if si > 1 else None
            v = cfg(v, v_nt, v_ni, st, si, "global", 0.0)
        x = x + dt * v
    return x


def patchify(latent, p):
    """BAGEL ``bagel.py`` latent patchify (L184-188) of one image ``[C, H, W]``: crop to multiples of ``p``,
    ``(c, h, p, w, q) → (h, w, p, q, c)`` → ``[h·w, p²·C]`` (channel-last inside each patch)."""
    c, H, W = latent.shape
    h, w = H // p, W // p
    x = latent[:, : h * p, : w * p].reshape(c, h, p, w, p)
    x = torch.einsum("chpwq->hwpqc", x)
    return x.reshape(-1, p * p * c)


def timestep_embedding(t, dim, max_period=10000):
    """DiT ``TimestepEmbedder.timestep_embedding`` (used by BAGEL / HALO), numpy: ``[cos ‖ sin]`` with frequencies
    ``exp(−log(max_period)·k/half)``, a zero column for odd ``dim``."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
    return emb


def sincos_2d_pos_embed(dim, grid_size):
    """MAE ``get_2d_sincos_pos_embed`` (BAGEL ``modeling/bagel/modeling_utils.py``), numpy: ``meshgrid(w, h)``,
    the first half of the channels from ``grid[0]`` (the column), the second from the row."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid_size, dtype=np.float64)
    gw = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def qwen2_mot_stack(sd, x, groups, pos, mask, layers, heads, kv_heads, head_dim, theta=1e6, eps=1e-6):
    """BAGEL ``modeling/bagel/qwen2_navit.py`` ``Qwen2MoTDecoderLayer`` × ``layers`` + the final norms on one packed
    sequence ``x [N, D]`` (halo_bagel.md §1, §6): weights looked up by their suffixed checkpoint names
    (``q_proj``, ``q_proj_moe_gen``, …); every sub-op allocates ``new_zeros`` and index-puts each expert's result
    at its token indexes ``groups {suffix: idx}``; q/k RMSNorm, RoPE, SwiGLU. ``sd`` holds the checkpoint."""
    W = {k: v.float() for k, v in sd.items()}
    N, D = x.shape
    H, HKV, HD = heads, kv_heads, head_dim

    def lin(name, h, bias=True):
        return F.linear(h, W[name + ".weight"], W[name + ".bias"] if bias else None)

    for i in range(layers):
        P = f"language_model.model.layers.{i}"
        q, k, v = x.new_zeros(N, H, HD), x.new_zeros(N, HKV, HD), x.new_zeros(N, HKV, HD)
        for S, idx in groups.items():
            h = rms_norm(x[idx], W[f"{P}.input_layernorm{S}.weight"], eps)
            q[idx] = lin(f"{P}.self_attn.q_proj{S}", h).view(-1, H, HD)
            k[idx] = lin(f"{P}.self_attn.k_proj{S}", h).view(-1, HKV, HD)
            v[idx] = lin(f"{P}.self_attn.v_proj{S}", h).view(-1, HKV, HD)
        qn, kn = torch.zeros_like(q), torch.zeros_like(k)
        for S, idx in groups.items():
            qn[idx] = rms_norm(q[idx], W[f"{P}.self_attn.q_norm{S}.weight"], eps)
            kn[idx] = rms_norm(k[idx], W[f"{P}.self_attn.k_norm{S}.weight"], eps)
        a = attention(rope(qn, pos, theta).transpose(0, 1), rope(kn, pos, theta).transpose(0, 1), v.transpose(0, 1),
                      mask, HD ** -0.5).transpose(0, 1).reshape(N, -1)
        o = x.new_zeros(N, D)
        for S, idx in groups.items():
            o[idx] = lin(f"{P}.self_attn.o_proj{S}", a[idx], bias=False)
        x = x + o
        m = x.new_zeros(N, D)
        for S, idx in groups.items():
            h2 = rms_norm(x[idx], W[f"{P}.post_attention_layernorm{S}.weight"], eps)
            g_, u = lin(f"{P}.mlp{S}.gate_proj", h2, False), lin(f"{P}.mlp{S}.up_proj", h2, False)
            m[idx] = lin(f"{P}.mlp{S}.down_proj", F.silu(g_) * u, False)
        x = x + m
    y = x.new_zeros(N, D)
    for S, idx in groups.items():
        y[idx] = rms_norm(x[idx], W[f"language_model.model.norm{S}.weight"], eps)
    return y
