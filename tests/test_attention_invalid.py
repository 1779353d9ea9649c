"""Values at invalid keys never reach a valid row, in every backend that runs on CPU.

NaN / +Inf / -Inf written into K and V at the *invalid* key positions of a layout (padding, a masked camera,
a cached prefix's invalid tokens) must leave every valid query row finite and equal to the output with zeros
there (the oracle: the same call with clean zeros, itself checked against the dense formula). A masked weight
is exactly 0, but 0 · NaN is NaN inside ``softmax(QKᵀ)·V``, so a backend must keep those values out.
Backends: dense ``sdpa``, ``sdpa_blocks`` (when registered), ``flex`` (forward), and the Triton kernel under
``TRITON_INTERPRET=1`` (fp32, at most 256 tokens). Malformed k / v shapes are dispatch reasons.
"""

from __future__ import annotations


import pytest
import torch

_CUDA = torch.cuda.is_available()

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vla_blocks.attention import FLAG_VALID, MaskMeta, attention  # noqa: E402
from vla_blocks.attention.dispatch import AttentionInputs, backends, choose_backend  # noqa: E402
from vla_blocks.layout import Layout, Segment  # noqa: E402

from oracles.nn import attention as attention_oracle  # noqa: E402

EXPERTS = ["a", "b"]
POISON = [float("nan"), float("inf"), -float("inf")]


def _triton_runs() -> bool:
    try:
        from vla_blocks.kernels import triton_available
        from vla_blocks.kernels.mask_attention import triton_interpreted
    except ImportError:
        return False
    return triton_available() and (_CUDA or triton_interpreted())


def cpu_backends() -> list[str]:
    names = [b.name for b in backends()]
    out = [n for n in ("sdpa", "sdpa_blocks", "flex") if n in names]
    if "triton" in names and not _CUDA and _triton_runs():
        out.append("triton")
    return out


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if not _CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton backend checks it at dispatch


@st.composite
def layouts_with_invalid_keys(draw, max_tokens: int = 96):
    """Rows of segments (causal / full / noise, per-token validity), at least one invalid and one valid token."""
    rows = draw(st.integers(1, 2))
    samples = []
    for _ in range(rows):
        segs = []
        for i in range(draw(st.integers(1, 4))):
            n = draw(st.integers(1, max_tokens // 4))
            valid = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            segs.append(Segment.of(draw(st.sampled_from(["causal", "full", "noise"])), draw(st.sampled_from(EXPERTS)),
                                   n, f"s{i}", valid=valid))
        samples.append(segs)
    layout = Layout.from_samples(samples, EXPERTS, pack=draw(st.booleans()))
    meta = layout.mask_meta()
    kv = (meta.k_flags & FLAG_VALID) != 0
    if bool(kv.all()):  # make one key invalid: a padding token at the end of row 0
        samples[0].append(Segment.of("causal", "a", 1, "pad", valid=[False]))
        layout = Layout.from_samples(samples, EXPERTS)
    return layout


def _poison(t: torch.Tensor, invalid: torch.Tensor, seed: int) -> torch.Tensor:
    """``t [B, H, N, D]`` with NaN / ±Inf scattered over the rows of the invalid keys ``invalid [B, N]``."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(POISON), t.shape, generator=g)
    bad = torch.tensor(POISON, dtype=t.dtype)[pick]
    return torch.where(invalid[:, None, :, None], bad, t)


def _valid_rows(meta: MaskMeta) -> torch.Tensor:
    return (meta.q_flags & FLAG_VALID) != 0  # [B, Nq]


def _run(name, q, k, v, meta, prefix=None):
    meta = MaskMeta(*meta.vectors())  # a fresh cache: no choice or mask carried between the two calls
    return attention(q, k, v, meta, backend=name, prefix=prefix)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layout=layouts_with_invalid_keys(), heads=st.sampled_from([(2, 2), (2, 1)]), seed=st.integers(0, 10_000),
       which=st.sampled_from(["k", "v", "kv"]))
def test_nonfinite_values_at_invalid_keys_do_not_reach_valid_rows(layout, heads, seed, which):
    meta = layout.mask_meta()
    B, N = layout.batch_size, layout.seq_len
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads[0], N, 16, generator=g)
    k = torch.randn(B, heads[1], N, 16, generator=g)
    v = torch.randn(B, heads[1], N, 16, generator=g)
    invalid = (meta.k_flags & FLAG_VALID) == 0
    zk = k.masked_fill(invalid[:, None, :, None], 0.0)
    zv = v.masked_fill(invalid[:, None, :, None], 0.0)
    bk = _poison(k, invalid, seed) if "k" in which else zk
    bv = _poison(v, invalid, seed + 1) if "v" in which else zv
    rows = _valid_rows(meta)[:, None, :, None].expand(B, heads[0], N, 16)
    ref = attention_oracle(q.double(), zk.double(), zv.double(), meta.dense())
    for name in cpu_backends():
        clean = _run(name, q, zk, zv, meta)
        torch.testing.assert_close(clean.double()[rows], ref[rows], atol=1e-5, rtol=1e-5, msg=name)
        got = _run(name, q, bk, bv, meta)
        assert torch.isfinite(got[rows]).all(), f"{name}: a non-finite value at an invalid key reached a valid row"
        torch.testing.assert_close(got[rows], clean[rows], atol=1e-6, rtol=1e-6, msg=name)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layout=layouts_with_invalid_keys(max_tokens=64), split=st.floats(0.2, 0.8), seed=st.integers(0, 10_000))
def test_invalid_keys_of_a_cached_prefix_do_not_reach_valid_rows(layout, split, seed):
    """The prefix form (``prefix=(k_p, v_p)``, the keys ``prefix ++ k``) with poison in both parts."""
    meta = layout.mask_meta()
    B, N = layout.batch_size, layout.seq_len
    p = max(1, min(N - 1, int(N * split))) if N > 1 else 0
    if p == 0:
        return
    qm = MaskMeta(*(t[:, p:] for t in meta.vectors()[:4]), *meta.vectors()[4:])  # queries: the suffix
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 2, N - p, 16, generator=g)
    k = torch.randn(B, 1, N, 16, generator=g)
    v = torch.randn(B, 1, N, 16, generator=g)
    invalid = (meta.k_flags & FLAG_VALID) == 0
    zk, zv = (t.masked_fill(invalid[:, None, :, None], 0.0) for t in (k, v))
    bk, bv = _poison(k, invalid, seed), _poison(v, invalid, seed + 1)
    rows = _valid_rows(qm)[:, None, :, None].expand(B, 2, N - p, 16)
    for name in cpu_backends():
        clean = _run(name, q, zk[:, :, p:], zv[:, :, p:], qm, prefix=(zk[:, :, :p], zv[:, :, :p]))
        got = _run(name, q, bk[:, :, p:], bv[:, :, p:], qm, prefix=(bk[:, :, :p], bv[:, :, :p]))
        assert torch.isfinite(got[rows]).all(), name
        torch.testing.assert_close(got[rows], clean[rows], atol=1e-6, rtol=1e-6, msg=name)


def test_gradients_stay_finite_and_zero_at_invalid_keys():
    """Backward through sdpa (and sdpa_blocks) with NaN at invalid keys: finite grads everywhere on q and on the
    valid keys, equal to the clean call's; the invalid keys get zero gradient."""
    layout = Layout.from_samples([[Segment.of("full", "a", 6, "img", valid=[True] * 3 + [False] * 3),
                                   Segment.of("causal", "a", 5, "txt", valid=[True, True, True, False, False]),
                                   Segment.of("noise", "b", 4, "act")]], EXPERTS)
    meta = layout.mask_meta()
    N = layout.seq_len
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 8, generator=g) for _ in range(3))
    invalid = (meta.k_flags & FLAG_VALID) == 0
    names = [n for n in ("sdpa", "sdpa_blocks") if n in [b.name for b in backends()]]
    for name in names:
        outs = []
        for kk, vv in ((k.masked_fill(invalid[:, None, :, None], 0), v.masked_fill(invalid[:, None, :, None], 0)),
                       (_poison(k, invalid, 1), _poison(v, invalid, 2))):
            ins = [t.clone().requires_grad_() for t in (q, kk, vv)]
            out = _run(name, *ins, meta)
            rows = _valid_rows(meta)[:, None, :, None].float()
            grads = torch.autograd.grad((out * rows).sum(), ins)
            outs.append((out.detach() * rows, grads))
        (o0, g0), (o1, g1) = outs
        torch.testing.assert_close(o1, o0)
        for a, b in zip(g1, g0):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b)
        assert (g1[1][..., invalid[0], :] == 0).all() and (g1[2][..., invalid[0], :] == 0).all()


@pytest.mark.parametrize("case", ["k_len", "v_len", "kv_heads", "kv_batch", "head_dim", "prefix_len", "prefix_heads"])
def test_kv_shape_mismatches_are_dispatch_reasons(case):
    layout = Layout.from_samples([[Segment.of("causal", "a", 8, "t")]], EXPERTS)
    meta = layout.mask_meta()
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    prefix = None
    qm = meta
    if case == "k_len":
        k = k[:, :, :6]
    elif case == "v_len":
        v = v[:, :, :6]
    elif case == "kv_heads":
        v = v[:, :1]
    elif case == "kv_batch":
        v = torch.cat([v, v])
    elif case == "head_dim":
        k = k[..., :8]
    else:  # a prefix of 3 keys whose v part disagrees with its k part
        qm = MaskMeta(*(t[:, 3:] for t in meta.vectors()[:4]), *meta.vectors()[4:])
        q, k, v = q[:, :, 3:], k[:, :, 3:], v[:, :, 3:]
        kp, vp = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
        prefix = (kp, vp[:, :, :2]) if case == "prefix_len" else (kp, vp[:, :1])
    inp = AttentionInputs(q, k, v, qm, prefix)
    assert inp.common_reasons(), case
    with pytest.raises(ValueError, match="malformed"):
        choose_backend(inp)
    with pytest.raises(ValueError, match="malformed"):
        attention(q, k, v, qm, prefix=prefix)
