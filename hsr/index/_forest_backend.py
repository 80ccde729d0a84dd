"""The tree backend: a forest of static partition trees plus an exactly-scanned buffer.

The trees (``_forest.py``) hold disjoint sets of ids, their sizes kept roughly geometric by
logarithmic merging (Bentley and Saxe): appended keys wait in a buffer of ``buffer_size``;
a full buffer is merged with every smaller tree into one new tree, so each key is rebuilt
``O(log(n / buffer_size))`` times. A query runs the four-case traversal (``_kernels.py``) on
every tree and on the buffer: count pass, prefix sum, fill pass. With ``method="auto"`` a
batch goes to the brute-force scan instead where the trees would score most keys.
"""

from __future__ import annotations

import numpy as np
from numba.typed import List

from .._arrays import as_float_array
from .._progress import Progress
from .._typing import ArrayLike
from . import _kernels as K
from ._backend import Found, SearchBackend, Work
from ._config import IndexConfig
from ._keys import KeyTable
from ._brute_backend import BruteScan
from ._files import _meta_ids, _meta_int
from ._forest import _build_tree, _empty_buffer, _pca_rotation, _Tree
from ._views import ForestView

__all__ = ["ForestSearch", "AUTO_MIN_KEYS", "AUTO_MAX_SCAN"]

#: ``method="auto"`` (trees) scans by brute force below this many live keys.
AUTO_MIN_KEYS = 4096
#: ``method="auto"`` falls back to brute force when a pilot of the batch's queries makes the
#: trees score more than this fraction of the keys (the blocked BLAS scan is then faster).
AUTO_MAX_SCAN = 0.35
#: The count pass remembers up to this many reporting nodes per query and tree, so the fill
#: pass revisits only them; a query with more traverses again.
_HITS = 256


class ForestSearch(SearchBackend):
    """``method="tree"``: the forest, its shared PCA basis and the append buffer."""

    name = "tree"

    def __init__(self, config: IndexConfig) -> None:
        super().__init__(config)
        self.trees: list[_Tree] = []  # largest first
        self.rot: np.ndarray | None = None  # (d, d) float64 PCA basis, made by the first build
        self.buffer = _empty_buffer(config.buffer_size, config.dim, config.dtype)
        self._scan = BruteScan(config) if config.method == "auto" else None

    @property
    def n_trees(self) -> int:
        return len(self.trees)

    def describe(self) -> str:
        return f"trees={len(self.trees)}, buffered={self.buffer.n}, leaf_size={self.config.leaf_size}"

    # ------------------------------------------------------------------ growth
    def added(self, table: KeyTable, start: int, k: int) -> None:
        buf = self.buffer
        size = self.config.buffer_size
        nb = int(buf.node_end[0])
        if nb + k < size:
            buf.ids[nb:nb + k] = np.arange(start, start + k)
            buf.kf.reshape(self.config.dim, size)[:, nb:nb + k] = table.keys[start:start + k].T
            buf.node_end[0] = nb + k
            buf.minid[0] = buf.ids[0]
            buf.maxid[0] = start + k - 1
            return
        pending = np.arange(start, start + k, dtype=np.int64)
        if nb:
            pending = np.concatenate([buf.ids[:nb], pending])
        buf.node_end[0] = 0
        self._merge_in(pending, table)

    def _merge_in(self, ids: np.ndarray, table: KeyTable) -> None:
        # every copy of ids is skipped when it would not change them (an int64 per key each)
        alive = table.alive
        if table.has_dead:
            ids = ids[alive[ids] == 1]
        merged = False
        while self.trees and self.trees[-1].n <= len(ids):
            t = self.trees.pop()
            ids = np.concatenate([ids, t.ids[alive[t.ids] == 1]])
            merged = True
        if len(ids) == 0:
            return
        if merged or (ids[1:] < ids[:-1]).any():
            ids = np.sort(ids)  # the tree depends on the set of ids only, not on merge history
        self.trees.append(self._build(ids, table.keys))
        self.trees.sort(key=lambda t: -t.n)

    def _build(self, ids: np.ndarray, keys: np.ndarray) -> _Tree:
        cfg = self.config
        n = len(ids)
        # sorted and unique ids 0..n-1 read the keys as a view; others through ids, in place
        rows = None if n and ids[0] == 0 and ids[-1] == n - 1 else np.ascontiguousarray(ids, dtype=np.int64)
        keys = keys[:n] if rows is None else keys
        with Progress(f"hsr: building a tree over {n} keys", total=1 + (self.rot is None), unit="steps",
                      enabled=None if n >= cfg.progress_min_keys else False) as progress:
            if self.rot is None:
                progress.stage("principal axes")
                self.rot = _pca_rotation(keys, cfg.seed, rows)
            progress.stage("partition")
            return _build_tree(keys, ids, self.rot, cfg.leaf_size, cfg.split == "pca", cfg.rotate, rows)

    def removed(self, table: KeyTable) -> None:
        # a tree keeps its bounds (still valid for the survivors) until more than half is dead
        alive = table.alive
        rebuilt = []
        for t in list(self.trees):
            live = int(alive[t.ids].sum())
            if 2 * live < t.n:
                self.trees.remove(t)
                rebuilt.append(t.ids[alive[t.ids] == 1])
        for r in rebuilt:
            if len(r):
                self.trees.append(self._build(np.sort(r), table.keys))
        self.trees.sort(key=lambda t: -t.n)

    def rebuild(self, table: KeyTable) -> None:
        live = np.flatnonzero(table.alive[:table.n_total]).astype(np.int64)
        self.trees = []
        self.rot = None  # a fresh PCA basis
        self.buffer = _empty_buffer(self.config.buffer_size, self.config.dim, self.config.dtype)
        if len(live):
            self.trees.append(self._build(live, table.keys))

    # ------------------------------------------------------------------ searches
    def _components(self) -> list[_Tree]:
        comps = list(self.trees)
        if self.buffer.n > 0:
            comps.append(self.buffer)
        return comps

    def _rotated(self, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queries in the bounds' basis (float64) and their norms."""
        Q64 = Q.astype(np.float64)
        QR = Q64 @ self.rot.T if (self.config.rotate and self.rot is not None) else Q64
        return np.ascontiguousarray(QR), np.sqrt(np.einsum("ij,ij->i", Q64, Q64))

    def _tree_args(self, t: _Tree, table: KeyTable) -> tuple:
        """The arguments every tree kernel takes after the queries, in the kernels' order."""
        return (t.kf, t.stride, t.ids, table.alive, table.has_dead, t.n_levels, t.node_start, t.node_end, t.center,
                t.radius, t.lo, t.hi, t.maxnorm, t.minid, t.maxid, self.slack_rel, self.slack_abs)

    def _scans(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable) -> bool:
        """Whether ``method="auto"`` hands this batch to the scan: few live keys, or a pilot
        of up to 8 of its queries scores more than ``AUTO_MAX_SCAN`` of them."""
        if self._scan is None:
            return False
        live = table.n_live
        if live < AUTO_MIN_KEYS:
            return True
        m = Q.shape[0]
        pick = np.unique(np.linspace(0, m - 1, min(m, 8)).astype(np.int64))
        _, stats, _ = self._count(Q[pick], tau[pick], lim[pick], table, with_scores=False)
        return stats[:, 1].mean() > AUTO_MAX_SCAN * live

    def _count(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable, with_scores: bool,
               rotated: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The count pass over every tree: ``counts (n_comps, m)``, ``stats (m, 2)`` (nodes
        visited, keys scored) and the reporting nodes it remembers, ``hits (n_comps, m, _HITS)``."""
        comps = self._components()
        QR, qn = self._rotated(Q) if rotated is None else rotated
        m = Q.shape[0]
        counts = np.zeros((len(comps), m), dtype=np.int64)
        stats = np.zeros((m, 2), dtype=np.int64)
        hits = np.empty((len(comps), m, _HITS), dtype=np.int64)
        for c, t in enumerate(comps):
            K.tree_range_count(Q, QR, qn, tau, lim, *self._tree_args(t, table), with_scores, counts[c], stats,
                               hits[c])
        return counts, stats, hits

    def range_search(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable,
                     with_scores: bool = True, remainder_scale: float | None = None) -> Found:
        if self._scans(Q, tau, lim, table):
            return self._scan.range_search(Q, tau, lim, table)
        comps = self._components()
        QR, qn = self._rotated(Q)
        counts, stats, hits = self._count(Q, tau, lim, table, with_scores, (QR, qn))
        m = Q.shape[0]
        lims = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(counts.sum(axis=0), out=lims[1:])
        ids = np.empty(lims[-1], dtype=np.int64)
        scores = np.zeros(lims[-1], dtype=self.config.dtype)
        offsets = lims[:-1].copy()
        for c, t in enumerate(comps):
            K.tree_range_fill(Q, QR, qn, tau, lim, *self._tree_args(t, table), with_scores, offsets, ids, scores,
                              hits[c])
            offsets += counts[c]
        return Found(lims, ids, scores, Work(self.name, stats[:, 0].copy(), stats[:, 1].copy()))

    def count(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable) -> np.ndarray:
        if self._scans(Q, tau, lim, table):
            return self._scan.count(Q, tau, lim, table)
        counts, _, _ = self._count(Q, tau, lim, table, with_scores=False)
        return counts.sum(axis=0)

    def topk(self, Q: np.ndarray, k: int, lim: np.ndarray, table: KeyTable, top_s: np.ndarray,
             top_i: np.ndarray) -> Work:
        stats = np.zeros((Q.shape[0], 2), dtype=np.int64)
        QR, qn = self._rotated(Q)
        for t in self._components():
            K.tree_topk(Q, QR, qn, lim, *self._tree_args(t, table), top_s, top_i, stats)
        return Work(self.name, stats[:, 0], stats[:, 1])

    def forest_view(self, queries: ArrayLike) -> ForestView:
        Q = as_float_array(queries, "queries", self.config.dtype, ndim=2, dim=self.config.dim)
        trees = List()
        for t in self._components():
            trees.append((t.kf, np.int64(t.stride), t.ids, np.int64(t.n_levels), t.node_start, t.node_end,
                          t.center, t.radius, t.lo, t.hi, t.maxnorm, t.minid, t.maxid))
        QR, qn = self._rotated(Q)
        return ForestView(trees, QR, qn, self.slack_rel, self.slack_abs)

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict, dict]:
        meta = {"n_trees": len(self.trees), "n_levels": [t.n_levels for t in self.trees],
                "strides": [t.stride for t in self.trees], "has_buffer": True}
        arrays = {} if self.rot is None else {"rot": self.rot}
        for i, t in enumerate(self.trees + [self.buffer]):
            name = f"t{i}" if i < len(self.trees) else "buf"
            for a in _Tree._ARRAYS:
                arrays[f"{name}_{a}"] = getattr(t, a)
        return meta, arrays

    @classmethod
    def from_state(cls, config: IndexConfig, meta: dict, arrays: dict, table: KeyTable) -> ForestSearch:
        dim, n_total, alive = config.dim, table.n_total, table.alive[:table.n_total]
        self = cls(config)
        rot = arrays.get("rot")
        if rot is not None:
            rot = np.ascontiguousarray(rot, dtype=np.float64)
            if rot.shape != (dim, dim) or not np.isfinite(rot).all() \
                    or np.abs(rot @ rot.T - np.eye(dim)).max() > 1e-6:
                raise ValueError("hsr index file is inconsistent: the PCA basis is not a (d, d) rotation")
        self.rot = rot
        groups = [_meta_ids(arrays, f"t{i}", n_total) for i in range(_meta_int(meta, "n_trees", 0, 1 << 16))]
        buffered = _meta_ids(arrays, "buf", n_total) if meta.get("has_buffer") else np.zeros(0, dtype=np.int64)
        every = np.concatenate(groups + [buffered])
        if len(np.unique(every)) != len(every):
            raise ValueError("hsr index file is inconsistent: a key id belongs to two trees")
        live = np.flatnonzero(alive)
        if not np.isin(live, every).all():
            raise ValueError("hsr index file is inconsistent: live keys that no tree holds")
        # a tree depends only on its set of ids (and the basis): rebuilt, it equals the saved one
        for ids in groups:
            ids = np.sort(ids[alive[ids] == 1])
            if len(ids):
                self.trees.append(self._build(ids, table.keys))
        self.trees.sort(key=lambda t: -t.n)
        size, buf = config.buffer_size, self.buffer
        for s0 in range(0, len(buffered), size):
            part = np.sort(buffered[s0:s0 + size])
            buf.ids[:len(part)] = part
            buf.kf.reshape(dim, size)[:, :len(part)] = table.keys[part].T
            buf.node_end[0] = len(part)
            buf.minid[0] = part[0]
            buf.maxid[0] = part[-1]
        return self
