"""numba kernels of the half-space reporting tree: the range search and the top-k search.

Everything here is a module-level function over flat arrays; ``tree.py`` holds the arrays,
``_build_kernels.py`` fills them. The tree layout (every array, its shape and dtype) and the
functions that walk it are in ``layout.py``; the canonical score every comparison uses is
defined in ``hsr/_numerics.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._numerics import dot_canonical, heap_pop, heap_push
from .layout import leaf_block, leaf_span, max_leaf, node_bounds, scan_block

# --------------------------------------------------------------------------------------
# canonical scores


@njit(cache=True, nogil=True, parallel=True)
def canonical_scores(Q, K):
    """All canonical scores ``(m, n)`` (``hsr/_numerics.py`` defines them; the O(mn) oracle)."""
    m = Q.shape[0]
    n = K.shape[0]
    out = np.empty((m, n), dtype=K.dtype)
    for i in prange(m):
        q = Q[i]
        for t in range(n):
            out[i, t] = dot_canonical(q, K, t)
    return out


@njit(cache=True, nogil=True, parallel=True)
def verify_candidates(Q, K, rows, cols, out):
    """Canonical score of each candidate pair ``(rows[c], cols[c])`` into ``out[c]``."""
    for c in prange(rows.shape[0]):
        out[c] = dot_canonical(Q[rows[c]], K, cols[c])


# --------------------------------------------------------------------------------------
# query


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
    acc = np.empty(max_leaf(fixed_stride), dtype=kf.dtype)
    first_leaf = (1 << n_levels) - 1
    found = 0
    for h in range(1, hits[0] + 1):
        v = hits[h]
        if v >= first_leaf:
            f0, f1 = v, v + 1
            whole = False
        else:
            f0, f1 = leaf_span(v, n_levels)
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
            base, stride, cnt = leaf_block(leaf, node_start, node_end, d, fixed_stride)
            scan_block(q, kf, base, stride, cnt, acc)
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
    acc = np.empty(max_leaf(fixed_stride), dtype=kf.dtype)
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
        ub, lb = node_bounds(v, qr, qnorm, center, radius, lo, hi, maxnorm, slack_rel, slack_abs)
        if ub < tau:
            continue
        if lb >= tau and radius[v] >= 0.0 and maxid[v] <= lim:
            # wholly inside: report without comparisons; scores only if the caller wants them
            if with_scores and fill:
                f0, f1 = leaf_span(v, n_levels)
                for leaf in range(f0, f1):
                    base, stride, cnt = leaf_block(leaf, node_start, node_end, d, fixed_stride)
                    scan_block(q, kf, base, stride, cnt, acc)
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
            base, stride, cnt = leaf_block(v, node_start, node_end, d, fixed_stride)
            scan_block(q, kf, base, stride, cnt, acc)
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
        acc = np.empty(max_leaf(fixed_stride), dtype=kf.dtype)
        first_leaf = (1 << n_levels) - 1
        ub, lb = node_bounds(0, QR[i], qnorm[i], center, radius, lo, hi, maxnorm, slack_rel, slack_abs)
        size = heap_push(hk, ht, hv, 0, ub, 0, 0)
        visited = 0
        scored = 0
        while size > 0:
            ub = hk[0]
            v = hv[0]
            size = heap_pop(hk, ht, hv, size)
            if ub < ts[0]:
                break
            s = node_start[v]
            e = node_end[v]
            if e <= s or minid[v] > lim[i]:
                continue
            visited += 1
            if v >= first_leaf:
                base, stride, cnt = leaf_block(v, node_start, node_end, q.shape[0], fixed_stride)
                scan_block(q, kf, base, stride, cnt, acc)
                scored += _visible_in_leaf(ids, s, cnt, lim[i], alive, has_dead, maxid[v])
                for t in range(cnt):
                    gid = ids[s + t]
                    if gid > lim[i] or (has_dead and alive[gid] == 0):
                        continue
                    _topk_insert(ts, ti, k, np.float64(acc[t]), gid)
                continue
            for c in range(2 * v + 1, 2 * v + 3):
                cub, clb = node_bounds(c, QR[i], qnorm[i], center, radius, lo, hi, maxnorm, slack_rel, slack_abs)
                if cub >= ts[0]:
                    size = heap_push(hk, ht, hv, size, cub, 0, c)
        stats[i, 0] += visited
        stats[i, 1] += scored
