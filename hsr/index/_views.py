"""What a search returns besides its CSR result, and the typed views other rooms read.

``SearchStats`` (per-query work counters), ``KeyView`` (the keys and their liveness, for
kernels that score canonically) and ``ForestView`` (the partition-tree forest and queries in
its basis, for the certified softmax). The index builds them; nothing here holds state.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["SearchStats", "KeyView", "ForestView"]


class SearchStats:
    """Per-query work counters of one search.

    Attributes
    ----------
    nodes_visited : ndarray, (m,) int64
        Tree nodes whose bounds were evaluated.
    keys_scored : ndarray, (m,) int64
        Keys whose canonical full-precision score was computed to compare it with tau (leaf
        scans; the candidates the code filter let through; every live key for the
        brute-force scan).
    keys_selected : ndarray, (m,) int64
        Size of each result (the same name as :class:`hsr.AttentionInfo`'s).
    n_keys : int
        Live keys in the index at search time.
    method : str
        ``"tree"``, ``"code"`` or ``"brute"``.
    codes_evaluated : ndarray, (m,) int64
        Keys whose compressed code was read to bound their score (code filter only; zeros
        for the other methods).
    remainder : ndarray, (m,) float64 or None
        With ``range_search(..., remainder_scale=s)``: an upper bound of
        ``sum exp(s (score_j - tau_i))`` over the visible live keys not reported.
    """

    def __init__(self, nodes_visited: np.ndarray, keys_scored: np.ndarray, keys_selected: np.ndarray, n_keys: int,
                 method: str, codes_evaluated: np.ndarray | None = None) -> None:
        self.nodes_visited = nodes_visited
        self.keys_scored = keys_scored
        self.keys_selected = keys_selected
        self.n_keys = n_keys
        self.method = method
        self.codes_evaluated = np.zeros_like(keys_scored) if codes_evaluated is None else codes_evaluated
        self.remainder = None

    @property
    def scan_fraction(self) -> float:
        """Mean fraction of the live keys scored per query: the honest measure of pruning."""
        if self.n_keys == 0 or self.keys_scored.size == 0:
            return 0.0
        return float(self.keys_scored.mean() / self.n_keys)

    def __repr__(self):
        return (f"SearchStats(method={self.method!r}, queries={self.keys_scored.size}, "
                f"n_keys={self.n_keys}, scan_fraction={self.scan_fraction:.4f}, "
                f"mean_selected={self.keys_selected.mean() if self.keys_selected.size else 0:.1f})")


class KeyView(NamedTuple):
    """The index's keys as kernels that score them canonically need them (read-only views).

    Attributes
    ----------
    keys : ndarray, (n_total, d), the working dtype
        Row i is key id i (removed ids included).
    alive : ndarray, (n_total,) uint8
        0 where the id was removed.
    has_dead : bool
        Whether any id was removed (kernels skip the liveness test otherwise).
    """

    keys: np.ndarray
    alive: np.ndarray
    has_dead: bool


class ForestView(NamedTuple):
    """The partition-tree forest and a batch of queries in its bounds' basis, for kernels that
    traverse it (the certified softmax).

    Attributes
    ----------
    trees : numba typed list of tuples
        One tuple per tree (and the append buffer): ``(kf, stride, ids, n_levels, node_start,
        node_end, center, radius, lo, hi, maxnorm, minid, maxid)``, the arrays of the table
        in :mod:`hsr.index.layout`, whose functions walk it.
    rotated : ndarray, (m, d) float64
        The queries in the bounds' basis.
    qnorm : ndarray, (m,) float64
        The queries' norms.
    slack_rel, slack_abs : float
        The rounding slack of the node bounds (``slack_rel * |q| * maxnorm + slack_abs``).
    """

    trees: object
    rotated: np.ndarray
    qnorm: np.ndarray
    slack_rel: float
    slack_abs: float
