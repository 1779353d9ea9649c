"""Generic transformer references: RMSNorm, adaRMS, RoPE, attention, a per-token MoT layer, SigLIP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps=1e-6, gemma=False):
    """RMSNorm in ``x``'s dtype: ``x · rsqrt(mean(x²) + eps)`` times ``w`` (Qwen2 / Llama ``*RMSNorm``) or times
    ``1 + w`` (transformers ``GemmaRMSNorm``, whose weight is stored as an offset from one)."""
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return xn * (1 + w) if gemma else xn * w


def ada_rms_norm(x, dense_w, dense_b, cond, eps=1e-6):
    """openpi pi0.5 adaptive RMSNorm (``gemma.py`` ``RMSNorm`` with ``cond``; lerobot ``PiGemmaRMSNorm``):
    ``scale, shift, gate = Dense(cond)``; returns ``(norm(x)·(1 + scale) + shift, gate)``."""
    scale, shift, gate = F.linear(cond, dense_w, dense_b).chunk(3, -1)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + scale) + shift, gate


def rope(x, pos, theta):
    """Half-split rotary embedding (transformers ``apply_rotary_pos_emb`` with ``rotate_half``), computed in
    ``x``'s dtype. ``x [..., heads, d]``; ``pos`` has ``x``'s leading shape without the heads (a scalar for
    one token ``[heads, d]``, ``[N]`` for ``[N, heads, d]``)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=x.dtype) / d)
    ang = pos.to(x.dtype)[..., None] * inv
    ang = torch.cat([ang, ang], -1).unsqueeze(-2)  # broadcast over the heads
    return x * ang.cos() + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * ang.sin()


def attention(q, k, v, mask, scale=None):
    """Softmax attention written out, in the inputs' dtype: ``q [..., H, Nq, d]``, ``k, v [..., Hkv, Nk, d]``
    (GQA by repeating each KV head ``H / Hkv`` times), ``mask [..., Nq, Nk]`` bool (True = attend); masked logits
    are −inf and a row that attends nothing gives 0. Returns ``[..., H, Nq, d]``."""
    rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("...hqd,...hkd->...hqk", q, k) * scale
    s = s.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    return torch.einsum("...hqk,...hkd->...hqd", torch.softmax(s, -1).nan_to_num(0.0), v)


def _norm(norm, ec, x, cond):
    """One of our MoT norms on one token in float64: adaRMS (openpi, gated) when the expert is conditioned,
    else plain / Gemma RMSNorm. Returns ``(y, gate or None)``."""
    if ec.adarms_cond_dim is not None:
        if cond is None:
            return rms_norm(x, norm.weight.double(), ec.norm_eps, gemma=True), None
        return ada_rms_norm(x, norm.dense.weight.double(), norm.dense.bias.double(), cond, ec.norm_eps)
    return rms_norm(x, norm.weight.double(), ec.norm_eps, gemma=ec.norm == "gemma_rms"), None


def _lin(m, x):
    return F.linear(x, m.weight.double(), None if m.bias is None else m.bias.double())


def mot_layer_per_token(layer, cfg, x_tok, expert_of, pos, mask, cond_tok):
    """A Mixture-of-Transformers decoder layer the BAGEL way (``Qwen2MoTDecoderLayer``: every token projected by
    its own expert's weights), one token at a time in float64, with a dense masked attention over all tokens.

    ``layer``: our ``MoTLayer`` (its per-expert weights are read, not its forward); ``cfg``: the ``MoTConfig``;
    ``x_tok``: per-token vectors (widths differ per expert); ``expert_of``: expert name per token; ``pos``:
    RoPE position per token; ``mask [N, N]``; ``cond_tok``: adaRMS cond per token or None. Returns the list of
    output vectors."""
    H, Hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    N = len(x_tok)
    qs, ks, vs, gates = [], [], [], []
    for i in range(N):
        blk, ec = layer.experts[expert_of[i]], cfg.experts[expert_of[i]]
        h, gate = _norm(blk.input_layernorm, ec, x_tok[i], cond_tok[i])
        q, k, v = _lin(blk.q_proj, h).view(H, d), _lin(blk.k_proj, h).view(Hk, d), _lin(blk.v_proj, h).view(Hk, d)
        if ec.qk_norm:
            q = rms_norm(q, blk.q_norm.weight.double(), ec.norm_eps, ec.norm == "gemma_rms")
            k = rms_norm(k, blk.k_norm.weight.double(), ec.norm_eps, ec.norm == "gemma_rms")
        qs.append(rope(q, pos[i], cfg.rope_theta))
        ks.append(rope(k, pos[i], cfg.rope_theta))
        vs.append(v)
        gates.append(gate)
    Q, K, V = (torch.stack(t).transpose(0, 1) for t in (qs, ks, vs))  # [heads, N, d]
    o = attention(Q, K, V, mask).transpose(0, 1).reshape(N, H * d)
    out = []
    for i in range(N):
        blk, ec = layer.experts[expert_of[i]], cfg.experts[expert_of[i]]
        a = F.linear(o[i], blk.o_proj.weight.double())
        x = x_tok[i] + (a if gates[i] is None else gates[i] * a)
        h, g = _norm(blk.post_attention_layernorm, ec, x, cond_tok[i])
        gp = F.linear(h, blk.mlp.gate_proj.weight.double())
        act = F.silu(gp) if ec.ffn_act == "silu" else F.gelu(gp, approximate="tanh")
        f = F.linear(act * F.linear(h, blk.mlp.up_proj.weight.double()), blk.mlp.down_proj.weight.double())
        out.append(x + (f if g is None else g * f))
    return out


def siglip_vision_model(config: dict, state_dict: dict):
    """transformers' ``SiglipVisionModel`` (no pooling head) built from ``config`` with ``state_dict`` loaded
    non-strictly. Returns ``(model in eval mode, missing keys, unexpected keys)``."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    ref = SiglipVisionModel(SiglipVisionConfig(**{**config, "vision_use_head": False})).eval()
    missing, unexpected = ref.load_state_dict(state_dict, strict=False)
    return ref, missing, unexpected
