"""ACoT-VLA references (``acot_vla.py``), re-written from reference/acot_pi0.md §2."""

from __future__ import annotations

import math

import torch


def _linear(m, x):
    return x @ m.weight.T + m.bias


def action_guided_prediction(model, a, coarse, z_im):
    """ACoT ``acot_vla.py`` ``embed_suffix`` "expert" branch (L620-667): the action tokens ``a`` attend to the
    embedded coarse trajectory (EAR, ``explicit_action_reasoner``) and to the implicit tokens ``z_im`` (IAR,
    ``implicit_action_reasoner_interact``); with both, each is projected from ``[a ‖ s]`` and fused by
    ``action_reasoning_fusion(f, f)``, with one, the fusion MLP takes ``[a ‖ s]``. ``model``'s submodules are
    called, their composition is the oracle."""
    c = model.config
    if c.ear is not None:
        s_ex = model.explicit_action_reasoner(a, _linear(model.coarse_action_in_proj, coarse))
    if c.iar is not None:
        s_im = model.implicit_action_reasoner_interact(a, z_im)
    if c.ear is not None and c.iar is not None:
        a_ex = _linear(model.explicit_action_reason_proj, torch.cat([a, s_ex], -1))
        a_im = _linear(model.implicit_action_reason_proj, torch.cat([a, s_im], -1))
        f = torch.cat([a_ex, a_im], -1)
        return model.action_reasoning_fusion(f, f)
    s = s_ex if c.ear is not None else s_im
    return model.action_reasoning_fusion(torch.cat([a, s], -1))


def pool(q, k, v, mask, flatten):
    """The IAR's per-layer attention (``acot_vla.py`` extractors): ``q [B|1, H, Q, Hd]``, ``k, v [B, H, T, Hd]``,
    masked positions −inf; ``flatten="downsample"``: mean over the queries, then ``(B, H, Hd) → (B, Hd, H)`` →
    ``[B, H·Hd]`` as upstream; otherwise (attention pooling) ``(B, 1, H, Hd) → [B, H·Hd]``."""
    B = k.shape[0]
    attn = torch.einsum("bhqd,bhkd->bhqk", q.expand(B, -1, -1, -1), k) / math.sqrt(k.shape[-1])
    if mask is not None:
        attn = attn.masked_fill(~mask[:, None, None, :], float("-inf"))
    pooled = torch.einsum("bhqk,bhkd->bhqd", attn.softmax(-1), v)  # (B, H, Q, Hd)
    if flatten == "downsample":
        return pooled.mean(2).transpose(1, 2).reshape(B, -1)
    return pooled.transpose(1, 2).reshape(B, -1)


def downsample_extractor(ext, K, V, mask=None):
    """ACoT ``DownsampleExtractor`` / learnable-query extractor, one layer at a time: layer ``l`` uses the
    projections of group ``l // group_size``; its learnable queries attend the layer's keys / values."""
    B, L, T, _ = K.shape
    h, hd, nq = ext.num_heads, ext.head_dim, ext.num_queries
    out = []
    for l in range(L):
        g = l // ext.group_size
        q = _linear(ext.q_proj[g], ext.query_params[l][None]).reshape(1, nq, h, hd).transpose(1, 2)
        k = _linear(ext.k_proj[g], K[:, l]).reshape(B, T, h, hd).transpose(1, 2)
        v = _linear(ext.v_proj[g], V[:, l]).reshape(B, T, h, hd).transpose(1, 2)
        out.append(_linear(ext.out_proj[g], pool(q, k, v, mask, "downsample")))
    return torch.stack(out, 1)


def attention_pooling_extractor(ext, K, V, mask=None):
    """ACoT ``AttentionPoolingExtractor``, one layer at a time: the query is the (valid-)mean of the layer's
    keys."""
    B, L, T, _ = K.shape
    h, hd = ext.num_heads, ext.head_dim
    out = []
    for l in range(L):
        g = l // ext.group_size
        if mask is None:
            Ql = K[:, l].mean(1, keepdim=True)
        else:
            Ql = (K[:, l] * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
        q = _linear(ext.q_proj[g], Ql).reshape(B, 1, h, hd).transpose(1, 2)
        k = _linear(ext.k_proj[g], K[:, l]).reshape(B, T, h, hd).transpose(1, 2)
        v = _linear(ext.v_proj[g], V[:, l]).reshape(B, T, h, hd).transpose(1, 2)
        out.append(_linear(ext.out_proj[g], pool(q, k, v, mask, "pooling")))
    return torch.stack(out, 1)
