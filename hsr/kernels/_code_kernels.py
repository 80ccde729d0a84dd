"""Triton kernels of the GPU code filter (:class:`hsr.kernels.CodeKVCache`).

Every kernel reads the cache's length from the device (``LENS``, int32 ``(B*Hkv,)``, one
entry per (batch, kv head)) and sizes nothing from it on the host: grids come from the
capacity, programs past the length exit early, so one captured CUDA graph replays at every
length up to the capacity (as paged decode kernels take their sequence lengths as a tensor).

Kernels (a decode step is three launches: ``_prepare_kernel`` — the add and the query's
rotation —, ``_code_filter_kernel`` with ``ATTEND`` — filter and attend —, and the merge of
the partials; :meth:`~hsr.kernels.CodeKVCache.plan` and ``run`` launch them apart):

``_code_add_kernel``, grid (B*Hkv, tiles of new tokens)
    Writes the new keys and values at the device-side position ``LENS[bh]``, rotates them
    (fp32, ieee), quantises to int8 codes with one fp32 step per key, bounds the residual
    with a rounding slack that keeps the bound sound (docs/codes.md, "The add kernel's
    bound"), raises the head's largest norm and error (``MAXN``, ``MAXE``: fp32 upper
    bounds, atomic max) and, when one program covers the new tokens, advances ``LENS``.
    Reads and writes ``t * (2 * 2D + DP + 8)`` bytes per head: microseconds.

``_prepare_kernel``, grid (B*Hkv, DP / 32 (+ 1 with an add))
    Rotates the group's query rows into ``QR`` (a column block per program); with ``ADD``,
    one more program per head (``APART``; else the first) adds its tokens as
    ``_code_add_kernel`` does.

``_code_filter_kernel``, a persistent grid (programs per (batch, kv head) from the capacity)
    Rotates the group's query rows itself (``ROTATE``) or reads them from ``QR`` (the
    default: measured faster on an H200), splits them into two int8 parts, thresholds once,
    then strides over the key tiles below the length, reading ``DP + 8`` bytes per key, and
    appends the survivors of any row of the group to the program's own segment. With
    ``ATTEND`` it then attends that segment and writes one partial per program. With ``ADD``
    (and ``ATTEND``; where ``CodeKVCache.step_form`` picks two launches) program 0 of each head adds
    the step's tokens instead of ``_prepare_kernel`` and attends them from their exact scores
    (``_add_then_attend``), while the others filter the keys below the length (which the
    merge then advances): no launch waits for the add's chain.

``_code_attend_kernel``, grid (splits, B*Hkv)
    Gathers the survivors' K and V (``DENSE``: every key below the length, no filter: the
    fallback where the filter costs more than it saves), keeps ``score >= tau`` (fp32-accumulated scores) and the
    causal limit, accumulates softmax (online) or ReLU^alpha. A row whose inputs it must not
    trust gets NaN (never a finite wrong answer) and a bit in ``STATUS`` (see ``BAD_*``).

``_score_all_kernel``, grid (capacity tiles, B*Hkv), ``_topk_gather_kernel``, grid (splits, rows),
and ``_topk_attend_kernel``, grid (splits, B*Hkv)
    The top-k mode (no filter): every visible key's fp32 score into a (rows, capacity)
    buffer, then, after ``_select.select_kth`` found each row's k-th best and the keys that
    reach it, softmax over those keys (the gather reads only the listed keys; the certified
    form scans every score for the dropped terms), reading only the kept keys' values.

``_certify_kernel``, grid (rows / 32,)
    Turns each row's dropped-term sum and lse into the certificate (``_code_plan.dropped_terms``
    and ``certified_share``, in one pass).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._softmax import (_online_softmax_step, _online_softmax_step_row, _pdl_enter, _relu_base, _relu_rows_step,
                       _running_max_init, _weights_epilogue)

#: bits of the cache's device status word (``CodeKVCache.status``), set by the kernels
BAD_Q = 1          # a query row holds NaN or Inf
BAD_TAU = 2        # a threshold is NaN
BAD_BIAS = 4       # a ReLU bias is NaN or Inf
BAD_KV = 8         # an added key or value holds NaN or Inf (sticky: the cache is poisoned)
BAD_RANGE = 16     # |q| |k| beyond the fp32 bounds of the filter (~1e37)
BAD_FULL = 32      # an add past the capacity (a replayed graph): nothing written (sticky: poisoned)

# their constexpr twins, for use inside kernels
_BAD_Q = tl.constexpr(BAD_Q)
_BAD_TAU = tl.constexpr(BAD_TAU)
_BAD_BIAS = tl.constexpr(BAD_BIAS)
_BAD_KV = tl.constexpr(BAD_KV)
_BAD_RANGE = tl.constexpr(BAD_RANGE)
_BAD_FULL = tl.constexpr(BAD_FULL)


@triton.jit
def _load_rows(X, x_scalar, s_xb, s_xh, s_xm, b, head, mrow, r_ok, fill, X_TENSOR: tl.constexpr):
    # one value per query row from a (B, Hq, M)-strided tensor (or a scalar): tau or bias
    if X_TENSOR:
        x = tl.load(X + b.to(tl.int64) * s_xb + head * s_xh + mrow * s_xm, mask=r_ok, other=fill)
    else:
        x = tl.where(r_ok, x_scalar, fill)
    return x.to(tl.float32)


@triton.jit
def _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS: tl.constexpr, D: tl.constexpr):
    # the G*M query rows of kv head h of batch b as one (ROWS, D) tile (rows past G*M: zeros)
    offs_r = tl.arange(0, ROWS)
    r_ok = offs_r < G * M
    head = h * G + offs_r // M
    mrow = offs_r % M
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b.to(tl.int64) * s_qb + head[:, None].to(tl.int64) * s_qh + mrow[:, None] * s_qm
                + offs_d[None, :], mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return q, r_ok, head, mrow


@triton.jit
def _bad_rows(q, tau, r_ok, maxn):
    """Per query row, the ``BAD_*`` bits its inputs earn: a non-finite entry of q, a NaN
    threshold, or ``|q| max|k|`` past the fp32 range of the bounds (which would drop keys)."""
    qf = q.to(tl.float32)
    q_bad = tl.sum(tl.where(tl.abs(qf) < float("inf"), 0, 1), 1) > 0  # NaN fails the comparison too
    qn = tl.sqrt(tl.sum(qf * qf, 1))
    range_bad = (qn * maxn >= 1e37) & ~q_bad
    code = tl.where(q_bad, _BAD_Q, 0) | tl.where(tau != tau, _BAD_TAU, 0) | tl.where(range_bad, _BAD_RANGE, 0)
    return tl.where(r_ok, code, 0)


@triton.jit
def _rotate_rows(Q, s_qb, s_qh, s_qm, b, head, mrow, r_ok, ROT,
                 ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_K: tl.constexpr):
    # the group's rows times ROT^T -> (ROWS, DP) fp32, accumulated over BLOCK_K-wide slices of
    # the head dim (small register tiles; ieee fp32: its rounding is bounded for any summation
    # order and is a term of the filter's slack); columns past HEAD_DIM are zeros
    offs_j = tl.arange(0, DP)
    acc = tl.zeros([ROWS, DP], tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, BLOCK_K):
        offs_k = d0 + tl.arange(0, BLOCK_K)
        qb = tl.load(Q + b.to(tl.int64) * s_qb + head[:, None].to(tl.int64) * s_qh + mrow[:, None] * s_qm
                     + offs_k[None, :], mask=r_ok[:, None], other=0.0)
        rb = tl.load(ROT + offs_j[:, None] * HEAD_DIM + offs_k[None, :], mask=offs_j[:, None] < HEAD_DIM, other=0.0)
        acc += tl.dot(qb.to(tl.float32), tl.trans(rb), input_precision="ieee")
    return acc


@triton.jit
def _butterfly(x, ROWS: tl.constexpr, D: tl.constexpr, H: tl.constexpr):
    # one stage of the fast Walsh-Hadamard transform of each row: entries j and j + H of every
    # block of 2H become their sum and difference
    y = tl.permute(tl.reshape(x, (ROWS, D // (2 * H), 2, H)), (0, 1, 3, 2))
    a, b = tl.split(y)
    y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(y, (ROWS, D))


@triton.jit
def _hadamard_rows(q, SIGNS, ROT, ROWS: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr):
    # rows (ROWS, D) times ROT^T for a Hadamard ROT = c H diag(signs) (CodeKVCache(rotation=
    # "hadamard")): c * H (signs * q) by log2(D) butterfly stages, no matrix read. c is the
    # stored entries' magnitude (exact); the fp32 error, (log2(D) + 1) u |q| at most, is far
    # below the dense product's 1.01 D sqrt(D) u |q| that the filter's slack allows for
    x = q.to(tl.float32) * tl.load(SIGNS + tl.arange(0, D))[None, :]
    for s in tl.static_range(LOG_D):
        x = _butterfly(x, ROWS, D, 1 << s)
    return x * tl.abs(tl.load(ROT))


@triton.jit
def _rotate_columns(Q, ROT, QR, s_qb, s_qh, s_qm, G, M, Hkv, pid, pid_j,
                    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_J: tl.constexpr):
    # QR fp32 (B*Hkv, ROWS, DP) = the group's query rows times ROT^T, columns [pid_j*BLOCK_J, ...)
    # of kv head pid: the filter's rotation, done before it (measured faster than inside it)
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, pid // Hkv, pid % Hkv, G, M, ROWS, HEAD_DIM)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    r = tl.load(ROT + offs_j[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_j[:, None] < HEAD_DIM, other=0.0)
    qr = tl.dot(q.to(tl.float32), tl.trans(r), input_precision="ieee")
    offs_r = tl.arange(0, ROWS)
    tl.store(QR + (pid.to(tl.int64) * ROWS + offs_r)[:, None] * DP + offs_j[None, :], qr)


@triton.jit
def _round_half(x):
    return tl.minimum(tl.maximum(tl.floor(x + 0.5), -127.0), 127.0)


@triton.jit
def _query_parts(qr, q, tau, r_ok, maxn, maxe, defect, HEAD_DIM: tl.constexpr):
    """Split rotated rows ``qr (ROWS, DP)`` into two int8 parts ``a1 i1 + a2 i2`` and return
    them with the threshold ``tau - slack`` per row (docs/codes.md: every fp32 rounding on
    the way is a term of the slack). ``q (ROWS, D)`` gives the norms; ``maxn``/``maxe`` are
    fp32 upper bounds of the head's largest key norm and key error."""
    a1 = tl.max(tl.abs(qr), 1) / 127.0
    a1 = tl.where(a1 > 0.0, a1, 1.0)
    i1 = _round_half(qr / a1[:, None])
    r1 = qr - a1[:, None] * i1
    a2 = tl.max(tl.abs(r1), 1) / 127.0
    a2 = tl.where(a2 > 0.0, a2, 1.0)
    i2 = _round_half(r1 / a2[:, None])
    rq = r1 - a2[:, None] * i2
    up = 1.0 + 1e-5  # covers the rounding of the norms themselves
    r1n = tl.sqrt(tl.sum(r1 * r1, 1))
    rqn = tl.sqrt(tl.sum(rq * rq, 1)) * up + 2.4e-7 * r1n  # fp32 rounding of rq: 2^-22 |r1|
    qf = q.to(tl.float32)
    qn = tl.sqrt(tl.sum(qf * qf, 1)) * up
    qrn = tl.sqrt(tl.sum(qr * qr, 1)) * up
    # >= max_j s_j ||c_j||: ||s c|| <= ||R k (fp32)|| + err <= (1 + defect)(1 + 1e-3) ||k|| + err
    w = (1.0 + defect) * (1.0 + 1e-3) * maxn + maxe
    u = 5.9604645e-08  # 2^-24
    dd = HEAD_DIM * 1.0
    slack = (rqn * w                                   # the query's int8 residual
             + 1.01 * dd * tl.sqrt(dd) * u * qn * w    # fp32 rotation of the query
             + 16.0 * u * (qrn * w + qn * maxe)        # fp32 bound arithmetic in the filter
             + 4.0 * dd * u * qn * maxn                # the kernels' fp32-accumulated score
             + 1e-30) * 1.001
    thr = tau - slack
    thr = thr - 2.4e-7 * (tl.abs(tau) + slack)  # the subtraction's own rounding
    thr = tl.where(r_ok, thr, float("inf"))
    return i1, i2, a1, a2, qn, thr


@triton.jit
def _rotate_key(kf, ROT, j0, HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr):
    # columns [j0, j0 + BLOCK_J) of ROT k for one key kf (D,) fp32, as a broadcast product and
    # a row sum (a (BLOCK_J, D) tile: no tensor-core dot for one row, no large register tile)
    offs_j = j0 + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    r = tl.load(ROT + offs_j[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_j[:, None] < HEAD_DIM, other=0.0)
    return tl.sum(r * kf[None, :], 1), offs_j


@triton.jit
def _code_add_kernel(KN, VN, K, V, CODES, SCALE, ERR, MAXN, MAXE, LENS, STATUS, ROT, T, PER_PROG,
                     s_nb, s_nh, s_nt, s_wb, s_wh, s_wt, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                     s_cb, s_ch, s_cn, s_sb, s_sh, Hkv, defect, CAP,
                     HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_J: tl.constexpr,
                     HAS_V: tl.constexpr, UPDATE_LEN: tl.constexpr):
    # program (bh, p) adds tokens [p * PER_PROG, (p + 1) * PER_PROG) of head bh (_add_tokens)
    _add_tokens(KN, VN, K, V, CODES, SCALE, ERR, MAXN, MAXE, LENS, STATUS, ROT, T, PER_PROG, tl.program_id(0),
                tl.program_id(1), s_nb, s_nh, s_nt, s_wb, s_wh, s_wt, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                s_cb, s_ch, s_cn, s_sb, s_sh, Hkv, defect, CAP, HEAD_DIM, DP, BLOCK_J, HAS_V, UPDATE_LEN)


@triton.jit
def _prepare_kernel(KN, VN, K, V, CODES, SCALE, ERR, MAXN, MAXE, LENS, STATUS, ROT, T, PER_PROG,
                    s_nb, s_nh, s_nt, s_wb, s_wh, s_wt, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                    s_cb, s_ch, s_cn, s_sb, s_sh, Hkv, defect, CAP,
                    Q, QR, s_qb, s_qh, s_qm, G, M,
                    HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_J: tl.constexpr, HAS_V: tl.constexpr,
                    ADD: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, APART: tl.constexpr,
                    PDL: tl.constexpr):
    # A decode step's first launch, grid (B*Hkv, DP // BLOCK_R (+ 1 with APART)): program
    # (bh, j) rotates columns [j*BLOCK_R, ...) of kv head bh's query rows into QR
    # (_rotate_columns); with ADD, program (bh, 0) also adds the T new tokens of head bh
    # (PER_PROG = T <= 64: one program per head), or with APART the extra last program of the
    # head adds them and rotates nothing (the add's chain then does not wait on a rotation).
    # The two are independent (the filter, next launch, reads both), so the add runs beside
    # the other columns' rotations instead of in a launch of its own.
    if PDL:  # a programmatic dependent launch: the step before may still be finishing
        _pdl_enter()
    pid_bh = tl.program_id(0)
    pid_j = tl.program_id(1)
    add_here = pid_j == (DP // BLOCK_R if APART else 0)
    if ADD:
        if add_here:
            _add_tokens(KN, VN, K, V, CODES, SCALE, ERR, MAXN, MAXE, LENS, STATUS, ROT, T, PER_PROG, pid_bh, 0,
                        s_nb, s_nh, s_nt, s_wb, s_wh, s_wt, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                        s_cb, s_ch, s_cn, s_sb, s_sh, Hkv, defect, CAP, HEAD_DIM, DP, BLOCK_J, HAS_V, True)
    if (not APART) or (pid_j < DP // BLOCK_R):
        _rotate_columns(Q, ROT, QR, s_qb, s_qh, s_qm, G, M, Hkv, pid_bh, pid_j, ROWS, HEAD_DIM, DP, BLOCK_R)


@triton.jit
def _add_tokens(KN, VN, K, V, CODES, SCALE, ERR, MAXN, MAXE, LENS, STATUS, ROT, T, PER_PROG, pid_bh, pid_t,
                s_nb, s_nh, s_nt, s_wb, s_wh, s_wt, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                s_cb, s_ch, s_cn, s_sb, s_sh, Hkv, defect, CAP,
                HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_J: tl.constexpr,
                HAS_V: tl.constexpr, UPDATE_LEN: tl.constexpr):
    # KN, VN (B, Hkv, T, D) new keys / values in the cache's dtype, written at LENS[bh] + t;
    # this program takes tokens [pid_t * PER_PROG, (pid_t + 1) * PER_PROG). Codes
    # c = round(x / s) with x = ROT k in fp32 and s = max|x| / 127; the error bound
    #   err >= (1 + defect) ||R k - s c|| + defect ||k||   (R k exact, R = ROT)
    # from the fp32 quantities (docs/codes.md, "The add kernel's bound").
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    start = tl.load(LENS + pid_bh)
    offs_d = tl.arange(0, HEAD_DIM)
    u = 5.9604645e-08  # 2^-24
    dd = HEAD_DIM * 1.0
    big = 1.0 + (2.0 * dd + 32.0) * u
    rot_err = 1.01 * u * (1.0 + defect) + 1.01 * dd * u * tl.sqrt(dd * (1.0 + defect))
    top_n = 0.0
    top_e = 0.0
    nbad = 0
    t0 = pid_t * PER_PROG
    # past the capacity (a graph replayed once too often): write nothing, poison the cache
    full = start + T > CAP
    for t in range(t0, tl.where(full, t0, tl.minimum(t0 + PER_PROG, T))):
        pos = (start + t).to(tl.int64)
        k = tl.load(KN + b.to(tl.int64) * s_nb + h * s_nh + t * s_nt + offs_d)
        tl.store(K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + pos * s_kn + offs_d, k)
        kf = k.to(tl.float32)
        nbad += tl.sum(tl.where(tl.abs(kf) < float("inf"), 0, 1), 0)  # NaN fails the comparison too
        if HAS_V:
            v = tl.load(VN + b.to(tl.int64) * s_wb + h * s_wh + t * s_wt + offs_d)
            tl.store(V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + pos * s_vn + offs_d, v)
            nbad += tl.sum(tl.where(tl.abs(v.to(tl.float32)) < float("inf"), 0, 1), 0)
        cbase = CODES + b.to(tl.int64) * s_cb + h.to(tl.int64) * s_ch + pos * s_cn
        if BLOCK_J == DP:  # the whole rotation in one tile: one pass
            x, offs_j = _rotate_key(kf, ROT, 0, HEAD_DIM, BLOCK_J)
            step = tl.max(tl.abs(x), 0) / 127.0
            inv = tl.where(step > 0.0, 1.0 / tl.where(step > 0.0, step, 1.0), 0.0)
            c = _round_half(x * inv)
            res = (x - step * c) * inv  # the residual in units of the step: no overflow, no underflow
            res2 = tl.sum(res * res, 0)
            tl.store(cbase + offs_j, c.to(tl.int8))
        else:
            # ---- pass 1: the rotated key's largest magnitude, a column block at a time
            amax = 0.0
            for j0 in tl.static_range(0, DP, BLOCK_J):
                x, offs_j = _rotate_key(kf, ROT, j0, HEAD_DIM, BLOCK_J)
                amax = tl.maximum(amax, tl.max(tl.abs(x), 0))
            step = amax / 127.0
            inv = tl.where(step > 0.0, 1.0 / tl.where(step > 0.0, step, 1.0), 0.0)
            # ---- pass 2: codes and the residual; the products are recomputed: a code is
            # measured against the residual it leaves
            res2 = 0.0
            for j0 in tl.static_range(0, DP, BLOCK_J):
                x, offs_j = _rotate_key(kf, ROT, j0, HEAD_DIM, BLOCK_J)
                c = _round_half(x * inv)
                res = (x - step * c) * inv
                res2 += tl.sum(res * res, 0)
                tl.store(cbase + offs_j, c.to(tl.int8))
        # ---- the bound: every fp32 rounding above is covered (docs/codes.md); norms scaled by
        # the largest entry so keys of any magnitude neither overflow nor underflow
        kmax = tl.max(tl.abs(kf), 0)
        ks = kf / tl.where(kmax > 0.0, kmax, 1.0)
        kn = kmax * tl.sqrt(tl.sum(ks * ks, 0))
        # 1e-36: the absolute error of products below fp32's normal range
        err = big * ((1.0 + defect) * step * tl.sqrt(res2) + kn * ((1.0 + defect) * rot_err + defect)) + 1e-36
        tl.store(SCALE + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh + pos, step)
        tl.store(ERR + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh + pos, err)
        top_n = tl.maximum(top_n, kn * big)
        top_e = tl.maximum(top_e, err)
    tl.atomic_or(STATUS, tl.where(nbad > 0, _BAD_KV, 0), mask=nbad > 0)
    tl.atomic_or(STATUS, _BAD_FULL, mask=full)
    tl.atomic_max(MAXN + pid_bh, top_n)
    tl.atomic_max(MAXE + pid_bh, top_e)
    if UPDATE_LEN:  # the only program of this head: nobody else reads LENS[bh] in this launch
        tl.store(LENS + pid_bh, tl.where(full, start, start + T))


@triton.jit
def _code_filter_kernel(Q, ROT, SIGNS, QR, TAU, tau_scalar, MAXN, MAXE, CODES, SCALE, ERR, COUNT, SURV, LENS, STATUS,
                        REM, K, V, BIAS, bias_scalar, O_PART, L_PART, KN, VN,
                        s_qb, s_qh, s_qm, s_tb, s_th, s_tm, s_cb, s_ch, s_cn, s_sb, s_sh,
                        s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_bb, s_bh, s_bm, s_nb, s_nh, s_nt, s_wb, s_wh, s_wt,
                        G, M, Hkv, SURV_STRIDE, SEG, defect, NPROG, BHM, qk_scale, scale, T, CAP,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        DP: tl.constexpr, TAU_TENSOR: tl.constexpr, UPCAST: tl.constexpr,
                        ROTATE: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                        CERTIFY: tl.constexpr, ATTEND: tl.constexpr, KIND: tl.constexpr, ALPHA: tl.constexpr,
                        BIAS_TENSOR: tl.constexpr, BLOCK_A: tl.constexpr, GROUP: tl.constexpr,
                        PDL: tl.constexpr, ADD: tl.constexpr, HADAMARD: tl.constexpr, LOG_D: tl.constexpr):
    # CERTIFY: REM (B*Hq*M,) fp32 += sum over the keys no row of the group keeps of
    # exp(scale * (ub - thr)) >= exp(scale * (score - tau)) (qk_scale = scale * log2(e))
    # ATTEND (filter and attend fused): each program then attends its own survivors, as
    # _code_attend_kernel does a split, and writes partial NPROG-indexed pid_n to O_PART,
    # L_PART (NPROG, BHM, ...): one launch and one pass over the survivor lists fewer
    # A persistent grid: NPROG programs per (batch, kv head) rotate the group's rows (or read
    # them from QR), derive their int8 parts and thresholds once, then stride over the key
    # tiles below LENS[bh] (pipelined loads). Program p appends the survivors of any row to
    # its own segment SURV[bh, p*SEG : (p+1)*SEG] (int32, ascending positions) and writes
    # their number to COUNT[bh, p]: no atomics (thousands of tiles of one head would contend
    # on one counter) and a deterministic survivor order.
    # PDL: launched as a programmatic dependent launch, its programs are resident (their launch
    # latency hidden) while the first launch still runs; they wait here for it to end. (Asking
    # L2 for their first tiles before the wait, while the memory is idle, measured no faster:
    # step 47.2 against 47.3 us at 128K, B 1, H100; bench/results/step_variants_h100_2026-12-06_pdl.json.)
    # ADD (with ATTEND; a decode step's T <= 64 new tokens): program 0 of each head adds them
    # at LENS (_add_then_attend) and the filter programs are 1..NPROG. The filter programs scan
    # the keys below LENS, the old length (the merge, next launch, advances it), and the add's
    # program attends the new tokens itself from their exact scores, so no filter program
    # waits for the add's chain (load, rotate, quantise, bound, atomics). Maxima the add may
    # raise meanwhile still bound the keys below the old length.
    if PDL:
        _pdl_enter()
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    if ADD:
        if pid_n == 0:
            # (the add's program compiled as a function apart, noinline, to see whether its inlined
            # branch slows the filter programs: no faster, 49.8 against 50.9 us at 128K B 1 (three
            # launches 47.0), 19.8 against 19.9 at 16K; step_variants_h100_2026-12-06_apart.json)
            _add_then_attend(Q, TAU, tau_scalar, BIAS, bias_scalar, KN, VN, K, V, CODES, SCALE, ERR, MAXN, MAXE, LENS,
                             STATUS, ROT, REM, O_PART, L_PART, T, pid_bh, b, h,
                             s_qb, s_qh, s_qm, s_tb, s_th, s_tm, s_bb, s_bh, s_bm, s_nb, s_nh, s_nt, s_wb, s_wh, s_wt,
                             s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_cb, s_ch, s_cn, s_sb, s_sh,
                             G, M, Hkv, defect, CAP, BHM, qk_scale, scale, ROWS, HEAD_DIM, DP, TAU_TENSOR,
                             BIAS_TENSOR, BLOCK_A, KIND, ALPHA, UPCAST, CERTIFY, GROUP)
            return
    N = tl.load(LENS + pid_bh)
    part = pid_n  # this program's partial
    if ADD:
        pid_n = pid_n - 1  # its segment of the survivor lists
    offs_d = tl.arange(0, DP)
    offs_r = tl.arange(0, ROWS)
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS, HEAD_DIM)
    if ROTATE and HADAMARD:  # (DP == HEAD_DIM)
        qr = _hadamard_rows(q, SIGNS, ROT, ROWS, HEAD_DIM, LOG_D)
    elif ROTATE:
        qr = _rotate_rows(Q, s_qb, s_qh, s_qm, b, head, mrow, r_ok, ROT, ROWS, HEAD_DIM, DP, BLOCK_K)
    else:
        qr = tl.load(QR + (pid_bh.to(tl.int64) * ROWS + offs_r)[:, None] * DP + offs_d[None, :])
    tau = _load_rows(TAU, tau_scalar, s_tb, s_th, s_tm, b, head, mrow, r_ok, 0.0, TAU_TENSOR)
    maxn = tl.load(MAXN + pid_bh)
    worst = tl.max(_bad_rows(q, tau, r_ok, maxn), 0)
    tl.atomic_or(STATUS, worst, mask=(worst > 0) & (pid_n == 0))
    i1, i2, a1, a2, qn, thr = _query_parts(qr, q, tau, r_ok, maxn, tl.load(MAXE + pid_bh), defect, HEAD_DIM)
    if UPCAST:
        q1 = i1
        q2 = i2
    else:
        q1 = i1.to(tl.int8)
        q2 = i2.to(tl.int8)
    cbase = CODES + b.to(tl.int64) * s_cb + h.to(tl.int64) * s_ch
    sbase = b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh
    obase = SURV + pid_bh.to(tl.int64) * SURV_STRIDE + pid_n.to(tl.int64) * SEG
    n_tiles = tl.cdiv(N, BLOCK_N)
    found = 0
    limit = N + T - M + mrow  # causal: keys past a row's position are not in its softmax at all
    rem = tl.zeros([ROWS], tl.float32)
    # (the full tiles without masks and their offsets shared, the partial one after them: 17%
    # fewer instructions a tile on sm_90, measured slower: 48.3 against 47.6 us at 128K B 1,
    # 22.2 against 20.7 at 16K, 246.7 against 241.1 at B 8; step_variants_h100_2026-12-06_hoist.json)
    # (two tiles an iteration, two independent chains for the latency-bound B 1 filter, 196
    # registers: measured slower at d 128, 52.0 against 46.6 us at 128K B 1, 22.6 against 20.9
    # at 16K, 266.7 against 240.9 at B 8; 1.2 us faster at d 64 128K B 1 only;
    # step_variants_h100_2026-12-06_tiles.json)
    for tile in tl.range(pid_n, n_tiles, NPROG, num_stages=STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        c = tl.load(cbase + offs_n[:, None].to(tl.int64) * s_cn + offs_d[None, :], mask=n_ok[:, None], other=0)
        # (rows, keys): an M of 16 rows, the older MMA. The other way round, codes @ parts^T with
        # the keys as M (Hopper's warpgroup MMA reading the staged codes from shared memory),
        # measured slower at B 1: 50.3 against 47.2 us at 128K, 22.4 against 20.4 at 16K; 1% faster
        # at B 8 (H100, bench/results/step_variants_h100_2026-12-06_codes_first.json)
        if UPCAST:  # the interpreter's int8 matmul would wrap: integer-valued fp32 sums are exact
            p1 = tl.dot(q1, tl.trans(c.to(tl.float32)), input_precision="ieee")
            p2 = tl.dot(q2, tl.trans(c.to(tl.float32)), input_precision="ieee")
        else:
            p1 = tl.dot(q1, tl.trans(c)).to(tl.float32)  # exact int32, |.| < 2^24
            p2 = tl.dot(q2, tl.trans(c)).to(tl.float32)
        s = tl.load(SCALE + sbase + offs_n, mask=n_ok, other=0.0)
        e = tl.load(ERR + sbase + offs_n, mask=n_ok, other=0.0)
        ub = s[None, :] * (a1[:, None] * p1 + a2[:, None] * p2) + qn[:, None] * e[None, :]
        hit = tl.where(ub >= thr[:, None], 1, 0)
        keep = (tl.max(hit, 0) > 0) & n_ok
        keep_i = keep.to(tl.int32)
        pos = found + tl.cumsum(keep_i, 0) - 1
        tl.store(obase + pos, offs_n, mask=keep)
        found += tl.sum(keep_i, 0)
        if CERTIFY:  # keys no row keeps: score - tau <= ub - thr < 0 (thr absorbs every rounding)
            out = n_ok[None, :] & ~keep[None, :] & (offs_n[None, :] <= limit[:, None])
            rem += tl.sum(tl.where(out, tl.exp2((ub - thr[:, None]) * qk_scale), 0.0), 1)
    tl.store(COUNT + pid_bh * NPROG + pid_n, found)
    row = (b * Hkv * G + head).to(tl.int64) * M + mrow
    if ATTEND:
        # the survivors this program wrote above, read back by all of its threads: a barrier
        # makes the segment's stores visible (to the block; no other program reads it)
        tl.debug_barrier()
        bias = _load_rows(BIAS, bias_scalar, s_bb, s_bh, s_bm, b, head, mrow, r_ok, 0.0, BIAS_TENSOR)
        row_bad, gap, m_i, l_i, acc, _unused = _attend_setup(q, tau, bias, r_ok, maxn, STATUS, pid_n == 0,
                                                             ROWS, HEAD_DIM, KIND)
        kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
        vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
        m_i, l_i, acc, rem = _attend_list(q, obase, found, kbase, vbase, s_kn, s_vn, tau, bias, limit, r_ok,
                                          m_i, l_i, acc, rem, gap, qk_scale, scale, BLOCK_A, HEAD_DIM, KIND, ALPHA,
                                          UPCAST, CERTIFY, GROUP)
        _store_partial(m_i, l_i, acc, row_bad, r_ok, row, part, BHM, O_PART, L_PART, HEAD_DIM, KIND, ALPHA)
    if CERTIFY:
        tl.atomic_add(REM + row, rem * 1.0001, mask=r_ok)  # 1.0001: exp2's and the sum's rounding


@triton.jit
def _add_then_attend(Q, TAU, tau_scalar, BIAS, bias_scalar, KN, VN, K, V, CODES, SCALE, ERR, MAXN, MAXE, LENS,
                     STATUS, ROT, REM, O_PART, L_PART, T, pid_bh, b, h,
                     s_qb, s_qh, s_qm, s_tb, s_th, s_tm, s_bb, s_bh, s_bm, s_nb, s_nh, s_nt, s_wb, s_wh, s_wt,
                     s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_cb, s_ch, s_cn, s_sb, s_sh,
                     G, M, Hkv, defect, CAP, BHM, qk_scale, scale,
                     ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DP: tl.constexpr, TAU_TENSOR: tl.constexpr,
                     BIAS_TENSOR: tl.constexpr, BLOCK_A: tl.constexpr, KIND: tl.constexpr, ALPHA: tl.constexpr,
                     UPCAST: tl.constexpr, CERTIFY: tl.constexpr, GROUP: tl.constexpr):
    # The filter launch's add program of head bh: add the T new tokens at the length (as
    # _code_add_kernel does, but LENS is left to the merge), then attend them, [start, start + T),
    # with the same exact scores and rules as a filter program's survivors, into partial 0.
    # It rotates 32 columns of a key at a time (two passes): a whole (DP, DP) tile in registers
    # would raise the register count of the kernel's every program, for a chain off the path.
    # Its own writes (K, V, the status, the maxima) are read back by all its threads: a
    # barrier makes them visible. Bad added values (or an add past the capacity) give this
    # head's rows NaN in this step already (and every row from the next, via the status).
    start = tl.load(LENS + pid_bh)
    _add_tokens(KN, VN, K, V, CODES, SCALE, ERR, MAXN, MAXE, LENS, STATUS, ROT, T, T, pid_bh, 0,
                s_nb, s_nh, s_nt, s_wb, s_wh, s_wt, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                s_cb, s_ch, s_cn, s_sb, s_sh, Hkv, defect, CAP, HEAD_DIM, DP, 32, True, False)
    tl.debug_barrier()
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS, HEAD_DIM)
    tau = _load_rows(TAU, tau_scalar, s_tb, s_th, s_tm, b, head, mrow, r_ok, 0.0, TAU_TENSOR)
    bias = _load_rows(BIAS, bias_scalar, s_bb, s_bh, s_bm, b, head, mrow, r_ok, 0.0, BIAS_TENSOR)
    row_bad, gap, m_i, l_i, acc, rem = _attend_setup(q, tau, bias, r_ok, tl.load(MAXN + pid_bh), STATUS, True,
                                                     ROWS, HEAD_DIM, KIND)
    written = start + T <= CAP  # else nothing was written (and the status says so)
    kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    limit = start + T - M + mrow
    for off in range(0, T, BLOCK_A):
        offs_i = off + tl.arange(0, BLOCK_A)
        m_i, l_i, acc, rem = _attend_tile(q, start + offs_i, (offs_i < T) & written, kbase, vbase, s_kn, s_vn, tau,
                                          bias, limit, r_ok, m_i, l_i, acc, rem, gap, qk_scale, scale, HEAD_DIM,
                                          KIND, ALPHA, UPCAST, CERTIFY, GROUP)
    row = (b * Hkv * G + head).to(tl.int64) * M + mrow
    _store_partial(m_i, l_i, acc, row_bad, r_ok, row, tl.program_id(0), BHM, O_PART, L_PART, HEAD_DIM, KIND,
                   ALPHA)  # partial 0 (program 0)
    if CERTIFY:
        tl.atomic_add(REM + row, rem * 1.0001, mask=r_ok)


@triton.jit
def _attend_tile(q, idx, i_ok, kbase, vbase, s_kn, s_vn, tau, bias, limit, r_ok, m_i, l_i, acc, rem, gap,
                 qk_scale, scale, HEAD_DIM: tl.constexpr, KIND: tl.constexpr, ALPHA: tl.constexpr,
                 UPCAST: tl.constexpr, CERTIFY: tl.constexpr, GROUP: tl.constexpr):
    # one tile of key positions idx (BLOCK_N,): exact fp32 scores, keep score >= tau within the
    # causal limit, and fold them into the running softmax or ReLU^alpha sums. GROUP (softmax):
    # a row keeps every key that any row of its group keeps (the union the tile was read for)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(kbase + idx[:, None].to(tl.int64) * s_kn + offs_d[None, :], mask=i_ok[:, None], other=0.0)
    v = tl.load(vbase + idx[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=i_ok[:, None], other=0.0)
    if UPCAST:
        sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        sc = tl.dot(q, tl.trans(k))
    seen = i_ok[None, :] & (idx[None, :] <= limit[:, None])  # causal: each row its own limit
    keep = seen & (sc >= tau[:, None]) & r_ok[:, None]
    if GROUP:  # the union of the rows' kept sets, each row within its own limit
        keep = (tl.max(tl.where(keep, 1, 0), 0) > 0)[None, :] & seen & r_ok[:, None]
    if CERTIFY:  # survivors this row drops: their exact mass, widened by the score's rounding
        # (with GROUP a dropped key is below every row's tau: each term is still below 1)
        out = seen & ~keep
        rem += tl.sum(tl.where(out, tl.exp2((sc - tau[:, None] + gap[:, None]) * qk_scale), 0.0), 1)
    if KIND == 0:
        s2 = tl.where(keep, sc * qk_scale, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s2, v, m_i, l_i, acc, UPCAST)
    else:
        # weights scaled by the rows' running maximum, rounded to v's 16-bit dtype for the
        # tensor cores (as softmax rounds P): they cannot underflow or overflow
        m_i, l_i, acc = _relu_rows_step(_relu_base(sc, keep, scale, bias[:, None]), v, m_i, l_i, acc, ALPHA, UPCAST)
    return m_i, l_i, acc, rem


@triton.jit
def _attend_setup(q, tau, bias, r_ok, maxn, STATUS, first,
                  ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, KIND: tl.constexpr):
    # inputs the answer must not be trusted with: NaN rows and a status bit (set by the
    # ``first`` program of the head), no sync; then the running sums and each row's bound on
    # the gap between the fp32-accumulated score and the real one
    code = _bad_rows(q, tau, r_ok, maxn)
    code = code | tl.where(r_ok & ~(tl.abs(bias) < float("inf")), _BAD_BIAS, 0)
    worst = tl.max(code, 0)
    tl.atomic_or(STATUS, worst, mask=(worst > 0) & first)
    row_bad = (code > 0) | ((tl.load(STATUS) & (_BAD_KV | _BAD_FULL)) != 0)
    qf = q.to(tl.float32)
    gap = 4.0 * HEAD_DIM * 5.9604645e-08 * tl.sqrt(tl.sum(qf * qf, 1)) * maxn
    m_i = _running_max_init(ROWS, KIND)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    rem = tl.zeros([ROWS], tl.float32)
    return row_bad, gap, m_i, l_i, acc, rem


@triton.jit
def _attend_list(q, SBASE, cnt, kbase, vbase, s_kn, s_vn, tau, bias, limit, r_ok, m_i, l_i, acc, rem, gap,
                 qk_scale, scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, KIND: tl.constexpr,
                 ALPHA: tl.constexpr, UPCAST: tl.constexpr, CERTIFY: tl.constexpr, GROUP: tl.constexpr):
    # the cnt key positions listed at SBASE (a filter program's segment), BLOCK_N at a time
    for off in range(0, cnt, BLOCK_N):
        offs_i = off + tl.arange(0, BLOCK_N)
        i_ok = offs_i < cnt
        idx = tl.load(SBASE + offs_i, mask=i_ok, other=0)
        m_i, l_i, acc, rem = _attend_tile(q, idx, i_ok, kbase, vbase, s_kn, s_vn, tau, bias, limit, r_ok,
                                          m_i, l_i, acc, rem, gap, qk_scale, scale, HEAD_DIM, KIND, ALPHA,
                                          UPCAST, CERTIFY, GROUP)
    return m_i, l_i, acc, rem


@triton.jit
def _store_partial(m_i, l_i, acc, row_bad, r_ok, row, part, BHM, O_PART, L_PART,
                   HEAD_DIM: tl.constexpr, KIND: tl.constexpr, ALPHA: tl.constexpr):
    # one split's normalised output and lse (or log sum of weights) for its rows, at index
    # ``part`` of the partials; every split writes NaN for a bad row, so the merge's max and
    # sums are NaN too
    l_safe, lse = _weights_epilogue(m_i, l_i, KIND, ALPHA)
    o = acc / l_safe[:, None]
    o = tl.where(row_bad[:, None], float("nan"), o)
    lse = tl.where(row_bad, float("nan"), lse)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(O_PART + (part.to(tl.int64) * BHM + row)[:, None] * HEAD_DIM + offs_d[None, :], o, mask=r_ok[:, None])
    tl.store(L_PART + part.to(tl.int64) * BHM + row, lse, mask=r_ok)


@triton.jit
def _code_attend_kernel(Q, K, V, TAU, tau_scalar, BIAS, bias_scalar, SURV, COUNT, O_PART, L_PART, LENS,
                        MAXN, STATUS, REM,
                        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                        s_tb, s_th, s_tm, s_bb, s_bh, s_bm,
                        M, G, Hkv, SURV_STRIDE, SEG, NPROG, SPLITS, BHM, qk_scale, scale,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        KIND: tl.constexpr, ALPHA: tl.constexpr, UPCAST: tl.constexpr,
                        TAU_TENSOR: tl.constexpr, BIAS_TENSOR: tl.constexpr, DENSE: tl.constexpr,
                        CERTIFY: tl.constexpr, GROUP: tl.constexpr):
    # TAU/BIAS: (B, Hq, M)-strided tensors or scalars. Partials: O_PART (SPLITS, BHM, D) fp32, L_PART (SPLITS, BHM)
    # natural-log lse (softmax) or log(sum w) (ReLU, KIND == 1); rows ordered (b, hq, m).
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    N = tl.load(LENS + pid_bh)
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS, HEAD_DIM)
    tau = _load_rows(TAU, tau_scalar, s_tb, s_th, s_tm, b, head, mrow, r_ok, float("inf"), TAU_TENSOR)
    bias = _load_rows(BIAS, bias_scalar, s_bb, s_bh, s_bm, b, head, mrow, r_ok, 0.0, BIAS_TENSOR)
    row_bad, gap, m_i, l_i, acc, rem = _attend_setup(q, tau, bias, r_ok, tl.load(MAXN + pid_bh), STATUS, pid_s == 0,
                                                     ROWS, HEAD_DIM, KIND)
    limit = N - M + mrow  # causal: query m of M sits at N - M + m
    kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    if DENSE:  # no filter: split s takes key tiles s, s+SPLITS, ... below the length
        # a group whose rows all have tau = +inf keeps nothing: its tiles are not read (a
        # certified step's dense pass for the rows past their eps skips every other group)
        live = tl.max(tl.where(r_ok & (tau < float("inf")), 1, 0), 0)
        for tile in range(pid_s, tl.cdiv(N, BLOCK_N) * live, SPLITS):
            idx = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            m_i, l_i, acc, rem = _attend_tile(q, idx, idx < N, kbase, vbase, s_kn, s_vn, tau, bias, limit, r_ok,
                                              m_i, l_i, acc, rem, gap, qk_scale, scale, HEAD_DIM, KIND, ALPHA,
                                              UPCAST, CERTIFY, GROUP)
    else:
        for seg in range(pid_s, NPROG, SPLITS):  # split s takes the filter's segments s, s+SPLITS, ...
            sbase = SURV + pid_bh.to(tl.int64) * SURV_STRIDE + seg * SEG
            cnt = tl.load(COUNT + pid_bh * NPROG + seg)
            m_i, l_i, acc, rem = _attend_list(q, sbase, cnt, kbase, vbase, s_kn, s_vn, tau, bias, limit, r_ok,
                                              m_i, l_i, acc, rem, gap, qk_scale, scale, BLOCK_N, HEAD_DIM, KIND,
                                              ALPHA, UPCAST, CERTIFY, GROUP)
    row = (b * Hkv * G + head).to(tl.int64) * M + mrow
    _store_partial(m_i, l_i, acc, row_bad, r_ok, row, pid_s, BHM, O_PART, L_PART, HEAD_DIM, KIND, ALPHA)
    if CERTIFY:
        tl.atomic_add(REM + row, rem * 1.0001, mask=r_ok)


@triton.jit
def _certify_kernel(REM, LSE, TAU, tau_scalar, Q, MAXN, LENS, BOUND, LOG_DROPPED, LSE_LOW,
                    s_qb, s_qh, s_qm, s_tb, s_th, s_tm, Hq, M, G, BHM, scale,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TAU_TENSOR: tl.constexpr):
    # The certificate of BLOCK rows (ordered (b, hq, m)) in one pass, the formula of
    # ``_code_plan.dropped_terms`` and ``certified_share``: from REM (>= sum over dropped keys
    # of exp(scale (score - tau))) and LSE (log of the kept mass, fp32 sums):
    #   log_dropped = log(REM + n 2^-126) + scale tau            (+ 1e-5: this log's rounding)
    #   lse_low     = LSE - (scale gap + 1e-4 + 2 n 2^-24),  gap = 4 D 2^-24 ||q|| max||k||
    #   bound       = sigmoid(log_dropped - lse_low), 1 where nothing is kept
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < BHM
    m = offs % M
    hq = (offs // M) % Hq
    b = offs // (M * Hq)
    bh = b * (Hq // G) + hq // G
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b[:, None].to(tl.int64) * s_qb + hq[:, None].to(tl.int64) * s_qh + m[:, None] * s_qm
                + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    qn = tl.sqrt(tl.sum(q * q, 1))
    n = tl.maximum(tl.load(LENS + bh, mask=ok, other=1).to(tl.float32), 1.0)
    if TAU_TENSOR:
        tau = tl.load(TAU + b.to(tl.int64) * s_tb + hq * s_th + m * s_tm, mask=ok, other=0.0)
    else:
        tau = tl.zeros([BLOCK], tl.float32) + tau_scalar
    gap = 4.0 * HEAD_DIM * 5.9604645e-08 * qn * tl.load(MAXN + bh, mask=ok, other=0.0)
    rem = tl.load(REM + offs, mask=ok, other=0.0)
    lse = tl.load(LSE + offs, mask=ok, other=0.0)
    log_dropped = tl.log(rem + n * 1.1754944e-38) + scale * tau + 1e-5
    lse_low = lse - (scale * gap + 1e-4 + 2.0 * n * 5.9604645e-08)
    bound = 1.0 / (1.0 + tl.exp(lse_low - log_dropped))
    bound = tl.where(lse_low == float("-inf"), 1.0, bound)
    tl.store(LOG_DROPPED + offs, log_dropped, mask=ok)
    tl.store(LSE_LOW + offs, lse_low, mask=ok)
    tl.store(BOUND + offs, bound, mask=ok)


@triton.jit
def _score_all_kernel(Q, K, SC, LENS, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_sr, G, M, Hkv,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    # SC (B*Hq*M, C) fp32, rows ordered (b, hq, m): every key's score for the group's rows of
    # kv head pid_bh, fp32-accumulated as _attend_tile scores (the top-k mode keeps and weighs
    # keys by these very numbers), -inf past a row's causal limit. The grid covers the
    # capacity (one capture serves every length); a tile past the length writes nothing (no
    # reader looks past a row's length).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    N = tl.load(LENS + pid_bh)
    if pid_n * BLOCK_N >= N:
        return
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS, HEAD_DIM)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_d = tl.arange(0, HEAD_DIM)
    kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    k = tl.load(kbase + offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    if UPCAST:
        d = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        d = tl.dot(q, tl.trans(k))
    limit = N - M + mrow  # causal: query m of M sits at N - M + m
    sc = tl.where(n_ok[None, :] & (offs_n[None, :] <= limit[:, None]), d, float("-inf"))
    row = (b * Hkv * G + head).to(tl.int64) * M + mrow
    tl.store(SC + row[:, None] * s_sr + offs_n[None, :], sc, mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _topk_attend_kernel(Q, V, SC, THR, LENS, MAXN, STATUS, O_PART, L_PART, REM,
                        s_qb, s_qh, s_qm, s_vb, s_vh, s_vn, s_sr, M, G, Hkv, SPLITS, BHM, qk_scale,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        UPCAST: tl.constexpr, CERTIFY: tl.constexpr):
    # Softmax over {j : SC[row, j] >= THR[row]} (THR: the row's k-th best score, so the k best
    # and every key tied with the k-th), split s taking key tiles s, s + SPLITS, ... below the
    # length. Only the kept keys' values are read (a tile's value rows are loaded where some
    # row of the group keeps the key). Partials as _code_attend_kernel's; CERTIFY: REM +=
    # the dropped keys' exp(scale (score - thr + gap)), as _attend_tile's certificate.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    N = tl.load(LENS + pid_bh)
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS, HEAD_DIM)
    row = (b * Hkv * G + head).to(tl.int64) * M + mrow
    thr = tl.load(THR + row, mask=r_ok, other=float("inf"))
    # a NaN thr comes from a bad q (flagged there): no second, misleading "tau" bit
    row_bad, gap, m_i, l_i, acc, rem = _attend_setup(q, tl.where(thr == thr, thr, float("inf")),
                                                     tl.zeros([ROWS], tl.float32), r_ok, tl.load(MAXN + pid_bh),
                                                     STATUS, pid_s == 0, ROWS, HEAD_DIM, 0)
    limit = N - M + mrow
    offs_d = tl.arange(0, HEAD_DIM)
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    for tile in range(pid_s, tl.cdiv(N, BLOCK_N), SPLITS):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        seen = (offs_n[None, :] < N) & (offs_n[None, :] <= limit[:, None]) & r_ok[:, None]
        sc = tl.load(SC + row[:, None] * s_sr + offs_n[None, :], mask=seen, other=float("-inf"))
        keep = seen & (sc >= thr[:, None])
        col = tl.max(tl.where(keep, 1, 0), 0) > 0
        v = tl.load(vbase + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=col[:, None], other=0.0)
        if CERTIFY:
            out = seen & ~keep  # empty where thr is -inf (fewer than k keys): finite thr_c, no -inf - -inf
            thr_c = tl.where(thr > float("-inf"), thr, 0.0)
            rem += tl.sum(tl.where(out, tl.exp2((sc - thr_c[:, None] + gap[:, None]) * qk_scale), 0.0), 1)
        m_i, l_i, acc = _online_softmax_step(tl.where(keep, sc * qk_scale, float("-inf")), v, m_i, l_i, acc,
                                             UPCAST)
    _store_partial(m_i, l_i, acc, row_bad, r_ok, row, pid_s, BHM, O_PART, L_PART, HEAD_DIM, 0, 1)
    if CERTIFY:
        tl.atomic_add(REM + row, rem * 1.0001, mask=r_ok)


@triton.jit
def _topk_gather_kernel(Q, V, SC, THR, LIST, COUNT, LENS, MAXN, STATUS, O_PART, L_PART,
                        s_qb, s_qh, s_qm, s_vb, s_vh, s_vn, s_sr, s_lr, Hq, M, G, Hkv,
                        SPLITS, BHM, qk_scale, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    # The top-k mode's softmax from the selection (hsr.kernels._select.select_kth), one
    # program per (split, query row): THR, the row's k-th best score; LIST[row, :COUNT[row]],
    # ascending positions of every key scoring at least it and of a few just below (kept
    # here by score >= THR). A row reads its list, those keys' scores and the kept keys' value
    # rows, not its n scores. Partials as _code_attend_kernel's (split s at index s).
    pid_s = tl.program_id(0)
    row = tl.program_id(1)  # (b, hq, m)
    b = row // (Hq * M)
    hq = (row // M) % Hq
    bh = b * Hkv + hq // G
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * s_qb + hq.to(tl.int64) * s_qh + (row % M) * s_qm + offs_d)
    code = tl.max(_bad_rows(q[None, :], tl.zeros([1], tl.float32), tl.full([1], 1, tl.int1), tl.load(MAXN + bh)), 0)
    tl.atomic_or(STATUS, code, mask=(code > 0) & (pid_s == 0))
    row_bad = (code > 0) | ((tl.load(STATUS) & (_BAD_KV | _BAD_FULL)) != 0)
    thr = tl.load(THR + row)  # -inf where the row sees fewer than k keys: it keeps them all
    cnt = tl.load(COUNT + row)
    offs = tl.arange(0, BLOCK)
    vbase = V + b.to(tl.int64) * s_vb + (hq // G).to(tl.int64) * s_vh
    m_i = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for off in range(pid_s * BLOCK, cnt, SPLITS * BLOCK):
        i_ok = off + offs < cnt
        pos = tl.load(LIST + row.to(tl.int64) * s_lr + off + offs, mask=i_ok, other=0)
        u = tl.load(SC + row.to(tl.int64) * s_sr + pos, mask=i_ok, other=float("-inf"))
        keep = i_ok & (u >= thr) & (u > float("-inf"))  # -inf: past the row's causal limit
        v = tl.load(vbase + pos[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=keep[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step_row(tl.where(keep, u * qk_scale, float("-inf")), v, m_i, l_i, acc)
    l_safe, lse = _weights_epilogue(m_i, l_i, 0, 1)
    o = tl.where(row_bad, float("nan"), acc / l_safe)
    lse = tl.where(row_bad, float("nan"), lse)
    part = pid_s.to(tl.int64) * BHM + row
    tl.store(O_PART + part * HEAD_DIM + offs_d, o)
    tl.store(L_PART + part, lse)
