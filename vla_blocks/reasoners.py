"""ACoT-VLA reasoners: EAR (explicit), IAR (implicit) and the AGP attention modules that fuse them.

- **EAR** (:class:`EARConfig`): a full action expert in the shared MoT attention plus a coarse flow
  head over a strided reference trajectory (default 15 steps taken with stride 2 from a 30-frame
  chunk, :func:`coarse_reference`). The expert itself lives in the model's MoT stack (expert ``ear``);
  this module only holds its settings.
- **IAR** (slot ``iar``): extractors over the per-layer prefix K/V (K after RoPE), one token per LLM
  layer: :class:`DownsampleExtractor` (default; upstream's published configs),
  :class:`LearnableQueryExtractor`, :class:`AttentionPoolingExtractor`. Upstream attends over every
  prefix position, padding and masked cameras included; ``mask_padding: true`` masks them instead
  (a deliberate deviation: not behaviour-compatible with upstream weights).
- **AGP**: :class:`UnifiedAttentionModule` (Linear q, Linear kv→split, multi-head attention with its
  own biased in/out projections, no mask/norm/residual, then ``fc_out``) used for the action-token
  cross-attentions and the fusion self-attention; :class:`FusionMLP` (3 linear layers, no activation)
  when only one reasoner is on. The model composes them (:meth:`vla_blocks.models.acot.ACoTVLA.guide`).

Extractors take ``K, V [B, L, T, Dk]`` (``Dk = num_kv_heads·head_dim``; stack a
:class:`~vla_blocks.mot.PrefixCache` with :func:`stack_prefix_kv`) and return ``[B, L, out_dim]``.
Parameter names follow upstream (``query_params.{l}``, ``{q,k,v,out}_proj.{group}``) for checkpoint
conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ExpertSpec
from .config import ComponentConfig, register
from .flow import FlowMatching

__all__ = ["EARConfig", "coarse_reference", "reference_chunk_length", "IARConfig", "DownsampleIAR",
           "LearnableQueryIAR", "AttentionPoolingIAR", "DownsampleExtractor", "LearnableQueryExtractor",
           "AttentionPoolingExtractor", "stack_prefix_kv", "UnifiedAttentionModule", "FusionMLP"]


# ---------------------------------------------------------------------------------------------- EAR
@dataclass
class EARConfig:
    """The explicit action reasoner: an expert of the shared attention and its coarse flow head.

    - ``expert``: the EAR expert (ACoT: gemma_300m, width 1024, mlp 4096; adaRMS is added in pi0.5 mode).
    - ``horizon`` / ``stride``: the reference trajectory is ``chunk[:, 0 : (horizon−1)·stride+1 : stride]``
      (LIBERO: 15 steps, stride 2 → frames 0, 2, …, 28 of a 30-frame chunk).
    - ``num_steps``: Euler steps of the coarse sampler (None: the model's flow setting, 10).
    - ``loss_weight``: weight of the EAR flow loss (upstream: 1, equal to the action loss).
    - ``flow``: the coarse head's flow recipe (loss kind, reduction, grid; None: the model's ``flow``).
      The flow time is drawn once per sample and shared with the action head, as upstream.
    """

    expert: ExpertSpec = field(default_factory=lambda: ExpertSpec(init_from=None))
    horizon: int = 15
    stride: int = 2
    num_steps: int | None = None
    loss_weight: float = 1.0
    flow: FlowMatching | None = None

    def __post_init__(self):
        if self.horizon < 1 or self.stride < 1:
            raise ValueError(f"ear.horizon and ear.stride must be >= 1, got {self.horizon}, {self.stride}")


def reference_chunk_length(coarse_horizon: int, coarse_stride: int, horizon: int, stride: int = 1) -> int:
    """Frames the data loader must provide: ``max(coarse_horizon·coarse_stride, horizon·stride)`` (upstream: 30)."""
    return max(coarse_horizon * coarse_stride, horizon * stride)


def coarse_reference(chunk: torch.Tensor, horizon: int, stride: int) -> torch.Tensor:
    """The EAR target: ``chunk[:, 0 : (horizon−1)·stride+1 : stride]`` of an action chunk ``[B, T, A]``.

    A strided slice of the ground truth (no pooling or smoothing), as upstream's ``LiberoACOTInputs``.
    """
    need = (horizon - 1) * stride + 1
    if chunk.ndim != 3 or chunk.shape[1] < need:
        raise ValueError(f"a reference of {horizon} steps with stride {stride} needs a chunk [B, ≥{need}, A], "
                         f"got {tuple(chunk.shape)}")
    return chunk[:, 0:need:stride]


# ---------------------------------------------------------------------------------------------- IAR
def stack_prefix_kv(keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer prefix K/V ``[B, Hkv, T, d]`` (a :class:`~vla_blocks.mot.PrefixCache`) → ``[B, L, T, Hkv·d]`` each."""
    def stack(ts):
        x = torch.stack(ts, dim=1)  # [B, L, Hkv, T, d]
        B, L, H, T, d = x.shape
        return x.permute(0, 1, 3, 2, 4).reshape(B, L, T, H * d)
    return stack(keys), stack(values)


class IARConfig(ComponentConfig, slot="iar"):
    """Slot base of implicit-action-reasoner extractors (recipe key ``iar``; ``null`` turns IAR off).

    ``build(depth, dim, output_dim, backbone_heads, backbone_head_dim)``: ``depth`` LLM layers with
    K/V of width ``dim`` (= num_kv_heads·head_dim) → one token of ``output_dim`` per layer.
    ``mask_padding``: False (upstream) attends over every prefix position; True masks invalid ones.
    """

    def build(self, depth: int, dim: int, output_dim: int, backbone_heads: int, backbone_head_dim: int) -> nn.Module:
        """The extractor module: K, V ``[B, depth, T, dim]`` → ``[B, depth, output_dim]`` (one token per layer)."""
        raise NotImplementedError


@register("iar", "downsample")
@dataclass
class DownsampleIAR(IARConfig):
    """ACoT's published extractor: ``num_queries`` learnable queries per layer, ``num_heads``-head attention in a
    ``downsample_dim`` space (None: dim/2, i.e. 128 for head_dim 256 → 8 heads of 16), projections shared per
    ``group_size`` layers, output ``out_proj`` → the action expert width."""

    num_queries: int = 1  # learnable queries per LLM layer (upstream: 1)
    num_heads: int = 8  # attention heads in the downsampled space (upstream: 8, of 16 dims each)
    # width of the attention space the K/V are projected to (None: dim/2; upstream 128 for Gemma-2B's 256)
    downsample_dim: int | None = None
    group_size: int = 3  # consecutive LLM layers sharing one set of q/k/v/out projections (upstream: 3, 6 groups)
    # false (upstream): attend over every prefix position, padding and masked cameras included;
    # true: mask them (not behaviour-compatible with upstream weights)
    mask_padding: bool = False

    def build(self, depth, dim, output_dim, backbone_heads, backbone_head_dim):
        """The :class:`DownsampleExtractor` over ``depth`` layers of K/V width ``dim`` → ``output_dim`` per layer."""
        return DownsampleExtractor(dim, output_dim, depth, self.downsample_dim or dim // 2, self.group_size,
                                   self.num_queries, self.num_heads)


@register("iar", "learnable_query")
@dataclass
class LearnableQueryIAR(IARConfig):
    """Upstream ``LearnableQueryExtractor``: ``num_queries`` queries per layer (averaged), ``num_heads`` heads of
    ``head_dim`` (None: the backbone's, 8 × 256), projections shared per ``group_size`` layers."""

    num_queries: int = 8  # learnable queries per LLM layer, averaged into one token (upstream: 8)
    num_heads: int | None = None  # attention heads (None: the backbone's, 8 for Gemma-2B)
    head_dim: int | None = None  # dims per head (None: the backbone's, 256 for Gemma-2B)
    group_size: int = 3  # consecutive LLM layers sharing one set of q/k/v/out projections (upstream: 3)
    # false (upstream): attend over every prefix position, padding and masked cameras included;
    # true: mask them (not behaviour-compatible with upstream weights)
    mask_padding: bool = False

    def build(self, depth, dim, output_dim, backbone_heads, backbone_head_dim):
        """The :class:`LearnableQueryExtractor` over ``depth`` layers of K/V width ``dim`` → ``output_dim``
        per layer."""
        return LearnableQueryExtractor(self.num_queries, dim, output_dim, depth, self.num_heads or backbone_heads,
                                       self.head_dim or backbone_head_dim, self.group_size)


@register("iar", "attention_pooling")
@dataclass
class AttentionPoolingIAR(IARConfig):
    """Upstream ``AttentionPoolingExtractor``: the query of layer l is the mean of its keys K_l."""

    num_heads: int | None = None  # attention heads (None: the backbone's, 8 for Gemma-2B)
    head_dim: int | None = None  # dims per head (None: the backbone's, 256 for Gemma-2B)
    group_size: int = 3  # consecutive LLM layers sharing one set of q/k/v/out projections (upstream: 3)
    # false (upstream): attend over every prefix position, padding and masked cameras included;
    # true: mask them (not behaviour-compatible with upstream weights)
    mask_padding: bool = False

    def build(self, depth, dim, output_dim, backbone_heads, backbone_head_dim):
        """The :class:`AttentionPoolingExtractor` over ``depth`` layers of K/V width ``dim`` → ``output_dim``
        per layer."""
        return AttentionPoolingExtractor(dim, output_dim, depth, self.num_heads or backbone_heads,
                                         self.head_dim or backbone_head_dim, self.group_size)


class _GroupedExtractor(nn.Module):
    """Shared machinery: per-group ``q/k/v/out`` projections (upstream lists ``{name}.{group}``), applied to all
    layers at once with the group weights gathered per layer (one einsum instead of a loop over layers).

    Heads split the projected width head-major (channel h·Hd + d). The pooled heads enter ``out_proj``
    flattened as upstream does: (Hd, H) order for the downsample and learnable-query extractors,
    (H, Hd) for attention pooling (``head_major_output``).
    """

    head_major_output = False

    def __init__(self, dim: int, inner: int, output_dim: int, depth: int, group_size: int, num_heads: int):
        super().__init__()
        if depth < 1 or group_size < 1:
            raise ValueError(f"depth and group_size must be >= 1, got {depth}, {group_size}")
        if inner % num_heads:
            raise ValueError(f"attention width {inner} is not divisible by {num_heads} heads")
        self.dim, self.inner, self.output_dim = dim, inner, output_dim
        self.depth, self.group_size, self.num_heads = depth, group_size, num_heads
        self.head_dim = inner // num_heads
        self.num_groups = math.ceil(depth / group_size)
        self.q_proj = nn.ModuleList(nn.Linear(dim, inner) for _ in range(self.num_groups))
        self.k_proj = nn.ModuleList(nn.Linear(dim, inner) for _ in range(self.num_groups))
        self.v_proj = nn.ModuleList(nn.Linear(dim, inner) for _ in range(self.num_groups))
        self.out_proj = nn.ModuleList(nn.Linear(inner, output_dim) for _ in range(self.num_groups))

    def layer_groups(self, device=None) -> torch.Tensor:
        """The projection group of each LLM layer, ``[depth]`` (layer l uses group l // group_size)."""
        return torch.arange(self.depth, device=device) // self.group_size

    def _per_layer(self, mods: nn.ModuleList, device) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.layer_groups(device)
        w = torch.stack([m.weight for m in mods])[g]  # [L, out, in]
        b = torch.stack([m.bias for m in mods])[g]  # [L, out]
        return w, b

    def _project(self, x: torch.Tensor, mods: nn.ModuleList) -> torch.Tensor:
        """``x [B, L, T, in]`` (or ``[L, T, in]``) through layer l's group projection → ``[..., L, T, out]``."""
        w, b = self._per_layer(mods, x.device)
        if x.ndim == 3:
            return torch.einsum("lti,loi->lto", x, w) + b[:, None]
        return torch.einsum("blti,loi->blto", x, w) + b[None, :, None]

    def _check(self, K: torch.Tensor, V: torch.Tensor, key_mask: torch.Tensor | None):
        if K.ndim != 4 or K.shape != V.shape or K.shape[1] != self.depth or K.shape[-1] != self.dim:
            raise ValueError(f"K and V must be [B, {self.depth}, T, {self.dim}], got {tuple(K.shape)}, {tuple(V.shape)}")
        if key_mask is not None and tuple(key_mask.shape) != (K.shape[0], K.shape[2]):
            raise ValueError(f"key_mask must be [B, T] = {(K.shape[0], K.shape[2])}, got {tuple(key_mask.shape)}")

    def queries(self, K: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """The projected queries ``[B or 1, L, Q, inner]`` of every layer."""
        raise NotImplementedError

    def attention_weights(self, K: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax weights ``[B, L, heads, Q, T]`` (fp32) of every layer's queries over the T prefix
        positions: what :meth:`forward` pools V with (traces read them, see :mod:`vla_blocks.trace`)."""
        self._check(K, K, key_mask)
        return self._weights(self.queries(K, key_mask), K, key_mask)

    def _weights(self, q: torch.Tensor, K: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, T, _ = K.shape
        h, hd = self.num_heads, self.head_dim
        k = self._project(K, self.k_proj).view(B, L, T, h, hd)
        q = q.view(q.shape[0], L, -1, h, hd).expand(B, -1, -1, -1, -1)
        logits = torch.einsum("blqhd,blthd->blhqt", q, k).float() / math.sqrt(hd)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask.bool()[:, None, None, None, :], torch.finfo(logits.dtype).min)
        return logits.softmax(-1)

    def _attend(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``q [B or 1, L, Q, inner]`` against the projected K/V of every layer → pooled ``[B, L, inner]``
        (softmax over T in fp32; queries averaged as upstream)."""
        B, L, T, _ = K.shape
        h, hd = self.num_heads, self.head_dim
        v = self._project(V, self.v_proj).view(B, L, T, h, hd)
        attn = self._weights(q, K, key_mask).to(v.dtype)
        pooled = torch.einsum("blhqt,blthd->blqhd", attn, v).mean(2)  # [B, L, h, hd]
        if not self.head_major_output:
            pooled = pooled.transpose(-1, -2)  # upstream flattens (B, H, Hd) as (Hd, H): channel d·H + h
        return pooled.reshape(B, L, h * hd)

    def _output(self, pooled: torch.Tensor) -> torch.Tensor:
        w, b = self._per_layer(self.out_proj, pooled.device)
        return torch.einsum("bli,loi->blo", pooled, w) + b


class DownsampleExtractor(_GroupedExtractor):
    """One learnable query per layer (``query_params.{l}`` [num_queries, dim], N(0, 1)), 256→128 projections
    shared per group of layers, ``num_heads`` heads over all T prefix positions, ``out_proj`` → output_dim.

    ``forward(K, V, key_mask=None)``: ``K, V [B, L, T, dim]`` → ``[B, L, output_dim]``.
    """

    def __init__(self, dim: int, output_dim: int, depth: int, downsample_dim: int = 128, group_size: int = 3,
                 num_queries: int = 1, num_heads: int = 8):
        super().__init__(dim, downsample_dim, output_dim, depth, group_size, num_heads)
        self.num_queries = num_queries
        self.query_params = nn.ParameterList(nn.Parameter(torch.randn(num_queries, dim)) for _ in range(depth))

    def queries(self, K: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The learnable queries of every layer through their group's ``q_proj``: ``[1, L, Q, inner]``."""
        queries = torch.stack(list(self.query_params)).to(K.dtype)  # [L, Q, dim]
        return self._project(queries, self.q_proj)[None]  # [1, L, Q, inner]

    def forward(self, K: torch.Tensor, V: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix ``K, V [B, L, T, dim]`` (``key_mask [B, T]``: valid positions, None = all)
        → ``[B, L, output_dim]``."""
        self._check(K, V, key_mask)
        return self._output(self._attend(self.queries(K), K, V, key_mask))


class LearnableQueryExtractor(_GroupedExtractor):
    """``num_queries`` learnable queries per layer, ``num_heads``×``head_dim`` attention, queries averaged."""

    def __init__(self, num_queries: int, dim: int, output_dim: int, depth: int, num_heads: int = 8,
                 head_dim: int = 256, group_size: int = 3):
        super().__init__(dim, num_heads * head_dim, output_dim, depth, group_size, num_heads)
        self.num_queries = num_queries
        self.query_params = nn.ParameterList(nn.Parameter(torch.randn(num_queries, dim)) for _ in range(depth))

    def queries(self, K: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The learnable queries of every layer through their group's ``q_proj``: ``[1, L, Q, inner]``."""
        queries = torch.stack(list(self.query_params)).to(K.dtype)
        return self._project(queries, self.q_proj)[None]

    def forward(self, K: torch.Tensor, V: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix ``K, V [B, L, T, dim]`` (``key_mask [B, T]``: valid positions, None = all)
        → ``[B, L, output_dim]``."""
        self._check(K, V, key_mask)
        return self._output(self._attend(self.queries(K), K, V, key_mask))


class AttentionPoolingExtractor(_GroupedExtractor):
    """The query of layer l is the mean of K_l over the prefix (over valid positions with ``key_mask``)."""

    head_major_output = True

    def __init__(self, dim: int, output_dim: int, depth: int, num_heads: int = 8, head_dim: int = 256,
                 group_size: int = 3):
        super().__init__(dim, num_heads * head_dim, output_dim, depth, group_size, num_heads)

    def queries(self, K: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean key of every layer (valid positions only with ``key_mask``) through ``q_proj``:
        ``[B, L, 1, inner]``."""
        if key_mask is None:
            mean_k = K.mean(2, keepdim=True)
        else:
            m = key_mask.to(K.dtype)[:, None, :, None]
            mean_k = (K * m).sum(2, keepdim=True) / m.sum(2, keepdim=True).clamp_min(1.0)
        return self._project(mean_k, self.q_proj)  # [B, L, 1, inner]

    def forward(self, K: torch.Tensor, V: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix ``K, V [B, L, T, dim]`` (``key_mask [B, T]``: valid positions, None = all)
        → ``[B, L, output_dim]``."""
        self._check(K, V, key_mask)
        return self._output(self._attend(self.queries(K, key_mask), K, V, key_mask))


# ---------------------------------------------------------------------------------------------- AGP
class UnifiedAttentionModule(nn.Module):
    """Upstream's ``UnifiedAttentionModule``: ``Q = q_proj(feat_1)``; ``K, V = split(kv_proj(feat_2))``;
    multi-head attention ``attn`` with its own biased q/k/v/out projections (``nn.MultiheadAttention``),
    no mask, no norm, no residual; then ``fc_out`` (and a sigmoid with ``apply_sigmoid``).

    ``forward(feat_1 [B, Nq, in_dim_1], feat_2 [B, Nk, in_dim_2]) → [B, Nq, out_dim]``. Used as
    cross-attention (action tokens vs coarse trajectory / IAR tokens) and as self-attention (fusion).
    """

    def __init__(self, in_dim_1: int, in_dim_2: int, out_dim: int, hidden_dim: int = 128, num_heads: int = 4,
                 apply_sigmoid: bool = False):
        super().__init__()
        self.q_proj = nn.Linear(in_dim_1, hidden_dim)
        self.kv_proj = nn.Linear(in_dim_2, 2 * hidden_dim)
        if num_heads < 1 or hidden_dim % num_heads:
            from .config import ConfigError
            raise ConfigError(f"agp_num_heads: {num_heads} heads do not divide the AGP width {hidden_dim} "
                              f"(the action expert's hidden_size)", key="agp_num_heads")
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, bias=True, batch_first=True)
        self.fc_out = nn.Linear(hidden_dim, out_dim)
        self.apply_sigmoid = apply_sigmoid

    def forward(self, feat_1: torch.Tensor, feat_2: torch.Tensor) -> torch.Tensor:
        """``feat_1 [B, Nq, in_dim_1]`` attends to ``feat_2 [B, Nk, in_dim_2]`` → ``[B, Nq, out_dim]``."""
        q = self.q_proj(feat_1)
        k, v = self.kv_proj(feat_2).chunk(2, dim=-1)
        o, _ = self.attn(q, k, v, need_weights=False)
        o = self.fc_out(o)
        return torch.sigmoid(o) if self.apply_sigmoid else o


class FusionMLP(nn.Module):
    """Upstream's ``MLP``: ``fc3(fc2(fc1(x)))`` (with swish between them when ``activate``; ACoT uses
    ``activate=False``), the fusion when only one reasoner is on."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, activate: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, output_dim)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., input_dim]`` → ``[..., output_dim]`` through the three linear layers."""
        if self.activate:
            return self.fc3(F.silu(self.fc2(F.silu(self.fc1(x)))))
        return self.fc3(self.fc2(self.fc1(x)))
