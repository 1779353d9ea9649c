"""Compile every kernel variant for sm80 and sm90 ahead of time, without a GPU.

``python -m vla_blocks.kernels.compile_check`` runs Triton's full pipeline (TTIR → TTGIR → LLVM →
PTX → cubin with the bundled ptxas) for the forward, Delta, dK/dV and dQ kernels of every tuned
configuration (head dims 64/128/256, fp16/bf16/fp32, with and without a prefix), and reports the
shared memory each needs against the device limits. It catches compile errors and configurations
that cannot launch; it says nothing about speed or numerics (the tests and benchmarks do).
Run it in a process where ``TRITON_INTERPRET`` is unset.
"""

from __future__ import annotations

import argparse
import os
import sys

# shared memory per block (opt-in maximum), bytes
SMEM_LIMIT = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 9): 101376}
_INT_SCALARS = {"H", "HKV", "G", "NQ", "NK", "NP", "NP_PAD", "NKT", "MQ", "MK", "TILE0"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}
_I32_POINTERS = {"QI", "QD", "QS", "QF", "KI", "KD", "KS", "KF", "PART_CNT", "PART_IDX", "FULL_CNT", "FULL_IDX"}
_F32_POINTERS = {"LSE", "LSE2", "DELTA"}
_DT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _signature(fn, dtype: str, constexprs: dict):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("s_") or name in _INT_SCALARS:
            sig[name] = "i32"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in _I32_POINTERS:
            sig[name] = "*i32"
        elif name in _F32_POINTERS:
            sig[name] = "*fp32"
        else:
            sig[name] = "*" + _DT[dtype]
    return sig


def compile_all(capabilities=((9, 0), (8, 0)), head_dims=(64, 128, 256), dtypes=("bfloat16", "float16", "float32"),
                prefix_modes=(False, True), verbose: bool = True) -> list[str]:
    """Compile all variants; returns a list of problems (empty: every variant compiles and fits)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _triton_mask_attention as K
    from .configs import get_config
    from .mask_attention import _dot_precision, _d_pad

    import torch

    problems = []
    for cap in capabilities:
        target = GPUTarget("cuda", cap[0] * 10 + cap[1], 32)
        limit = SMEM_LIMIT.get(cap, 101376)
        for dtype in dtypes:
            if dtype == "bfloat16" and cap[0] < 8:
                continue
            prec = _dot_precision(getattr(torch, dtype))
            for d in head_dims:
                cfg = get_config(d, dtype, cap)
                for has_prefix in prefix_modes:
                    base = dict(HEAD_DIM=d, D_PAD=_d_pad(d), HAS_PREFIX=has_prefix, DOT_PREC=prec)
                    jobs = [
                        (K._fwd_kernel, dict(base, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg.num_warps,
                         cfg.num_stages),
                        (K._bwd_dkdv_kernel, dict(base, BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1),
                         cfg.bwd_num_warps, cfg.bwd_num_stages),
                        (K._bwd_dq_kernel, dict(base, BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2),
                         cfg.bwd_num_warps, cfg.bwd_num_stages),
                    ]
                    if has_prefix == prefix_modes[0]:
                        jobs.append((K._bwd_delta_kernel, dict(HEAD_DIM=d, D_PAD=_d_pad(d), BLOCK_M=cfg.block_m2),
                                     cfg.bwd_num_warps, 1))
                    for fn, const, warps, stages in jobs:
                        name = f"sm{cap[0]}{cap[1]} {dtype} d{d} prefix={has_prefix} {fn.fn.__name__}"
                        try:
                            src = ASTSource(fn, _signature(fn, dtype, const), constexprs=const)
                            k = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                            smem = k.metadata.shared
                            msg = f"{name}: ok, {smem} B shared, {k.metadata.num_warps} warps"
                            if smem > limit:
                                problems.append(f"{name}: needs {smem} B shared memory > {limit}")
                                msg += "  (OVER THE LIMIT)"
                        except Exception as e:  # noqa: BLE001 - report every failing variant
                            msg = f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                            problems.append(msg)
                        if verbose:
                            print(msg, flush=True)
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities, e.g. 90,80,86")
    p.add_argument("--head-dims", default="64,128,256")
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--prefix", choices=["both", "yes", "no"], default="both",
                   help="kernel variants with a cached prefix, without, or both")
    a = p.parse_args(argv)
    caps = [(int(x[0]), int(x[1:])) for x in a.arch.split(",")]
    modes = {"both": (False, True), "yes": (True,), "no": (False,)}[a.prefix]
    problems = compile_all(caps, tuple(int(x) for x in a.head_dims.split(",")), tuple(a.dtypes.split(",")), modes)
    print(f"\n{len(problems)} problem(s)")
    for pr in problems:
        print("  " + pr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
