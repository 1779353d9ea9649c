"""openpi (Physical-Intelligence/openpi, ``models/pi0.py``, ``models/gemma.py``) and lerobot pi0 / pi0.5
references, re-written from reference/acot_pi0.md."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .nn import ada_rms_norm, attention, rms_norm, rope


def make_attn_mask(input_mask, ar_mask):
    """openpi ``pi0.py`` ``make_attn_mask`` (L19-44; acot_pi0.md §3.3): a token attends to every valid token whose
    ``cumsum(ar_mask)`` is ≤ its own, AND both tokens valid. ``input_mask``, ``ar_mask``: ``[B, N]`` bool."""
    cumsum = torch.cumsum(ar_mask.long(), dim=1)
    attn = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return attn & valid


def posemb_sincos(pos, dim, min_period, max_period):
    """openpi ``pi0.py`` ``posemb_sincos`` (L47-63), numpy: periods geometric from ``min_period`` to
    ``max_period`` over ``dim/2`` frequencies, ``[sin ‖ cos]``."""
    fraction = np.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    x = np.einsum("i,j->ij", pos, 1.0 / period * 2 * np.pi)
    return np.concatenate([np.sin(x), np.cos(x)], axis=-1)


def sample_times(num_steps):
    """openpi ``pi0.py`` ``sample_actions`` loop: ``dt = −1/num_steps``; ``t = 1``; while ``t ≥ −dt/2``: use ``t``,
    ``t += dt``. Returns the times at which the velocity is evaluated."""
    dt = -1.0 / num_steps
    t, out = 1.0, []
    while t >= -dt / 2:
        out.append(t)
        t += dt
    return out


def _linear(m, x):
    return x @ m.weight.T + m.bias


def embed_suffix(x_t, t, in_proj, mlp_in, mlp_out, pi05):
    """openpi ``pi0.py`` ``embed_suffix`` (L150-190) for the action tokens: ``a = in_proj(x_t)``,
    ``temb = posemb_sincos(t, W, 4e-3, 4.0)``. pi0.5: tokens ``a`` and adaRMS cond
    ``silu(mlp_out(silu(mlp_in(temb))))``; pi0: tokens ``mlp_out(silu(mlp_in([a ‖ temb])))``, cond None.
    ``in_proj`` / ``mlp_in`` / ``mlp_out``: the Linear modules whose weights are read."""
    W = in_proj.out_features
    a = _linear(in_proj, x_t)
    temb = torch.from_numpy(posemb_sincos(t.double().numpy(), W, 4e-3, 4.0)).to(a.dtype)
    if pi05:
        return a, F.silu(_linear(mlp_out, F.silu(_linear(mlp_in, temb))))
    x = torch.cat([a, temb[:, None].expand_as(a)], -1)
    return _linear(mlp_out, F.silu(_linear(mlp_in, x))), None


def resize_with_pad(images_bhwc_uint8, height, width):
    """openpi's torch ``resize_with_pad`` for uint8 ``[B, H, W, C]``: scale by ``max(W/w, H/h)``, bilinear
    (align_corners False), round to uint8 levels, centre-pad with 0. Returns float ``[B, 3, height, width]``."""
    x = images_bhwc_uint8.permute(0, 3, 1, 2).float()
    H, W = x.shape[-2:]
    ratio = max(W / width, H / height)
    rh, rw = int(H / ratio), int(W / ratio)
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False).round().clamp(0, 255)
    top, left = (height - rh) // 2, (width - rw) // 2
    out = torch.zeros(x.shape[0], 3, height, width)
    out[:, :, top: top + rh, left: left + rw] = x
    return out


def paligemma_with_expert(sd, prefix, suffix, cond, pi05, layers, heads, kv_heads, head_dim, vlm, expert,
                          theta=1e4, eps=1e-6):
    """openpi / lerobot ``PaliGemmaWithExpertModel`` joint pass for one sample (acot_pi0.md §3): per layer each
    expert norms and projects its own tokens, Q/K/V are concatenated along the sequence, RoPE (θ 1e4) at
    positions ``arange``, eager attention under ``make_attn_mask`` with ar_mask ``[0]·P + [1] + [0]·(S−1)``,
    split back, o_proj + (gated) residual, norm, GeGLU (gelu-tanh), (gated) residual; final norms. Gemma norms
    (``1 + w``); the action expert's norms are adaRMS when ``pi05``.

    ``sd``: lerobot checkpoint tensors; ``vlm`` / ``expert``: the name prefixes of the PaliGemma model and of the
    Gemma expert (``…paligemma.model.``, ``…gemma_expert.``). Returns (prefix output, suffix output)."""
    W = {k: v.float() for k, v in sd.items()}
    P, S = prefix.shape[0], suffix.shape[0]
    ar = torch.tensor([0] * P + [1] + [0] * (S - 1))
    mask = make_attn_mask(torch.ones(1, P + S, dtype=torch.bool), ar[None])[0]
    pos = torch.arange(P + S)
    names = [f"{vlm}language_model.layers.{{i}}.", f"{expert}model.layers.{{i}}."]
    xs = [prefix.float(), suffix.float()]

    def norm(e, x, name):
        if e == 1 and pi05:
            return ada_rms_norm(x, W[name + ".dense.weight"], W[name + ".dense.bias"], cond, eps)
        return rms_norm(x, W[name + ".weight"], eps, gemma=True), None

    for i in range(layers):
        pre = [n.format(i=i) for n in names]
        gates, qs, ks, vs = [], [], [], []
        for e in range(2):
            h, gate = norm(e, xs[e], pre[e] + "input_layernorm")
            gates.append(gate)
            qs.append(F.linear(h, W[pre[e] + "self_attn.q_proj.weight"]).view(-1, heads, head_dim))
            ks.append(F.linear(h, W[pre[e] + "self_attn.k_proj.weight"]).view(-1, kv_heads, head_dim))
            vs.append(F.linear(h, W[pre[e] + "self_attn.v_proj.weight"]).view(-1, kv_heads, head_dim))
        q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        a = attention(rope(q, pos, theta).transpose(0, 1), rope(k, pos, theta).transpose(0, 1), v.transpose(0, 1),
                      mask, head_dim ** -0.5).transpose(0, 1).reshape(P + S, -1)
        parts = [a[:P], a[P:]]
        for e in range(2):
            o = F.linear(parts[e], W[pre[e] + "self_attn.o_proj.weight"])
            x = xs[e] + (o if gates[e] is None else o * gates[e])
            h, gate = norm(e, x, pre[e] + "post_attention_layernorm")
            f = F.linear(F.gelu(F.linear(h, W[pre[e] + "mlp.gate_proj.weight"]), approximate="tanh")
                         * F.linear(h, W[pre[e] + "mlp.up_proj.weight"]), W[pre[e] + "mlp.down_proj.weight"])
            xs[e] = x + (f if gate is None else f * gate)
    out0 = rms_norm(xs[0], W[vlm + "language_model.norm.weight"], eps, gemma=True)
    out1 = norm(1, xs[1], expert + "model.norm")[0]
    return out0, out1
