"""Mixture-of-Transformers: per-expert norms/projections/FFN, one shared attention per layer.

Experts are a dict by name (``und``, ``gen``, ``act``, ``vlm``, ``ear``…); adding one is a recipe
edit. Every token goes through its own expert's blocks; routing is by index tensors computed once
per batch (:class:`Routing`), never a Python loop over tokens. Experts may differ in width and FFN
size but share ``num_heads``, ``num_kv_heads`` and ``head_dim``. :class:`MoTLayer` owns every
expert's block of one layer: it is the unit for FSDP wrapping and activation checkpointing.

Hidden states travel as ``{expert: [n_e, D_e]}`` (tokens of that expert in flat row-major order of
the layout's ``[B, N]`` grid). K/V of a prefix can be kept in a :class:`PrefixCache` (K after
k-norm and RoPE) and read by later suffix passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import MaskMeta, attention
from .layout import Layout


# ---------------------------------------------------------------------------------------------- configs
@dataclass
class ExpertConfig:
    """One expert's block. ``norm``: ``rms`` (x̂·w, w=1 at init; Qwen2/Llama) or ``gemma_rms`` (x̂·(1+w), w=0).

    ``adarms_cond_dim`` turns every norm of the expert (and its final norm) into pi0.5's adaRMS:
    a zero-initialised Dense(cond → 3·D) giving scale, shift and a residual gate.
    ``init_from`` names another expert whose weights this one copies at initialisation (sliced
    into the leading corner when widths differ), as BAGEL's ``init_moe`` and ACoT's loader do.
    """

    hidden_size: int
    intermediate_size: int
    norm: Literal["rms", "gemma_rms"] = "rms"
    norm_eps: float = 1e-6
    ffn_act: Literal["silu", "gelu_tanh"] = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    adarms_cond_dim: int | None = None
    init_from: str | None = None

    def __post_init__(self):
        from .validate import check_value
        for k in ("hidden_size", "intermediate_size", "adarms_cond_dim"):
            check_value(k, getattr(self, k), 1)
        check_value("norm_eps", self.norm_eps, 0.0, integer=False)


@dataclass
class MoTConfig:
    """The shared-attention stack: layer count, the attention geometry shared by all experts, the experts."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    experts: dict[str, ExpertConfig]
    rope_theta: float = 10000.0
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        from .config import ConfigError
        from .validate import check_value
        if not self.experts:
            raise ValueError("an MoT stack needs at least one expert")
        for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            check_value(k, getattr(self, k), 1)
        from .attention.dispatch import backends
        names = [b.name for b in backends()] + ["auto"]
        if self.attention_backend not in names:
            import difflib
            close = difflib.get_close_matches(str(self.attention_backend), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"attention_backend: unknown attention backend {self.attention_backend!r}{hint} "
                              f"(valid: {', '.join(names)})", key="attention_backend")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        for name, e in self.experts.items():
            if e.init_from is not None and e.init_from not in self.experts:
                raise ValueError(f"expert {name!r}: init_from={e.init_from!r} is not an expert "
                                 f"({sorted(self.experts)})")


# ---------------------------------------------------------------------------------------------- norms
def _acc(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. ``gemma=True`` multiplies by ``1 + w`` (Gemma), else by ``w`` (Qwen2/Llama)."""

    def __init__(self, dim: int, eps: float = 1e-6, gemma: bool = False):
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        """``(normed x, None)``: RMS-normalised in fp32 (at least), times ``w`` (or ``1 + w`` for Gemma), in x's dtype;
        ``cond`` is ignored (the signature of :class:`AdaRMSNorm`)."""
        dt = x.dtype
        xf = x.to(_acc(dt))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (xf * (1.0 + self.weight.to(xf.dtype))).to(dt), None
        return self.weight * xf.to(dt), None


class AdaRMSNorm(nn.Module):
    """pi0.5's adaptive RMSNorm: Dense(cond)→(scale, shift, gate), zero-initialised.

    With ``cond``: ``x̂·(1+scale)+shift`` and the residual gate; without: ``x̂·(1+w)`` and no gate.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(dim))
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        """``(normed x, gate)``: with ``cond [B, C]`` (or broadcastable) ``x̂·(1 + scale) + shift`` and the residual
        gate from ``dense(cond)``; without, ``x̂·(1 + w)`` and no gate."""
        dt = x.dtype
        xf = x.to(_acc(dt))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if cond is None:
            return (xf * (1.0 + self.weight.to(xf.dtype))).to(dt), None
        mod = self.dense(cond).to(xf.dtype)
        scale, shift, gate = mod.chunk(3, dim=-1)
        return (xf * (1.0 + scale) + shift).to(dt), gate.to(dt)


def make_norm(cfg: ExpertConfig, dim: int | None = None) -> nn.Module:
    """The norm of an expert over ``dim`` (default its width): :class:`AdaRMSNorm` when it has ``adarms_cond_dim``, else
    :class:`RMSNorm` in the family's convention."""
    dim = dim or cfg.hidden_size
    if cfg.adarms_cond_dim is not None:
        return AdaRMSNorm(dim, cfg.adarms_cond_dim, cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, gemma=cfg.norm == "gemma_rms")


class GatedFFN(nn.Module):
    """SwiGLU (``silu``) or GeGLU (``gelu_tanh``): down(act(gate(x)) · up(x))."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = act

    def forward(self, x):
        """``down(act(gate(x)) · up(x))`` with SiLU or tanh-GELU."""
        g = self.gate_proj(x)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down_proj(g * self.up_proj(x))


# ---------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32):
    """Half-split RoPE tables ``[B, N, head_dim]`` computed in fp32 (fp64 for fp64), then cast, from integer ids."""
    acc = _acc(dtype)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=acc) / head_dim))
    freqs = position_ids.to(acc)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, N, H, d]`` rotated by half-split RoPE (not interleaved)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


# ---------------------------------------------------------------------------------------------- routing
@dataclass
class Routing:
    """Index tensors of one pass: which flat tokens each active expert owns, and the inverse gather."""

    batch_size: int
    seq_len: int
    index: dict[str, torch.Tensor]  # expert -> flat token indices (ascending)
    inverse: torch.Tensor | None  # flat token -> row of cat([per-expert tokens..., one zero row]); None = identity
    position_ids: torch.Tensor  # [B, N]

    @classmethod
    def from_layout(cls, layout: Layout) -> "Routing":
        """The per-expert token indices of ``layout`` and the inverse permutation that merges them back (None when one
        expert covers every token)."""
        idx = layout.expert_indices()
        B, N = layout.batch_size, layout.seq_len
        total = sum(v.numel() for v in idx.values())
        if len(idx) == 1 and total == B * N:
            inverse = None
        else:
            inverse = torch.full((B * N,), total, dtype=torch.long, device=layout.expert_id.device)
            off = 0
            for v in idx.values():
                inverse[v] = torch.arange(off, off + v.numel(), device=v.device)
                off += v.numel()
        return cls(B, N, idx, inverse, layout.position_ids)

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-expert ``[n_e, ...]`` tensors (in ``index`` order) -> ``[B*N, ...]`` (padding rows zero)."""
        if self.inverse is None:
            return parts[0]
        cat = torch.cat(parts + [parts[0].new_zeros((1,) + tuple(parts[0].shape[1:]))], dim=0)
        return cat[self.inverse]


# ---------------------------------------------------------------------------------------------- cache
@dataclass
class PassPlan:
    """What a pass over ``layout`` from token ``start`` needs besides the hidden states: the pass's
    sub-layout, routing indices, mask metadata and RoPE tables (per dtype, built on first use).

    Built once per pass structure and reused by every pass of that structure — each Euler step of a flow
    head reads the same plan (``MoTStack.forward(hidden, plan=plan, cache=…)``), so the per-step work is
    the model's own compute. Example::

        plan = stack.plan(layout, start=P)          # once
        for t in grid:                              # per flow step
            out = stack(hidden_at(t), plan=plan, cache=cache)
    """

    layout: Layout
    start: int
    sub: Layout
    routing: Routing
    meta: MaskMeta
    head_dim: int
    rope_theta: float
    _rope: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, layout: Layout, start: int = 0, meta: MaskMeta | None = None, *, head_dim: int,
              rope_theta: float) -> "PassPlan":
        """The plan of a pass over ``layout``'s tokens from ``start`` (mask metadata computed unless given)."""
        sub = layout.tokens(start) if start else layout
        if meta is None:
            meta = layout.mask_meta(slice(start, layout.seq_len), slice(0, layout.seq_len))
        return cls(layout, start, sub, Routing.from_layout(sub), meta, head_dim, rope_theta)

    def rope(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of the pass's positions in ``dtype`` (computed once per dtype)."""
        if dtype not in self._rope:
            self._rope[dtype] = rope_cos_sin(self.routing.position_ids, self.head_dim, self.rope_theta, dtype)
        return self._rope[dtype]


@dataclass
class PrefixCache:
    """Per-layer K (after k-norm and RoPE) and V of a prefix, ``[B, Hkv, P, d]`` each, plus its layout.

    Suffix passes read it and leave it unchanged; :meth:`append` extends it explicitly (decoding).
    Tensors are not detached, so gradients flow through the cache in training.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    layout: Layout | None = None
    _buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        """Number of cached prefix tokens P."""
        return self.keys[0].shape[2] if self.keys else 0

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor], layout: Layout | None = None) -> "PrefixCache":
        """Extend every layer's K/V by the new tokens' (``[B, Hkv, n, d]``).

        Without autograd (decoding) the new K/V are written into preallocated buffers whose capacity doubles
        when full, so a decoding step copies only its own tokens; ``keys[i]`` / ``values[i]`` are views of
        the filled part. With gradients the cache is concatenated (no in-place writes into the graph)."""
        if len(keys) != len(self.keys):
            raise ValueError(f"append got {len(keys)} layers for a cache of {len(self.keys)}")
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in (*self.keys, *self.values, *keys, *values))
        if grads:
            self._buffers = None
            self.keys = [torch.cat([a, b], dim=2) for a, b in zip(self.keys, keys)]
            self.values = [torch.cat([a, b], dim=2) for a, b in zip(self.values, values)]
        else:
            P, n = self.length, keys[0].shape[2]
            if self._buffers is None or self._buffers[0][0].shape[2] < P + n:
                cap = max(2 * (P + n), 64)
                self._buffers = [(self._grown(a, cap), self._grown(b, cap)) for a, b in zip(self.keys, self.values)]
            for (kb, vb), k, v in zip(self._buffers, keys, values):
                kb[:, :, P:P + n].copy_(k)
                vb[:, :, P:P + n].copy_(v)
            self.keys = [kb[:, :, :P + n] for kb, _ in self._buffers]
            self.values = [vb[:, :, :P + n] for _, vb in self._buffers]
        if layout is not None:
            self.layout = layout
        return self

    @staticmethod
    def _grown(t: torch.Tensor, capacity: int) -> torch.Tensor:
        buf = t.new_empty(t.shape[:2] + (capacity,) + t.shape[3:])
        buf[:, :, :t.shape[2]].copy_(t)
        return buf

    def clone(self) -> "PrefixCache":
        """A copy with cloned K/V tensors (appending to it leaves this cache unchanged)."""
        return PrefixCache([k.clone() for k in self.keys], [v.clone() for v in self.values], self.layout)


@dataclass
class MoTOutput:
    """A stack pass's result: per-expert hidden states, and the per-layer K/V ``[B, Hkv, N, d]`` when asked for
    (``return_kv``)."""
    hidden: dict[str, torch.Tensor]
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def cache(self, layout: Layout | None = None) -> PrefixCache:
        """The K/V of this pass as a :class:`PrefixCache` (for ``layout``) that suffix passes can read."""
        return PrefixCache(self.keys, self.values, layout)


# ---------------------------------------------------------------------------------------------- layers
class ExpertBlock(nn.Module):
    """One expert's share of a layer: pre-norm, q/k/v/o, optional q/k norm, post-norm, gated FFN."""

    def __init__(self, cfg: ExpertConfig, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        D = cfg.hidden_size
        self.input_layernorm = make_norm(cfg)
        self.q_proj = nn.Linear(D, num_heads * head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, num_kv_heads * head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, num_kv_heads * head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            qk = ExpertConfig(head_dim, 1, norm=cfg.norm, norm_eps=cfg.norm_eps)
            self.q_norm = make_norm(qk, head_dim)
            self.k_norm = make_norm(qk, head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = GatedFFN(D, cfg.intermediate_size, cfg.ffn_act)


class MoTLayer(nn.Module):
    """One decoder layer owning every expert's block, with one shared attention over all tokens."""

    def __init__(self, cfg: MoTConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleDict({n: ExpertBlock(e, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
                                      for n, e in cfg.experts.items()})

    def forward(self, hidden: dict[str, torch.Tensor], routing: Routing, meta: MaskMeta, cos: torch.Tensor,
                sin: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                cond: dict[str, torch.Tensor] | None = None):
        """One decoder layer: per-expert norms and projections, one shared attention (after RoPE, against the prefix K/V
        if given), per-expert output, residual and FFN. Returns ``(hidden, k, v)``, the K/V of this pass's tokens."""
        cfg = self.cfg
        B, N = routing.batch_size, routing.seq_len
        H, Hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cond = cond or {}
        qs, ks, vs, gates = [], [], [], {}
        for e, x in hidden.items():
            blk = self.experts[e]
            h, gates[e] = blk.input_layernorm(x, cond.get(e))
            q = blk.q_proj(h).view(-1, H, d)
            k = blk.k_proj(h).view(-1, Hk, d)
            if blk.q_norm is not None:
                q = blk.q_norm(q)[0]
                k = blk.k_norm(k)[0]
            qs.append(q)
            ks.append(k)
            vs.append(blk.v_proj(h).view(-1, Hk, d))
        q = apply_rope(routing.merge(qs).view(B, N, H, d), cos, sin).transpose(1, 2)
        k = apply_rope(routing.merge(ks).view(B, N, Hk, d), cos, sin).transpose(1, 2)
        v = routing.merge(vs).view(B, N, Hk, d).transpose(1, 2)
        o = attention(q, k, v, meta, backend=cfg.attention_backend, prefix=prefix, scale=d ** -0.5)
        o = o.transpose(1, 2).reshape(B * N, H * d)
        out = {}
        for e, x in hidden.items():
            blk = self.experts[e]
            oe = o if routing.inverse is None else o[routing.index[e]]
            a = blk.o_proj(oe)
            x = x + (a if gates[e] is None else gates[e] * a)
            h, g = blk.post_attention_layernorm(x, cond.get(e))
            f = blk.mlp(h)
            out[e] = x + (f if g is None else g * f)
        return out, k, v


class MoTStack(nn.Module):
    """The layers plus each expert's final norm.

    ``forward(hidden, layout)`` runs a full pass over ``layout``. For a suffix pass reading a cached
    prefix, ``layout`` is the whole sequence (prefix + suffix) and ``start`` the first suffix token:
    ``hidden`` then holds the suffix tokens only (route them with ``layout.tokens(start)``).
    """

    def __init__(self, cfg: MoTConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MoTLayer(cfg) for _ in range(cfg.num_layers))
        self.norms = nn.ModuleDict({n: make_norm(e) for n, e in cfg.experts.items()})
        self.copy_init_experts()

    @torch.no_grad()
    def copy_init_experts(self):
        """Initialise experts with ``init_from`` by copying (sliced to the leading corner) their source expert."""
        for name, e in self.cfg.experts.items():
            if e.init_from is None:
                continue
            for layer in self.layers:
                copy_sliced(layer.experts[e.init_from], layer.experts[name])
            copy_sliced(self.norms[e.init_from], self.norms[name])

    def plan(self, layout: Layout, start: int = 0, meta: MaskMeta | None = None) -> PassPlan:
        """The :class:`PassPlan` of a pass over ``layout`` from token ``start`` (reuse it across passes)."""
        return PassPlan.build(layout, start, meta, head_dim=self.cfg.head_dim, rope_theta=self.cfg.rope_theta)

    def forward(self, hidden: dict[str, torch.Tensor], layout: Layout | None = None, *, start: int = 0,
                cache: PrefixCache | None = None, cond: dict[str, torch.Tensor] | None = None,
                meta: MaskMeta | None = None, return_kv: bool = False, plan: PassPlan | None = None) -> MoTOutput:
        """One pass: ``hidden {expert: [n_e, D_e]}`` of the tokens from ``start`` on (routing order of the
        layout), shared attention masked by the layout, K/V of the cache before them. Give either ``layout``
        (+ ``start`` / ``meta``) or a prebuilt ``plan``."""
        if plan is None:
            if layout is None:
                raise ValueError("MoTStack.forward needs a layout or a plan")
            plan = self.plan(layout, start, meta)
        elif layout is not None and layout is not plan.layout or start and start != plan.start:
            raise ValueError("give either a layout/start or a plan, not both")
        start = plan.start
        if cache is not None and cache.length != start:
            raise ValueError(f"suffix pass starts at token {start} but the cache holds {cache.length} tokens")
        if start and cache is None:
            raise ValueError("a pass starting after token 0 needs the prefix cache")
        routing, meta = plan.routing, plan.meta
        unknown = set(hidden) - set(routing.index)
        missing = set(routing.index) - set(hidden)
        if unknown or missing:
            raise ValueError(f"hidden states for experts {sorted(hidden)} do not match the layout's active experts "
                             f"{sorted(routing.index)}")
        hidden = {e: hidden[e] for e in routing.index}  # routing order
        for e, x in hidden.items():
            if x.shape[0] != routing.index[e].numel():
                raise ValueError(f"expert {e!r}: {x.shape[0]} hidden rows for {routing.index[e].numel()} tokens")
        dtype = next(iter(hidden.values())).dtype
        cos, sin = plan.rope(dtype)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            prefix = (cache.keys[i], cache.values[i]) if cache is not None else None
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, k, v = checkpoint(layer, hidden, routing, meta, cos, sin, prefix, cond, use_reentrant=False)
            else:
                hidden, k, v = layer(hidden, routing, meta, cos, sin, prefix, cond)
            if return_kv:
                keys.append(k)
                values.append(v)
        cond = cond or {}
        out = {e: self.norms[e](x, cond.get(e))[0] for e, x in hidden.items()}
        return MoTOutput(out, keys, values)


@torch.no_grad()
def copy_sliced(src: nn.Module, dst: nn.Module):
    """Copy every parameter of ``src`` into the same-named parameter of ``dst``, sliced to the common corner."""
    sp = dict(src.named_parameters())
    for n, p in dst.named_parameters():
        if n not in sp:
            continue
        s = sp[n]
        if s.dim() != p.dim():
            continue
        sl = tuple(slice(0, min(a, b)) for a, b in zip(s.shape, p.shape))
        p[sl].copy_(s[sl])


__all__ = ["ExpertConfig", "MoTConfig", "RMSNorm", "AdaRMSNorm", "GatedFFN", "rope_cos_sin", "apply_rope", "Routing",
           "PassPlan", "PrefixCache", "MoTOutput", "ExpertBlock", "MoTLayer", "MoTStack", "copy_sliced"]
