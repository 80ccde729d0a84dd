"""The code filter's range search for a batch of queries, blocked like a GEMM.

A search of m queries over n keys is an ``(m, n)`` matrix of integer products
``<qi_r, c_j>`` (``_code_kernels`` explains the codes and the bound). This kernel computes it
the way a GEMM does, and never stores it:

* **register blocking**: ``pair_dot_8x1`` keeps 8 query rows x 32 keys of int32 sums in 16
  vector registers; each 64-byte slice of codes (two dimensions of 32 keys) is read and
  widened to int16 once for the 8 rows, and each row's pair of int16 dimensions is one
  broadcast. The products are multiply-add-pairs (``vpmaddwd``, fused with the add into
  ``vpdpwssd`` on AVX512-VNNI): 32 exact int16 x int16 -> int32 products per instruction,
  twice the float32 FMAs of a BLAS scan per instruction.
* **cache blocking**: a task takes a tile of up to ``TILE_ROWS`` queries and a range of code
  blocks; it walks the range in key tiles of ``KEY_TILE`` blocks (16 KiB of codes at d = 64,
  in L1), and every 8-row group of the tile reads the key tile while it is in cache.
* **the bound per tile**: the 32 float32 bounds of a block are computed from the sums in the
  same pass, as one vector expression compared into a 32-bit mask (``_lane_mask``); a block
  whose mask is empty costs nothing more.
* **survivors compacted per query**: a row's candidates (ascending ids) wait in its pending
  list and are decided in batches of four canonical score chains (``_verify``): exact scores
  for the candidates only.

Few queries (fewer than ``FEW_ROWS``): one row at a time against four blocks at once
(``pair_dot_1x4``: eight accumulator chains hide the multiply-add latency), so a single
search runs at the blocks' bandwidth instead of the accumulation's latency.

Threads: ``codes.py`` splits the work into tasks (query tile x block range), enough for every
thread: many queries give many tiles, one query gives several block ranges.

Exactness is the code filter's: the bound and the slack are the same float32 expressions as
in ``_code_kernels`` (no ``fastmath``: no contraction, no reordering); only the order in which
the exact integer sums are formed changes, and integer sums do not depend on it.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from ._code_kernels import BLOCK, _PENDING, _collect_near, _data, _verify, pair_dot_1x1, pair_dot_1x4, pair_dot_8x1

#: query rows per task (the rows that share one pass over a range of codes)
TILE_ROWS = 64
#: code blocks per key tile: 16 x 32 keys x 64 bytes = 32 KiB at d = 64, within L1 + L2's
#: nearest ways while 8 tiles of 8 rows pass over it
KEY_TILE = 16
#: below this many rows in a task, rows go one at a time against four blocks
FEW_ROWS = 4


_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)


@intrinsic
def _lane_mask(typingctx, acc, off, a, qnr, scale, err, first, th):
    """``mask`` (int64): bit t set when the float32 bound of lane t of one block,
    ``scale[first+t] * (a * float32(acc[off+t])) + qnr * err[first+t]``, is ``>= th``.

    The expression the slack was sized for (``_code_kernels``' bound), as IEEE float32
    operations without fast-math flags (no contraction into FMAs, so the same roundings); a
    NaN compares false as in numba. Written as one 32-lane vector expression ending in a
    compare-to-mask because numba leaves the float ``max`` over the lanes scalar (it must keep
    NaN semantics): measured 3x the time of the integer products it follows; the mask costs
    about a tenth of them."""
    sig = types.int64(acc, off, a, qnr, scale, err, first, th)

    def codegen(context, builder, signature, args):
        acc_, off_, a_, q_, sc_, er_, fi_, th_ = args
        types_ = signature.args
        ap, sp, ep = (_data(context, builder, types_[i], v) for i, v in ((0, acc_), (4, sc_), (5, er_)))
        vf = ir.VectorType(_F32, BLOCK)
        vi = ir.VectorType(_I32, BLOCK)

        def splat(x):
            v = builder.insert_element(ir.Constant(vf, ir.Undefined), x, ir.Constant(_I32, 0))
            return builder.shuffle_vector(v, ir.Constant(vf, ir.Undefined), ir.Constant(vi, None))

        av = builder.load(builder.bitcast(builder.gep(ap, [off_]), ir.PointerType(vi)), align=4)
        sv = builder.load(builder.bitcast(builder.gep(sp, [fi_]), ir.PointerType(vf)), align=4)
        ev = builder.load(builder.bitcast(builder.gep(ep, [fi_]), ir.PointerType(vf)), align=4)
        ub = builder.fadd(builder.fmul(sv, builder.fmul(splat(a_), builder.sitofp(av, vf))),
                          builder.fmul(splat(q_), ev))
        hit = builder.fcmp_ordered(">=", ub, splat(th_))
        return builder.zext(builder.bitcast(hit, ir.IntType(BLOCK)), _I64)

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def _collect_mask(i, first, cnt, mask, alive, has_dead, cand, ncand):
    """Append the lanes ``t < cnt`` of one block whose bit is set in ``mask`` (ascending) to
    row slot i's pending list, skipping removed keys."""
    nc = ncand[i]
    while mask != 0:
        t = trailing_zeros(mask)
        if t >= cnt:
            break
        if not (has_dead and alive[first + t] == 0):
            cand[i, nc] = first + t
            nc += 1
        mask &= mask - 1
    ncand[i] = nc


@njit(cache=True, nogil=True, parallel=True)
def code_range(QP, qa32, qn32, thr32, tau, lim, Q, keys, codes, scale, err, alive, has_dead, n,
               task_tile, task_part, tile_r0, tile_r1, part_b0, part_b1, cap, buf_ids, buf_sc,
               counts, stats):
    """Filter, then verify: every key with canonical ``score(Q[r], k) >= tau[r]`` and id
    ``<= lim[r]``, for the (row tile, block range) tasks listed.

    Parameters
    ----------
    QP : (m8, dp/2) int32
        The quantised rotated queries as pairs of int16 dimensions, rows padded with zeros to
        a multiple of 8 (row groups read all 8).
    qa32, qn32, thr32 : (m,) float32
        Query step, norm, and the filter's threshold ``tau - slack`` (rounded down).
    tau : (m,) float64 or working dtype; lim : (m,) int64
        Inclusive thresholds of the canonical scores; largest visible id per row.
    Q : (m, d); keys : (n_cap, d)
        Queries and keys in the working dtype (canonical scores of the candidates).
    codes : (n_blocks, dp/2, 32, 2) int8; scale, err : (n_cap,) float32
    task_tile, task_part : (n_tasks,) int64
        Task i covers rows ``tile_r0[task_tile[i]] .. tile_r1[...]`` and blocks
        ``part_b0[task_part[i]] .. part_b1[...]``.
    cap : int; buf_ids : (m, n_parts, cap) int64; buf_sc : (m, n_parts, cap)
        Row r's hits of block range p, in id order.
    counts, stats : (m, n_parts) int64
        Hits (may exceed ``cap``: the caller re-runs that task with a larger buffer) and keys
        verified in full precision.

    Memory traffic: each task reads its block range of codes, steps and errors once per key
    tile (the tile then serves all its rows from cache) and the full rows of its candidates.
    """
    dh = QP.shape[1]
    bstride = dh * 2 * BLOCK
    cflat = codes.reshape(-1)
    qflat = QP.reshape(-1)
    for ti in prange(task_tile.shape[0]):
        tile = task_tile[ti]
        p = task_part[ti]
        r0 = tile_r0[tile]
        r1 = tile_r1[tile]
        acc = np.empty(8 * BLOCK, dtype=np.int32)
        sc4 = np.empty(4, dtype=keys.dtype)
        cand = np.empty((r1 - r0, _PENDING + BLOCK + 3), dtype=np.int64)
        ncand = np.zeros(r1 - r0, dtype=np.int64)
        top = 0
        for r in range(r0, r1):
            counts[r, p] = 0
            stats[r, p] = 0
            top = max(top, min(lim[r], n - 1))
        b0 = part_b0[p]
        b1 = min(part_b1[p], top // BLOCK + 1)  # blocks past every row's limit: never read
        if r1 - r0 < FEW_ROWS:
            for r in range(r0, r1):
                last = min(lim[r], n - 1)
                e = min(b1, last // BLOCK + 1)
                th = thr32[r]
                b = b0
                while b < e:
                    nblk = 4 if b + 4 <= e else 1
                    if nblk == 4:
                        pair_dot_1x4(cflat, b * bstride, bstride, qflat, r * dh, dh, dh, acc)
                    else:
                        pair_dot_1x1(cflat, b * bstride, bstride, qflat, r * dh, dh, dh, acc)
                    for k in range(nblk):
                        first = (b + k) * BLOCK
                        mask = _lane_mask(acc, k * BLOCK, qa32[r], qn32[r], scale, err, first, th)
                        if mask == 0:
                            continue
                        _collect_mask(r - r0, first, min(BLOCK, last - first + 1), mask, alive, has_dead, cand, ncand)
                        if ncand[r - r0] >= _PENDING:
                            _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts,
                                    stats, False, 0.0, stats)
                    b += nblk
        else:
            for kb in range(b0, b1, KEY_TILE):
                ke = min(kb + KEY_TILE, b1)
                for g in range(r0, r1, 8):
                    gn = min(8, r1 - g)
                    for b in range(kb, ke):
                        first = b * BLOCK
                        pair_dot_8x1(cflat, b * bstride, bstride, qflat, g * dh, dh, dh, acc)
                        for i in range(gn):
                            r = g + i
                            last = min(lim[r], n - 1)
                            if first > last:
                                continue
                            mask = _lane_mask(acc, i * BLOCK, qa32[r], qn32[r], scale, err, first, thr32[r])
                            if mask == 0:
                                continue
                            _collect_mask(r - r0, first, min(BLOCK, last - first + 1), mask, alive, has_dead, cand,
                                          ncand)
                            if ncand[r - r0] >= _PENDING:
                                _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc,
                                        counts, stats, False, 0.0, stats)
        for r in range(r0, r1):
            _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats,
                    False, 0.0, stats)


@njit(cache=True, nogil=True, inline="always")
def _near_block(acc, off, r, i, p, first, last, qa32, qn32, thr32, near32, slack, tau, rscale, scale, err, alive,
                has_dead, ubs, cand, ncand, hist, looked):
    """One block of row r for :func:`code_range_remainder`: nothing when every lane's bound
    is below ``near32[r]`` (the caller counts those keys as far); else its 32 bounds (the same
    float32 expression as ``_lane_mask``), candidates and histogram (``_collect_near``)."""
    if _lane_mask(acc, off, qa32[r], qn32[r], scale, err, first, near32[r]) == 0:
        return
    a = qa32[r]
    qnr = qn32[r]
    for t in range(BLOCK):
        ubs[t] = scale[first + t] * (a * np.float32(acc[off + t])) + qnr * err[first + t]
    _collect_near(i, r, p, first, min(BLOCK, last - first + 1), ubs, thr32[r], near32[r], alive, has_dead, cand,
                  ncand, rscale * (np.float64(slack[r]) - tau[r]), rscale, hist, looked)


@njit(cache=True, nogil=True, parallel=True)
def code_range_remainder(QP, qa32, qn32, thr32, tau, lim, Q, keys, codes, scale, err, alive, has_dead, n,
                         task_tile, task_part, tile_r0, tile_r1, part_b0, part_b1, cap, buf_ids, buf_sc,
                         counts, stats, near32, slack, rscale, rem, hist, looked):
    """:func:`code_range` (the same tasks, blocking and products), and a bound on the mass of
    what it does not report, for a softmax over the reported keys (a kernel of its own: the
    extra work in a shared loop slowed the plain search 1.75x, measured).

    ``rem[r, p]`` sums ``exp(rscale (u - tau))`` over the candidates whose score ``u`` fell
    short; the non-candidates of every block with a bound at least ``near32[r]`` (their
    ``u <= bound + slack[r]``) are counted in ``hist[r, p, k]``,
    ``k = floor(-4 rscale (bound + slack - tau))`` (each term ``<= exp(-k / 4)``; the last bin
    takes everything further down), and ``looked[r, p]`` counts the lanes looked at this way.
    Every other visible key is far: its term is below ``exp(rscale (near + slack - tau))``;
    the caller adds them up.
    """
    dh = QP.shape[1]
    bstride = dh * 2 * BLOCK
    cflat = codes.reshape(-1)
    qflat = QP.reshape(-1)
    for ti in prange(task_tile.shape[0]):
        tile = task_tile[ti]
        p = task_part[ti]
        r0 = tile_r0[tile]
        r1 = tile_r1[tile]
        acc = np.empty(8 * BLOCK, dtype=np.int32)
        ubs = np.empty(BLOCK, dtype=np.float32)
        sc4 = np.empty(4, dtype=keys.dtype)
        cand = np.empty((r1 - r0, _PENDING + BLOCK + 3), dtype=np.int64)
        ncand = np.zeros(r1 - r0, dtype=np.int64)
        top = 0
        for r in range(r0, r1):
            counts[r, p] = 0
            stats[r, p] = 0
            rem[r, p] = 0.0
            looked[r, p] = 0
            hist[r, p, :] = 0
            top = max(top, min(lim[r], n - 1))
        b0 = part_b0[p]
        b1 = min(part_b1[p], top // BLOCK + 1)
        if r1 - r0 < FEW_ROWS:
            for r in range(r0, r1):
                last = min(lim[r], n - 1)
                e = min(b1, last // BLOCK + 1)
                b = b0
                while b < e:
                    nblk = 4 if b + 4 <= e else 1
                    if nblk == 4:
                        pair_dot_1x4(cflat, b * bstride, bstride, qflat, r * dh, dh, dh, acc)
                    else:
                        pair_dot_1x1(cflat, b * bstride, bstride, qflat, r * dh, dh, dh, acc)
                    for k in range(nblk):
                        _near_block(acc, k * BLOCK, r, r - r0, p, (b + k) * BLOCK, last, qa32, qn32, thr32, near32,
                                    slack, tau, rscale, scale, err, alive, has_dead, ubs, cand, ncand, hist, looked)
                        if ncand[r - r0] >= _PENDING:
                            _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts,
                                    stats, True, rscale, rem)
                    b += nblk
        else:
            for kb in range(b0, b1, KEY_TILE):
                ke = min(kb + KEY_TILE, b1)
                for g in range(r0, r1, 8):
                    gn = min(8, r1 - g)
                    for b in range(kb, ke):
                        first = b * BLOCK
                        pair_dot_8x1(cflat, b * bstride, bstride, qflat, g * dh, dh, dh, acc)
                        for i in range(gn):
                            r = g + i
                            last = min(lim[r], n - 1)
                            if first > last:
                                continue
                            _near_block(acc, i * BLOCK, r, r - r0, p, first, last, qa32, qn32, thr32, near32, slack,
                                        tau, rscale, scale, err, alive, has_dead, ubs, cand, ncand, hist, looked)
                            if ncand[r - r0] >= _PENDING:
                                _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc,
                                        counts, stats, True, rscale, rem)
        for r in range(r0, r1):
            _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats,
                    True, rscale, rem)


@njit(cache=True, nogil=True)
def gather_hits(counts, cap, buf_ids, buf_sc, b2_ids, b2_sc, lims, ids, scores):
    """Concatenate each row's hits of its block ranges, in range order (so ids ascend), into
    the CSR ``ids, scores`` at ``lims``: from ``buf_*[r, p, :c]``, or from the re-run's
    ``b2_*`` where ``c = counts[r, p]`` exceeded ``cap``. On the calling thread: a copy of
    the hits, a few percent of a batch's search at most (512 queries x 1M keys: 60 MB against
    0.5-1 s), where a parallel region costs more than it saves at a few rows and, on few
    cores, leaves a worker spinning that slows the next kernel (one query over 32K real keys
    in a loop, 2 threads: 180 us a search with the gather in parallel, 107 us without)."""
    m, n_parts = counts.shape
    for r in range(m):
        off = lims[r]
        for p in range(n_parts):
            c = counts[r, p]
            if c > cap:
                for x in range(c):
                    ids[off + x] = b2_ids[r, p, x]
                    scores[off + x] = b2_sc[r, p, x]
            else:
                for x in range(c):
                    ids[off + x] = buf_ids[r, p, x]
                    scores[off + x] = buf_sc[r, p, x]
            off += c


_EPS64 = 2.0 ** -53
_U32 = 2.0 ** -24


@njit(cache=True, nogil=True)
def prepare_queries(Q, rot, qmax, d, w, max_err, max_norm, u, tau):
    """Quantise the rotated queries and size each one's slack (``CodeStore._queries``).

    ``Q (m, d)`` (working dtype), ``rot (dp, d)`` float64; ``w >= max_j s_j ||c_j||``;
    ``tau (m,)`` float64. Returns ``(QP, qa, qn, thr, slack, qa32, qn32, thr32)``: ``QP (m8,
    dp/2)`` int32, the int16 codes ``qi`` (``R q = qa qi + rq``, ``|qi| <= qmax``) as pairs of
    dimensions, rows padded with zeros to ``m8``, a multiple of 8; the float64 ``qa, qn, slack``
    and ``thr = tau - slack`` (less 4 ulps), and their float32 forms for the filter:
    ``qa32, qn32`` rounded to nearest (inside the 16 u term of the slack) and ``thr32`` rounded
    *down* (a threshold below float32's range becomes -inf: keep all). Sums run in any order:
    every term of the slack is a worst-case bound of its rounding."""
    m = Q.shape[0]
    dp = rot.shape[0]
    QI = np.zeros(((m + 7) // 8 * 8, dp), dtype=np.int16)
    qa, qn, thr, slack = np.empty(m), np.empty(m), np.empty(m), np.empty(m)
    qa32, qn32, thr32 = np.empty(m, np.float32), np.empty(m, np.float32), np.empty(m, np.float32)
    qr = np.empty(dp)
    for r in range(m):
        qn2 = 0.0
        for j in range(d):
            x = np.float64(Q[r, j])
            qn2 += x * x
        amax = 0.0
        qrn2 = 0.0
        for i in range(dp):
            acc = 0.0
            for j in range(d):
                acc += rot[i, j] * np.float64(Q[r, j])
            qr[i] = acc
            qrn2 += acc * acc
            amax = max(amax, abs(acc))
        a = amax / qmax if amax > 0 else 1.0
        rq2 = 0.0
        for i in range(dp):
            c = np.rint(qr[i] / a)
            QI[r, i] = np.int16(c)
            e = qr[i] - a * c
            rq2 += e * e
        rq = np.sqrt(rq2)
        qrn = np.sqrt(qrn2)
        n_ = np.sqrt(qn2)
        sl = (rq * (1.0 + 2 * d * _EPS64) * w
              + 2.0 * _EPS64 * qrn * w
              + 16.0 * _U32 * (qrn * w + n_ * max_err)  # the filter's float32 bound arithmetic
              + 2.0 * d ** 1.5 * _EPS64 * n_ * w
              + 2.0 * (d * u / (1.0 - d * u)) * n_ * max_norm
              + (d + 4) * 2.0 ** -148)
        t = tau[r] - sl
        t = t - 4.0 * _EPS64 * abs(t)
        qa[r] = a
        qn[r] = n_
        slack[r] = sl
        thr[r] = t
        qa32[r] = np.float32(a)
        qn32[r] = np.float32(n_)
        t32 = np.float32(t)
        if np.float64(t32) > t:
            t32 = np.nextafter(t32, np.float32(-np.inf))
        thr32[r] = t32
    return QI.view(np.int32), qa, qn, thr, slack, qa32, qn32, thr32


@njit(cache=True, nogil=True, parallel=True)
def select_topk(lims, ids, scores, top_s, top_i):
    """The ``k = top_s.shape[1]`` best of each CSR row (ids ascending within a row), best
    first, ties to the smaller id (a stable sort of the negated scores), into ``top_s``
    (float64) and ``top_i``; rows with fewer results keep their fill."""
    m, k = top_s.shape
    for r in prange(m):
        a = lims[r]
        b = lims[r + 1]
        if b == a:
            continue
        neg = np.empty(b - a)
        for x in range(b - a):
            neg[x] = -np.float64(scores[a + x])
        kk = min(k, b - a)
        # only the rows' results at or above the k-th best are sorted (every tie of it kept,
        # in id order, so the stable sort still prefers the smaller id)
        kth = np.partition(neg, kk - 1)[kk - 1]
        sel = np.flatnonzero(neg <= kth)
        order = sel[np.argsort(neg[sel], kind="mergesort")]
        for x in range(kk):
            top_s[r, x] = -neg[order[x]]
            top_i[r, x] = ids[a + order[x]]


@njit(cache=True, nogil=True)
def csr_lims(counts, lim, n, lims, coded):
    """``lims`` (m + 1,) from the per-range hit counts ``(m, n_parts)``, and ``coded[r]`` the
    codes row r evaluated (ids ``0 .. min(lim[r], n - 1)``); returns the largest count (a
    range whose hits outgrew the buffer has to be re-run)."""
    m, n_parts = counts.shape
    lims[0] = 0
    most = 0
    for r in range(m):
        t = 0
        for p in range(n_parts):
            t += counts[r, p]
            most = max(most, counts[r, p])
        lims[r + 1] = lims[r] + t
        coded[r] = max(0, min(min(lim[r], n - 1) + 1, n))
    return most


@njit(cache=True, nogil=True)
def rerun_and_gather(QP, qa32, qn32, thr32, tau, lim, Q, keys, codes, scale, err, alive, has_dead, n, n_tasks,
                     tile_r0, tile_r1, part_b0, part_b1, tile_rows, cap, buf_ids, buf_sc, counts, lims, most):
    """The CSR ``(ids, scores)`` of a search whose per-task hits are in ``buf_*`` (``cap`` a
    row and range), ``counts`` and ``lims`` (:func:`csr_lims`, ``most`` its largest count).
    Where a row's hits outgrew ``cap`` (rare), only the tasks holding such rows are re-run by
    :func:`code_range` with room for ``most``, then everything is gathered in id order."""
    m, n_parts = counts.shape
    b2_ids, b2_sc = buf_ids, buf_sc  # read only where a count exceeds cap: never, unless re-run
    if most > cap:
        redo = np.zeros(n_tasks, dtype=np.bool_)
        for r in range(m):
            for p in range(n_parts):
                if counts[r, p] > cap:
                    redo[(r // tile_rows) * n_parts + p] = True
        sel = np.flatnonzero(redo)
        b2_ids = np.empty((m, n_parts, most), dtype=np.int64)
        b2_sc = np.empty((m, n_parts, most), dtype=buf_sc.dtype)
        code_range(QP, qa32, qn32, thr32, tau, lim, Q, keys, codes, scale, err, alive, has_dead, n, sel // n_parts,
                   sel % n_parts, tile_r0, tile_r1, part_b0, part_b1, most, b2_ids, b2_sc, np.zeros_like(counts),
                   np.zeros_like(counts))
    ids = np.empty(lims[m], dtype=np.int64)
    scores = np.empty(lims[m], dtype=buf_sc.dtype)
    gather_hits(counts, cap, buf_ids, buf_sc, b2_ids, b2_sc, lims, ids, scores)
    return ids, scores


@njit(cache=True, nogil=True)
def code_search(Q, rot, qmax, d, w, max_err, max_norm, u, tau, lim, keys, codes, scale, err, alive, has_dead, n,
                task_tile, task_part, tile_r0, tile_r1, part_b0, part_b1, tile_rows, cap):
    """A whole range search of the code filter in one compiled call: :func:`prepare_queries`,
    :func:`code_range`, the CSR row offsets, the re-run of the tasks whose hits outgrew
    ``cap`` and the gather. One call instead of four, and no per-search arrays made from
    Python: a search that follows other work (a model's layer, another index) finds the
    interpreter's code and data out of cache, where each call and allocation from Python cost
    several microseconds (measured: 40 us of a 1K-key search warm, 100 us after streaming 8 MB).

    Arguments as :func:`prepare_queries` and :func:`code_range` (``tile_rows``: rows per query
    tile, to find a row's task). Returns ``(lims (m + 1,), ids, scores, coded (m,),
    verified (m,), most)``: the CSR result (ids ascending within a row), the codes and the
    full-precision scores each row took, and the largest hit count of one task's row."""
    m = Q.shape[0]
    n_parts = part_b0.shape[0]
    QP, qa, qn, thr, slack, qa32, qn32, thr32 = prepare_queries(Q, rot, qmax, d, w, max_err, max_norm, u, tau)
    counts = np.zeros((m, n_parts), dtype=np.int64)
    stats = np.zeros((m, n_parts), dtype=np.int64)
    buf_ids = np.empty((m, n_parts, cap), dtype=np.int64)
    buf_sc = np.empty((m, n_parts, cap), dtype=keys.dtype)
    code_range(QP, qa32, qn32, thr32, tau, lim, Q, keys, codes, scale, err, alive, has_dead, n, task_tile,
               task_part, tile_r0, tile_r1, part_b0, part_b1, cap, buf_ids, buf_sc, counts, stats)
    lims = np.empty(m + 1, dtype=np.int64)
    coded = np.empty(m, dtype=np.int64)
    most = csr_lims(counts, lim, n, lims, coded)
    ids, scores = rerun_and_gather(QP, qa32, qn32, thr32, tau, lim, Q, keys, codes, scale, err, alive, has_dead, n,
                                   task_tile.shape[0], tile_r0, tile_r1, part_b0, part_b1, tile_rows, cap, buf_ids,
                                   buf_sc, counts, lims, most)
    return lims, ids, scores, coded, stats.sum(axis=1), most


@njit(cache=True, nogil=True, parallel=True)
def gather_transposed(keys, sid, out):
    """``out[j, t] = keys[sid[t], j]``: the sample keys transposed ``(d, s)`` for
    :func:`sample_kth`, 32 keys at a time so that their rows stay in cache while the columns
    are written (numpy's ``keys[sid].T`` copy took 5 ms for 13K keys of d 64)."""
    d = keys.shape[1]
    s = sid.shape[0]
    for tb in prange((s + 31) // 32):
        t0 = tb * 32
        t1 = min(t0 + 32, s)
        for j in range(d):
            for t in range(t0, t1):
                out[j, t] = keys[sid[t], j]


@njit(cache=True, nogil=True, parallel=True)
def sample_kth(Q, KsT, sid, lim, alive, has_dead, k, kth):
    """``kth[r]``: the k-th largest score of query r over the sample keys ``KsT (d, s)``
    (transposed: the s sums run in vector lanes, each in dimension order) with ids ``sid``
    visible to it (``<= lim[r]``, alive); ``-inf`` when fewer than k are visible. Parallel
    over queries."""
    m, d = Q.shape
    s = KsT.shape[1]
    for r in prange(m):
        acc = np.zeros(s, dtype=KsT.dtype)
        for j in range(d):
            qj = Q[r, j]
            for t in range(s):
                acc[t] = acc[t] + qj * KsT[j, t]
        # the visible sample scores, then the k-th largest by selection: O(s) for any k (an
        # insertion into the k best cost O(s k) when k is large: 28 ms a layer at k = 1024)
        vals = np.empty(s)
        nv = 0
        for t in range(s):
            if sid[t] > lim[r] or (has_dead and alive[sid[t]] == 0):
                continue
            vals[nv] = np.float64(acc[t])
            nv += 1
        kth[r] = np.partition(vals[:nv], nv - k)[nv - k] if nv >= k else -np.inf
