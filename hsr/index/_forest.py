"""The static partition trees of the forest: their arrays (``_Tree``) and their build.

A thin layer over the build kernels of ``_build_kernels.py`` (the table of every array, with
shapes and dtypes, heads ``layout.py``, whose walkers the search kernels use). The forest
strategy (``_forest_backend.py``) keeps a list of these trees plus an append buffer and merges
them (logarithmic method).
"""

from __future__ import annotations

import math

import numpy as np

from . import _build_kernels as K

#: Nodes with more keys get their radius from their children (triangle inequality) instead of
#: a pass over their keys: the exact pass over the top levels cost about half the build.
_EXACT_RADIUS_MAX = 4096
#: Principal coordinates the build's splits look at (see ``_build_tree``).
_SKETCH_DIMS = 16


class _Tree:
    """Arrays of one static tree; see the table in ``layout.py``."""

    __slots__ = ("ids", "kf", "stride", "n_levels", "node_start", "node_end", "center", "radius",
                 "lo", "hi", "maxnorm", "minid", "maxid")
    _ARRAYS = ("ids", "kf", "node_start", "node_end", "center", "radius", "lo", "hi", "maxnorm",
               "minid", "maxid")

    @property
    def n(self) -> int:
        return int(self.node_end[0])


def _node_ranges(n: int, n_levels: int, width: int):
    """Position ranges of every node: leaf i owns [i*width, (i+1)*width) clipped to n, and a
    node owns the union of its leaves."""
    starts = []
    ends = []
    for level in range(n_levels + 1):
        span = width << (n_levels - level)
        j = np.arange(1 << level, dtype=np.int64)
        starts.append(np.minimum(j * span, n))
        ends.append(np.minimum((j + 1) * span, n))
    return np.concatenate(starts), np.concatenate(ends)


def _n_levels(n: int, width: int) -> int:
    leaves = -(-n // width)
    return 0 if leaves <= 1 else int(math.ceil(math.log2(leaves)))


def _build_tree(keys: np.ndarray, ids: np.ndarray, rot: np.ndarray, leaf_size: int,
                use_pca: bool, rotate: bool, rows: np.ndarray | None = None) -> _Tree:
    """Build one static tree over ``keys (n, d)`` whose caller ids are ``ids (n,)``; or, with
    ``rows (n,)`` int64, over the rows ``keys[rows]``, read in place (no gathered copy of them:
    a merge after removals builds over scattered ids).

    ``rot`` is the keys' PCA basis: splits always look at the top principal coordinates; the
    node bounds live in that basis when ``rotate``, else in the input coordinates."""
    n = keys.shape[0] if rows is None else rows.shape[0]
    d = keys.shape[1]
    dt = keys.dtype
    W = leaf_size
    L = _n_levels(n, W)
    n_nodes = (1 << (L + 1)) - 1
    t = _Tree()
    t.n_levels = L
    t.stride = W
    t.node_start, t.node_end = _node_ranges(n, L, W)
    # splits are chosen on the top principal coordinates only: partitioning a 16-wide sketch
    # moves a quarter of the bytes of the full keys at d = 64 at every level, and the leading
    # coordinates carry most of the spread that a split can use
    sketch = _project(keys, rows, rot[:min(d, _SKETCH_DIMS)].astype(dt))
    perm = np.arange(n, dtype=np.int64)
    K.build_permutation(sketch, perm, L, t.node_start, t.node_end, use_pca, 32)
    del sketch
    # the tree-ordered keys exist only leaf-packed (kf); everything else reads the caller's
    # rows through perm, so no (n, d) copy keys[perm] is made
    src = perm if rows is None else rows[perm]  # tree position -> row of keys
    norms = _row_norms(keys, src)
    t.ids = np.ascontiguousarray(ids[perm], dtype=np.int64)
    first_leaf = (1 << L) - 1
    leaf_s, leaf_e = t.node_start[first_leaf:], t.node_end[first_leaf:]
    size = -(-n // W) * W * d
    if rotate:
        # the bounds' basis: one BLAS product in the working dtype (its rounding is part of
        # the bounds' slack, see _precision), leaf-packed like kf; made and the product freed
        # before kf exists, so at most two (n, d) arrays of the build are alive at once
        kr = _project(keys, rows, rot.astype(dt))
        kb = np.zeros(size, dtype=dt)
        K.pack_leaves(kr, perm, leaf_s, leaf_e, W, kb)
        del kr
    t.kf = np.zeros(size, dtype=dt)
    K.pack_leaves(keys, src, leaf_s, leaf_e, W, t.kf)
    if not rotate:
        kb = t.kf
    del perm, src
    t.center = np.empty((n_nodes, d), dtype=dt)
    t.radius = np.empty(n_nodes)
    t.lo = np.empty((n_nodes, d), dtype=dt)
    t.hi = np.empty((n_nodes, d), dtype=dt)
    t.maxnorm = np.empty(n_nodes)
    K.build_bounds(kb, W, norms, L, t.node_start, t.node_end, t.center, t.radius, t.lo, t.hi, t.maxnorm,
                   _EXACT_RADIUS_MAX)
    del kb
    t.minid = np.empty(n_nodes, dtype=np.int64)
    t.maxid = np.empty(n_nodes, dtype=np.int64)
    K.build_id_ranges(t.ids, t.node_start, t.node_end, L, t.minid, t.maxid)
    return t


def _project(keys: np.ndarray, rows: np.ndarray | None, m: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """``keys @ m.T`` (``keys[rows] @ m.T`` with ``rows``), C-contiguous; with rows, gathered
    ``chunk`` rows at a time so that no copy of the selected keys is made."""
    if rows is None:
        return np.ascontiguousarray(keys @ m.T)
    out = np.empty((rows.shape[0], m.shape[0]), dtype=np.result_type(keys.dtype, m.dtype))
    for s in range(0, rows.shape[0], chunk):
        out[s:s + chunk] = keys[rows[s:s + chunk]] @ m.T
    return out


def _row_norms(x: np.ndarray, rows: np.ndarray | None = None, chunk: int = 1 << 16) -> np.ndarray:
    """``(n,)`` float64 Euclidean norms of the rows of ``x`` (of ``x[rows]`` when given),
    ``chunk`` rows at a time: a whole-array float64 einsum would hold a float64 copy of all the
    keys (2x their size in float32) at the build's peak, and ``x[rows]`` a copy of the keys."""
    n = x.shape[0] if rows is None else rows.shape[0]
    out = np.empty(n)
    for s in range(0, n, chunk):
        c = x[s:s + chunk] if rows is None else x[rows[s:s + chunk]]
        out[s:s + chunk] = np.sqrt(np.einsum("ij,ij->i", c, c, dtype=np.float64))
    return out


def _empty_buffer(capacity: int, d: int, dt) -> _Tree:
    """The append buffer: one node with radius -1 (unbounded, so always scanned)."""
    t = _Tree()
    t.ids = np.zeros(capacity, dtype=np.int64)
    t.kf = np.zeros(d * capacity, dtype=dt)
    t.stride = capacity
    t.n_levels = 0
    t.node_start = np.zeros(1, dtype=np.int64)
    t.node_end = np.zeros(1, dtype=np.int64)
    t.center = np.zeros((1, d), dtype=dt)
    t.radius = np.full(1, -1.0)
    t.lo = np.zeros((1, d), dtype=dt)
    t.hi = np.zeros((1, d), dtype=dt)
    t.maxnorm = np.zeros(1)
    t.minid = np.zeros(1, dtype=np.int64)
    t.maxid = np.zeros(1, dtype=np.int64)
    return t


def _pca_rotation(keys: np.ndarray, seed: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Orthogonal ``(d, d)`` float64 matrix whose rows are the principal axes of the keys (of
    ``keys[rows]`` when given), from a seeded sample of at most 8192 of them."""
    n = keys.shape[0] if rows is None else rows.shape[0]
    d = keys.shape[1]
    if n < 2:
        return np.eye(d)
    rng = np.random.default_rng(seed)
    pick = np.arange(n) if n <= 8192 else np.sort(rng.choice(n, 8192, replace=False))
    sample = keys[pick if rows is None else rows[pick]]
    x = sample.astype(np.float64)
    x = x - x.mean(axis=0)
    w, v = np.linalg.eigh(x.T @ x)
    return np.ascontiguousarray(v[:, ::-1].T)
