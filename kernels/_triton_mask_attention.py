"""Triton kernels of masked attention over the Layout mask (forward, Delta preprocess, dK/dV, dQ).

Imported lazily by :mod:`vla_blocks.kernels.mask_attention` (importing vla_blocks never imports
triton). ``@triton.jit`` reads ``TRITON_INTERPRET`` at decoration time, and triton's own library
functions are decorated when triton is imported, so the wrapper imports this module in the mode
triton was imported in (compiled for CUDA, or interpreted on the CPU for tests).

Mask evaluation. Each program loads the per-token metadata of its tile once, as [BM] / [BN] vector
loads (``idx``, ``doc`` with validity folded in by the wrapper, ``seg``, ``flags``), and evaluates::

    allowed = doc_q = doc_k ∧ (idx_k ≤ idx_q ∨ (seg_q = seg_k ∧ bidir_q)) ∧ (seg_q = seg_k ∨ ¬noise_k)

on [BM, BN] only for *partial* tiles. The tile lists (per q tile: partial and full kv tiles; per kv
tile: partial and full q tiles for dK/dV) come from the O(N) tile summaries; empty tiles are never
visited, full tiles do no mask work and no bounds checks (a full tile lies inside both sequences).

Key tile space. With a cached prefix the keys are ``prefix ++ suffix`` read through two pointers.
The prefix is padded (in metadata only, with invalid keys) to ``NP_PAD``, a multiple of every
key-tile size, so a key tile lies wholly in the prefix or wholly in the suffix.

Numerics. Scores are scaled by ``scale·log2(e)`` and exponentiated with ``exp2``; the running max
of a row that has seen nothing is -inf and is replaced by 0 before use (``m_safe``), so fully
masked rows end with ``l = 0``: output 0, LSE -inf. The backward receives the LSE in log2 units
with -inf replaced by +inf, so ``exp2(s - lse)`` is exactly 0 on such rows (no NaN).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_mask(qi, qd, qs, qf, ki, kd, ks, kf):
    """The Layout mask on a [BM, BN] tile from [BM] and [BN] metadata vectors."""
    same_seg = qs[:, None] == ks[None, :]
    q_bidir = (qf & 2) != 0
    k_clean = (kf & 4) == 0
    causal = ki[None, :] <= qi[:, None]
    return (qd[:, None] == kd[None, :]) & (causal | (same_seg & q_bidir[:, None])) & (same_seg | k_clean[None, :])


@triton.jit
def _kv_tile_ptrs(j, K_s, V_s, K_p, V_p, s_kn, s_vn, s_kpn, s_vpn, NK, NP, NP_PAD, offs_n, offs_d,
                  BLOCK_N: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Pointers of key tile ``j`` of the key tile space (prefix tiles first), and its row bounds."""
    start = j * BLOCK_N
    loc = start - NP_PAD + offs_n
    k_ptrs = K_s + loc[:, None].to(tl.int64) * s_kn + offs_d[None, :]
    v_ptrs = V_s + loc[:, None].to(tl.int64) * s_vn + offs_d[None, :]
    rows_ok = loc < NK
    if HAS_PREFIX:
        if start < NP_PAD:
            loc = start + offs_n
            k_ptrs = K_p + loc[:, None].to(tl.int64) * s_kpn + offs_d[None, :]
            v_ptrs = V_p + loc[:, None].to(tl.int64) * s_vpn + offs_d[None, :]
            rows_ok = loc < NP
    return k_ptrs, v_ptrs, rows_ok


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, qi, qd, qs, qf, j,
              K_s, V_s, K_p, V_p, s_kn, s_vn, s_kpn, s_vpn, NK, NP, NP_PAD,
              KI, KD, KS, KF, qk_scale, offs_n, offs_d, d_ok,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
              HAS_PREFIX: tl.constexpr, DOT_PREC: tl.constexpr):
    # key tile j of the key tile space: prefix tiles first (inlined: the interpreter pays per jit call)
    start = j * BLOCK_N
    loc = start - NP_PAD + offs_n
    k_ptrs = K_s + loc[:, None].to(tl.int64) * s_kn + offs_d[None, :]
    v_ptrs = V_s + loc[:, None].to(tl.int64) * s_vn + offs_d[None, :]
    rows_ok = loc < NK
    if HAS_PREFIX:
        if start < NP_PAD:
            loc = start + offs_n
            k_ptrs = K_p + loc[:, None].to(tl.int64) * s_kpn + offs_d[None, :]
            v_ptrs = V_p + loc[:, None].to(tl.int64) * s_vpn + offs_d[None, :]
            rows_ok = loc < NP
    if MASKED:  # a partial tile may run past the sequence end
        k = tl.load(k_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:  # a full tile lies inside the sequence
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        kcol = j * BLOCK_N + offs_n  # metadata is indexed in the key tile space (padded past the tile end)
        ki = tl.load(KI + kcol)
        kd = tl.load(KD + kcol)
        ks = tl.load(KS + kcol)
        kf = tl.load(KF + kcol)
        s = tl.where(_tile_mask(qi, qd, qs, qf, ki, kd, ks, kf), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K_s, V_s, K_p, V_p, O, LSE,
                QI, QD, QS, QF, KI, KD, KS, KF,
                PART_CNT, PART_IDX, FULL_CNT, FULL_IDX,
                qk_scale,
                s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                s_kpb, s_kph, s_kpn, s_vpb, s_vph, s_vpn, s_ob, s_oh, s_on,
                H, G, NQ, NK, NP, NP_PAD, NKT, MQ, MK,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_PREFIX: tl.constexpr, DOT_PREC: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < NQ

    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qmeta = b * NQ + offs_m
    qi = tl.load(QI + qmeta, mask=row_ok, other=0)
    qd = tl.load(QD + qmeta, mask=row_ok, other=-2147483648)  # never equals a key's doc
    qs = tl.load(QS + qmeta, mask=row_ok, other=0)
    qf = tl.load(QF + qmeta, mask=row_ok, other=0)

    K_s += b * s_kb + hk * s_kh
    V_s += b * s_vb + hk * s_vh
    if HAS_PREFIX:
        K_p += b * s_kpb + hk * s_kph
        V_p += b * s_vpb + hk * s_vph
    KI += b * NKT
    KD += b * NKT
    KS += b * NKT
    KF += b * NKT

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    lists = b * MQ + pid_m
    n_full = tl.load(FULL_CNT + lists)
    for t in range(0, n_full):
        j = tl.load(FULL_IDX + lists * MK + t)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qi, qd, qs, qf, j,
                                  K_s, V_s, K_p, V_p, s_kn, s_vn, s_kpn, s_vpn, NK, NP, NP_PAD,
                                  KI, KD, KS, KF, qk_scale, offs_n, offs_d, d_ok,
                                  BLOCK_N, False, EVEN_D, HAS_PREFIX, DOT_PREC)
    n_part = tl.load(PART_CNT + lists)
    for t in range(0, n_part):
        j = tl.load(PART_IDX + lists * MK + t)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qi, qd, qs, qf, j,
                                  K_s, V_s, K_p, V_p, s_kn, s_vn, s_kpn, s_vpn, NK, NP, NP_PAD,
                                  KI, KD, KS, KF, qk_scale, offs_n, offs_d, d_ok,
                                  BLOCK_N, True, EVEN_D, HAS_PREFIX, DOT_PREC)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln 2: log2 → ln
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * NQ + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, s_ob, s_oh, s_on, s_dob, s_doh, s_don, H, NQ,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(O · dO) in fp32, [B, H, NQ]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    ok = (offs_m < NQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * s_ob + h * s_oh + rows * s_on + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * s_dob + h * s_doh + rows * s_don + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + (b * H + h) * NQ + offs_m, tl.sum(o * do, 1), mask=offs_m < NQ)


@triton.jit
def _dkdv_tile(dk, dv, k, v, ki, kd, ks, kf, i, Q_h, DO_h, LSE_h, DELTA_h,
               s_qn, s_don, QI, QD, QS, QF, NQ, qk_scale, offs_m, offs_d, d_ok,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    rows = i * BLOCK_M + offs_m
    rows_ok = rows < NQ
    q_ptrs = Q_h + rows[:, None].to(tl.int64) * s_qn + offs_d[None, :]
    do_ptrs = DO_h + rows[:, None].to(tl.int64) * s_don + offs_d[None, :]
    if MASKED:  # a partial tile may run past the sequence end
        q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
    if MASKED:
        lse = tl.load(LSE_h + rows, mask=rows_ok, other=float("inf"))
        delta = tl.load(DELTA_h + rows, mask=rows_ok, other=0.0)
    else:
        lse = tl.load(LSE_h + rows)
        delta = tl.load(DELTA_h + rows)
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
    if MASKED:
        qi = tl.load(QI + rows, mask=rows_ok, other=0)
        qd = tl.load(QD + rows, mask=rows_ok, other=-2147483648)
        qs = tl.load(QS + rows, mask=rows_ok, other=0)
        qf = tl.load(QF + rows, mask=rows_ok, other=0)
        allowed = tl.trans(_tile_mask(qi, qd, qs, qf, ki, kd, ks, kf))
        sT = tl.where(allowed, sT, float("-inf"))
    pT = tl.math.exp2(sT - lse[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K_s, V_s, K_p, V_p, DO, LSE2, DELTA,
                     DK_s, DV_s, DK_p, DV_p,
                     QI, QD, QS, QF, KI, KD, KS, KF,
                     PART_CNT, PART_IDX, FULL_CNT, FULL_IDX,
                     sm_scale, qk_scale,
                     s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                     s_kpb, s_kph, s_kpn, s_vpb, s_vph, s_vpn, s_dob, s_doh, s_don,
                     s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                     s_dkpb, s_dkph, s_dkpn, s_dvpb, s_dvph, s_dvpn,
                     H, HKV, G, NQ, NK, NP, NP_PAD, NKT, MQ, MK, TILE0,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_PREFIX: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per (kv tile, batch, kv head): loops over the q heads of the group and their q tiles.

    Programs cover kv tiles ``TILE0 + program_id(0)``: the launcher skips the prefix tiles when the
    prefix needs no gradient (a detached KV cache), or the suffix tiles when only the prefix does.
    """
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    pid_n = tl.program_id(0) + TILE0
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    k_ptrs, v_ptrs, rows_ok = _kv_tile_ptrs(pid_n, K_s + b * s_kb + hk * s_kh, V_s + b * s_vb + hk * s_vh,
                                       K_p + b * s_kpb + hk * s_kph, V_p + b * s_vpb + hk * s_vph,
                                       s_kn, s_vn, s_kpn, s_vpn, NK, NP, NP_PAD, offs_n, offs_d, BLOCK_N, HAS_PREFIX)
    k = tl.load(k_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    kcol = b * NKT + pid_n * BLOCK_N + offs_n
    ki = tl.load(KI + kcol)
    kd = tl.load(KD + kcol)
    ks = tl.load(KS + kcol)
    kf = tl.load(KF + kcol)
    QI += b * NQ
    QD += b * NQ
    QS += b * NQ
    QF += b * NQ

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    lists = b * MK + pid_n
    n_full = tl.load(FULL_CNT + lists)
    n_part = tl.load(PART_CNT + lists)
    for g in range(0, G):
        h = hk * G + g
        Q_h = Q + b * s_qb + h * s_qh
        DO_h = DO + b * s_dob + h * s_doh
        LSE_h = LSE2 + (b * H + h) * NQ
        DELTA_h = DELTA + (b * H + h) * NQ
        for t in range(0, n_full):
            i = tl.load(FULL_IDX + lists * MQ + t)
            dk, dv = _dkdv_tile(dk, dv, k, v, ki, kd, ks, kf, i, Q_h, DO_h, LSE_h, DELTA_h,
                                s_qn, s_don, QI, QD, QS, QF, NQ, qk_scale, offs_m, offs_d, d_ok,
                                BLOCK_M, False, EVEN_D, DOT_PREC)
        for t in range(0, n_part):
            i = tl.load(PART_IDX + lists * MQ + t)
            dk, dv = _dkdv_tile(dk, dv, k, v, ki, kd, ks, kf, i, Q_h, DO_h, LSE_h, DELTA_h,
                                s_qn, s_don, QI, QD, QS, QF, NQ, qk_scale, offs_m, offs_d, d_ok,
                                BLOCK_M, True, EVEN_D, DOT_PREC)
    dk = dk * sm_scale

    start = pid_n * BLOCK_N
    loc = start - NP_PAD + offs_n
    dk_ptrs = DK_s + b * s_dkb + hk * s_dkh + loc[:, None].to(tl.int64) * s_dkn + offs_d[None, :]
    dv_ptrs = DV_s + b * s_dvb + hk * s_dvh + loc[:, None].to(tl.int64) * s_dvn + offs_d[None, :]
    ok = loc < NK
    if HAS_PREFIX:
        if start < NP_PAD:
            loc = start + offs_n
            dk_ptrs = DK_p + b * s_dkpb + hk * s_dkph + loc[:, None].to(tl.int64) * s_dkpn + offs_d[None, :]
            dv_ptrs = DV_p + b * s_dvpb + hk * s_dvph + loc[:, None].to(tl.int64) * s_dvpn + offs_d[None, :]
            ok = loc < NP
    st_ok = ok[:, None] & d_ok[None, :]
    tl.store(dk_ptrs, dk.to(DK_s.dtype.element_ty), mask=st_ok)
    tl.store(dv_ptrs, dv.to(DV_s.dtype.element_ty), mask=st_ok)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, qi, qd, qs, qf, j,
             K_s, V_s, K_p, V_p, s_kn, s_vn, s_kpn, s_vpn, NK, NP, NP_PAD,
             KI, KD, KS, KF, qk_scale, offs_n, offs_d, d_ok,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
             HAS_PREFIX: tl.constexpr, DOT_PREC: tl.constexpr):
    # key tile j of the key tile space: prefix tiles first (inlined: the interpreter pays per jit call)
    start = j * BLOCK_N
    loc = start - NP_PAD + offs_n
    k_ptrs = K_s + loc[:, None].to(tl.int64) * s_kn + offs_d[None, :]
    v_ptrs = V_s + loc[:, None].to(tl.int64) * s_vn + offs_d[None, :]
    rows_ok = loc < NK
    if HAS_PREFIX:
        if start < NP_PAD:
            loc = start + offs_n
            k_ptrs = K_p + loc[:, None].to(tl.int64) * s_kpn + offs_d[None, :]
            v_ptrs = V_p + loc[:, None].to(tl.int64) * s_vpn + offs_d[None, :]
            rows_ok = loc < NP
    if MASKED:  # a partial tile may run past the sequence end
        k = tl.load(k_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:  # a full tile lies inside the sequence
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        kcol = j * BLOCK_N + offs_n
        ki = tl.load(KI + kcol)
        kd = tl.load(KD + kcol)
        ks = tl.load(KS + kcol)
        kf = tl.load(KF + kcol)
        s = tl.where(_tile_mask(qi, qd, qs, qf, ki, kd, ks, kf), s, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K_s, V_s, K_p, V_p, DO, LSE2, DELTA, DQ,
                   QI, QD, QS, QF, KI, KD, KS, KF,
                   PART_CNT, PART_IDX, FULL_CNT, FULL_IDX,
                   sm_scale, qk_scale,
                   s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                   s_kpb, s_kph, s_kpn, s_vpb, s_vph, s_vpn, s_dob, s_doh, s_don, s_dqb, s_dqh, s_dqn,
                   H, G, NQ, NK, NP, NP_PAD, NKT, MQ, MK,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_PREFIX: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per (q tile, batch, q head): loops over its kv tiles (no atomics: deterministic)."""
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < NQ
    rows = offs_m[:, None].to(tl.int64)

    ld = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows * s_qn + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + rows * s_don + offs_d[None, :], mask=ld, other=0.0)
    lse = tl.load(LSE2 + (b * H + h) * NQ + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * NQ + offs_m, mask=row_ok, other=0.0)
    qmeta = b * NQ + offs_m
    qi = tl.load(QI + qmeta, mask=row_ok, other=0)
    qd = tl.load(QD + qmeta, mask=row_ok, other=-2147483648)
    qs = tl.load(QS + qmeta, mask=row_ok, other=0)
    qf = tl.load(QF + qmeta, mask=row_ok, other=0)

    K_s += b * s_kb + hk * s_kh
    V_s += b * s_vb + hk * s_vh
    if HAS_PREFIX:
        K_p += b * s_kpb + hk * s_kph
        V_p += b * s_vpb + hk * s_vph
    KI += b * NKT
    KD += b * NKT
    KS += b * NKT
    KF += b * NKT

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    lists = b * MQ + pid_m
    n_full = tl.load(FULL_CNT + lists)
    for t in range(0, n_full):
        j = tl.load(FULL_IDX + lists * MK + t)
        dq = _dq_tile(dq, q, do, lse, delta, qi, qd, qs, qf, j,
                      K_s, V_s, K_p, V_p, s_kn, s_vn, s_kpn, s_vpn, NK, NP, NP_PAD,
                      KI, KD, KS, KF, qk_scale, offs_n, offs_d, d_ok,
                      BLOCK_N, False, EVEN_D, HAS_PREFIX, DOT_PREC)
    n_part = tl.load(PART_CNT + lists)
    for t in range(0, n_part):
        j = tl.load(PART_IDX + lists * MK + t)
        dq = _dq_tile(dq, q, do, lse, delta, qi, qd, qs, qf, j,
                      K_s, V_s, K_p, V_p, s_kn, s_vn, s_kpn, s_vpn, NK, NP, NP_PAD,
                      KI, KD, KS, KF, qk_scale, offs_n, offs_d, d_ok,
                      BLOCK_N, True, EVEN_D, HAS_PREFIX, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + rows * s_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
