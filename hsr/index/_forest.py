"""The static partition trees of the forest: their arrays (``_Tree``) and their build.

A thin layer over the numba kernels of ``_kernels.py`` (the table of every array, with shapes
and dtypes, is there). ``HSRIndex`` (``tree.py``) keeps a list of these trees plus an append
buffer and merges them (logarithmic method).
"""

from __future__ import annotations

import math

import numpy as np

from . import _kernels as K

#: Nodes with more keys get their radius from their children (triangle inequality) instead of
#: a pass over their keys: the exact pass over the top levels cost about half the build.
_EXACT_RADIUS_MAX = 4096
#: Principal coordinates the build's splits look at (see ``_build_tree``).
_SKETCH_DIMS = 16


class _Tree:
    """Arrays of one static tree; see the table in ``_kernels.py``."""

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
                use_pca: bool, rotate: bool) -> _Tree:
    """Build one static tree over ``keys (n, d)`` whose caller ids are ``ids (n,)``.

    ``rot`` is the keys' PCA basis: splits always look at the top principal coordinates; the
    node bounds live in that basis when ``rotate``, else in the input coordinates."""
    n, d = keys.shape
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
    sketch = np.ascontiguousarray(keys @ rot[:min(d, _SKETCH_DIMS)].T.astype(dt))
    # the bounds' basis: one BLAS product in the working dtype (its rounding is part of the
    # bounds' slack, see _precision)
    kr = keys @ rot.T.astype(dt) if rotate else keys
    perm = np.arange(n, dtype=np.int64)
    K.build_permutation(sketch, perm, L, t.node_start, t.node_end, use_pca, 32)
    del sketch
    kp = keys[perm]
    kr = kr[perm] if rotate else kp
    norms = _row_norms(kp)
    t.ids = np.ascontiguousarray(ids[perm], dtype=np.int64)
    first_leaf = (1 << L) - 1
    t.kf = np.zeros(-(-n // W) * W * d, dtype=dt)
    K.pack_leaves(kp, t.node_start[first_leaf:], t.node_end[first_leaf:], W, t.kf)
    t.center = np.empty((n_nodes, d), dtype=dt)
    t.radius = np.empty(n_nodes)
    t.lo = np.empty((n_nodes, d), dtype=dt)
    t.hi = np.empty((n_nodes, d), dtype=dt)
    t.maxnorm = np.empty(n_nodes)
    K.build_bounds(kr, norms, L, t.node_start, t.node_end, t.center, t.radius, t.lo, t.hi, t.maxnorm,
                   _EXACT_RADIUS_MAX)
    t.minid = np.empty(n_nodes, dtype=np.int64)
    t.maxid = np.empty(n_nodes, dtype=np.int64)
    K.build_id_ranges(t.ids, t.node_start, t.node_end, L, t.minid, t.maxid)
    return t


def _row_norms(x: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """``(n,)`` float64 Euclidean norms of the rows of ``x``, ``chunk`` rows at a time: a
    whole-array float64 einsum would hold a float64 copy of all the keys (2x their size in
    float32) at the build's peak."""
    out = np.empty(x.shape[0])
    for s in range(0, x.shape[0], chunk):
        c = x[s:s + chunk]
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


def _pca_rotation(keys: np.ndarray, seed: int) -> np.ndarray:
    """Orthogonal ``(d, d)`` float64 matrix whose rows are the keys' principal axes, from a
    seeded sample of at most 8192 keys."""
    n, d = keys.shape
    if n < 2:
        return np.eye(d)
    rng = np.random.default_rng(seed)
    sample = keys if n <= 8192 else keys[np.sort(rng.choice(n, 8192, replace=False))]
    x = sample.astype(np.float64)
    x = x - x.mean(axis=0)
    w, v = np.linalg.eigh(x.T @ x)
    return np.ascontiguousarray(v[:, ::-1].T)
