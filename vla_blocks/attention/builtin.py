"""Built-in attention backends: ``flex`` (FlexAttention on tile summaries) and ``sdpa`` (dense mask, always last).

Optional backends (``triton``, ``flash_attn``, ``xformers``) register themselves from
``vla_blocks.attention.optional`` when that module imports; each reports why it cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import AttentionBackend, AttentionInputs, register_backend
from .meta import allowed_pairs


def _empty_safe_dense_mask(meta):
    """The dense mask with fully masked rows opened (their output is zeroed afterwards), so no NaN reaches
    autograd; ``None`` for the rows when no row is empty."""
    def build():
        m = meta.dense()
        empty = ~m.any(-1, keepdim=True)
        if not bool(empty.any()):
            return m, None
        return m | empty, empty
    return meta.cached("dense_empty_safe", build)


class SDPABackend(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention`` with the dense boolean mask (the oracle path).

    A plain causal pass (one document per row, every token valid, causal segments only) runs with
    ``is_causal=True`` and no mask tensor, which lets PyTorch pick its flash kernel.
    """

    name = "sdpa"

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        """None: PyTorch SDPA runs every well-formed input (the fallback of ``auto``)."""
        return []

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        """Attention with ``F.scaled_dot_product_attention``: ``is_causal`` for a plain causal pass, else the dense mask
        (rows with nothing to attend set to 0)."""
        k, v = inp.full_kv()
        gqa = inp.q.shape[1] != k.shape[1]
        if inp.prefix is None and inp.meta.is_plain_causal():
            return F.scaled_dot_product_attention(inp.q, k, v, is_causal=True, scale=inp.scale, enable_gqa=gqa)
        mask, empty = _empty_safe_dense_mask(inp.meta)
        out = F.scaled_dot_product_attention(inp.q, k, v, attn_mask=mask[:, None], scale=inp.scale, enable_gqa=gqa)
        return out if empty is None else out.masked_fill(empty[:, None], 0.0)


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
        """Why FlexAttention cannot run these inputs (torch without it, device, no CPU backward, dtype, head_dim > 256);
        empty when it can."""
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
        """Off CUDA FlexAttention runs unfused, so ``auto`` prefers sdpa there."""
        if inp.q.device.type != "cuda":
            return ["FlexAttention runs unfused (eager) off CUDA; sdpa is faster there"]
        return []

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        """Attention with FlexAttention and a block mask built from the mask metadata (empty rows give 0)."""
        k, v = inp.full_kv()
        bm = flex_block_mask(inp.meta, self.block_size)
        fn = _flex_fn(inp.q.device.type)
        # rows with nothing to attend come back as 0 from Flex (tested against the oracle)
        return fn(inp.q, k, v, block_mask=bm, scale=inp.scale, enable_gqa=inp.q.shape[1] != k.shape[1])


register_backend(FlexBackend(), before=None)
register_backend(SDPABackend(), before=None)

try:  # optional kernels (triton / flash-attn / xformers) register before sdpa
    from . import optional as _optional  # noqa: F401
except ImportError:  # pragma: no cover - module not present yet
    pass
