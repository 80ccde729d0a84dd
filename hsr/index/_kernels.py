"""numba kernels of the half-space reporting tree.

Everything here is a module-level function over flat arrays; ``tree.py`` holds the arrays,
``_build_kernels.py`` fills them.

The canonical score
-------------------
The library defines ``score(q, k)`` as the dot product summed **in dimension order** in the
working dtype (float32 unless float64 is asked for), each product rounded, no fused
multiply-add::

    acc = q[0] * k[0];  for j in range(1, d): acc = acc + q[j] * k[j]

Every path that reports keys (tree leaves, the brute-force scan's verification, the oracle
:func:`canonical_scores`) computes exactly this, so "exact" has one meaning and every backend
returns the same set for ``score >= tau``, even for thresholds that tie a score to the last
bit. numba compiles without ``fastmath`` so LLVM neither reorders the sum nor contracts it
into FMAs.

Tree layout (one static tree; a forest is a list of them)
----------------------------------------------------------
``n`` keys, dimension ``d``, leaf width ``W``, ``L = n_levels``; nodes are in heap order
(root 0, children of ``i`` are ``2i+1`` and ``2i+2``), ``n_nodes = 2**(L+1) - 1``, leaves are
the last level. Leaf ``i`` owns tree positions ``[i*W, (i+1)*W)`` clipped to ``n``: every leaf
is full but the last non-empty one, and leaves past ``n`` are empty (never visited).

==============  ======================  ==================================================
array           shape, dtype            meaning
==============  ======================  ==================================================
ids             (n,) int64              caller's id of the key at each tree position
kf              (n_leaves*W*d,)         keys in tree order, one zero-padded ``(d, W)`` block
                float32/64              per leaf [s, e) at offset ``s*d`` (key t of the leaf,
                                        dimension j at ``s*d + j*W + t``; W the leaf width):
                                        a leaf is one contiguous read, scored key-parallel
                                        while each score keeps its dimension order
node_start/end  (n_nodes,) int64        the node's range of tree positions
center          (n_nodes, d) float32    mean of the node's keys, in the rotated basis
radius          (n_nodes,) float64      max distance from ``center`` (rotated basis);
                                        -1 marks an unbounded node (always scanned)
lo, hi          (n_nodes, d) float32    bounding box in the rotated basis, rounded outward
maxnorm         (n_nodes,) float64      largest key norm in the node (scales the slack)
minid, maxid    (n_nodes,) int64        smallest / largest caller id in the node (ids are
                                        cache positions, so causal queries prune by them)
==============  ======================  ==================================================

Bounds of node ``v`` for query ``q`` (``qr = R q`` the rotated query)::

    ball:  <qr, c> -/+ |q| r        box:  sum_j min/max(qr_j lo_j, qr_j hi_j)

and the node's interval is the intersection of both, widened by
``slack = slack_rel * |q| * maxnorm + slack_abs``, which covers the rounding of the rotation,
of the bounds themselves and of the canonical score (see ``tree.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# --------------------------------------------------------------------------------------
# canonical scores


@njit(cache=True, nogil=True)
def _dot_canonical(q, keys, i):
    acc = q[0] * keys[i, 0]
    for j in range(1, q.shape[0]):
        acc = acc + q[j] * keys[i, j]
    return acc


@njit(cache=True, nogil=True, inline="always")
def _dot_canonical4(q, keys, i0, i1, i2, i3, out):
    """Canonical scores of four keys at once: four independent dimension-order chains, so the
    adds of one key wait on each other but not on the other keys' (a single chain is bound by
    the add latency)."""
    a0 = q[0] * keys[i0, 0]
    a1 = q[0] * keys[i1, 0]
    a2 = q[0] * keys[i2, 0]
    a3 = q[0] * keys[i3, 0]
    for j in range(1, q.shape[0]):
        qj = q[j]
        a0 = a0 + qj * keys[i0, j]
        a1 = a1 + qj * keys[i1, j]
        a2 = a2 + qj * keys[i2, j]
        a3 = a3 + qj * keys[i3, j]
    out[0] = a0
    out[1] = a1
    out[2] = a2
    out[3] = a3


@njit(cache=True, nogil=True, parallel=True)
def canonical_scores(Q, K):
    """All canonical scores ``(m, n)`` by the definition above (the O(mn) oracle)."""
    m = Q.shape[0]
    n = K.shape[0]
    out = np.empty((m, n), dtype=K.dtype)
    for i in prange(m):
        q = Q[i]
        for t in range(n):
            out[i, t] = _dot_canonical(q, K, t)
    return out


@njit(cache=True, nogil=True, parallel=True)
def verify_candidates(Q, K, rows, cols, out):
    """Canonical score of each candidate pair ``(rows[c], cols[c])`` into ``out[c]``."""
    for c in prange(rows.shape[0]):
        out[c] = _dot_canonical(Q[rows[c]], K, cols[c])


# --------------------------------------------------------------------------------------
# query


@njit(cache=True, nogil=True)
def _node_bounds(v, qr, qnorm, center, radius, lo, hi, maxnorm, slack_rel, slack_abs):
    """(upper, lower) bound of the canonical score over node ``v``'s keys."""
    if radius[v] < 0.0:
        return np.inf, -np.inf
    d = qr.shape[0]
    dc = 0.0
    bu = 0.0
    bl = 0.0
    for j in range(d):
        x = qr[j]
        dc += x * center[v, j]
        a = x * lo[v, j]
        b = x * hi[v, j]
        if a > b:
            bu += a
            bl += b
        else:
            bu += b
            bl += a
    qrad = qnorm * radius[v]
    ub = min(dc + qrad, bu)
    lb = max(dc - qrad, bl)
    slack = slack_rel * qnorm * maxnorm[v] + slack_abs
    return ub + slack, lb - slack


@njit(cache=True, nogil=True)
def _scan(q, kf, base, stride, cnt, acc):
    """Canonical scores of a block of ``cnt`` keys stored as ``kf[base + j*stride + t]``
    (dimension j, key t) into ``acc[:cnt]``."""
    q0 = q[0]
    for t in range(cnt):
        acc[t] = q0 * kf[base + t]
    for j in range(1, q.shape[0]):
        qj = q[j]
        off = base + j * stride
        for t in range(cnt):
            acc[t] = acc[t] + qj * kf[off + t]


@njit(cache=True, nogil=True)
def _leaf_block(v, node_start, node_end, d, stride):
    """(base, stride, cnt) of leaf ``v``'s key block: leaf [s, e) is a zero-padded
    ``(d, stride)`` block at ``s*d`` (a tree's stride is its leaf width, the buffer's its
    capacity)."""
    s = node_start[v]
    return s * d, stride, node_end[v] - s


@njit(cache=True, nogil=True, inline="always")
def _scan32(q, kf, base, acc):
    """``_scan`` for a full 32-wide block: the constant width lets LLVM keep the 32
    accumulators in vector registers (4x faster than the generic loop on AVX2)."""
    a = np.empty(32, dtype=kf.dtype)
    q0 = q[0]
    for t in range(32):
        a[t] = q0 * kf[base + t]
    for j in range(1, q.shape[0]):
        qj = q[j]
        off = base + j * 32
        for t in range(32):
            a[t] = a[t] + qj * kf[off + t]
    for t in range(32):
        acc[t] = a[t]


@njit(cache=True, nogil=True)
def _visible_in_leaf(ids, s, cnt, lim, alive, has_dead, leaf_maxid):
    """Keys of a scanned leaf that the query may see (live, id <= lim): what ``keys_scored``
    counts, so that it never exceeds the visible keys (the leaf scan also scores the others,
    a few per leaf, which are not reported)."""
    if leaf_maxid <= lim and not has_dead:
        return cnt
    n = 0
    for t in range(cnt):
        gid = ids[s + t]
        if gid <= lim and not (has_dead and alive[gid] == 0):
            n += 1
    return n


@njit(cache=True, nogil=True, inline="always")
def _scan_block(q, kf, base, stride, cnt, acc):
    """Canonical scores of a leaf block (same arithmetic on both paths)."""
    if stride == 32:
        _scan32(q, kf, base, acc)
    else:
        _scan(q, kf, base, stride, cnt, acc)


@njit(cache=True, nogil=True)
def _leaf_span(v, n_levels):
    """First and one-past-last leaf under node ``v`` (heap order)."""
    level = 0
    while (1 << (level + 1)) - 1 <= v:
        level += 1
    jn = v - ((1 << level) - 1)
    width = 1 << (n_levels - level)
    first = (1 << n_levels) - 1 + jn * width
    return first, first + width


@njit(cache=True, nogil=True)
def _max_leaf(stride):
    """Scratch size for one leaf's scores: its block width (at least 32 for ``_scan32``)."""
    return max(stride, 32)


@njit(cache=True, nogil=True)
def _record_hit(hits, v, fill):
    if fill or hits[0] < 0:
        return
    h = hits[0]
    if h + 1 >= hits.shape[0]:
        hits[0] = -1
        return
    hits[h + 1] = v
    hits[0] = h + 1


@njit(cache=True, nogil=True)
def _fill_from_hits(q, tau, lim, kf, fixed_stride, ids, alive, has_dead, n_levels, node_start,
                    node_end, with_scores, out_ids, out_scores, pos, hits):
    """Fill pass over the nodes the count pass recorded: leaves are rescanned and compared
    again; whole nodes are reported as in the traversal."""
    d = q.shape[0]
    acc = np.empty(_max_leaf(fixed_stride), dtype=kf.dtype)
    first_leaf = (1 << n_levels) - 1
    found = 0
    for h in range(1, hits[0] + 1):
        v = hits[h]
        if v >= first_leaf:
            f0, f1 = v, v + 1
            whole = False
        else:
            f0, f1 = _leaf_span(v, n_levels)
            whole = True
        if whole and not with_scores:
            for t in range(node_start[v], node_end[v]):
                gid = ids[t]
                if has_dead and alive[gid] == 0:
                    continue
                out_ids[pos + found] = gid
                found += 1
            continue
        for leaf in range(f0, f1):
            base, stride, cnt = _leaf_block(leaf, node_start, node_end, d, fixed_stride)
            _scan_block(q, kf, base, stride, cnt, acc)
            ls = node_start[leaf]
            for t in range(cnt):
                if whole or acc[t] >= tau:
                    gid = ids[ls + t]
                    if gid > lim or (has_dead and alive[gid] == 0):
                        continue
                    out_ids[pos + found] = gid
                    out_scores[pos + found] = acc[t]
                    found += 1
    return found


@njit(cache=True, nogil=True)
def _range_one(q, qr, qnorm, tau, lim, kf, fixed_stride, ids, alive, has_dead, n_levels,
               node_start, node_end, center, radius, lo, hi, maxnorm, minid, maxid, slack_rel,
               slack_abs, with_scores, out_ids, out_scores, pos, fill, stats, hits):
    """Four-case traversal for one query. ``fill`` False counts only; True writes results
    from ``pos``. Returns the number of keys reported; ``stats`` gets [visited, scored].

    The count pass records the nodes that reported something in ``hits[1:]`` (``hits[0]``
    their number, -1 on overflow); the fill pass then revisits only those instead of
    traversing again, unless the list overflowed. Only ids ``<= lim`` are reported (causal
    attention: a node whose smallest id is past the limit is pruned by position)."""
    d = q.shape[0]
    if fill and hits[0] >= 0:
        return _fill_from_hits(q, tau, lim, kf, fixed_stride, ids, alive, has_dead, n_levels,
                               node_start, node_end, with_scores, out_ids, out_scores, pos, hits)
    acc = np.empty(_max_leaf(fixed_stride), dtype=kf.dtype)
    stack = np.empty(2 * n_levels + 4, dtype=np.int64)
    stack[0] = 0
    top = 1
    first_leaf = (1 << n_levels) - 1
    found = 0
    visited = 0
    scored = 0
    while top > 0:
        top -= 1
        v = stack[top]
        s = node_start[v]
        e = node_end[v]
        if e <= s or minid[v] > lim:
            continue
        visited += 1
        ub, lb = _node_bounds(v, qr, qnorm, center, radius, lo, hi, maxnorm, slack_rel, slack_abs)
        if ub < tau:
            continue
        if lb >= tau and radius[v] >= 0.0 and maxid[v] <= lim:
            # wholly inside: report without comparisons; scores only if the caller wants them
            if with_scores and fill:
                f0, f1 = _leaf_span(v, n_levels)
                for leaf in range(f0, f1):
                    base, stride, cnt = _leaf_block(leaf, node_start, node_end, d, fixed_stride)
                    _scan_block(q, kf, base, stride, cnt, acc)
                    ls = node_start[leaf]
                    for t in range(cnt):
                        gid = ids[ls + t]
                        if has_dead and alive[gid] == 0:
                            continue
                        out_ids[pos + found] = gid
                        out_scores[pos + found] = acc[t]
                        found += 1
            elif has_dead:
                for t in range(s, e):
                    gid = ids[t]
                    if alive[gid] != 0:
                        if fill:
                            out_ids[pos + found] = gid
                        found += 1
            else:
                if fill:
                    for t in range(s, e):
                        out_ids[pos + found + t - s] = ids[t]
                found += e - s
            _record_hit(hits, v, fill)
            continue
        if v >= first_leaf:
            base, stride, cnt = _leaf_block(v, node_start, node_end, d, fixed_stride)
            _scan_block(q, kf, base, stride, cnt, acc)
            scored += _visible_in_leaf(ids, s, cnt, lim, alive, has_dead, maxid[v])
            before = found
            for t in range(cnt):
                if acc[t] >= tau:
                    gid = ids[s + t]
                    if gid > lim or (has_dead and alive[gid] == 0):
                        continue
                    if fill:
                        out_ids[pos + found] = gid
                        out_scores[pos + found] = acc[t]
                    found += 1
            if found > before:
                _record_hit(hits, v, fill)
            continue
        stack[top] = 2 * v + 2
        stack[top + 1] = 2 * v + 1
        top += 2
    stats[0] += visited
    stats[1] += scored
    return found


@njit(cache=True, nogil=True, parallel=True)
def tree_range_count(Q, QR, qnorm, tau, lim, kf, fixed_stride, ids, alive, has_dead, n_levels,
                     node_start, node_end, center, radius, lo, hi, maxnorm, minid, maxid,
                     slack_rel, slack_abs, with_scores, counts, stats, hits):
    """Count pass: ``counts[i]`` keys reported for query i; ``stats[i] += [visited, scored]``;
    ``hits[i]`` the nodes that reported (see ``_range_one``)."""
    dummy_ids = np.empty(0, dtype=np.int64)
    dummy_sc = np.empty(0, dtype=kf.dtype)
    for i in prange(Q.shape[0]):
        hits[i, 0] = 0
        counts[i] = _range_one(Q[i], QR[i], qnorm[i], tau[i], lim[i], kf, fixed_stride, ids,
                               alive, has_dead, n_levels, node_start, node_end, center, radius,
                               lo, hi, maxnorm, minid, maxid, slack_rel, slack_abs, with_scores,
                               dummy_ids, dummy_sc, 0, False, stats[i], hits[i])


@njit(cache=True, nogil=True, parallel=True)
def tree_range_fill(Q, QR, qnorm, tau, lim, kf, fixed_stride, ids, alive, has_dead, n_levels,
                    node_start, node_end, center, radius, lo, hi, maxnorm, minid, maxid,
                    slack_rel, slack_abs, with_scores, offsets, out_ids, out_scores, hits):
    """Fill pass: query i writes its results from ``offsets[i]``."""
    for i in prange(Q.shape[0]):
        st = np.zeros(2, dtype=np.int64)
        _range_one(Q[i], QR[i], qnorm[i], tau[i], lim[i], kf, fixed_stride, ids, alive, has_dead,
                   n_levels, node_start, node_end, center, radius, lo, hi, maxnorm, minid, maxid,
                   slack_rel, slack_abs, with_scores, out_ids, out_scores, offsets[i], True, st,
                   hits[i])


# --------------------------------------------------------------------------------------
# best-first top-k


@njit(cache=True, nogil=True)
def _heap_push(hk, ht, hv, size, key, t, v):
    """Max-heap on ``hk`` with payloads ``ht`` (tree) and ``hv`` (node); returns the new size."""
    i = size
    hk[i] = key
    ht[i] = t
    hv[i] = v
    while i > 0:
        p = (i - 1) // 2
        if hk[p] >= hk[i]:
            break
        hk[p], hk[i] = hk[i], hk[p]
        ht[p], ht[i] = ht[i], ht[p]
        hv[p], hv[i] = hv[i], hv[p]
        i = p
    return size + 1


@njit(cache=True, nogil=True)
def _heap_pop(hk, ht, hv, size):
    """Remove the top of the max-heap (read it first); returns the new size."""
    size -= 1
    hk[0] = hk[size]
    ht[0] = ht[size]
    hv[0] = hv[size]
    i = 0
    while True:
        l = 2 * i + 1
        r = l + 1
        b = i
        if l < size and hk[l] > hk[b]:
            b = l
        if r < size and hk[r] > hk[b]:
            b = r
        if b == i:
            break
        hk[b], hk[i] = hk[i], hk[b]
        ht[b], ht[i] = ht[i], ht[b]
        hv[b], hv[i] = hv[i], hv[b]
        i = b
    return size


@njit(cache=True, nogil=True)
def _topk_insert(ts, ti, k, score, gid):
    """Keep the k best (score, id) in a min-heap (ts[0] is the k-th best). Ties on score are
    broken toward the smaller id so results do not depend on traversal order."""
    if score < ts[0] or (score == ts[0] and gid >= ti[0]):
        return
    ts[0] = score
    ti[0] = gid
    i = 0
    while True:
        l = 2 * i + 1
        r = l + 1
        b = i
        if l < k and (ts[l] < ts[b] or (ts[l] == ts[b] and ti[l] > ti[b])):
            b = l
        if r < k and (ts[r] < ts[b] or (ts[r] == ts[b] and ti[r] > ti[b])):
            b = r
        if b == i:
            break
        ts[b], ts[i] = ts[i], ts[b]
        ti[b], ti[i] = ti[i], ti[b]
        i = b


@njit(cache=True, nogil=True, parallel=True)
def tree_topk(Q, QR, qnorm, lim, kf, fixed_stride, ids, alive, has_dead, n_levels, node_start,
              node_end, center, radius, lo, hi, maxnorm, minid, maxid, slack_rel, slack_abs,
              top_s, top_i, stats):
    """Best-first search by upper bound; updates each query's running top-k heap
    (``top_s``, ``top_i`` of shape (m, k), min-heaps, initialised to -inf / -1 by the caller
    and carried across the trees of a forest)."""
    n_nodes = node_start.shape[0]
    k = top_s.shape[1]
    for i in prange(Q.shape[0]):
        q = Q[i]
        ts = top_s[i]
        ti = top_i[i]
        hk = np.empty(n_nodes + 1)
        ht = np.zeros(n_nodes + 1, dtype=np.int64)  # one tree: the tree payload stays 0
        hv = np.empty(n_nodes + 1, dtype=np.int64)
        acc = np.empty(_max_leaf(fixed_stride), dtype=kf.dtype)
        first_leaf = (1 << n_levels) - 1
        ub, lb = _node_bounds(0, QR[i], qnorm[i], center, radius, lo, hi, maxnorm, slack_rel, slack_abs)
        size = _heap_push(hk, ht, hv, 0, ub, 0, 0)
        visited = 0
        scored = 0
        while size > 0:
            ub = hk[0]
            v = hv[0]
            size = _heap_pop(hk, ht, hv, size)
            if ub < ts[0]:
                break
            s = node_start[v]
            e = node_end[v]
            if e <= s or minid[v] > lim[i]:
                continue
            visited += 1
            if v >= first_leaf:
                base, stride, cnt = _leaf_block(v, node_start, node_end, q.shape[0], fixed_stride)
                _scan_block(q, kf, base, stride, cnt, acc)
                scored += _visible_in_leaf(ids, s, cnt, lim[i], alive, has_dead, maxid[v])
                for t in range(cnt):
                    gid = ids[s + t]
                    if gid > lim[i] or (has_dead and alive[gid] == 0):
                        continue
                    _topk_insert(ts, ti, k, np.float64(acc[t]), gid)
                continue
            for c in range(2 * v + 1, 2 * v + 3):
                cub, clb = _node_bounds(c, QR[i], qnorm[i], center, radius, lo, hi, maxnorm, slack_rel, slack_abs)
                if cub >= ts[0]:
                    size = _heap_push(hk, ht, hv, size, cub, 0, c)
        stats[i, 0] += visited
        stats[i, 1] += scored
