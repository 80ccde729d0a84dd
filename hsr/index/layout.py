"""The partition-tree layout: the contract between the index that builds a forest and the
kernels that walk it.

``HSRIndex.forest_view(queries)`` hands a ``ForestView``: one tuple per
tree ``(kf, stride, ids, n_levels, node_start, node_end, center, radius, lo, hi, maxnorm,
minid, maxid)`` of the arrays below, and the queries in the bounds' basis. The index's own
searches (``_kernels.py``) and the attention's certified softmax walk it with the numba
functions here, so both read one layout the same way: :func:`node_bounds` bounds a node's
canonical scores, :func:`leaf_block` locates a leaf's keys, :func:`scan_block` scores them
canonically, :func:`leaf_span` lists the leaves under a node, :func:`max_leaf` sizes the
scratch of one leaf's scores.

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
from numba import njit

__all__ = ["node_bounds", "scan_block", "leaf_block", "leaf_span", "max_leaf"]


@njit(cache=True, nogil=True)
def node_bounds(v, qr, qnorm, center, radius, lo, hi, maxnorm, slack_rel, slack_abs):
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


@njit(cache=True, nogil=True, inline="always")
def scan_block(q, kf, base, stride, cnt, acc):
    """Canonical scores of a leaf block (same arithmetic on both paths)."""
    if stride == 32:
        _scan32(q, kf, base, acc)
    else:
        _scan(q, kf, base, stride, cnt, acc)


@njit(cache=True, nogil=True)
def leaf_block(v, node_start, node_end, d, stride):
    """(base, stride, cnt) of leaf ``v``'s key block: leaf [s, e) is a zero-padded
    ``(d, stride)`` block at ``s*d`` (a tree's stride is its leaf width, the buffer's its
    capacity)."""
    s = node_start[v]
    return s * d, stride, node_end[v] - s


@njit(cache=True, nogil=True)
def leaf_span(v, n_levels):
    """First and one-past-last leaf under node ``v`` (heap order)."""
    level = 0
    while (1 << (level + 1)) - 1 <= v:
        level += 1
    jn = v - ((1 << level) - 1)
    width = 1 << (n_levels - level)
    first = (1 << n_levels) - 1 + jn * width
    return first, first + width


@njit(cache=True, nogil=True)
def max_leaf(stride):
    """Scratch size for one leaf's scores: its block width (at least 32 for ``_scan32``)."""
    return max(stride, 32)
