"""Fused masked attention over the Layout mask: input checks, per-batch kernel metadata, autograd.

:func:`mask_attention` is the public entry point. Everything that depends only on the mask
(kernel metadata vectors, tile lists per block size, the prefix alignment) is cached on the
:class:`~vla_blocks.attention.MaskMeta` of the batch, so every layer after the first pays only for
the kernels. Triton is imported on the first kernel launch, never at import time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from vla_blocks.attention.meta import FLAG_VALID, MaskMeta

from .configs import KernelConfig, config_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
_INT32_MIN = -(2 ** 31)
Q_DOC_INVALID = _INT32_MIN  # folded into the doc vectors: an invalid query never matches any key
K_DOC_INVALID = _INT32_MIN + 1


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` (Triton runs kernels on the CPU through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton runs kernels through its CPU interpreter in this process.

    Triton 3.x reads ``TRITON_INTERPRET`` when a function is decorated with ``@triton.jit``, and its
    own library functions (``tl.zeros``, ``tl.max``…) are decorated when ``triton`` is first imported.
    So the mode is fixed by the variable at ``import triton`` time: set ``TRITON_INTERPRET=1`` before
    anything imports triton. Before that import this reports what the import will do.
    """
    import sys

    std = sys.modules.get("triton.language.standard")
    if std is None:
        return interpreter_enabled()
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(std, "zeros", None), InterpretedFunction)


_IMPL = None


def _impl():
    """The kernel module, decorated in the same mode as triton itself (whatever TRITON_INTERPRET says now)."""
    global _IMPL
    if _IMPL is None:
        mode = triton_interpreted()
        prev = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if mode else "0"
        try:
            from . import _triton_mask_attention as impl
        finally:
            if prev is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = prev
        _IMPL = impl
    return _IMPL


# ------------------------------------------------------------------------------------------ checks


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: MaskMeta,
                        prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[str]:
    """Why :func:`mask_attention` cannot run these inputs (empty list: it can)."""
    r: list[str] = []
    if not triton_available():
        return ["triton is not installed (pip install 'vla-blocks[triton]')"]
    ts = [("q", q), ("k", k), ("v", v)]
    if prefix is not None:
        if not isinstance(prefix, (tuple, list)) or len(prefix) != 2:
            return ["prefix must be a pair (k_prefix, v_prefix)"]
        ts += [("k_prefix", prefix[0]), ("v_prefix", prefix[1])]
    for name, t in ts:
        if not isinstance(t, torch.Tensor):
            return [f"{name} is a {type(t).__name__}, not a tensor"]
        if t.dim() != 4:
            return [f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}"]
    B, Hq, Nq, D = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        r.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    for name, t in ts[1:]:
        if t.dtype != q.dtype:
            r.append(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            r.append(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape[0] != B or t.shape[1] != k.shape[1] or t.shape[3] != D:
            r.append(f"{name} has shape {tuple(t.shape)}; expected [B={B}, Hkv={k.shape[1]}, N, D={D}]")
    if v.shape[2] != k.shape[2]:
        r.append(f"k has {k.shape[2]} keys but v has {v.shape[2]}")
    if prefix is not None and prefix[0].shape[2] != prefix[1].shape[2]:
        r.append(f"k_prefix has {prefix[0].shape[2]} keys but v_prefix has {prefix[1].shape[2]}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        r.append(f"query heads {Hq} are not a multiple of kv heads {k.shape[1]}")
    if D > MAX_HEAD_DIM or D < 1:
        r.append(f"head_dim {D} is not supported (1..{MAX_HEAD_DIM}; 64, 128 and 256 are the tuned sizes)")
    nk = k.shape[2] + (prefix[0].shape[2] if prefix is not None else 0)
    if not isinstance(meta, MaskMeta):
        r.append(f"meta is a {type(meta).__name__}, not a MaskMeta")
    else:
        if (meta.batch_size, meta.q_len, meta.k_len) != (B, Nq, nk):
            r.append(f"mask metadata is [{meta.batch_size}, {meta.q_len}, {meta.k_len}] but the inputs are "
                     f"B={B}, Nq={Nq}, Nk={nk}" + (" (prefix ++ keys)" if prefix is not None else ""))
        if meta.device != q.device:
            r.append(f"mask metadata is on {meta.device} but q is on {q.device} (use meta.to(device))")
    dev = q.device.type
    interp = triton_interpreted()
    if dev == "cuda":
        if interp:
            r.append("triton runs in interpreter mode (TRITON_INTERPRET=1 when triton was imported); "
                     "CUDA tensors need compiled kernels")
        elif q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device)[0] < 8:
            r.append("bfloat16 needs compute capability 8.0 or newer")
    elif dev == "cpu":
        if not interpreter_enabled():
            r.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1); the kernels run on CUDA")
        elif not interp:
            r.append("TRITON_INTERPRET=1 was set after triton was imported; set it before importing triton")
        elif q.dtype == torch.bfloat16:
            r.append("bfloat16 is unsupported under the Triton interpreter (its bf16 tl.dot is wrong, triton #11584)")
    else:
        r.append(f"device {dev} is not supported (cuda, or cpu with TRITON_INTERPRET=1)")
    return r


# ------------------------------------------------------------------------------------------ per-batch metadata


@dataclass
class KernelMeta:
    """The kernels' view of a MaskMeta for one prefix length and key alignment (cached per batch)."""

    logical: MaskMeta  # the meta in the kernels' key tile space (prefix padded to n_prefix_pad)
    q_vecs: tuple[torch.Tensor, ...]  # idx, doc (invalid folded in), seg, flags: [B, Nq] int32 contiguous
    k_vecs: tuple[torch.Tensor, ...]  # the same for keys: [B, n_keys_pad] int32, invalid past the end
    n_prefix: int
    n_prefix_pad: int
    n_keys_pad: int  # row stride of k_vecs: a multiple of the alignment

    def lists(self, kind: str, bm: int, bn: int) -> tuple[torch.Tensor, ...]:
        """Ordered tile lists: ``kind="kv"`` per q tile (forward, dQ) or ``"q"`` per kv tile (dK/dV)."""
        def build():
            s = self.logical.tile_summary(bm, bn)
            lists = s.kv_lists() if kind == "kv" else s.q_lists()
            return tuple(t.to(torch.int32).contiguous() for t in lists)
        return self.logical.cached(("triton_lists", kind, bm, bn), build)


def kernel_meta(meta: MaskMeta, n_prefix: int, align: int) -> KernelMeta:
    """Build (once per batch) the kernel metadata; ``n_prefix`` keys come from the prefix pointers."""
    def build():
        qv = (meta.q_flags & FLAG_VALID) != 0
        kv = (meta.k_flags & FLAG_VALID) != 0
        bad = ((meta.q_doc <= K_DOC_INVALID) & qv).any() | ((meta.k_doc <= K_DOC_INVALID) & kv).any()
        if bool(bad):
            raise ValueError(f"document ids {Q_DOC_INVALID} and {K_DOC_INVALID} are reserved by the Triton kernels")
        n_prefix_pad = -(-n_prefix // align) * align
        logical = meta if n_prefix_pad == n_prefix else meta.with_invalid_keys(n_prefix, n_prefix_pad - n_prefix)
        i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        q_vecs = (i32(meta.q_idx), i32(torch.where(qv, meta.q_doc, Q_DOC_INVALID)), i32(meta.q_seg),
                  i32(meta.q_flags))
        nk = logical.k_len
        n_keys_pad = max(align, -(-nk // align) * align)
        lkv = (logical.k_flags & FLAG_VALID) != 0
        k_vecs = []
        for t, fill in ((logical.k_idx, 0), (torch.where(lkv, logical.k_doc, K_DOC_INVALID), K_DOC_INVALID),
                        (logical.k_seg, 0), (logical.k_flags, 0)):
            t = i32(t)
            if n_keys_pad > nk:
                t = torch.cat([t, t.new_full((t.shape[0], n_keys_pad - nk), fill)], dim=1)
            k_vecs.append(t.contiguous())
        return KernelMeta(logical, q_vecs, tuple(k_vecs), n_prefix, n_prefix_pad, n_keys_pad)
    return meta.cached(("triton_kernel_meta", n_prefix, align), build)


# ------------------------------------------------------------------------------------------ launches


def _d_pad(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for accuracy (tests, references): no TF32 truncation
    return "ieee" if dtype == torch.float32 else "tf32"


def _s3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_ctx(t: torch.Tensor):
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _forward(q, k, v, kp, vp, km: KernelMeta, scale: float, cfg: KernelConfig):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if B * H * Nq == 0:
        return out, lse
    if km.logical.k_len == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    impl = _impl()
    bm, bn = cfg.block_m, cfg.block_n
    pc, pi, fc, fi = km.lists("kv", bm, bn)
    MQ, MK = pi.shape[1], pi.shape[2]
    has_prefix = kp is not None
    kp_, vp_ = (kp, vp) if has_prefix else (k, v)
    grid = (MQ, B * H)
    with _device_ctx(q):
        impl._fwd_kernel[grid](
            q, k, v, kp_, vp_, out, lse, *km.q_vecs, *km.k_vecs, pc, pi, fc, fi,
            scale * LOG2E,
            *_s3(q), *_s3(k), *_s3(v), *_s3(kp_), *_s3(vp_), *_s3(out),
            H, H // Hkv, Nq, Nk, km.n_prefix, km.n_prefix_pad, km.n_keys_pad, MQ, MK,
            HEAD_DIM=D, D_PAD=_d_pad(D), BLOCK_M=bm, BLOCK_N=bn, HAS_PREFIX=has_prefix,
            DOT_PREC=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def _backward(q, k, v, kp, vp, out, lse, dout, dlse, km: KernelMeta, scale: float, cfg: KernelConfig,
              needs=(True, True, True, True, True)):
    """Gradients for the inputs flagged in ``needs`` (q, k, v, k_prefix, v_prefix); None for the others."""
    B, H, Nq, D = q.shape
    has_prefix = kp is not None
    need_q = needs[0]
    need_s = needs[1] or needs[2]
    need_p = has_prefix and (needs[3] or needs[4])
    zeros = lambda t, need: torch.zeros_like(t, memory_format=torch.contiguous_format) if need else None  # noqa: E731
    dq = zeros(q, need_q)
    dk, dv = zeros(k, need_s), zeros(v, need_s)
    dkp, dvp = (zeros(kp, need_p), zeros(vp, need_p)) if has_prefix else (None, None)
    trivial = B * H * Nq == 0 or km.logical.k_len == 0 or (dout is None and dlse is None)
    if not trivial:
        _launch_backward(q, k, v, kp, vp, out, lse, dout, dlse, km, scale, cfg, dq, dk, dv, dkp, dvp)
    pick = lambda g, need: g if need else None  # noqa: E731
    return (pick(dq, needs[0]), pick(dk, needs[1]), pick(dv, needs[2]),
            pick(dkp, has_prefix and needs[3]), pick(dvp, has_prefix and needs[4]))


def _launch_backward(q, k, v, kp, vp, out, lse, dout, dlse, km, scale, cfg, dq, dk, dv, dkp, dvp):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    has_prefix = kp is not None
    impl = _impl()
    if dout is None:
        dout = torch.zeros_like(out)
    dout = _last_contig(dout)
    d_pad = _d_pad(D)
    prec = _dot_precision(q.dtype)
    kp_, vp_ = (kp, vp) if has_prefix else (k, v)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    with _device_ctx(q):
        bmd = cfg.block_m2
        impl._bwd_delta_kernel[(triton_cdiv(Nq, bmd), B * H)](
            out, dout, delta, *_s3(out), *_s3(dout), H, Nq,
            HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=bmd, num_warps=cfg.bwd_num_warps)
        if dlse is not None:  # d lse / d s = p: folds into Delta (ds = p·(dp − (Delta − dlse)))
            delta = delta - dlse.to(torch.float32)
        # log2 units; rows that attend nothing get +inf so exp2(s − lse) is exactly 0
        lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse * LOG2E).contiguous()

        if dk is not None or dkp is not None:
            bm1, bn1 = cfg.block_m1, cfg.block_n1
            pc, pi, fc, fi = km.lists("q", bm1, bn1)
            MK1, MQ1 = pi.shape[1], pi.shape[2]
            split = km.n_prefix_pad // bn1  # kv tiles [0, split) are prefix tiles
            first = 0 if dkp is not None else split
            last = MK1 if dk is not None else split
            dk_, dv_ = (dk, dv) if dk is not None else (dkp, dvp)  # unused pointers still need a tensor
            dkp_, dvp_ = (dkp, dvp) if dkp is not None else (dk_, dv_)
            if last > first:
                impl._bwd_dkdv_kernel[(last - first, B * Hkv)](
                    q, k, v, kp_, vp_, dout, lse2, delta, dk_, dv_, dkp_, dvp_,
                    *km.q_vecs, *km.k_vecs, pc, pi, fc, fi, scale, scale * LOG2E,
                    *_s3(q), *_s3(k), *_s3(v), *_s3(kp_), *_s3(vp_), *_s3(dout),
                    *_s3(dk_), *_s3(dv_), *_s3(dkp_), *_s3(dvp_),
                    H, Hkv, H // Hkv, Nq, Nk, km.n_prefix, km.n_prefix_pad, km.n_keys_pad, MQ1, MK1, first,
                    HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=bm1, BLOCK_N=bn1, HAS_PREFIX=has_prefix, DOT_PREC=prec,
                    num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
        if dq is not None:
            bm2, bn2 = cfg.block_m2, cfg.block_n2
            pc, pi, fc, fi = km.lists("kv", bm2, bn2)
            MQ2, MK2 = pi.shape[1], pi.shape[2]
            impl._bwd_dq_kernel[(MQ2, B * H)](
                q, k, v, kp_, vp_, dout, lse2, delta, dq,
                *km.q_vecs, *km.k_vecs, pc, pi, fc, fi, scale, scale * LOG2E,
                *_s3(q), *_s3(k), *_s3(v), *_s3(kp_), *_s3(vp_), *_s3(dout), *_s3(dq),
                H, H // Hkv, Nq, Nk, km.n_prefix, km.n_prefix_pad, km.n_keys_pad, MQ2, MK2,
                HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=bm2, BLOCK_N=bn2, HAS_PREFIX=has_prefix, DOT_PREC=prec,
                num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class MaskAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: outputs ``(out, lse)``; gradients flow to q, k, v and the prefix K/V (also through lse)."""

    @staticmethod
    def forward(ctx, q, k, v, kp, vp, km, scale, cfg):
        out, lse = _forward(q, k, v, kp, vp, km, scale, cfg)
        ctx.save_for_backward(q, k, v, kp, vp, out, lse)
        ctx.km, ctx.scale, ctx.cfg = km, scale, cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, kp, vp, out, lse = ctx.saved_tensors
        dq, dk, dv, dkp, dvp = _backward(q, k, v, kp, vp, out, lse, dout, dlse, ctx.km, ctx.scale, ctx.cfg,
                                         needs=tuple(ctx.needs_input_grad[:5]))
        return dq, dk, dv, dkp, dvp, None, None, None


def mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: MaskMeta,
                   prefix: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None,
                   return_lse: bool = False, config: KernelConfig | None = None):
    """Attention under the Layout mask with fused Triton kernels (forward and backward).

    ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]`` (``Hkv`` divides ``Hq``; K/V are never repeated),
    ``meta`` the :class:`MaskMeta` of the call. ``prefix=(k_prefix, v_prefix)`` (``[B, Hkv, P, D]``)
    is a cached prefix read in place: the keys are ``prefix ++ k`` and ``meta``'s key side covers both;
    gradients reach the prefix tensors too. Returns ``out [B, Hq, Nq, D]`` (dtype of q) and, with
    ``return_lse``, the natural-log log-sum-exp ``[B, Hq, Nq]`` fp32 (differentiable). Rows with
    nothing to attend give 0 and LSE = -inf. The backward is deterministic (no atomics).
    ``config`` overrides the launch configuration (:func:`vla_blocks.kernels.get_config`).
    """
    reasons = unsupported_reasons(q, k, v, meta, prefix)
    if reasons:
        raise ValueError("mask_attention cannot run these inputs: " + "; ".join(reasons))
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = config if config is not None else config_for(q)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    kp = vp = None
    if prefix is not None:
        kp, vp = _last_contig(prefix[0]), _last_contig(prefix[1])
    n_prefix = kp.shape[2] if kp is not None else 0
    km = kernel_meta(meta, n_prefix, cfg.key_align)
    out, lse = MaskAttentionFunction.apply(q, k, v, kp, vp, km, scale, cfg)
    return (out, lse) if return_lse else out
