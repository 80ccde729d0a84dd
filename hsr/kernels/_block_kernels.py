"""Triton kernels of the GPU block index (``search.py``): the block filter and the fused
filter + attention decode. Layout and semantics: the header of ``hsr/kernels/search.py``."""
from __future__ import annotations

import triton
import triton.language as tl

from ._softmax import _dot, _online_softmax_step, _relu_base, _relu_rows_step, _running_max_init, _weights_epilogue

#: radius of a block with no real key: its upper bound is far below any threshold
EMPTY_RADIUS = -1e30
_EMPTY_RADIUS = tl.constexpr(EMPTY_RADIUS)


@triton.jit
def _upper_bounds(q, qn, qsn, CENT, RAD, SRAD, cb, c_ok, offs_d,
                  S: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    # q (ROWS, D), qn (ROWS,), qsn (ROWS, S); block ids cb (NB,) -> ub (ROWS, NB) float32
    cent = tl.load(CENT + cb[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                   mask=c_ok[:, None], other=0.0)
    rad = tl.load(RAD + cb, mask=c_ok, other=_EMPTY_RADIUS)
    offs_s = tl.arange(0, S)
    srad = tl.load(SRAD + cb[:, None].to(tl.int64) * S + offs_s[None, :], mask=c_ok[:, None],
                   other=0.0)
    qc = _dot(q, tl.trans(cent), UPCAST)
    ub_ball = qc + qn[:, None] * rad[None, :]
    ub_sub = qc + tl.sum(qsn[:, None, :] * srad[None, :, :], 2)
    return tl.minimum(ub_ball, ub_sub)


@triton.jit
def _load_group_queries(Q, TAU, tau_scalar, KMAX, ROT, pid_bh, sqb, sqh, sqm, stb, sth, Hq, M,
                        Hkv, slack_rel, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        S: tl.constexpr, TAU_TENSOR: tl.constexpr, ROTATE: tl.constexpr):
    # Program pid_bh's (batch b, kv head hk) and the G*M query rows of that kv head stacked
    # as one tile; their norms, per-subspace norms, thresholds and the filter's rounding slack
    # (SLACK_REL * ||q|| * max||k||).
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    G = Hq // Hkv
    offs_r = tl.arange(0, ROWS)
    r_ok = offs_r < G * M
    head = hk * G + offs_r // M
    mrow = offs_r % M
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * sqb + head[:, None] * sqh + mrow[:, None] * sqm
                + offs_d[None, :], mask=r_ok[:, None], other=0.0)
    qf = q.to(tl.float32)
    qn = tl.sqrt(tl.sum(qf * qf, 1))
    if ROTATE:
        # subspace norms of q R (R orthonormal float32, columns = principal directions)
        DS: tl.constexpr = HEAD_DIM // S
        offs_s = tl.arange(0, S)
        offs_j = tl.arange(0, DS)
        rbase = ROT + (b * Hkv + hk).to(tl.int64) * HEAD_DIM * HEAD_DIM
        qsn = tl.zeros([ROWS, S], tl.float32)
        for si in tl.static_range(S):
            r_s = tl.load(rbase + offs_d[:, None] * HEAD_DIM + si * DS + offs_j[None, :])
            qr = tl.dot(qf, r_s, input_precision="ieee")
            nrm = tl.sqrt(tl.sum(qr * qr, 1))
            qsn = tl.where(offs_s[None, :] == si, nrm[:, None], qsn)
    else:
        qsn = tl.sqrt(tl.sum(tl.reshape(qf * qf, (ROWS, S, HEAD_DIM // S)), 2))
    if TAU_TENSOR:
        tau = tl.load(TAU + b * stb + head * sth + mrow, mask=r_ok, other=float("inf"))
    else:
        tau = tl.where(r_ok, tau_scalar, float("inf"))
    kmax = tl.load(KMAX + b * Hkv + hk)
    thr = tau - slack_rel * qn * kmax
    return b, hk, q, qn, qsn, thr, tau, r_ok, head, mrow


@triton.jit
def _block_filter_kernel(
    Q, TAU, tau_scalar, KMAX, ROT, CENT, RAD, SRAD, FLAGS, UCNT, UIDX,
    sqb, sqh, sqm, stb, sth, Hkv, Hq, M, NB_TOTAL, slack_rel,
    ROWS: tl.constexpr, NB: tl.constexpr, HEAD_DIM: tl.constexpr, S: tl.constexpr,
    TAU_TENSOR: tl.constexpr, ROTATE: tl.constexpr, WRITE_FLAGS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # FLAGS int8 (B, Hq, M, NB_TOTAL): 1 where the block's upper bound >= tau - slack
    # (only with WRITE_FLAGS). Union over the kv head's rows, compacted: UCNT (B*Hkv,) int32
    # (zeroed by the caller) counts, UIDX (B*Hkv, NB_TOTAL) int32 receives the surviving
    # block ids, in no particular order (one atomic per program reserves its slots).
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hk, q, qn, qsn, thr, tau, r_ok, head, mrow = _load_group_queries(
        Q, TAU, tau_scalar, KMAX, ROT, pid_bh, sqb, sqh, sqm, stb, sth, Hq, M, Hkv, slack_rel,
        ROWS, HEAD_DIM, S, TAU_TENSOR, ROTATE)
    cb = pid_c * NB + tl.arange(0, NB)
    c_ok = cb < NB_TOTAL
    base = (b * Hkv + hk).to(tl.int64) * NB_TOTAL
    offs_d = tl.arange(0, HEAD_DIM)
    ub = _upper_bounds(q, qn, qsn, CENT + base * HEAD_DIM, RAD + base, SRAD + base * S,
                       cb, c_ok, offs_d, S, HEAD_DIM, UPCAST)
    surv = ((ub >= thr[:, None]) & r_ok[:, None] & c_ok[None, :]).to(tl.int32)
    if WRITE_FLAGS:
        frow = (b * Hq + head) * M + mrow
        tl.store(FLAGS + frow[:, None].to(tl.int64) * NB_TOTAL + cb[None, :], surv.to(tl.int8),
                 mask=r_ok[:, None] & c_ok[None, :])
    any_row = tl.max(surv, 0)
    n = tl.sum(any_row, 0)
    if n > 0:
        start = tl.atomic_add(UCNT + pid_bh, n)
        slot = start + tl.cumsum(any_row, 0) - any_row
        tl.store(UIDX + pid_bh.to(tl.int64) * NB_TOTAL + slot, cb, mask=any_row > 0)


@triton.jit
def _hsr_decode_kernel(
    Q, TAU, tau_scalar, KMAX, ROT, CENT, RAD, SRAD, KP, VP, POS, OP, LSEP,
    sqb, sqh, sqm, stb, sth, Hkv, Hq, M, NB_TOTAL, NVALID, BLOCKS_PER_SPLIT, BHM,
    qk_scale, bias, slack_rel, visited,
    TAU_TENSOR: tl.constexpr, ROTATE: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
    NB: tl.constexpr, HEAD_DIM: tl.constexpr,
    S: tl.constexpr, KIND: tl.constexpr, ALPHA: tl.constexpr, MASK_TAU: tl.constexpr,
    COUNT: tl.constexpr, UPCAST: tl.constexpr,
):
    # Fused filter + attention for one (split of the block range, batch, kv head):
    # bounds of NB blocks at a time -> for each block that survives for any row of the
    # group: K/V of its C keys once for all G*M query rows. Writes a normalised partial and
    # its lse (softmax) or log(sum of weights) (relu) for _merge_kernel.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hk, q, qn, qsn, thr, tau, r_ok, head, mrow = _load_group_queries(
        Q, TAU, tau_scalar, KMAX, ROT, pid_bh, sqb, sqh, sqm, stb, sth, Hq, M, Hkv, slack_rel,
        ROWS, HEAD_DIM, S, TAU_TENSOR, ROTATE)
    qpos = NVALID - M + mrow
    base = (b * Hkv + hk).to(tl.int64) * NB_TOTAL
    kbase = base * C
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, C)
    offs_nb = tl.arange(0, NB)
    blk_lo = pid_s * BLOCKS_PER_SPLIT
    blk_hi = tl.minimum(blk_lo + BLOCKS_PER_SPLIT, NB_TOTAL)
    m_i = _running_max_init(ROWS, KIND)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    n_vis = 0
    for c0 in range(blk_lo, blk_hi, NB):
        cb = c0 + offs_nb
        c_ok = cb < blk_hi
        ub = _upper_bounds(q, qn, qsn, CENT + base * HEAD_DIM, RAD + base, SRAD + base * S,
                           cb, c_ok, offs_d, S, HEAD_DIM, UPCAST)
        surv = ((ub >= thr[:, None]) & r_ok[:, None] & c_ok[None, :]).to(tl.int32)
        any_row = tl.max(surv, 0)  # (NB,)
        for i in range(0, NB):
            flag = tl.sum(tl.where(offs_nb == i, any_row, 0), 0)
            if flag > 0:
                if COUNT:
                    n_vis += 1
                key = (c0 + i) * C + offs_c
                kt = tl.load(KP + (kbase + key[None, :]) * HEAD_DIM + offs_d[:, None])
                pos = tl.load(POS + kbase + key)
                s = _dot(q, kt, UPCAST)
                keep = (pos[None, :] < NVALID) & (pos[None, :] <= qpos[:, None])
                if MASK_TAU:
                    keep = keep & (s >= tau[:, None])
                vt = tl.load(VP + (kbase + key[:, None]) * HEAD_DIM + offs_d[None, :])
                if KIND == 0:
                    s2 = tl.where(keep, s * qk_scale, float("-inf"))
                    m_i, l_i, acc = _online_softmax_step(s2, vt, m_i, l_i, acc, UPCAST)
                else:
                    m_i, l_i, acc = _relu_rows_step(_relu_base(s, keep, qk_scale, bias), vt, m_i, l_i, acc,
                                                    ALPHA, UPCAST)
    l_safe, lse = _weights_epilogue(m_i, l_i, KIND, ALPHA)
    out = acc / l_safe[:, None]
    prow = (b * Hq + head) * M + mrow
    tl.store(OP + (pid_s * BHM + prow[:, None]).to(tl.int64) * HEAD_DIM + offs_d[None, :],
             out, mask=r_ok[:, None])
    tl.store(LSEP + pid_s * BHM + prow, lse, mask=r_ok)
    if COUNT:
        tl.atomic_add(visited + pid_bh, n_vis)
