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
  same pass; a block whose largest bound is below the row's threshold costs nothing more.
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
from numba import njit, prange

from ._code_kernels import BLOCK, _PENDING, _collect, _verify, pair_dot_1x1, pair_dot_1x4, pair_dot_8x1

#: query rows per task (the rows that share one pass over a range of codes)
TILE_ROWS = 64
#: code blocks per key tile: 16 x 32 keys x 64 bytes = 32 KiB at d = 64, within L1 + L2's
#: nearest ways while 8 tiles of 8 rows pass over it
KEY_TILE = 16
#: below this many rows in a task, rows go one at a time against four blocks
FEW_ROWS = 4


@njit(cache=True, nogil=True, inline="always")
def _acc_bounds(acc, off, a, qnr, scale, err, first, ubs):
    """Float32 bounds of the 32 lanes of one block from its int32 sums ``acc[off:off+32]``
    into ``ubs``, without branches (vectorised); returns the largest. The expression is the
    one the slack was sized for (``_code_kernels._lane_bounds``)."""
    best = np.float32(-np.inf)
    for t in range(BLOCK):
        ub = scale[first + t] * (a * np.float32(acc[off + t])) + qnr * err[first + t]
        ubs[t] = ub
        best = max(best, ub)
    return best


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
        ubs = np.empty(BLOCK, dtype=np.float32)
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
                        if _acc_bounds(acc, k * BLOCK, qa32[r], qn32[r], scale, err, first, ubs) < th:
                            continue
                        _collect(r - r0, first, min(BLOCK, last - first + 1), ubs, th, alive, has_dead, cand, ncand)
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
                            th = thr32[r]
                            if _acc_bounds(acc, i * BLOCK, qa32[r], qn32[r], scale, err, first, ubs) < th:
                                continue
                            _collect(r - r0, first, min(BLOCK, last - first + 1), ubs, th, alive, has_dead, cand,
                                     ncand)
                            if ncand[r - r0] >= _PENDING:
                                _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc,
                                        counts, stats, False, 0.0, stats)
        for r in range(r0, r1):
            _verify(Q, r, r - r0, p, tau[r], keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats,
                    False, 0.0, stats)
