"""numba kernels that build one static tree: the split permutation, the leaf-packed keys, the
node bounds and id ranges.

The tree layout they fill (arrays, shapes, meaning) is described in ``layout.py``, beside
the functions that walk it; ``_forest.py`` calls these in order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# --------------------------------------------------------------------------------------
# split permutation and bounds


@njit(cache=True, nogil=True)
def _select(proj, perm, s, e, k):
    """Partial sort of ``proj[s:e]`` (with ``perm`` alongside) so that positions < k hold the
    smallest values (Hoare quickselect, median-of-three pivot). Equal values split evenly, so
    duplicated keys do not degrade it."""
    lo = s
    hi = e - 1
    while hi > lo:
        mid = (lo + hi) // 2
        a = proj[lo]
        b = proj[mid]
        c = proj[hi]
        if a > b:
            a, b = b, a
        if b > c:
            b = c
            if a > b:
                b = a
        pivot = b
        i = lo
        j = hi
        while i <= j:
            while proj[i] < pivot:
                i += 1
            while proj[j] > pivot:
                j -= 1
            if i <= j:
                tp = proj[i]
                proj[i] = proj[j]
                proj[j] = tp
                ti = perm[i]
                perm[i] = perm[j]
                perm[j] = ti
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return


@njit(cache=True, nogil=True)
def _split_direction(keys, perm, s, e, use_pca, n_sample):
    """Unit direction to split keys ``perm[s:e]`` along.

    ``use_pca``: the top principal direction of a strided sample (two power iterations from
    the sample point farthest from the mean). Otherwise the coordinate of widest spread."""
    d = keys.shape[1]
    cnt = e - s
    ns = min(cnt, n_sample)
    mu = np.zeros(d)
    for a in range(ns):
        p = perm[s + (a * cnt) // ns]
        for j in range(d):
            mu[j] += keys[p, j]
    for j in range(d):
        mu[j] /= ns
    v = np.zeros(d)
    if not use_pca:
        lo = np.full(d, np.inf)
        hi = np.full(d, -np.inf)
        for a in range(ns):
            p = perm[s + (a * cnt) // ns]
            for j in range(d):
                x = keys[p, j]
                if x < lo[j]:
                    lo[j] = x
                if x > hi[j]:
                    hi[j] = x
        best = 0
        for j in range(d):
            if hi[j] - lo[j] > hi[best] - lo[best]:
                best = j
        v[best] = 1.0
        return v
    far = -1.0
    for a in range(ns):
        p = perm[s + (a * cnt) // ns]
        dist = 0.0
        for j in range(d):
            t = keys[p, j] - mu[j]
            dist += t * t
        if dist > far:
            far = dist
            for j in range(d):
                v[j] = keys[p, j] - mu[j]
    w = np.zeros(d)
    for _ in range(2):
        nv = 0.0
        for j in range(d):
            nv += v[j] * v[j]
        if nv == 0.0:
            break
        w[:] = 0.0
        for a in range(ns):
            p = perm[s + (a * cnt) // ns]
            proj = 0.0
            for j in range(d):
                proj += (keys[p, j] - mu[j]) * v[j]
            for j in range(d):
                w[j] += proj * (keys[p, j] - mu[j])
        nw = 0.0
        for j in range(d):
            nw += w[j] * w[j]
        if nw == 0.0:
            break
        v[:] = w
    nv = 0.0
    for j in range(d):
        nv += v[j] * v[j]
    if nv == 0.0:
        v[0] = 1.0
    return v


@njit(cache=True, nogil=True, parallel=True)
def build_permutation(kw, perm, n_levels, node_start, node_end, use_pca, n_sample):
    """Reorder the rows of ``kw`` (a working copy of the keys) and ``perm`` (their positions
    in the caller's array) level by level, so every node's keys split at its left child's end
    along the node's split direction (the median, except on the partly filled right edge).
    Rows move with ``perm`` so each level reads them sequentially: gathering them through
    ``perm`` instead costs a cache miss per key per level."""
    n, d = kw.shape
    ident = np.arange(n)
    # scratch for every node of a level at once (nodes own disjoint ranges): two arrays of n
    # allocated once, not two per node (per-node buffers of up to n entries fragment the heap,
    # and that memory stays in the RSS for the rest of the build)
    proj_all = np.empty(n)
    order_all = np.empty(n, dtype=np.int64)
    for level in range(n_levels):
        first = (1 << level) - 1
        for jn in prange(1 << level):
            v = first + jn
            s = node_start[v]
            e = node_end[v]
            mid = node_end[2 * v + 1]
            if mid <= s or mid >= e:
                continue
            u = _split_direction(kw, ident, s, e, use_pca, n_sample)
            cnt = e - s
            # no BLAS here: OpenBLAS called from numba's worker threads can deadlock
            proj = proj_all[s:e]
            order = order_all[s:e]
            for a in range(cnt):
                acc = 0.0
                for j in range(d):
                    acc += kw[s + a, j] * u[j]
                proj[a] = acc
                order[a] = a
            _select(proj, order, 0, cnt, mid - s)
            _permute_rows(kw, perm, s, order)


@njit(cache=True, nogil=True)
def _permute_rows(kw, perm, s, order):
    """``kw[s + a] = kw[s + order[a]]`` and the same for ``perm``, for every a, in place by
    following the cycles of ``order`` (consumed: set to -1): the gather
    ``kw[s:e] = kw[s:e][order]`` would copy the node's rows (a quarter of the keys' bytes at
    the root, for a 16-wide sketch of d = 64 keys)."""
    d = kw.shape[1]
    tmp = np.empty(d, dtype=kw.dtype)
    for a in range(order.shape[0]):
        if order[a] < 0:
            continue
        for j in range(d):
            tmp[j] = kw[s + a, j]
        tp = perm[s + a]
        x = a
        while True:
            src = order[x]
            order[x] = -1
            if src == a:
                break
            for j in range(d):
                kw[s + x, j] = kw[s + src, j]
            perm[s + x] = perm[s + src]
            x = src
        for j in range(d):
            kw[s + x, j] = tmp[j]
        perm[s + x] = tp


@njit(cache=True, nogil=True, parallel=True)
def build_bounds(kb, width, norms, n_levels, node_start, node_end, center, radius, lo, hi, maxnorm,
                 exact_radius_max):
    """Fill the node arrays from the keys in the bounds' basis, leaf-packed like ``kf`` (``kb``,
    leaf width ``width``: dimension j of tree position a at ``(a - a % width) * d + j * width
    + a % width``), so the build needs no tree-ordered ``(n, d)`` copy besides ``kf``.

    Leaves read their keys; an internal node's box, centre and max norm come from its
    children; its radius from a pass over its keys when it holds at most
    ``exact_radius_max`` keys, else from its children by the triangle inequality.
    Empty nodes (past the last key) get an empty box and are never visited."""
    d = center.shape[1]
    for level in range(n_levels, -1, -1):
        first = (1 << level) - 1
        for jn in prange(1 << level):
            v = first + jn
            s = node_start[v]
            e = node_end[v]
            cnt = e - s
            if level == n_levels:
                mn = 0.0
                for j in range(d):
                    acc = 0.0
                    l = np.inf
                    h = -np.inf
                    for a in range(s, e):
                        x = kb[s * d + j * width + a - s]  # a leaf is one block at s * d
                        acc += x
                        if x < l:
                            l = x
                        if x > h:
                            h = x
                    center[v, j] = acc / max(cnt, 1)
                    lo[v, j] = l
                    hi[v, j] = h
                for a in range(s, e):
                    if norms[a] > mn:
                        mn = norms[a]
                maxnorm[v] = mn
            else:
                c1 = 2 * v + 1
                c2 = 2 * v + 2
                n1 = node_end[c1] - node_start[c1]
                n2 = cnt - n1
                for j in range(d):
                    center[v, j] = (n1 * np.float64(center[c1, j]) + n2 * np.float64(center[c2, j])) / max(cnt, 1)
                    lo[v, j] = min(lo[c1, j], lo[c2, j])
                    hi[v, j] = max(hi[c1, j], hi[c2, j])
                maxnorm[v] = max(maxnorm[c1], maxnorm[c2])
            if level < n_levels and cnt > exact_radius_max:
                # a big node: the triangle inequality over its children (their centres and
                # radii) bounds every key's distance; one exact pass per level over all keys
                # would cost n*d per level
                rr = 0.0
                for c in range(2 * v + 1, 2 * v + 3):
                    if node_end[c] <= node_start[c]:
                        continue
                    dd = 0.0
                    for j in range(d):
                        t = np.float64(center[c, j]) - np.float64(center[v, j])
                        dd += t * t
                    rr = max(rr, np.sqrt(dd) + radius[c])
                radius[v] = rr * (1.0 + 1e-12) + 1e-300
                continue
            r2 = 0.0
            for a in range(s, e):
                acc = 0.0
                base = (a - a % width) * d + a % width
                for j in range(d):
                    t = np.float64(kb[base + j * width]) - np.float64(center[v, j])
                    acc += t * t
                if acc > r2:
                    r2 = acc
            # widen by a relative ulp-scale margin: the radius is compared against exact
            # distances that we only know to float64 rounding
            radius[v] = np.sqrt(r2) * (1.0 + 1e-12) + 1e-300


# --------------------------------------------------------------------------------------
# layout


@njit(cache=True, nogil=True, parallel=True)
def pack_leaves(keys, perm, starts, ends, width, kf):
    """Lay out rows ``keys[perm]`` (tree order) as one zero-padded ``(d, width)`` block per
    leaf, leaf [s, e) at offset ``s*d``, gathering through ``perm``: a tree-ordered copy
    ``keys[perm]`` would hold the keys' bytes once more at the build's peak."""
    d = keys.shape[1]
    for v in prange(starts.shape[0]):
        s = starts[v]
        cnt = ends[v] - s
        if cnt <= 0:
            continue
        for t in range(width):
            if t < cnt:
                p = perm[s + t]
                for j in range(d):
                    kf[s * d + j * width + t] = keys[p, j]
            else:
                for j in range(d):
                    kf[s * d + j * width + t] = 0.0


@njit(cache=True, nogil=True)
def build_id_ranges(ids, node_start, node_end, n_levels, minid, maxid):
    """Per-node smallest and largest id, leaves first, then parents from children."""
    first_leaf = (1 << n_levels) - 1
    n_nodes = node_start.shape[0]
    for v in range(n_nodes - 1, -1, -1):
        if v >= first_leaf:
            lo = np.iinfo(np.int64).max
            hi = -1
            for t in range(node_start[v], node_end[v]):
                if ids[t] < lo:
                    lo = ids[t]
                if ids[t] > hi:
                    hi = ids[t]
            minid[v] = lo
            maxid[v] = hi
        else:
            minid[v] = min(minid[2 * v + 1], minid[2 * v + 2])
            maxid[v] = max(maxid[2 * v + 1], maxid[2 * v + 2])
