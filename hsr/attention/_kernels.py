"""numba kernels for attention on the index.

``relu_from_csr``: ReLU^alpha attention from the CSR of reported keys.

``softmax_certified``: best-first softmax over a forest with a certified dropped mass.
Nodes of every tree sit in one max-heap keyed by their upper bound ``u``. The mass of the
unopened nodes is at most ``R = sum count_v * exp(scale*u_v)``; opened leaves add their exact
terms to ``Z`` (accumulated online, relative to the running max score, with R kept relative to
the largest root bound, and the two compared in logs so nothing overflows or underflows). The search stops when ``R <= eps * Z`` (eps mode) or when the best
unopened bound is below tau (threshold mode), and reports ``(R + D) / (Z + R + D)`` as the
certified dropped fraction (``D`` = exact mass of scored-but-dropped keys in threshold mode).
Because the dropped fraction ``x / (Z + x)`` grows with the dropped mass ``x <= R + D``, the
certificate holds on any input.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._numerics import dot_canonical4, heap_pop, heap_push
from ..index.layout import leaf_block, max_leaf, node_bounds, scan_block


@njit(cache=True, nogil=True, parallel=True)
def relu_from_csr(lims, ids, scores, values, scale, bias, alpha, out, wsum):
    """``out[i] = sum_j w_ij v_j / sum_j w_ij`` with ``w = relu(scale*score - bias_i)**alpha``
    over query i's reported keys; zeros where nothing fires. ``wsum[i]`` receives
    ``log sum_j w_ij`` (-inf where nothing fires), computed without overflow for any alpha."""
    dv = values.shape[1]
    for i in prange(lims.shape[0] - 1):
        acc = np.zeros(dv)
        tot = 0.0
        # weights (z / z_max) ** alpha lie in [0, 1] for any alpha (z ** alpha overflows float64
        # from alpha ~ 300 on); the normalisation cancels the scale, and wsum gets it back in logs
        zmax = 0.0
        for p in range(lims[i], lims[i + 1]):
            zmax = max(zmax, scale * np.float64(scores[p]) - bias[i])
        for p in range(lims[i], lims[i + 1]):
            z = scale * np.float64(scores[p]) - bias[i]
            if z > 0.0:
                w = (z / zmax) ** alpha
                tot += w
                row = values[ids[p]]
                for c in range(dv):
                    acc[c] += w * row[c]
        wsum[i] = np.log(tot) + alpha * np.log(zmax) if tot > 0.0 else -np.inf
        if tot > 0.0:
            for c in range(dv):
                out[i, c] = acc[c] / tot
        else:
            for c in range(dv):
                out[i, c] = 0.0


@njit(cache=True, nogil=True)
def _keep_leaf(q, tr, v, scale, st, mode, tau, lim, alive, has_dead, values, acc_out, acc,
               fill, out_ids, out_scores, pos):
    """Score leaf ``v`` of tree ``tr`` into the online-softmax state
    ``st = [m_run, Z, D, kept, scored]`` (Z, D relative to exp(m_run)); ``acc_out`` holds the
    unnormalised output relative to exp(m_run)."""
    kf, stride, ids, node_start, node_end = tr[0], tr[1], tr[2], tr[4], tr[5]
    base, bs, cnt = leaf_block(v, node_start, node_end, q.shape[0], stride)
    scan_block(q, kf, base, bs, cnt, acc)
    ls = node_start[v]
    for t in range(cnt):
        gid = ids[ls + t]
        if gid > lim or (has_dead and alive[gid] == 0):
            continue
        st[4] += 1  # keys_scored: the visible keys scored (never more than visible)
        if _accumulate(np.float64(acc[t]), gid, scale, st, mode, tau, values, acc_out) and fill:
            k = int(st[3]) - 1
            out_ids[pos + k] = gid
            out_scores[pos + k] = acc[t]


@njit(cache=True, nogil=True)
def _accumulate(sc, gid, scale, st, mode, tau, values, acc_out):
    """Add key ``gid`` with canonical score ``sc`` to the online-softmax state
    ``st = [m_run, Z, D, kept, scored]`` (Z, D relative to exp(m_run)); in threshold mode a
    score below tau goes to the exact dropped mass D. Returns True when the key is kept."""
    dv = values.shape[1]
    z = scale * sc
    if z > st[0]:
        # new running max: rescale what was accumulated so far
        r = np.exp(st[0] - z)
        st[1] *= r
        st[2] *= r
        for c in range(dv):
            acc_out[c] *= r
        st[0] = z
    w = np.exp(z - st[0])
    if mode == 1 and sc < tau:
        st[2] += w
        return False
    st[1] += w
    row = values[gid]
    for c in range(dv):
        acc_out[c] += w * row[c]
    st[3] += 1.0
    return True


#: floor of each remainder term exp(scale*u - M_ref): an underflowed term would under-count
#: the remainder, so it is rounded up instead (conservative)
_TINY = 1e-290


@njit(cache=True, nogil=True)
def _remainder(trees, hk, ht, hv, size, scale, mref):
    R = 0.0
    for h in range(size):
        tr = trees[ht[h]]
        R += (tr[5][hv[h]] - tr[4][hv[h]]) * max(np.exp(scale * hk[h] - mref), _TINY)
    return R


@njit(cache=True, nogil=True)
def _log_ratio_ok(R, mref, st, eps):
    """True when R * exp(mref) <= eps * Z * exp(m_run), compared in logs."""
    if st[1] <= 0.0:
        return False
    if R <= 0.0:
        return True
    return np.log(R) + mref <= np.log(eps) + np.log(st[1]) + st[0]


@njit(cache=True, nogil=True)
def _softmax_one(q, qr, qnorm, trees, alive, has_dead, values, scale, mode, eps, tau, lim,
                 slack_rel, slack_abs, out_row, info, fill, out_ids, out_scores, pos):
    """One query; ``info`` gets [lse, certified dropped fraction, kept, scored, visited].

    Kept mass Z is accumulated online relative to the running max score (as FlashAttention
    does); the remainder R relative to ``M_ref = scale * max root bound``, so no term of either
    overflows; they are compared in logs."""
    total_nodes = 0
    leaf_cap = 1
    for tr in trees:
        total_nodes += tr[4].shape[0]
        leaf_cap = max(leaf_cap, max_leaf(tr[1]))
    hk = np.empty(total_nodes + 1)
    ht = np.empty(total_nodes + 1, dtype=np.int64)
    hv = np.empty(total_nodes + 1, dtype=np.int64)
    acc = np.empty(leaf_cap, dtype=values.dtype)
    dv = values.shape[1]
    acc_out = np.zeros(dv)
    st = np.zeros(5)
    st[0] = -np.inf
    visited = 0
    size = 0
    mref = -np.inf
    for ti in range(len(trees)):
        tr = trees[ti]
        if tr[5][0] <= tr[4][0] or tr[11][0] > lim:
            continue
        visited += 1
        if tr[7][0] < 0.0:  # the unbounded buffer: scan it now
            _keep_leaf(q, tr, 0, scale, st, mode, tau, lim, alive, has_dead, values, acc_out,
                       acc, fill, out_ids, out_scores, pos)
        else:
            ub, lb = node_bounds(0, qr, qnorm, tr[6], tr[7], tr[8], tr[9], tr[10], slack_rel, slack_abs)
            size = heap_push(hk, ht, hv, size, ub, ti, 0)
            mref = max(mref, scale * ub)
    R = _remainder(trees, hk, ht, hv, size, scale, mref)
    while size > 0:
        if mode == 0 and _log_ratio_ok(R, mref, st, eps):
            # the running R drifts with rounding: decide on an exact recount
            R = _remainder(trees, hk, ht, hv, size, scale, mref)
            if _log_ratio_ok(R, mref, st, eps):
                break
        if mode == 1 and hk[0] < tau:
            break
        ub = hk[0]
        ti = ht[0]
        v = hv[0]
        size = heap_pop(hk, ht, hv, size)
        tr = trees[ti]
        node_start, node_end = tr[4], tr[5]
        R -= (node_end[v] - node_start[v]) * max(np.exp(scale * ub - mref), _TINY)
        if v >= (1 << tr[3]) - 1:
            _keep_leaf(q, tr, v, scale, st, mode, tau, lim, alive, has_dead, values, acc_out,
                       acc, fill, out_ids, out_scores, pos)
            continue
        for c in range(2 * v + 1, 2 * v + 3):
            if node_end[c] <= node_start[c] or tr[11][c] > lim:
                continue
            visited += 1
            cub, clb = node_bounds(c, qr, qnorm, tr[6], tr[7], tr[8], tr[9], tr[10], slack_rel, slack_abs)
            size = heap_push(hk, ht, hv, size, cub, ti, c)
            R += (node_end[c] - node_start[c]) * max(np.exp(scale * cub - mref), _TINY)
    R = _remainder(trees, hk, ht, hv, size, scale, mref) * (1.0 + 1e-12)
    _finish(st, R, mref, acc_out, out_row, info)
    info[4] = visited
    return int(st[3])


@njit(cache=True, nogil=True)
def _finish(st, R, mref, acc_out, out_row, info):
    """Normalise the output and write [lse, certified dropped fraction, kept, scored] into
    ``info[:4]``, from the state ``st``, the remainder bound ``R`` (relative to exp(mref))."""
    dv = acc_out.shape[0]
    Z = st[1]
    D = st[2]
    if Z > 0.0:
        for c in range(dv):
            out_row[c] = acc_out[c] / Z
        info[0] = st[0] + np.log(Z)
    else:
        out_row[:] = 0.0
        info[0] = -np.inf
    # dropped fraction (R e^mref + D e^m) / (Z e^m + R e^mref + D e^m), in logs
    if R > 0.0 and mref > -np.inf:
        lr = np.log(R) + mref
        if Z + D > 0.0:
            lzd = np.log(Z + D) + st[0]
            lz = np.log(Z) + st[0] if Z > 0.0 else -np.inf
            top = max(lr, lzd)
            den = np.log(np.exp(lr - top) + np.exp(lzd - top)) + top
            info[1] = 1.0 - np.exp(lz - den)
        else:
            info[1] = 1.0
    else:
        info[1] = D / (Z + D) if Z + D > 0.0 else 0.0
    info[2] = st[3]
    info[3] = st[4]


@njit(cache=True, nogil=True, parallel=True)
def softmax_certified(Q, QR, qnorm, trees, alive, has_dead, values, scale, mode, eps, tau, lim,
                      slack_rel, slack_abs, out, info):
    """Certified softmax for every query (see the module docstring). ``mode`` 0: stop when
    the certified remainder is at most ``eps`` times the mass found; 1: keep ``score >= tau``."""
    dummy_i = np.empty(0, dtype=np.int64)
    dummy_s = np.empty(0, dtype=values.dtype)
    for i in prange(Q.shape[0]):
        _softmax_one(Q[i], QR[i], qnorm[i], trees, alive, has_dead, values, scale, mode, eps,
                     tau[i], lim[i], slack_rel, slack_abs, out[i], info[i], False, dummy_i,
                     dummy_s, 0)


# --------------------------------------------------------------------------------------
# certified softmax from per-key bounds (the code filter)

#: buckets of the keys' bounds, each a quarter e-fold of scaled score wide (48 e-folds in
#: all); the last takes the rest
_PER_EFOLD = 4
_NB = 48 * _PER_EFOLD


@njit(cache=True, nogil=True)
def _bounds_one(q, keys, alive, has_dead, ub, values, scale, mode, eps, tau, lim, out_row, info):
    """Certified softmax of one query from per-key upper bounds ``ub (n,)`` of the canonical
    scores. Keys are bucketed by bound (counting sort, a quarter e-fold of ``scale * ub`` per
    bucket) and scored bucket by bucket from the top; the remainder is the bound mass of the
    unscored buckets, each key counted at its bucket's upper edge (no exponential per key;
    at most e^0.25 above the keys' own bounds), so the certificate is nearly as tight as the
    per-key bounds.
    ``info`` gets [lse, certified dropped fraction, kept, scored, codes evaluated]."""
    n = ub.shape[0]
    top = min(lim, n - 1)
    dv = values.shape[1]
    acc_out = np.zeros(dv)
    st = np.zeros(5)
    st[0] = -np.inf
    mref = -np.inf
    visible = 0
    for j in range(top + 1):
        if has_dead and alive[j] == 0:
            continue
        visible += 1
        mref = max(mref, scale * ub[j])
    start = np.zeros(_NB + 1, dtype=np.int64)
    mass = np.zeros(_NB)
    sc4 = np.empty(4, dtype=keys.dtype)
    bucket = np.empty(max(top + 1, 0), dtype=np.int32)
    for j in range(top + 1):
        if has_dead and alive[j] == 0:
            bucket[j] = -1
            continue
        if mode == 1:
            b = 0 if ub[j] >= tau else _NB - 1  # ub < tau proves score < tau: never scored
            mass[b] += max(np.exp(scale * ub[j] - mref), _TINY)
        else:
            gap = _PER_EFOLD * (mref - scale * ub[j])
            b = _NB - 1 if gap >= _NB - 1 else int(gap)
        bucket[j] = b
        start[b + 1] += 1
    if mode == 0:  # bucket b holds keys with mref - scale*ub in [b/4, (b+1)/4): each <= e^(-b/4)
        for b in range(_NB):
            mass[b] = (start[b + 1]) * max(np.exp(-b / _PER_EFOLD), _TINY)
    for b in range(_NB):
        start[b + 1] += start[b]
    order = np.empty(visible, dtype=np.int64)
    fill = start[:_NB].copy()
    for j in range(top + 1):
        b = bucket[j]
        if b >= 0:
            order[fill[b]] = j
            fill[b] += 1
    done = 0
    for b in range(_NB):
        if mode == 1 and b > 0:
            break
        if mode == 0 and b > 0:
            R = 0.0
            for c in range(b, _NB):
                R += mass[c]
            if _log_ratio_ok(R, mref, st, eps):
                break
        # four canonical score chains at a time (one chain is bound by the add latency)
        e = start[b + 1]
        for p in range(start[b], e, 4):
            c = min(4, e - p)
            dot_canonical4(q, keys, order[p], order[p + min(1, c - 1)], order[p + min(2, c - 1)],
                           order[p + min(3, c - 1)], sc4)
            for y in range(c):
                st[4] += 1.0
                _accumulate(np.float64(sc4[y]), order[p + y], scale, st, mode, tau, values, acc_out)
        done = b + 1
    R = 0.0
    for c in range(done, _NB):
        R += mass[c]
    _finish(st, R * (1.0 + 1e-12), mref, acc_out, out_row, info)
    info[4] = visible


@njit(cache=True, nogil=True, parallel=True)
def softmax_from_bounds(Q, keys, alive, has_dead, ub, values, scale, mode, eps, tau, lim, out, info):
    """Certified softmax for every query from per-key bounds ``ub (m, n)``; modes as in
    :func:`softmax_certified`."""
    for i in prange(Q.shape[0]):
        _bounds_one(Q[i], keys, alive, has_dead, ub[i], values, scale, mode, eps, tau[i], lim[i], out[i],
                    info[i])


@njit(cache=True, nogil=True)
def _softmax_csr_row(a, b, ids, scores, values, scale, tau_i, R, out_i, info_i):
    """One query row of :func:`softmax_from_csr`: softmax over its reported keys
    ``ids[a:b]`` (scores ``scores[a:b]``, value rows of ``values``) and the certified dropped
    fraction from ``R``; ``info_i`` gets [lse, certified dropped fraction, kept]."""
    dv = values.shape[1]
    m = -np.inf
    for p in range(a, b):
        m = max(m, scale * np.float64(scores[p]))
    acc = np.zeros(dv)
    Z = 0.0
    for p in range(a, b):
        w = np.exp(scale * np.float64(scores[p]) - m)
        Z += w
        row = values[ids[p]]
        for c in range(dv):
            acc[c] += w * row[c]
    if Z > 0.0:
        for c in range(dv):
            out_i[c] = acc[c] / Z
        info_i[0] = m + np.log(Z)
        if R > 0.0:
            # dropped fraction R e^(s tau) / (Z e^m + R e^(s tau)), in logs
            lr = np.log(R) + scale * tau_i
            lz = m + np.log(Z)
            top = max(lr, lz)
            info_i[1] = np.exp(lr - top) / (np.exp(lr - top) + np.exp(lz - top))
        else:
            info_i[1] = 0.0
    else:
        for c in range(dv):
            out_i[c] = 0.0
        info_i[0] = -np.inf
        info_i[1] = 1.0 if R > 0.0 else 0.0
    info_i[2] = b - a


@njit(cache=True, nogil=True, parallel=True)
def softmax_from_csr(lims, ids, scores, values, scale, tau, remainder, out, info):
    """Softmax over each query's reported keys (``score >= tau``), with the certified dropped
    fraction from ``remainder[i] >= sum exp(scale (score_j - tau_i))`` over the keys not
    reported (``range_search(..., remainder_scale=scale)``). ``info`` gets
    [lse, certified dropped fraction, kept]."""
    for i in prange(lims.shape[0] - 1):
        _softmax_csr_row(lims[i], lims[i + 1], ids, scores, values, scale, tau[i], remainder[i], out[i], info[i])
