"""numba kernels of the code filter: per-key int8 codes with an exact per-key error bound.

Everything is a module-level function over flat arrays; ``codes.py`` holds the arrays.

Layout (``n`` keys, dimension ``d``, padded dimension ``dp = d`` rounded up to even)
-----------------------------------------------------------------------------------

==============  ======================  ==================================================
array           shape, dtype            meaning
==============  ======================  ==================================================
rot             (dp, d) float64         rotation (rows = the basis; zero rows pad d to dp)
codes           (n_blocks, dp, 32)      int8 codes of ``rot @ k``, 32 keys per block in id
                int8                    order, transposed (lane t = key ``32*b + t``), so a
                                        block is one contiguous 32*dp-byte read and the 32
                                        sums run in vector lanes
scale           (n,) float32            per-key step ``s``: ``rot @ k ~= s * c``, ``|c| <= 127``
err             (n,) float32            ``>= ||k - rot^T (s c)||``, rounded up (see below)
==============  ======================  ==================================================

The bound
---------
For any matrix ``R``, ``<q, k> = <R q, s c> + <q, k - R^T s c>``, so by Cauchy-Schwarz

    <q, k>  <=  s * <R q, c>  +  ||q|| * ||k - R^T s c||

The query side is quantised too, so the inner loop is an exact integer dot product:
``R q = a * qi + rq`` with ``qi`` int16 and ``|rq_j| <= a / 2``; then
``s <R q, c> <= s * a * <qi, c> + ||rq|| * s ||c||``. ``<qi, c>`` is summed in int32 (exact:
``QMAX`` keeps it from overflowing) in pairs of dimensions, which LLVM turns into the
multiply-add-pairs instructions of the CPU. The remaining terms (``||rq|| * max_j s_j ||c_j||``,
the float32 evaluation of the bound, the rotation's rounding, and the gap between the
canonical score and the real dot product) are one per-query slack computed in ``codes.py``; a key is a
*candidate* when its bound reaches ``tau - slack`` and is then decided by its canonical score.
So no key whose canonical score is ``>= tau`` is ever dropped.

``err`` is computed in float64 from the rotated key ``x = R k`` as ``||x - s c||`` plus the
distance between that and ``||k - R^T s c||``: ``(defect(R) + 2 dp^1.5 2^-53) ||k||``, where
``defect(R) >= ||R^T R - I||_2`` is measured once (``codes.py``), then rounded up to float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._kernels import _dot_canonical4


#: keys per code block (one transposed block is read at once, its sums run in vector lanes)
BLOCK = 32
#: largest code magnitude: int8 codes in [-127, 127]
CMAX = 127
#: candidates a row collects before they are verified in one batch
_PENDING = 64


@njit(cache=True, nogil=True, parallel=True)
def quantize(x, knorm, defect, start, codes, scale, err):
    """Quantise rotated keys ``x (k, dp)`` float64 (ids ``start .. start+k-1``) in place into
    ``codes``, ``scale`` and ``err``; ``knorm (k,)`` are the keys' norms (float64)."""
    k, dp = x.shape
    rel = 4.0 * dp * 2.0 ** -53
    for i in prange(k):
        gid = start + i
        b = gid // BLOCK
        t = gid % BLOCK
        amax = 0.0
        for j in range(dp):
            a = abs(x[i, j])
            if a > amax:
                amax = a
        s = np.float32(amax / CMAX)
        if np.float64(s) * CMAX < amax:  # round the step up so codes stay within +-127
            s = np.nextafter(s, np.float32(np.inf))
        s64 = np.float64(s)
        e2 = 0.0
        for j in range(dp):
            c = 0.0
            if s64 > 0.0:
                c = np.rint(x[i, j] / s64)
                if c > CMAX:
                    c = CMAX
                elif c < -CMAX:
                    c = -CMAX
            codes[b, j, t] = np.int8(c)
            r = x[i, j] - s64 * c
            e2 += r * r
        e = np.sqrt(e2) * (1.0 + rel) + (defect + rel) * knorm[i] + 1e-300
        e32 = np.float32(e)
        if np.float64(e32) < e:
            e32 = np.nextafter(e32, np.float32(np.inf))
        scale[gid] = s
        err[gid] = e32


@njit(cache=True, nogil=True, inline="always")
def _block_dot(QI, r, codes, b):
    """``acc[t] = <QI[r], codes[b, :, t]>`` exactly in int32, dimensions taken in pairs.

    The accumulator is a fresh local array: LLVM then knows nothing else aliases it and keeps
    the 32 sums in vector registers across the whole loop (2.2x faster, measured, than
    accumulating into an array passed in)."""
    acc = np.zeros(BLOCK, dtype=np.int32)
    for j in range(0, QI.shape[1], 2):
        q0 = np.int32(QI[r, j])
        q1 = np.int32(QI[r, j + 1])
        for t in range(BLOCK):
            acc[t] += q0 * np.int32(codes[b, j, t]) + q1 * np.int32(codes[b, j + 1, t])
    return acc


@njit(cache=True, nogil=True, inline="always")
def _lane_bounds(QI, r, codes, b, a, qnr, scale, err, first, ubs):
    """Float32 bounds of the 32 lanes of block b for row r into ``ubs``, without branches
    (vectorised; their rounding is part of the slack; lanes past n have step and error 0 and
    are cut by the callers); returns the largest."""
    acc = _block_dot(QI, r, codes, b)
    best = np.float32(-np.inf)
    for t in range(BLOCK):
        ub = scale[first + t] * (a * np.float32(acc[t])) + qnr * err[first + t]
        ubs[t] = ub
        best = max(best, ub)
    return best


@njit(cache=True, nogil=True, parallel=True)
def code_range(QI, qa32, qn32, thr32, tau, lim, Q, keys, codes, scale, err, alive, has_dead, n,
               task_tile, task_part, tile_r0, tile_r1, part_b0, part_b1, cap, buf_ids, buf_sc,
               counts, stats):
    """Filter, then verify: every key with canonical ``score(Q[r], k) >= tau[r]`` and id
    ``<= lim[r]``, for the (row tile, block range) tasks listed.

    Row r's hits of block range p go to ``buf_ids[r, p, :cap]`` / ``buf_sc[r, p, :cap]`` in id
    order; ``counts[r, p]`` receives the number of hits (it may exceed ``cap``: the caller then
    re-runs that task with a larger buffer), ``stats[r, p]`` the keys verified in full
    precision (candidates). Codes evaluated follow from the limits (ids ``<= min(lim, n-1)``).
    """
    for ti in prange(task_tile.shape[0]):
        tile = task_tile[ti]
        p = task_part[ti]
        r0 = tile_r0[tile]
        r1 = tile_r1[tile]
        ubs = np.empty(BLOCK, dtype=np.float32)
        sc4 = np.empty(4, dtype=keys.dtype)
        # each row's candidates wait here (ascending ids) and are verified in batches, so
        # four independent score chains (and their key loads) are in flight at once
        cand = np.empty((r1 - r0, _PENDING + BLOCK + 3), dtype=np.int64)
        ncand = np.zeros(r1 - r0, dtype=np.int64)
        top = 0
        for r in range(r0, r1):
            counts[r, p] = 0
            stats[r, p] = 0
            top = max(top, min(lim[r], n - 1))
        for b in range(part_b0[p], part_b1[p]):
            first = b * BLOCK
            if first > top:
                break
            for r in range(r0, r1):
                last = min(lim[r], n - 1)
                if first > last:
                    continue
                th = thr32[r]
                if _lane_bounds(QI, r, codes, b, qa32[r], qn32[r], scale, err, first, ubs) < th:
                    continue
                _collect(r - r0, first, min(BLOCK, last - first + 1), ubs, th, alive, has_dead, cand, ncand)
                if ncand[r - r0] >= _PENDING:
                    _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats,
                            False, 0.0, stats)
        for r in range(r0, r1):
            _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats,
                    False, 0.0, stats)


@njit(cache=True, nogil=True, parallel=True)
def code_range_remainder(QI, qa32, qn32, thr32, tau, lim, Q, keys, codes, scale, err, alive, has_dead, n,
                         task_tile, task_part, tile_r0, tile_r1, part_b0, part_b1, cap, buf_ids, buf_sc,
                         counts, stats, near32, slack, rscale, rem, hist, looked):
    """:func:`code_range`, and a bound on the mass of what it does not report, for a softmax
    over the reported keys (a kernel of its own: the extra work in the shared loop slowed the
    plain search 1.75x, measured).

    ``rem[r, p]`` sums ``exp(rscale (u - tau))`` over the candidates whose score ``u`` fell
    short; the non-candidates whose bound is at least ``near32[r]`` (their
    ``u <= bound + slack[r]``) are counted in ``hist[r, p, k]``,
    ``k = floor(-4 rscale (bound + slack - tau))`` (each term ``<= exp(-k / 4)``; the last bin
    takes everything further down), and ``looked[r, p]`` counts the lanes looked at this way.
    Every other visible key is far: its term is below ``exp(rscale (near + slack - tau))``;
    the caller adds them up.
    """
    for ti in prange(task_tile.shape[0]):
        tile = task_tile[ti]
        p = task_part[ti]
        r0 = tile_r0[tile]
        r1 = tile_r1[tile]
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
        for b in range(part_b0[p], part_b1[p]):
            first = b * BLOCK
            if first > top:
                break
            for r in range(r0, r1):
                last = min(lim[r], n - 1)
                if first > last:
                    continue
                if _lane_bounds(QI, r, codes, b, qa32[r], qn32[r], scale, err, first, ubs) < near32[r]:
                    continue
                _collect_near(r - r0, r, p, first, min(BLOCK, last - first + 1), ubs, thr32[r], near32[r], alive,
                              has_dead, cand, ncand, rscale * (np.float64(slack[r]) - tau[r]), rscale, hist, looked)
                if ncand[r - r0] >= _PENDING:
                    _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats,
                            True, rscale, rem)
        for r in range(r0, r1):
            _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats,
                    True, rscale, rem)


@njit(cache=True, nogil=True)
def _collect_near(i, r, p, first, cnt, ubs, th, near, alive, has_dead, cand, ncand, shift, rscale, hist, looked):
    """:func:`_collect`, and in the same pass the histogram of ``rscale ub + shift`` (<= 0,
    quarter e-folds) of the block's non-candidates (those below ``near`` in the last bin);
    counts the lanes looked at."""
    looked[r, p] += cnt
    last = hist.shape[2] - 1
    nc = ncand[i]
    for t in range(cnt):
        if has_dead and alive[first + t] == 0:
            continue
        if ubs[t] >= th:
            cand[i, nc] = first + t
            nc += 1
        elif ubs[t] < near:  # below the near edge: the last bin (e^-_FAR) bounds it
            hist[r, p, last] += 1
        else:
            k = int(np.floor(-4.0 * (rscale * np.float64(ubs[t]) + shift)))
            hist[r, p, min(max(k, 0), last)] += 1
    ncand[i] = nc


@njit(cache=True, nogil=True)
def _collect(i, first, cnt, ubs, th, alive, has_dead, cand, ncand):
    """Append the lanes of one block whose bound reaches ``th`` to row slot i's pending list.
    A function of its own, kept out of the filter's hot loop (which then compiles to a tight
    vector loop: measured 2x faster than with this code inlined into it)."""
    nc = ncand[i]
    for t in range(cnt):
        if ubs[t] >= th and not (has_dead and alive[first + t] == 0):
            cand[i, nc] = first + t
            nc += 1
    ncand[i] = nc


@njit(cache=True, nogil=True)
def _verify(Q, r, i, p, tau_r, keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats, want_rem, rscale, rem):
    """Decide row r's pending candidates (slot i) by their canonical scores, four at a time,
    appending the hits (ascending ids) to its buffer."""
    nc = ncand[i]
    if nc == 0:
        return
    stats[r, p] += nc
    for x in range(nc, (nc + 3) // 4 * 4):
        cand[i, x] = cand[i, nc - 1]
    for x in range(0, nc, 4):
        _dot_canonical4(Q[r], keys, cand[i, x], cand[i, x + 1], cand[i, x + 2], cand[i, x + 3], sc4)
        for y in range(min(4, nc - x)):
            if sc4[y] >= tau_r:
                c = counts[r, p]
                if c < cap:
                    buf_ids[r, p, c] = cand[i, x + y]
                    buf_sc[r, p, c] = sc4[y]
                counts[r, p] = c + 1
            elif want_rem:
                rem[r, p] += np.exp(rscale * (np.float64(sc4[y]) - tau_r))
    ncand[i] = 0


@njit(cache=True, nogil=True, parallel=True)
def code_centres(QI, qa, codes, scale, n, out):
    """``out[r, j] = s_j * a_r * <qi_r, c_j>`` for ids ``j < n``, float64 ``(m, n)``: the
    centre of key j's score interval (its half-width is ``||q|| err_j`` plus the query's
    slack). Parallel over blocks; every row reads a block while it is in cache."""
    m = QI.shape[0]
    nb = (n + BLOCK - 1) // BLOCK
    for b in prange(nb):
        first = b * BLOCK
        cnt = min(BLOCK, n - first)
        for r in range(m):
            acc = _block_dot(QI, r, codes, b)
            a = qa[r]
            for t in range(cnt):
                out[r, first + t] = np.float64(scale[first + t]) * a * np.float64(acc[t])

