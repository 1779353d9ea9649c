"""Optional attention backends: ``triton`` (vla_blocks.kernels), ``flash_attn`` (varlen) and ``xformers``.

Registered before ``flex``, so ``auto`` tries triton → flash_attn → xformers → flex → sdpa. Each
backend imports its library lazily (in ``not_supported_reasons`` / ``forward``): importing vla_blocks
never imports triton, flash_attn or xformers, and a missing one is reported with the extra to install.

flash-attn has no mask argument, and xformers' bias classes cover only block-diagonal (optionally
causal) masks. :func:`varlen_plan` decides, in O(N log N) from the metadata and once per batch,
whether the Layout mask is exactly one of the two forms ``flash_attn_varlen_func`` expresses:

- **causal within documents**: every valid query sees exactly the valid keys of its document at or
  before it. It fails where a full/noise query has later tokens of its own segment (it would see
  ahead), or where a noise token has a later query of another segment (it would be hidden);
- **bidirectional within documents**: every valid query sees every valid key of its document.

The test is exact (per token, with per-document/segment reductions), not a pattern match on segment
modes. Documents without queries are dropped, and the queries must be the last ``Nq`` keys of the
row (self-attention, or a suffix over a cached prefix, where flash-attn's bottom-right-aligned
causal mask is the right one) with increasing positions. Only valid tokens are packed, so invalid
tokens anywhere are fine. Anything else gets a reason; xformers then falls back to a dense additive
bias on its cutlass kernel.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from .dispatch import AttentionBackend, AttentionInputs, register_backend
from .meta import FLAG_BIDIR, FLAG_NOISE, FLAG_VALID, MaskMeta

_I32_OFFSET = 2 ** 31


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (probed once per process: installs do not change under a run)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or shadowed install
        return False


# ------------------------------------------------------------------------------------------ varlen plans


@dataclass
class VarlenPlan:
    """How to run the mask as packed variable-length documents (flash-attn varlen, xformers block-diagonal).

    ``q_rows``/``q_cols`` index the valid queries of ``[B, Nq]`` in packed order (documents one after
    another, positions increasing); ``k_rows``/``k_cols`` likewise the keys of ``[B, Nk]``. Document
    ``i`` holds packed queries ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and keys ``cu_seqlens_k[i]:...``;
    ``causal`` means bottom-right-aligned causal inside each document (else bidirectional).
    """

    causal: bool
    q_rows: torch.Tensor
    q_cols: torch.Tensor
    k_rows: torch.Tensor
    k_cols: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32 [docs + 1]
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    seqlens_q: list[int]
    seqlens_k: list[int]

    @property
    def num_docs(self) -> int:
        """Number of packed sequences (documents with at least one valid query)."""
        return len(self.seqlens_q)

    def pack_q(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, H, Nq, D]`` → packed ``[total_q, H, D]`` (differentiable gather)."""
        return q.transpose(1, 2)[self.q_rows, self.q_cols]

    def pack_kv(self, k: torch.Tensor) -> torch.Tensor:
        """``[B, H, Nk, D]`` → packed ``[total_k, H, D]``."""
        return k.transpose(1, 2)[self.k_rows, self.k_cols]

    def unpack(self, o: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Packed ``[total_q, H, D]`` → ``[B, H, Nq, D]`` with zeros on the rows that attend nothing."""
        B, H, Nq, D = q.shape
        out = o.new_zeros((B, Nq, H, o.shape[-1]))
        out = out.index_put((self.q_rows, self.q_cols), o)
        return out.transpose(1, 2)


def _group_keys(rows: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """An int64 key ordering (row, value) lexicographically; values are any int32."""
    return rows.to(torch.int64) * (2 ** 32) + (vals.to(torch.int64) + _I32_OFFSET)


def varlen_plan(meta: MaskMeta) -> VarlenPlan | list[str]:
    """A :class:`VarlenPlan` when the mask is causal- or bidirectional-within-documents, else the reasons why not.

    O(N log N) in the number of tokens (sorts of the valid tokens), no O(N²) pass; cached per batch.
    """
    return meta.cached("varlen_plan", lambda: _build_varlen_plan(meta))


def _group_max(group: torch.Tensor, values: torch.Tensor, n: int, where: torch.Tensor) -> torch.Tensor:
    """Per group, the max of ``values`` over tokens in ``where`` (-1 when none; values are >= 0)."""
    out = torch.full((n,), -1, dtype=torch.int64, device=values.device)
    return out.scatter_reduce(0, group, torch.where(where, values, torch.full_like(values, -1)), "amax")


def _last_other_segment(doc_of, seg, pos, n_docs, where) -> torch.Tensor:
    """For every token: the last position, in its document, of a token in ``where`` from ANOTHER segment (-1: none).

    O(N): the document's last such token (position P1, segment S1), and its last one outside S1 (P2).
    """
    p1 = _group_max(doc_of, pos, n_docs, where)
    at_p1 = where & (pos == p1[doc_of])
    s1 = torch.zeros(n_docs, dtype=seg.dtype, device=seg.device).scatter(0, doc_of[at_p1], seg[at_p1])
    p2 = _group_max(doc_of, pos, n_docs, where & (seg != s1[doc_of]))
    return torch.where(seg == s1[doc_of], p2[doc_of], p1[doc_of])


def _build_varlen_plan(meta: MaskMeta) -> VarlenPlan | list[str]:
    Nq, Nk = meta.q_len, meta.k_len
    off = Nk - Nq
    if off < 0:
        return [f"more queries ({Nq}) than keys ({Nk}): queries must be the last keys of the row"]
    same = all(torch.equal(a, b[:, off:]) for a, b in zip(
        (meta.q_idx, meta.q_doc, meta.q_seg, meta.q_flags), (meta.k_idx, meta.k_doc, meta.k_seg, meta.k_flags)))
    if not same:
        return ["the queries are not the last Nq keys of the row (only self-attention or a suffix over a "
                "cached prefix maps to varlen documents)"]
    valid = (meta.k_flags & FLAG_VALID) != 0
    idx = meta.k_idx.to(torch.int64)
    # key positions strictly increase along the valid tokens of a row, so packed order is causal order
    low = torch.iinfo(torch.int64).min
    run_max = torch.cummax(torch.where(valid, idx, torch.full_like(idx, low)), dim=1).values
    prev = torch.cat([torch.full_like(run_max[:, :1], low), run_max[:, :-1]], dim=1)
    if bool((valid & (idx <= prev)).any()):
        return ["key positions (idx) do not increase along the row"]

    # valid tokens grouped by (row, document), positions increasing inside a document
    rows, cols = torch.nonzero(valid, as_tuple=True)
    dkey = _group_keys(rows, meta.k_doc[rows, cols])
    order = torch.sort(dkey, stable=True).indices
    rows, cols, dkey = rows[order], cols[order], dkey[order]
    _, doc_of, doc_len = torch.unique_consecutive(dkey, return_inverse=True, return_counts=True)
    n_docs = doc_len.numel()
    # documents without a query are never attended: drop them before judging the mask
    is_q = cols >= off
    keep_doc = _group_max(doc_of, cols, n_docs, is_q) >= 0
    tok = keep_doc[doc_of]
    rows, cols, dkey, is_q = rows[tok], cols[tok], dkey[tok], is_q[tok]
    _, doc_of, doc_len = torch.unique_consecutive(dkey, return_inverse=True, return_counts=True)
    n_docs = doc_len.numel()
    seg = meta.k_seg[rows, cols].to(torch.int64)
    flags = meta.k_flags[rows, cols]
    bidir = (flags & FLAG_BIDIR) != 0
    noise = (flags & FLAG_NOISE) != 0
    pos = cols.to(torch.int64)
    everyone = torch.ones_like(is_q)
    _, seg_of = torch.unique(doc_of.to(torch.int64) * (2 ** 32) + (seg + _I32_OFFSET), return_inverse=True)
    seg_last = _group_max(seg_of, pos, int(seg_of.max()) + 1 if seg_of.numel() else 0, everyone)[seg_of]
    later_same_seg = seg_last > pos
    later_other_seg = _last_other_segment(doc_of, seg, pos, n_docs, everyone) > pos
    other_seg_query = _last_other_segment(doc_of, seg, pos, n_docs, is_q)

    # causal within documents: a query sees exactly the document's keys at or before it
    bidir_sees_ahead = is_q & bidir & later_same_seg
    noise_hidden = noise & (other_seg_query > pos)
    # bidirectional within documents: a query sees every key of its document
    query_blind_ahead = is_q & ((later_same_seg & ~bidir) | later_other_seg)
    noise_hidden_any = noise & (other_seg_query >= 0)

    def per_doc(bad):
        return _group_max(doc_of, bad.long(), n_docs, everyone) > 0

    causal_ok = ~(per_doc(bidir_sees_ahead) | per_doc(noise_hidden))
    full_ok = ~(per_doc(query_blind_ahead) | per_doc(noise_hidden_any))
    if bool(causal_ok.all()):
        causal = True
    elif bool(full_ok.all()):
        causal = False
    else:
        why_c = []
        if bidir_sees_ahead.any():
            why_c.append("a full/noise query sees later tokens of its segment")
        if noise_hidden.any():
            why_c.append("a noise segment is hidden from later tokens of its document")
        why_f = []
        if query_blind_ahead.any():
            why_f.append("a query does not see later tokens of its document")
        if noise_hidden_any.any():
            why_f.append("a noise segment is hidden from other segments")
        if not why_f or not why_c:
            why_f.append("documents need different modes")
        return [f"the mask is neither causal within documents ({'; '.join(why_c) or 'some documents'}) nor "
                f"bidirectional within documents ({'; '.join(why_f)}); flash-attn/xformers varlen cannot express it"]

    q_rows, q_cols = rows[is_q], cols[is_q] - off
    seqlens_q = torch.zeros(n_docs, dtype=torch.int64, device=pos.device).scatter_add(0, doc_of, is_q.long())
    zero = torch.zeros(1, dtype=torch.int32, device=pos.device)
    cu_q = torch.cat([zero, torch.cumsum(seqlens_q, 0).to(torch.int32)])
    cu_k = torch.cat([zero, torch.cumsum(doc_len, 0).to(torch.int32)])
    sq, sk = seqlens_q.tolist(), doc_len.tolist()
    return VarlenPlan(causal=causal, q_rows=q_rows, q_cols=q_cols, k_rows=rows, k_cols=cols,
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(sq, default=0),
                      max_seqlen_k=max(sk, default=0), seqlens_q=sq, seqlens_k=sk)


def _cuda_reasons(inp: AttentionInputs, lib: str) -> list[str]:
    if inp.q.device.type != "cuda":
        return [f"{lib} needs CUDA tensors (got {inp.q.device.type})"]
    if inp.meta.device != inp.q.device:
        return [f"mask metadata is on {inp.meta.device} but q is on {inp.q.device} (use meta.to(device))"]
    return []


def _zeros_like(q: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like q that stay in q's autograd graph (zero gradient, no NaN from inf inputs)."""
    return q.masked_fill(torch.ones((), dtype=torch.bool, device=q.device), 0.0)


def _empty_safe_dense(meta: MaskMeta):
    """Dense mask with rows that attend nothing opened (their output is zeroed after), and those rows."""
    def build():
        m = meta.dense()
        empty = ~m.any(-1, keepdim=True)
        return m | empty, empty
    return meta.cached("optional_dense_empty_safe", build)


# ------------------------------------------------------------------------------------------ backends


class TritonBackend(AttentionBackend):
    """The fused Triton kernels of :mod:`vla_blocks.kernels` (any Layout mask, tile skipping, prefix in place)."""

    name = "triton"

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        """Why the Triton mask kernel cannot run these inputs (see :func:`vla_blocks.kernels.unsupported_reasons`)."""
        from vla_blocks.kernels import unsupported_reasons  # no triton import until a kernel runs

        return unsupported_reasons(inp.q, inp.k, inp.v, inp.meta, inp.prefix)

    def auto_skip_reasons(self, inp: AttentionInputs) -> list[str]:
        """Off CUDA the kernel runs in the Triton interpreter, so ``auto`` prefers sdpa there."""
        if inp.q.device.type != "cuda":
            return ["the Triton interpreter is slow (CPU tensors run under TRITON_INTERPRET=1); sdpa is faster here"]
        return []

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        """Attention with the Triton mask kernel (block-sparse over the mask metadata)."""
        from vla_blocks.kernels import mask_attention

        return mask_attention(inp.q, inp.k, inp.v, inp.meta, prefix=inp.prefix, scale=inp.scale)


class FlashAttnBackend(AttentionBackend):
    """flash-attn 2 ``flash_attn_varlen_func`` for masks that are causal or bidirectional within documents."""

    name = "flash_attn"
    reads_invalid_keys = False  # the varlen plan packs the valid tokens only

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        """Why flash-attn cannot run these inputs (not installed, not CUDA, dtype, head size, a mask it cannot express);
        empty when it can."""
        if not _installed("flash_attn"):
            return ["flash-attn is not installed (pip install 'vla-blocks[flash-attn]')"]
        r = _cuda_reasons(inp, "flash-attn")
        if r:
            return r
        if inp.q.dtype not in (torch.float16, torch.bfloat16):
            r.append(f"flash-attn supports float16/bfloat16, not {inp.q.dtype}")
        d = inp.q.shape[-1]
        if d > 256 or d % 8:
            r.append(f"flash-attn needs head_dim <= 256 and a multiple of 8 (got {d})")
        if torch.cuda.get_device_capability(inp.q.device)[0] < 8:
            r.append("flash-attn needs compute capability 8.0 or newer")
        plan = varlen_plan(inp.meta)
        if isinstance(plan, list):
            r.extend(plan)
        return r

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        """Attention with ``flash_attn_varlen_func`` over the documents of the mask packed into variable-length
        sequences."""
        from flash_attn import flash_attn_varlen_func

        plan = varlen_plan(inp.meta)
        k, v = inp.full_kv()
        if plan.num_docs == 0:
            return _zeros_like(inp.q)  # no valid query
        o = flash_attn_varlen_func(plan.pack_q(inp.q), plan.pack_kv(k), plan.pack_kv(v),
                                   plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
                                   softmax_scale=inp.scale, causal=plan.causal)
        return plan.unpack(o, inp.q)


class XformersBackend(AttentionBackend):
    """xformers ``memory_efficient_attention``: block-diagonal (causal) bias classes where the mask is one,
    else a dense additive bias on the cutlass kernel (the only xformers op taking a tensor bias)."""

    name = "xformers"

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        """Why xformers cannot run these inputs (not installed, not CUDA, dtype, a broken build); empty when it can."""
        if not _installed("xformers"):
            return ["xformers is not installed (pip install 'vla-blocks[xformers]')"]
        r = _cuda_reasons(inp, "xformers")
        if r:
            return r
        if inp.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            r.append(f"xformers supports float16/bfloat16/float32, not {inp.q.dtype}")
        try:
            import xformers.ops  # noqa: F401
        except Exception as e:  # noqa: BLE001 - a broken build reports itself here
            r.append(f"xformers.ops failed to import ({type(e).__name__}: {e})")
        return r

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        """Attention with xformers' memory-efficient kernel: block-diagonal over packed documents when the mask allows,
        else a dense additive bias (kv heads repeated for grouped-query attention)."""
        from xformers.ops import fmha

        q = inp.q
        k, v = inp.full_kv()
        hq, hk = q.shape[1], k.shape[1]
        if hq != hk:  # the 5-D grouped layout is forward-only in xformers
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
        plan = varlen_plan(inp.meta)
        if isinstance(plan, VarlenPlan):
            if plan.num_docs == 0:
                return _zeros_like(q)
            cls = (fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if plan.causal
                   else fmha.attn_bias.BlockDiagonalMask)
            bias = cls.from_seqlens(q_seqlen=plan.seqlens_q, kv_seqlen=plan.seqlens_k, device=q.device)
            o = fmha.memory_efficient_attention(plan.pack_q(q)[None], plan.pack_kv(k)[None], plan.pack_kv(v)[None],
                                                attn_bias=bias, scale=inp.scale)
            return plan.unpack(o[0], q)
        # dense additive bias (cutlass): last-dim storage padded to 8 elements for 128-bit aligned strides
        mask, empty = _empty_safe_dense(inp.meta)
        B, H, Nq, _ = q.shape
        nk = k.shape[2]
        storage = q.new_full((B, 1, Nq, -(-nk // 8) * 8), float("-inf"))
        bias = storage[..., :nk]
        bias.masked_fill_(mask[:, None], 0.0)
        o = fmha.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            attn_bias=bias.expand(B, H, Nq, nk), scale=inp.scale,
                                            op=(fmha.cutlass.FwOp, fmha.cutlass.BwOp))
        return o.transpose(1, 2).masked_fill(empty[:, None], 0.0)


# priority: triton > flash_attn > xformers > flex > sdpa (each inserted just before flex)
register_backend(TritonBackend(), before="flex")
register_backend(FlashAttnBackend(), before="flex")
register_backend(XformersBackend(), before="flex")
