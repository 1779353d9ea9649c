"""Triton attention kernels for the Layout mask (imported as ``vla_blocks.kernels``).

``mask_attention(q, k, v, meta, prefix=None, scale=None, return_lse=False)`` is fused masked
attention (forward and deterministic backward) over any mask of the Layout formula, evaluated in
the kernel from per-token metadata, with empty tiles skipped and full tiles unmasked. Importing
this package does not import triton; the kernels load on first use.
"""

from .configs import INTERPRETER, KernelConfig, get_config
from .mask_attention import (MaskAttentionFunction, interpreter_enabled, kernel_meta, mask_attention,
                             triton_available, unsupported_reasons)

__all__ = ["mask_attention", "MaskAttentionFunction", "unsupported_reasons", "KernelConfig", "get_config",
           "INTERPRETER", "interpreter_enabled", "triton_available", "kernel_meta"]
