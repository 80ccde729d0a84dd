"""Decode attention for a whole layer in one compiled call: every (batch row, kv head, query)
row of a ``KVCacheIndex`` at once, threads across the rows.

The per-head path of :func:`hsr.hsr_attention` calls two or three numba kernels per
(batch row, kv head) from Python, each with its own validation, allocations and thread launch;
at decode (one query position, 3 kv heads of 3 query heads each on SmolLM2) that overhead and
the per-row bucketing cost more than the attention arithmetic. Here the caller's contiguous
``(B * Hkv, capacity, D)`` float32 keys and values (the transformers cache's own buffers, read
in place) stand in for the index's copies, which hold the same numbers, and one ``prange``
runs every row:

``softmax_bounds_rows``
    the certified softmax of the code filter (:func:`hsr.attention._kernels.softmax_from_bounds`,
    ``eps`` mode) over per-key upper bounds ``ub (rows, n)`` from ``HSRIndex.upper_bounds``.
    Same buckets, same order inside a bucket (ascending id), same canonical scores, same
    online-softmax arithmetic (``_accumulate`` / ``_finish`` are shared), so the kept keys,
    the output and the certified dropped mass are bit for bit those of the per-head kernel.
    Faster per row: the bucket order is filled only as far as the search gets (a second pass
    fills the rest if it goes further), empty buckets are skipped (their mass is zero, so the
    stopping test there equals the test at the next non-empty one), scores are computed
    eight keys at a time (eight independent dimension-order chains), and those eight keys'
    values are added to the output in one pass over it, each element's adds in the key
    order (the same sums, bit for bit; in a 32K SmolLM2 decode the index's steps went from
    0.82-0.83x to 0.94-0.96x the dense steps over the same buffers, paired:
    ``bench/results/generate_cpu_32k_eps1e-3_ab_*.json``).
``softmax_csr_rows``
    :func:`hsr.attention._kernels.softmax_from_csr` over the concatenated CSR results of
    every head (threshold modes: ``tau`` and ``topk``), values read per row's head.
``layer_softmax``
    the seam the transformers backend calls: one decode step of a whole
    :class:`~hsr.attention.kv.KVCacheIndex` (bounds or searches per head through the index's
    public methods, then one of the two kernels above for every row).
``dense_softmax_chunks``, ``merge_chunks``, ``layer_dense_softmax``
    the dense step beside it (every visible key, no index): a flash-decoding split of each
    (batch row, kv head)'s keys into chunks, one task per chunk that reads each key and value
    row once for all the group's query rows, then a merge of the chunks in float64. torch's
    CPU SDPA reads the cache at 14 GB/s in a SmolLM2 decode at 32K (3.6 ms a layer, 2 cores;
    the machine reads 35 GB/s): this kernel reads it at about twice that.

Arrays (all C-contiguous; ``R`` rows ordered ``(b, kv head, query head in group, query)``,
``rows_per_head = G * M`` consecutive rows per (b, kv head)):

- ``Q (R, d)`` float32; ``keys (BH, cap, d)`` and ``values (BH, cap, dv)`` float32, ids
  ``0 .. n-1`` valid; ``alive (BH, n)`` uint8 (``(BH, 0)`` when ``has_dead`` is False);
- ``ub (R, n)`` float64; ``lim (R,)`` int64 (largest id each row sees);
- ``out (R, dv)`` float32; ``info (R, 5)`` float64: lse, certified dropped fraction, kept,
  scored, visible (bounds) / kept (CSR: columns 3-4 untouched).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._numerics import dot_canonical
from ._kernels import _NB, _PER_EFOLD, _TINY, _accumulate, _finish, _log_ratio_ok, _softmax_csr_row
from .kv import KVCacheIndex

__all__ = ["dense_softmax_chunks", "layer_dense_softmax", "layer_softmax", "merge_chunks", "softmax_bounds_rows",
           "softmax_csr_rows"]

#: the first pass of the bucket fill stops at the bucket where this share of the visible keys
#: (at least ``_FILL_MIN``) is placed; a search that goes further fills the rest
_FILL_SHARE = 4
_FILL_MIN = 512


#: keys ahead of the one being scored whose key and value rows are prefetched: the keys a
#: bucket holds are scattered over the cache, so each is a cache miss that the hardware
#: prefetcher does not predict (measured in a SmolLM2 decode at 8K: 1.6x faster with it)
_AHEAD = 16


@intrinsic
def _prefetch(typingctx, arr, i, j):
    """Hint the cache line of ``arr[i, j]`` (a 2-D array) into every cache level (never faults)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2):
        return None

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [args[1], args[2]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp, types.intp), codegen


@njit(cache=True, nogil=True)
def _prefetch_rows(K, V, order, a, b):
    """Prefetch the key and value rows of ids ``order[a:b]``."""
    for p in range(a, b):
        i = order[p]
        for c in range(0, K.shape[1], 16):
            _prefetch(K, i, c)
        for c in range(0, V.shape[1], 16):
            _prefetch(V, i, c)


@njit(cache=True, nogil=True)
def _dot8(q, K, order, p, out):
    """Canonical scores of keys ``order[p:p+8]`` into ``out[:8]`` (as ``dot_canonical``: float32,
    dimension order, no fused multiply-add), eight independent chains: two calls of the shared
    four-chain ``dot_canonical4`` measured 4-6% slower on a layer that scores nearly every key
    (32K keys, 9 rows, one thread)."""
    i0, i1, i2, i3 = order[p], order[p + 1], order[p + 2], order[p + 3]
    i4, i5, i6, i7 = order[p + 4], order[p + 5], order[p + 6], order[p + 7]
    q0 = q[0]
    a0 = q0 * K[i0, 0]
    a1 = q0 * K[i1, 0]
    a2 = q0 * K[i2, 0]
    a3 = q0 * K[i3, 0]
    a4 = q0 * K[i4, 0]
    a5 = q0 * K[i5, 0]
    a6 = q0 * K[i6, 0]
    a7 = q0 * K[i7, 0]
    for j in range(1, q.shape[0]):
        qj = q[j]
        a0 = a0 + qj * K[i0, j]
        a1 = a1 + qj * K[i1, j]
        a2 = a2 + qj * K[i2, j]
        a3 = a3 + qj * K[i3, j]
        a4 = a4 + qj * K[i4, j]
        a5 = a5 + qj * K[i5, j]
        a6 = a6 + qj * K[i6, j]
        a7 = a7 + qj * K[i7, j]
    out[0] = a0
    out[1] = a1
    out[2] = a2
    out[3] = a3
    out[4] = a4
    out[5] = a5
    out[6] = a6
    out[7] = a7


@njit(cache=True, nogil=True)
def _accumulate8(sc8, order, p, scale, st, V, acc_out):
    """``_accumulate`` of keys ``order[p:p+8]`` with scores ``sc8``, bit for bit: when none of
    them raises the running max (the common case, the buckets come from the top), every
    output element takes its eight adds in one pass, in the same order, so ``acc_out`` is
    loaded and stored once instead of eight times; otherwise key by key, since a rescale
    falls between two adds."""
    m = st[0]
    rises = False
    for y in range(8):
        if scale * np.float64(sc8[y]) > m:
            rises = True
    if rises:
        for y in range(8):
            st[4] += 1.0
            _accumulate(np.float64(sc8[y]), order[p + y], scale, st, 0, 0.0, V, acc_out)
        return
    w0 = np.exp(scale * np.float64(sc8[0]) - m)
    w1 = np.exp(scale * np.float64(sc8[1]) - m)
    w2 = np.exp(scale * np.float64(sc8[2]) - m)
    w3 = np.exp(scale * np.float64(sc8[3]) - m)
    w4 = np.exp(scale * np.float64(sc8[4]) - m)
    w5 = np.exp(scale * np.float64(sc8[5]) - m)
    w6 = np.exp(scale * np.float64(sc8[6]) - m)
    w7 = np.exp(scale * np.float64(sc8[7]) - m)
    st[1] = st[1] + w0 + w1 + w2 + w3 + w4 + w5 + w6 + w7  # left to right: the sequential sum
    st[3] += 8.0
    st[4] += 8.0
    r0, r1, r2, r3 = V[order[p]], V[order[p + 1]], V[order[p + 2]], V[order[p + 3]]
    r4, r5, r6, r7 = V[order[p + 4]], V[order[p + 5]], V[order[p + 6]], V[order[p + 7]]
    for c in range(V.shape[1]):
        a = acc_out[c]
        a += w0 * r0[c]
        a += w1 * r1[c]
        a += w2 * r2[c]
        a += w3 * r3[c]
        a += w4 * r4[c]
        a += w5 * r5[c]
        a += w6 * r6[c]
        a += w7 * r7[c]
        acc_out[c] = a


@njit(cache=True, nogil=True)
def _mass_from(mass, b):
    """Bound mass of buckets ``b ..`` (the keys not yet scored when bucket ``b`` is next)."""
    R = 0.0
    for c in range(b, _NB):
        R += mass[c]
    return R


@njit(cache=True, nogil=True)
def _fill(bucket, top, lo, hi, fill, order):
    """Place the ids ``<= top`` of buckets ``lo <= b < hi`` at ``order[fill[b]++]`` (ascending id)."""
    for j in range(top + 1):
        b = bucket[j]
        if b >= lo and b < hi:
            order[fill[b]] = j
            fill[b] += 1


@njit(cache=True, nogil=True)
def _visible_max(alive, has_dead, ub, top, scale):
    """``(visible, mref)``: the keys a row sees (ids ``<= top``, alive) and the largest
    ``scale * ub`` among them (``-inf`` when none)."""
    mref = -np.inf
    if not has_dead:  # no liveness test in the loop when nothing was ever removed
        # four running maxima: one chain waits on each max's latency (32K keys: 36 -> 9 us)
        m0 = m1 = m2 = m3 = -np.inf
        j = 0
        while j + 4 <= top + 1:
            m0 = max(m0, scale * ub[j])
            m1 = max(m1, scale * ub[j + 1])
            m2 = max(m2, scale * ub[j + 2])
            m3 = max(m3, scale * ub[j + 3])
            j += 4
        for j in range(j, top + 1):
            m0 = max(m0, scale * ub[j])
        return max(top + 1, 0), max(max(m0, m1), max(m2, m3))
    visible = 0
    for j in range(top + 1):
        if alive[j] != 0:
            visible += 1
            mref = max(mref, scale * ub[j])
    return visible, mref


@njit(cache=True, nogil=True)
def _bucket_counts(bucket, top):
    """``cnt (_NB + 1,)``: ``cnt[b + 1]`` keys of ids ``<= top`` in bucket ``b`` (255: removed,
    not counted). Four histograms, one per id mod 4, summed: consecutive keys mostly share a
    bucket, and one histogram's increments then wait on each other (32K keys: 38 -> 22 us with
    the bucket pass)."""
    cnt4 = np.zeros((4, 257), dtype=np.int64)  # every uint8 bucket + 1: removed keys land past _NB
    j = 0
    while j + 4 <= top + 1:
        cnt4[0, bucket[j] + 1] += 1
        cnt4[1, bucket[j + 1] + 1] += 1
        cnt4[2, bucket[j + 2] + 1] += 1
        cnt4[3, bucket[j + 3] + 1] += 1
        j += 4
    for j in range(j, top + 1):
        cnt4[0, bucket[j] + 1] += 1
    cnt = np.zeros(_NB + 1, dtype=np.int64)
    for b in range(_NB + 1):
        cnt[b] = cnt4[0, b] + cnt4[1, b] + cnt4[2, b] + cnt4[3, b]
    return cnt


@njit(cache=True, nogil=True)
def _bounds_row(q, K, V, alive, has_dead, ub, scale, eps, lim, out_row, info):
    """One row of :func:`softmax_bounds_rows` (``_kernels._bounds_one`` in ``eps`` mode)."""
    n = ub.shape[0]
    top = min(lim, n - 1)
    visible, mref = _visible_max(alive, has_dead, ub, top, scale)
    acc_out = np.zeros(V.shape[1])
    st = np.zeros(5)  # the online-softmax state [m_run, Z, D, kept, scored] of ``_accumulate``
    st[0] = -np.inf
    # bucket b holds keys with mref - scale*ub in [b/4, (b+1)/4): each term <= e^(-b/4)
    bucket = np.empty(max(top + 1, 0), dtype=np.uint8)
    for j in range(top + 1):
        if has_dead and alive[j] == 0:
            bucket[j] = 255
            continue
        gap = _PER_EFOLD * (mref - scale * ub[j])
        bucket[j] = _NB - 1 if gap >= _NB - 1 else int(gap)
    cnt = _bucket_counts(bucket, top)
    mass = np.zeros(_NB)
    for b in range(_NB):
        mass[b] = cnt[b + 1] * max(np.exp(-b / _PER_EFOLD), _TINY)
    start = cnt  # prefix sums in place: start[b] .. start[b+1] is bucket b
    for b in range(_NB):
        start[b + 1] += start[b]
    order = np.empty(visible + 8, dtype=np.int64)
    fill = start[:_NB].copy()
    want = max(visible // _FILL_SHARE, _FILL_MIN)
    filled = _NB
    for b in range(_NB):
        if start[b + 1] >= want:
            filled = b + 1
            break
    _fill(bucket, top, 0, filled, fill, order)
    sc8 = np.empty(8, dtype=K.dtype)
    done = 0
    for b in range(_NB):
        s, e = start[b], start[b + 1]
        if e == s:
            continue  # empty: zero mass, the test here is the test at the next non-empty bucket
        if b > 0 and _log_ratio_ok(_mass_from(mass, b), mref, st, eps):
            break
        if b >= filled:
            _fill(bucket, top, filled, _NB, fill, order)
            filled = _NB
        p = s
        _prefetch_rows(K, V, order, s, min(s + _AHEAD, e))
        while p + 8 <= e:
            _prefetch_rows(K, V, order, min(p + _AHEAD, e), min(p + _AHEAD + 8, e))
            _dot8(q, K, order, p, sc8)
            _accumulate8(sc8, order, p, scale, st, V, acc_out)
            p += 8
        while p < e:
            st[4] += 1.0
            _accumulate(np.float64(dot_canonical(q, K, order[p])), order[p], scale, st, 0, 0.0, V, acc_out)
            p += 1
        done = b + 1
    _finish(st, _mass_from(mass, done) * (1.0 + 1e-12), mref, acc_out, out_row, info)
    info[4] = visible


@njit(cache=True, nogil=True, parallel=True)
def softmax_bounds_rows(Q, keys, values, alive, has_dead, ub, rows_per_head, scale, eps, lim, out, info):
    """Certified softmax (``eps`` mode) of every row from per-key bounds ``ub``; row ``r``
    reads head ``r // rows_per_head`` (see the module docstring for the arrays)."""
    for r in prange(Q.shape[0]):
        h = r // rows_per_head
        _bounds_row(Q[r], keys[h], values[h], alive[h], has_dead, ub[r], scale, eps, lim[r], out[r], info[r])


@njit(cache=True, nogil=True, parallel=True)
def softmax_csr_rows(lims, ids, scores, values, rows_per_head, scale, tau, remainder, out, info):
    """``_kernels.softmax_from_csr`` over every row's reported keys, row ``r``'s values being
    ``values[r // rows_per_head]``; the same row kernel, so the same output and certificate."""
    for i in prange(lims.shape[0] - 1):
        _softmax_csr_row(lims[i], lims[i + 1], ids, scores, values[i // rows_per_head], scale, tau[i], remainder[i],
                         out[i], info[i])


def layer_softmax(Q: np.ndarray, index: KVCacheIndex, keys: np.ndarray, values: np.ndarray, n: int,
                  scale: float, *, eps: Optional[float] = None, tau: Optional[float] = None,
                  topk: Optional[int] = None, causal: bool = True
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Certified softmax of a decode step for a whole :class:`~hsr.attention.kv.KVCacheIndex`.

    Parameters
    ----------
    Q : ndarray (B, Hq, M, d) float32, C-contiguous
    index : KVCacheIndex over ids ``0 .. n-1`` (code filter), the same keys and values as
        ``keys`` / ``values``
    keys, values : ndarray (B * Hkv, cap, d) / (B * Hkv, cap, dv) float32, C-contiguous, rows
        ``0 .. n-1`` valid (the transformers cache's buffers, read in place)
    n : int
        Keys in the cache.
    scale : float
    eps, tau, topk : as :func:`hsr.hsr_attention` (exactly one given); ``tau`` a scalar
    causal : bool, default True
        Query ``m`` of ``M`` sees ids ``<= n - M + m``; False: every id.

    Returns
    -------
    out : ndarray (B, Hq, M, dv) float32
    scored, selected : ndarray (B, Hq, M) int64
    dropped : ndarray (B, Hq, M) float64
        The certified dropped fraction, as :func:`hsr.hsr_attention` returns it.

    The bounds and searches are the index's public methods, one call per (batch row, kv head)
    (each index is its own object); everything else is one compiled call for the layer.
    """
    B, Hq, M, d = Q.shape
    Hkv = index.kv_heads
    G = Hq // Hkv
    rph = G * M
    R = B * Hq * M
    Qr = Q.reshape(R, d)
    dv = values.shape[2]
    lim_h = np.tile(np.arange(M, dtype=np.int64) + (n - M), G) if causal \
        else np.full(rph, np.iinfo(np.int64).max, dtype=np.int64)
    lim = np.tile(lim_h, B * Hkv)
    out = np.empty((R, dv), dtype=np.float32)
    info = np.zeros((R, 5))
    flat = [kvi.index for row in index.heads for kvi in row]
    has_dead = any(len(ix) != ix.n_total for ix in flat)
    if eps is not None:
        ub = np.empty((R, n))
        for h, ix in enumerate(flat):
            ix.upper_bounds(Qr[h * rph:(h + 1) * rph], out=ub[h * rph:(h + 1) * rph])
        alive = np.stack([ix.key_view().alive for ix in flat]) if has_dead else np.ones((len(flat), 0), np.uint8)
        softmax_bounds_rows(Qr, keys, values, alive, has_dead, ub, rph, float(scale), float(eps), lim, out, info)
        scored = info[:, 3].astype(np.int64)
    else:
        lims, ids, scs, rems, taus, scored = [np.zeros(1, dtype=np.int64)], [], [], [], [], []
        lo = 0
        for h, ix in enumerate(flat):
            Qh = Qr[h * rph:(h + 1) * rph]
            if topk is not None:
                sc, top_ids = ix.topk(Qh, int(topk), max_id=lim_h)
                t = np.where(top_ids[:, -1] >= 0, sc[:, -1].astype(np.float64), -np.inf)
            else:
                t = np.full(rph, float(tau))
            t = np.maximum(t, float(np.finfo(np.float32).min))
            li, sc, i, st = ix.range_search(Qh, t, max_id=lim_h, remainder_scale=float(scale), return_stats=True)
            lims.append(li[1:] + lo)
            lo += int(li[-1])
            ids.append(i)
            scs.append(sc)
            rems.append(st.remainder)
            taus.append(t)
            scored.append(st.keys_scored)
        softmax_csr_rows(np.concatenate(lims), np.concatenate(ids), np.concatenate(scs), values, rph, float(scale),
                         np.concatenate(taus), np.concatenate(rems), out, info)
        scored = np.concatenate(scored).astype(np.int64)
    shape = (B, Hq, M)
    return (out.reshape(B, Hq, M, dv), scored.reshape(shape), info[:, 2].astype(np.int64).reshape(shape),
            info[:, 1].reshape(shape))


# ------------------------------------------------------------------------------ dense decode
# fastmath: reassociation and contraction only, so the dot products and the value sums
# vectorise; no comparison with a threshold decides what is kept here (every visible key
# enters), and NaN and Inf keep their meaning (no nnan / ninf).
_DENSE_MATH = {"reassoc", "contract", "nsz"}
# exp in float32 as Cephes' expf computes it (x = n ln2 + r, |r| <= ln2 / 2, a degree-7
# polynomial for e^r, 2^n from its exponent bits), in two loops the compiler vectorises:
# numba's own np.exp is a scalar call per element (no SVML), ~20% of the dense kernel's time
_LOG2E32 = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = HI + LO, HI with 9 significant bits: n * HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                       1.6666665459e-1, 5.0000001201e-1))
_EXP_LOW = np.float32(-87.0)  # below: 0 (e^-87 = 1.6e-38, the float32 normal range's end)


@njit(cache=True, nogil=True, fastmath=_DENSE_MATH)
def exp_shifted(row, w, m, bits):
    """``row[:w] = exp(row[:w] - m)`` in float32 and their sum, for ``row[j] <= m`` (a
    softmax's maximum): within 4e-7 of the exact exponential of the float32 difference
    (2.97e-7 the worst of 2e7 random differences), 0 below ``-87`` (and for ``-inf``), NaN for
    NaN. ``bits``: int32 scratch of ``w`` or more."""
    if w > row.shape[0] or w > bits.shape[0]:  # numba checks no bounds: a short array would be overrun
        raise ValueError("exp_shifted: w is longer than row or bits")
    p0, p1, p2, p3, p4, p5 = _EXP_P
    for j in range(w):
        x = row[j] - m
        under = x < _EXP_LOW  # False for NaN: a NaN stays NaN through r
        x = _EXP_LOW if under else x
        n = np.floor(x * _LOG2E32 + np.float32(0.5))
        r = (x - n * _LN2_HI) - n * _LN2_LO
        row[j] = ((((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * (r * r) + r) + np.float32(1.0)
        bits[j] = np.int32(0) if under else (np.int32(n) + np.int32(127)) << np.int32(23)  # 2^n, n in [-126, 0]
    scale2 = bits.view(np.float32)
    tot = np.float32(0.0)
    for j in range(w):
        p = row[j] * scale2[j]
        row[j] = p
        tot += p
    return tot


@njit(cache=True, nogil=True, parallel=True, fastmath=_DENSE_MATH)
def dense_softmax_chunks(Q, keys, values, n, lim, scale, chunk, m_part, l_part, a_part):
    """Softmax partials of every row over every chunk of its (batch row, kv head)'s keys.

    ``Q (BH, rows_per_head, d)``, ``keys (BH, cap, d)``, ``values (BH, cap, dv)`` float32 (ids ``0 .. n-1``),
    ``lim (R,)`` int64 (row ``r`` sees ids ``<= lim[r]``), ``scale`` float32. Writes, for row
    ``r`` and chunk ``c`` (ids ``c * chunk ..``): ``m_part[r, c]`` the largest scaled score it
    sees there (-inf if none), ``l_part[r, c]`` the sum of ``exp(score - m)``, ``a_part[r, c]``
    the sum of ``exp(score - m) * v`` (float32). One task per (kv head, chunk): each key and
    value row is read once for the ``rows_per_head`` rows of its group; rows are numbered
    ``bh * rows_per_head + i``. A NaN or +Inf score makes its row's sums NaN, so a bad input
    cannot give a finite answer.
    """
    BH, rph, d = Q.shape
    dv = values.shape[2]
    nch = (n + chunk - 1) // chunk
    for t in prange(BH * nch):
        bh = t // nch
        c = t - bh * nch
        a = c * chunk
        w = min(n, a + chunk) - a
        r0 = bh * rph
        s = np.empty((rph, chunk), np.float32)
        bits = np.empty(chunk, np.int32)
        qh = Q[bh]  # (rph, d), C-contiguous: the dot products vectorise
        for j in range(w):
            kj = keys[bh, a + j]
            for r in range(rph):
                acc = np.float32(0.0)
                for e in range(d):
                    acc += qh[r, e] * kj[e]
                s[r, j] = acc * scale
        for r in range(rph):  # causal: the ids past a row's limit (the last M - 1 at most)
            for j in range(max(0, lim[r0 + r] + 1 - a), w):
                s[r, j] = -np.inf
        for r in range(rph):
            m = np.float32(-np.inf)  # float32 throughout: a float64 exp here costs 15% of the step
            for j in range(w):
                m = max(m, s[r, j])
            tot = np.float32(0.0)
            if m == -np.inf:  # every id of the chunk is past this row's limit
                s[r, :w] = 0.0
            else:  # a NaN score, skipped by max, gives a NaN weight: the row's answer is NaN
                tot = exp_shifted(s[r], w, m, bits)
            m_part[r0 + r, c] = m
            l_part[r0 + r, c] = tot
        acc_o = np.zeros((rph, dv), np.float32)
        for j in range(w):
            vj = values[bh, a + j]
            for r in range(rph):
                p = s[r, j]
                for e in range(dv):
                    acc_o[r, e] += p * vj[e]
        for r in range(rph):
            a_part[r0 + r, c, :] = acc_o[r]


@njit(cache=True, nogil=True, parallel=True)
def merge_chunks(m_part, l_part, a_part, out, lse):
    """``out (R, dv)`` float32 and ``lse (R,)`` float64 (natural log of the row's sum of
    ``exp(scaled score)``) from :func:`dense_softmax_chunks`' partials, summed in float64."""
    R, nch = m_part.shape
    dv = a_part.shape[2]
    for r in prange(R):
        mm = -np.inf
        for c in range(nch):
            mm = max(mm, np.float64(m_part[r, c]))
        tot = 0.0
        acc = np.zeros(dv)
        for c in range(nch):
            x = np.float64(m_part[r, c])
            wgt = 0.0 if x == -np.inf else np.exp(x - mm)  # a chunk it sees nothing of adds nothing
            tot += wgt * l_part[r, c]
            for e in range(dv):
                acc[e] += wgt * a_part[r, c, e]
        for e in range(dv):
            out[r, e] = acc[e] / tot
        lse[r] = mm + np.log(tot)


def dense_chunk(n: int, heads: int, threads: int) -> int:
    """Keys per chunk: about eight tasks per thread, 256 to 2048 keys (a multiple of 64), so a
    short cache still splits over the threads and a long one keeps each task's score buffer
    in the L1/L2 caches."""
    want = -(-n * heads // (8 * max(1, threads)))
    return int(min(2048, max(256, -(-want // 64) * 64)))


def layer_dense_softmax(Q: np.ndarray, keys: np.ndarray, values: np.ndarray, n: int, scale: float, *,
                        causal: bool = True, threads: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Full softmax attention of a decode step over a layer's cache buffers: every visible key.

    Parameters
    ----------
    Q : ndarray (B, Hq, M, d) float32, C-contiguous
    keys, values : ndarray (B * Hkv, cap, d) / (B * Hkv, cap, dv) float32, C-contiguous, rows
        ``0 .. n-1`` valid (the transformers cache's buffers, read in place)
    n : int
        Keys in the cache (``M <= n``).
    scale : float
    causal : bool, default True
        Query ``m`` of ``M`` sees ids ``<= n - M + m``; False: every id.
    threads : int, optional
        Threads the chunks are sized for (default: numba's).

    Returns
    -------
    out : ndarray (B, Hq, M, dv) float32
    lse : ndarray (B, Hq, M) float64
        Natural log of each row's ``sum exp(scale * score)``.

    The same numbers as :func:`hsr.attention.dense.dense_softmax_attention` up to float32
    rounding: scores and each chunk's sums in float32 (vectorised: the order of a dot product's
    terms is the compiler's), the chunks merged in float64.
    """
    from numba import get_num_threads

    B, Hq, M, d = Q.shape
    BH = keys.shape[0]
    if BH % B or Hq % (BH // B) or not 1 <= M <= n <= keys.shape[1]:
        raise ValueError(f"q {Q.shape} against keys {keys.shape} with n={n}: need Hq a multiple of the kv heads "
                         "and 1 <= M <= n <= capacity")
    G = Hq // (BH // B)
    rph = G * M
    R = B * Hq * M
    lim_h = np.tile(np.arange(M, dtype=np.int64) + (n - M), G) if causal \
        else np.full(rph, n - 1, dtype=np.int64)
    lim = np.tile(lim_h, BH)
    chunk = dense_chunk(n, BH, threads or get_num_threads())
    nch = -(-n // chunk)
    dv = values.shape[2]
    m_part = np.empty((R, nch), np.float32)
    l_part = np.empty((R, nch), np.float32)
    a_part = np.empty((R, nch, dv), np.float32)
    dense_softmax_chunks(Q.reshape(BH, rph, d), keys, values, int(n), lim, np.float32(scale), chunk,
                         m_part, l_part, a_part)
    out = np.empty((R, dv), np.float32)
    lse = np.empty(R)
    merge_chunks(m_part, l_part, a_part, out, lse)
    return out.reshape(B, Hq, M, dv), lse.reshape(B, Hq, M)
