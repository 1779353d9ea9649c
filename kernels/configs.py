"""Launch configurations (tile sizes, warps, pipeline stages) of the mask-attention kernels.

One :class:`KernelConfig` covers the three kernels of a call: the forward, the dK/dV backward
(which iterates q tiles for one kv tile) and the dQ backward (which iterates kv tiles for one q
tile). Tables are keyed by GPU generation (Hopper sm90, Ampere sm80 and later non-Hopper parts,
which have less shared memory) and the padded head dim. The starting points follow the H100
FlexAttention defaults and the Triton tutorial (reference/attention_kernels.md §1.2, §3.4 item 6);
they have not been autotuned on a GPU yet (benchmarks/ will record that).

Block sizes are powers of two ≥ 16 (``tl.dot`` needs every dimension ≥ 16). The tile summaries
are built at the same sizes, so each distinct config costs one O(B·Mq·Mk) summary per batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 64  # forward: queries per program
    block_n: int = 64  # forward: keys per inner-loop tile
    num_warps: int = 4
    num_stages: int = 2
    block_m1: int = 32  # dK/dV backward: queries per inner-loop tile
    block_n1: int = 64  # dK/dV backward: keys per program
    block_m2: int = 64  # dQ backward: queries per program
    block_n2: int = 32  # dQ backward: keys per inner-loop tile
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_m1", "block_n1", "block_m2", "block_n2"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"KernelConfig.{name}={b}: block sizes must be powers of two >= 16")
        for name in ("num_warps", "bwd_num_warps"):
            w = getattr(self, name)
            if w < 1 or w & (w - 1):
                raise ValueError(f"KernelConfig.{name}={w}: must be a power of two")
        if self.num_stages < 1 or self.bwd_num_stages < 1:
            raise ValueError("KernelConfig: num_stages must be >= 1")

    @property
    def key_align(self) -> int:
        """Alignment of the prefix in the kernels' key tile space (a multiple of every block_n)."""
        return max(self.block_n, self.block_n1, self.block_n2)

    def replace(self, **kw) -> "KernelConfig":
        return replace(self, **kw)

    def as_dict(self) -> dict:
        return asdict(self)


C = KernelConfig

# (head_dim_padded) -> config, for fp16/bf16. Hopper: 228 KiB shared memory per SM.
_SM90 = {
    16: C(128, 128, 4, 3, 32, 128, 128, 32, 4, 3),
    32: C(128, 128, 4, 3, 32, 128, 128, 32, 4, 3),
    64: C(128, 128, 4, 3, 32, 128, 128, 32, 4, 3),
    128: C(128, 64, 8, 3, 32, 128, 128, 32, 8, 3),
    256: C(64, 32, 4, 2, 32, 64, 64, 32, 8, 1),
}
# Ampere A100 (164 KiB) and the 99 KiB-smem parts (sm86/sm89) share the conservative table.
_SM80 = {
    16: C(128, 64, 4, 3, 32, 64, 64, 32, 4, 2),
    32: C(128, 64, 4, 3, 32, 64, 64, 32, 4, 2),
    64: C(128, 64, 4, 3, 32, 64, 64, 32, 4, 2),
    128: C(128, 32, 4, 2, 32, 64, 64, 32, 4, 2),
    256: C(64, 32, 4, 1, 16, 32, 32, 16, 4, 1),
}
# fp32 tiles take twice the registers and shared memory: halve the key-side tiles.
_FP32_SHRINK = {"block_n": 2, "block_n1": 2, "block_m2": 2}

# The interpreter runs programs one after another on the CPU: small tiles keep each step cheap and
# exercise multi-tile paths (empty / partial / full) on short test sequences.
INTERPRETER = C(32, 32, 1, 1, 32, 32, 32, 32, 1, 1)


def _shrink_fp32(cfg: KernelConfig) -> KernelConfig:
    kw = {k: max(16, getattr(cfg, k) // f) for k, f in _FP32_SHRINK.items()}
    return cfg.replace(**kw)


def get_config(head_dim: int, dtype_name: str = "bfloat16", capability: tuple[int, int] | None = None,
               interpreter: bool = False) -> KernelConfig:
    """The launch configuration for a head dim, dtype name and CUDA capability ``(major, minor)``.

    ``interpreter=True`` (CPU under ``TRITON_INTERPRET=1``) returns :data:`INTERPRETER`.
    """
    if interpreter:
        return INTERPRETER
    d = max(16, 1 << (max(int(head_dim), 1) - 1).bit_length())
    if d > 256:
        raise ValueError(f"head_dim {head_dim} > 256 has no kernel configuration")
    major = capability[0] if capability is not None else 9
    table = _SM90 if major == 9 else _SM80
    cfg = table[d]
    if dtype_name == "float32":
        cfg = _shrink_fp32(cfg)
    return cfg


def config_for(q) -> KernelConfig:
    """The configuration for a query tensor on its device (the capability is read from CUDA)."""
    if q.device.type != "cuda":  # only the interpreter runs off CUDA
        return INTERPRETER
    import torch

    cap = torch.cuda.get_device_capability(q.device)
    return get_config(q.shape[-1], str(q.dtype).replace("torch.", ""), cap)
