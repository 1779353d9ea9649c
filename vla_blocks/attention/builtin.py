"""Built-in attention backends: ``flex`` (FlexAttention on tile summaries), ``sdpa_blocks`` (SDPA on per-document
chunks and their non-empty key tiles, no N×N mask) and ``sdpa`` (dense mask, the oracle, always last).

Optional backends (``triton``, ``flash_attn``, ``xformers``) register themselves from
``vla_blocks.attention.optional`` when that module imports; each reports why it cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import AttentionBackend, AttentionInputs, register_backend
from .blocks import BLOCK_K, BLOCK_Q, BlockPlan, block_plan, blocks_attention
from .meta import allowed_pairs


def _sdpa_dense_mask(meta):
    """The dense ``[B, Nq, Nk]`` mask of the ``sdpa`` call, with rows that attend nothing opened (their output
    is zeroed afterwards, so no NaN reaches autograd on any device), and those rows (``None`` when there are
    none). One copy: the rows come from the O(N) metadata (:meth:`MaskMeta.row_is_empty`), and the mask is
    opened in place (it is the oracle's own tensor only when nothing needs opening)."""
    def build():
        empty = meta.row_is_empty()
        if not bool(empty.any()):
            return meta.dense(), None
        if "dense" in meta._cache:  # the oracle is already held: do not write into it
            m = meta.dense().clone()
        else:
            q = [t[:, :, None] for t in (meta.q_idx, meta.q_doc, meta.q_seg, meta.q_flags)]
            k = [t[:, None, :] for t in (meta.k_idx, meta.k_doc, meta.k_seg, meta.k_flags)]
            m = allowed_pairs(*q, *k)
        m[empty] = True
        return m, empty[:, :, None]
    return meta.cached("sdpa_dense_mask", build)


class SDPABackend(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention`` with the dense boolean mask (the oracle path).

    A plain causal pass (one document per row, every token valid, causal segments only) runs with
    ``is_causal=True`` and no mask tensor, which lets PyTorch pick its flash kernel. Otherwise the mask is
    ``B·Nq·Nk`` bytes, built once per batch; ``auto`` prefers ``sdpa_blocks`` when that is much less.
    """

    name = "sdpa"

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        return []

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        k, v = inp.full_kv()
        gqa = inp.q.shape[1] != k.shape[1]
        if inp.prefix is None and inp.meta.is_plain_causal():
            return F.scaled_dot_product_attention(inp.q, k, v, is_causal=True, scale=inp.scale, enable_gqa=gqa)
        mask, empty = _sdpa_dense_mask(inp.meta)
        out = F.scaled_dot_product_attention(inp.q, k, v, attn_mask=mask[:, None], scale=inp.scale, enable_gqa=gqa)
        return out if empty is None else out.masked_fill(empty[:, None], 0.0)


class SDPABlocksBackend(AttentionBackend):
    """SDPA without an N×N mask: per-document query chunks over their non-empty key tiles
    (:mod:`vla_blocks.attention.blocks`). Runs wherever ``sdpa`` does, forward and backward, every dtype, GQA
    and the cached-prefix form. ``auto`` takes it over the dense ``sdpa`` path only when it saves work:

    - the dense mask would hold at least ``min_dense_pairs`` (B·Nq·Nk) elements (below that one dense call
      is faster than planning and several calls), and
    - the plan issues at most ``max_fraction`` of the dense pairs (one short document per row gains nothing).

    The reason either test fails is the dispatch reason ``auto`` reports for skipping it.
    """

    name = "sdpa_blocks"
    min_dense_pairs = 2 ** 18  # 512² pairs: below, planning and several calls cost more than one dense call
    max_fraction = 0.75  # measured: 70% of the dense pairs (ACoT, 1k tokens) still ran 26% faster as blocks
    block_q = BLOCK_Q
    block_k = BLOCK_K

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        return []

    def plan(self, meta) -> BlockPlan:
        return block_plan(meta, self.block_q, self.block_k)

    def auto_skip_reasons(self, inp: AttentionInputs) -> list[str]:
        m = inp.meta
        if inp.prefix is None and m.is_plain_causal():
            return ["plain causal rows: sdpa runs is_causal=True without a mask"]
        dense = m.batch_size * m.q_len * m.k_len
        if dense < self.min_dense_pairs:
            return [f"the dense mask is small (B·Nq·Nk = {dense} < {self.min_dense_pairs}): one dense sdpa call is "
                    f"faster than planned blocks"]
        p = self.plan(m)
        if p.fraction > self.max_fraction:
            return [f"the blocks would issue {100 * p.fraction:.0f}% of the dense pairs (> "
                    f"{100 * self.max_fraction:.0f}%): no saving over the dense mask"]
        return []

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        k, v = inp.full_kv()
        return blocks_attention(inp.q, k, v, inp.meta, self.plan(inp.meta), scale=inp.scale)


def flex_block_mask(meta, block_size: int = 128):
    """A FlexAttention ``BlockMask`` built from the tile summaries (no O(N²) ``create_block_mask`` pass)."""
    from torch.nn.attention.flex_attention import BlockMask

    def build():
        summ = meta.tile_summary(block_size, block_size)
        kv_num, kv_idx, full_num, full_idx = summ.kv_lists()
        q_idx, q_doc, q_seg, q_flags, k_idx, k_doc, k_seg, k_flags = meta.vectors()

        def mask_mod(b, h, qi, ki):
            return allowed_pairs(q_idx[b, qi], q_doc[b, qi], q_seg[b, qi], q_flags[b, qi],
                                 k_idx[b, ki], k_doc[b, ki], k_seg[b, ki], k_flags[b, ki])

        return BlockMask.from_kv_blocks(kv_num[:, None], kv_idx[:, None], full_num[:, None], full_idx[:, None],
                                        BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                        seq_lengths=(meta.q_len, meta.k_len))
    return meta.cached(("flex_block_mask", block_size), build)


_COMPILED_FLEX = None


def _flex_fn(device_type: str):
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if device_type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class FlexBackend(AttentionBackend):
    """FlexAttention with a BlockMask from the Layout tile summaries; compiled on CUDA, forward-only on CPU."""

    name = "flex"
    block_size = 128

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        r = []
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except Exception as e:  # pragma: no cover - old torch
            return [f"FlexAttention is unavailable in this torch ({e})"]
        dev = inp.q.device.type
        if dev not in ("cuda", "cpu"):
            r.append(f"device {dev} is not supported (cuda or cpu)")
        if dev == "cpu" and inp.needs_grad:
            r.append("FlexAttention has no backward on CPU in this torch (inputs require grad)")
        if dev == "cpu" and inp.q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            r.append(f"dtype {inp.q.dtype} is not supported")
        d = inp.q.shape[-1]
        if d > 256:
            r.append(f"head_dim {d} > 256")
        return r

    def auto_skip_reasons(self, inp: AttentionInputs) -> list[str]:
        if inp.q.device.type != "cuda":
            return ["FlexAttention runs unfused (eager) off CUDA; sdpa is faster there"]
        return []

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        k, v = inp.full_kv()
        bm = flex_block_mask(inp.meta, self.block_size)
        fn = _flex_fn(inp.q.device.type)
        # rows with nothing to attend come back as 0 from Flex (tested against the oracle)
        return fn(inp.q, k, v, block_mask=bm, scale=inp.scale, enable_gqa=inp.q.shape[1] != k.shape[1])


register_backend(FlexBackend(), before=None)
register_backend(SDPABlocksBackend(), before=None)
register_backend(SDPABackend(), before=None)

try:  # optional kernels (triton / flash-attn / xformers) register before sdpa
    from . import optional as _optional  # noqa: F401
except ImportError:  # pragma: no cover - module not present yet
    pass
