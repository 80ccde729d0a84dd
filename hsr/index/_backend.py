"""The seam between :class:`~hsr.index.HSRIndex` and its search backends.

``HSRIndex`` owns what every backend shares: the keys in id order, their liveness, growth,
the readers-writer lock, files and device moves. A *backend* owns one way of searching them
(the code filter ``_code_backend.py``, the partition-tree forest ``_forest_backend.py``, the
brute-force scan ``_brute_backend.py``) and subclasses :class:`SearchBackend`: three searches
(``range_search``, ``count``, ``topk``), the growth hooks the index calls after it changes
the keys, and its part of the saved file. What a backend cannot do (``score_bounds`` without
codes, ``forest_view`` without trees) raises the ``ValueError`` this base class writes.

Every call passes the index's :class:`~hsr.index._keys.KeyTable` (its keys and liveness,
read, never written, never copied): a backend holds only what it derives from them (codes,
trees) and the index's options, one frozen :class:`~hsr.index._config.IndexConfig`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np

from .._arrays import as_float_array
from .._typing import ArrayLike
from ._config import IndexConfig
from ._keys import KeyTable
from ._validate import as_tau
from ._views import ForestView

__all__ = ["Work", "Found", "SearchBackend", "as_limits", "best_first", "precision"]


class Work(NamedTuple):
    """What one search did, per query: the counters of :class:`~hsr.index.SearchStats`.

    ``method`` is the backend that ran (``"brute"`` where the forest handed a batch to the
    scan); ``visited`` (m,) tree nodes bounded; ``scored`` (m,) keys scored canonically;
    ``coded`` (m,) codes read, or None; ``remainder`` (m,) the softmax remainder bound of a
    range search with ``remainder_scale``, or None.
    """

    method: str
    visited: np.ndarray
    scored: np.ndarray
    coded: np.ndarray | None = None
    remainder: np.ndarray | None = None


class Found(NamedTuple):
    """A range search's CSR result and its :class:`Work`: ``lims (m + 1,)`` int64, ``ids``
    int64 and ``scores`` (the working dtype), query i's in ``[lims[i], lims[i + 1])``."""

    lims: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    work: Work

    @classmethod
    def nothing(cls, m: int, dtype: np.dtype) -> Found:
        """The result of a search with no query or no live key (reported as the scan's)."""
        none = np.zeros(m, dtype=np.int64)
        return cls(np.zeros(m + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=dtype),
                   Work("brute", none, none.copy()))


class SearchBackend(ABC):
    """One way of searching the keys of an ``HSRIndex``.

    A subclass sets ``name`` and implements :meth:`range_search`, :meth:`count`,
    :meth:`topk` and :meth:`describe`; it overrides the growth hooks that it needs (each a
    no-op here) and, if it saves anything, :meth:`state` and :meth:`from_state`. The index
    calls the searches only with at least one query and one live key, under its read lock;
    the hooks under its write lock.

    Parameters
    ----------
    config : IndexConfig
    """

    #: ``index.backend``, ``SearchStats.method``
    name: str = ""
    #: True: keys are indexed by :meth:`sync` before a search (``HSRIndex._catch_up``), not by
    #: :meth:`added`, so an append may skip the hook (the decode step's one-key fast path)
    lazy: bool = False
    #: what :meth:`sync` reports doing, when it is long enough to report progress
    sync_label: str = ""

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self.slack_rel, self.slack_abs, self.gamma, self.overflow = precision(config.dtype, config.dim, config.rotate)

    # ------------------------------------------------------------------ inputs
    def prepare(self, queries: ArrayLike, tau: float | ArrayLike, max_id: int | ArrayLike | None,
                max_norm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries ``(m, d)`` in the working dtype, thresholds ``(m,)`` float64 and id limits
        ``(m,)`` int64; ``ValueError`` where ``|q| max|k|`` would overflow the scores."""
        cfg = self.config
        Q = as_float_array(queries, "queries", cfg.dtype, ndim=2, dim=cfg.dim)
        t = as_tau(tau, Q.shape[0])
        lim = as_limits(max_id, Q.shape[0])
        if Q.shape[0] and max_norm > 0:
            qmax = float(np.sqrt(np.einsum("ij,ij->i", Q, Q, dtype=np.float64).max()))
            if qmax * max_norm >= self.overflow:
                raise ValueError(
                    f"|q|*|k| reaches {qmax * max_norm:.3g}: scores would overflow {cfg.dtype.name}; "
                    "rescale the inputs or build the index with dtype='float64'")
            self.check_range(qmax, max_norm)
        return Q, t, lim

    def check_range(self, qmax: float, max_norm: float) -> None:
        """Raise ``ValueError`` where this backend cannot bound scores of queries up to norm
        ``qmax`` over keys up to ``max_norm`` (below the working dtype's own overflow)."""

    def check_remainder_scale(self, scale: float) -> None:
        """Raise ``ValueError`` unless this backend bounds the remainder at ``scale``."""
        raise ValueError(f"remainder_scale needs the code backend; this index uses {self.name!r}")

    # ------------------------------------------------------------------ growth hooks
    def pending(self, n_total: int) -> int:
        """Keys below ``n_total`` that wait for :meth:`sync` (lazy backends)."""
        return 0

    def reserve(self, n: int) -> None:
        """Make room for ``n`` keys at once, before :meth:`sync` runs in steps."""

    def sync(self, keys: np.ndarray) -> None:
        """Index ``keys (n, d)``, rows = ids, up to ``n`` (lazy backends)."""

    def added(self, table: KeyTable, start: int, k: int) -> None:
        """Ids ``start .. start + k - 1`` were appended to ``table`` (k >= 1)."""

    def removed(self, table: KeyTable) -> None:
        """Ids were marked dead in ``table.alive``."""

    def rebuild(self, table: KeyTable) -> None:
        """Rebuild everything derived from the live keys."""

    # ------------------------------------------------------------------ searches
    @abstractmethod
    def range_search(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable,
                     with_scores: bool, remainder_scale: float | None) -> Found:
        """Live ids ``j <= lim[i]`` with canonical ``score(Q[i], k_j) >= tau[i]``.

        ``with_scores=False`` lets a backend report keys without scoring them (``scores`` is
        then not meaningful for them); ``remainder_scale`` was accepted by
        :meth:`check_remainder_scale`.
        """

    @abstractmethod
    def count(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable) -> np.ndarray:
        """Sizes ``(m,)`` int64 of :meth:`range_search`'s results."""

    @abstractmethod
    def topk(self, Q: np.ndarray, k: int, lim: np.ndarray, table: KeyTable, top_s: np.ndarray,
             top_i: np.ndarray) -> Work:
        """Fill ``top_s (m, k)`` float64 and ``top_i (m, k)`` int64 (preset to ``-inf`` and
        ``-1``) with the k best visible live keys of each query, in any order."""

    # ------------------------------------------------------------------ views for attention
    def score_bounds(self, queries: ArrayLike, table: KeyTable) -> tuple[np.ndarray, np.ndarray]:
        """Sound bounds ``(upper, lower)``, ``(m, n_total)`` float64, of every key's score."""
        raise ValueError(f"score_bounds needs the code backend; this index uses {self.name!r}")

    def upper_bounds(self, queries: ArrayLike, table: KeyTable, out: np.ndarray | None) -> np.ndarray:
        """The upper half of :meth:`score_bounds`, ``(m, n_total)``, into ``out`` when given."""
        raise ValueError(f"upper_bounds needs the code backend; this index uses {self.name!r}")

    def forest_view(self, queries: ArrayLike) -> ForestView:
        """The forest and the queries in its bounds' basis."""
        raise ValueError(f"forest_view needs the tree backend; this index uses {self.name!r}")

    @property
    def n_trees(self) -> int:
        """Static trees held (0 but for the forest)."""
        return 0

    def code_bytes_per_key(self) -> int:
        """Bytes of code read per key (0 but for the code filter)."""
        return 0

    @abstractmethod
    def describe(self) -> str:
        """The backend's fields of ``repr(index)``."""

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict, dict]:
        """``(meta, arrays)``: header fields and arrays the saved file adds for this backend."""
        return {}, {}

    @classmethod
    def from_state(cls, config: IndexConfig, meta: dict, arrays: dict, table: KeyTable) -> SearchBackend:
        """The backend of a saved file (``HSRIndex.load``), over the keys already read into
        ``table``; ``ValueError`` where the file contradicts itself. Derived arrays are
        rebuilt from the keys, never trusted."""
        return cls(config)


def precision(dtype: np.dtype, d: int, rotate: bool) -> tuple[float, float, float, float]:
    """Rounding constants of the working dtype: ``(slack_rel, slack_abs, gamma, overflow)``.

    Node bounds are widened by ``slack_rel * |q| * maxnorm + slack_abs``: twice the worst-case
    rounding ``gamma_d |q||k|`` of a d-term canonical sum, plus the float64 arithmetic of the
    bounds, plus (``rotate``) the rounding of the keys' rotation into the PCA basis (one BLAS
    product in the working dtype: ``gamma_d |k|`` per coordinate, so ``sqrt(d) gamma_d |q||k|``
    in an inner product); ``slack_abs`` covers subnormal underflow. ``overflow`` caps
    ``|q||k|``.
    """
    eps = 2.0 ** -24 if dtype == np.float32 else 2.0 ** -53
    tiny = 2.0 ** -148 if dtype == np.float32 else 2.0 ** -1072
    gamma = d * eps / (1.0 - d * eps)
    slack_rel = 2.0 * (d + 4) * eps + 64.0 * d * 2.0 ** -53
    if rotate:
        slack_rel += 1.01 * math.sqrt(d) * gamma
    overflow = 1e37 if dtype == np.float32 else 1e300
    return slack_rel, (d + 4) * tiny, gamma, overflow


def best_first(top_s: np.ndarray, top_i: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A top-k's ``(scores, ids)`` from a backend's ``top_s, top_i (m, k)``: each row sorted
    by score, descending, ties by smaller id, empty slots (id -1) last; scores in ``dtype``."""
    if not top_s.shape[0]:
        return top_s.astype(dtype), top_i
    order = np.lexsort((np.where(top_i < 0, np.iinfo(np.int64).max, top_i), -top_s), axis=1)
    return np.take_along_axis(top_s, order, axis=1).astype(dtype), np.take_along_axis(top_i, order, axis=1)


def as_limits(max_id: int | ArrayLike | None, m: int) -> np.ndarray:
    """Per-query inclusive id limits, ``(m,)`` int64 (no limit: int64 max)."""
    if max_id is None:
        return np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
    a = np.asarray(max_id)
    if a.dtype.kind not in "iu":
        raise TypeError(f"max_id must be integer, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.ndim == 0:
        return np.full(m, int(a), dtype=np.int64)
    if a.shape != (m,):
        raise ValueError(f"max_id must be a scalar or have shape ({m},), got shape {a.shape}")
    return np.ascontiguousarray(a)
