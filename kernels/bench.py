"""Speed of the Layout-mask attention backends on MoT-realistic packings (reference/attention_kernels.md §5).

``python -m vla_blocks.kernels.bench --tokens 1024,4096,16384 --head-dim 128 --out bench.json``

For each sequence length S (B·S fixed by ``--total``), a pi0-like packing (three 256-token image
blocks, text, a state token and a 50-token noisy action chunk per sample) and a causal-documents
packing are timed through every backend that can run them (triton, flash_attn, xformers, flex,
sdpa), forward and forward+backward, with ``triton.testing.do_bench``. Useful TFLOP/s count the
exact allowed (q, k) pairs P from the metadata (4·B·H·D·P forward, 2.5× that backward); mask
preparation (tile summaries + lists for triton, BlockMask for flex, dense mask for sdpa) is timed
on its own, since every layer of a model reuses it. Results are JSON records, one per
(backend, layout, S, pass). Timing needs CUDA; ``--device cpu`` only smoke-tests the script.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def pi0_like(n_tokens: int):
    from vla_blocks.layout import Layout, Segment

    def sample(n_txt):
        img = [Segment.of("full", "a", 256, "img") for _ in range(3)]
        return img + [Segment.of("causal", "a", n_txt, "txt"), Segment.of("full", "a", 1, "state"),
                      Segment.of("noise", "a", 50, "act")]
    docs, total, i = [], 0, 0
    while True:
        s = sample(40 + 9 * (i % 4))
        n = sum(x.length for x in s)
        if total + n > n_tokens:
            break
        docs.append(s)
        total += n
        i += 1
    if total < n_tokens:
        docs.append([Segment.of("causal", "a", n_tokens - total, "txt")])
    return Layout.from_samples([docs], ["a"])


def causal_docs(n_tokens: int):
    from vla_blocks.layout import Layout, Segment

    lens = [n_tokens // 2, n_tokens // 4, n_tokens - n_tokens // 2 - n_tokens // 4]
    return Layout.from_samples([[[Segment.of("causal", "a", n, "t")] for n in lens if n]], ["a"])


def _timer(device):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return cpu_time


def _prep(backend: str, meta, head_dim: int, dtype, device):
    """Build the per-batch mask structures a backend needs (what every later layer reuses)."""
    from vla_blocks.attention.builtin import flex_block_mask
    from vla_blocks.attention.optional import varlen_plan

    if backend == "triton":
        from vla_blocks.kernels import kernel_meta
        from vla_blocks.kernels.configs import get_config

        cap = torch.cuda.get_device_capability() if device == "cuda" else None
        cfg = get_config(head_dim, str(dtype).replace("torch.", ""), cap, interpreter=device != "cuda")
        km = kernel_meta(meta, 0, cfg.key_align)
        km.lists("kv", cfg.block_m, cfg.block_n)
        km.lists("q", cfg.block_m1, cfg.block_n1)
        km.lists("kv", cfg.block_m2, cfg.block_n2)
    elif backend == "flex":
        flex_block_mask(meta)
    elif backend in ("flash_attn", "xformers"):
        varlen_plan(meta)
        if backend == "xformers":
            meta.dense()
    else:
        meta.dense()


def run(tokens, total, heads, kv_heads, head_dim, dtype, device, backends, layouts):
    from vla_blocks.attention import attention
    from vla_blocks.attention.dispatch import AttentionInputs, get_backend

    bench = _timer(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    records = []
    for S in tokens:
        B = max(1, total // S)
        for lname in layouts:
            one = {"mot": pi0_like, "causal_docs": causal_docs}[lname](S).to(device)
            pairs = one.mask_meta().num_allowed_pairs() * B
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(B, heads, S, head_dim, device=device, dtype=dtype, generator=g)
            k = torch.randn(B, kv_heads, S, head_dim, device=device, dtype=dtype, generator=g)
            v = torch.randn(B, kv_heads, S, head_dim, device=device, dtype=dtype, generator=g)
            do = torch.randn_like(q)
            flops_fwd = 4.0 * heads * head_dim * pairs
            for name in backends:
                def fresh_meta():
                    m = one.mask_meta()
                    return type(m)(*(t.expand(B, -1).contiguous() for t in m.vectors()))
                meta = fresh_meta()
                reasons = get_backend(name).not_supported_reasons(AttentionInputs(q, k, v, meta))
                base = dict(backend=name, layout=lname, S=S, B=B, heads=heads, kv_heads=kv_heads,
                            head_dim=head_dim, dtype=str(dtype), allowed_pairs=pairs,
                            density=pairs / (B * S * S))
                if reasons:
                    records.append(dict(base, skipped="; ".join(reasons)))
                    print(f"{name:10s} {lname:11s} S={S:6d}: skipped ({reasons[0][:80]})", flush=True)
                    continue
                try:
                    sync()
                    t0 = time.perf_counter()
                    _prep(name, meta, head_dim, dtype, device)
                    sync()
                    prep_ms = (time.perf_counter() - t0) * 1e3
                    fwd_ms = bench(lambda: attention(q, k, v, meta, backend=name))
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                    def fwd_bwd():
                        out = attention(qg, kg, vg, meta, backend=name)
                        torch.autograd.grad(out, (qg, kg, vg), do)
                    fb_ms = bench(fwd_bwd)
                except Exception as e:  # noqa: BLE001 - an OOM or compile failure is a result too
                    records.append(dict(base, error=f"{type(e).__name__}: {e}"[:500]))
                    print(f"{name:10s} {lname:11s} S={S:6d}: ERROR {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                bwd_ms = max(fb_ms - fwd_ms, 1e-9)
                rec = dict(base, prep_ms=prep_ms, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                           fwd_tflops=flops_fwd / fwd_ms / 1e9, bwd_tflops=2.5 * flops_fwd / bwd_ms / 1e9)
                records.append(rec)
                print(f"{name:10s} {lname:11s} S={S:6d}: prep {prep_ms:8.2f} ms  fwd {fwd_ms:8.3f} ms "
                      f"({rec['fwd_tflops']:6.1f} TF/s)  fwd+bwd {fb_ms:8.3f} ms ({rec['bwd_tflops']:6.1f} TF/s bwd)",
                      flush=True)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1024,2048,4096,8192,16384")
    p.add_argument("--total", type=int, default=16384, help="B·S held fixed")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default="triton,flash_attn,xformers,flex,sdpa")
    p.add_argument("--layouts", default="mot,causal_docs")
    p.add_argument("--out", default=None, help="write the JSON records here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    records = run([int(x) for x in a.tokens.split(",")], a.total, a.heads, a.kv_heads, a.head_dim,
                  getattr(torch, a.dtype), a.device, a.backends.split(","), a.layouts.split(","))
    env = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "flash_attn", "xformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    if a.device == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"env": env, "records": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main()
