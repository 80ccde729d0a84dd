"""``HSRIndex``: exact half-space reporting over a growing set of keys.

A thin class. It owns every key ever added, in the caller's id order, with its liveness
(``_table``, a ``_keys.KeyTable``; removal is a tombstone), growth, the readers-writer lock
(``_lock.py``), files (``_files.py``, ``_config.py``) and device moves, and hands every search
to one backend object (``_search``, a ``_backend.SearchBackend``), chosen in ``_BACKENDS``:
``"code"`` (``_code_backend.py``: the int8 code filter, the default from d = 16), ``"tree"``
(``_forest_backend.py``: the partition-tree forest and its append buffer), ``"brute"``
(``_brute_backend.py``: the exact blocked BLAS scan). After it changes the keys, the index
calls the backend's growth hooks (``added``, ``removed``, ``rebuild``; ``sync`` for the code
filter, which codes lazily).
"""

from __future__ import annotations

import functools
import warnings
from contextlib import AbstractContextManager

import numpy as np

from ._files import _digest, read_index_file, write_index_file
from .._lock import RWLock, reads, writes
from .._progress import Progress
from ._views import ForestView, KeyView, SearchStats
from .._arrays import as_float_array, kept_in_place
from ._validate import resolve_dtype
from .results import RangeResult, SearchResult
from ._backend import Found, SearchBackend, Work, best_first
from ._config import IndexConfig, check_options, resolve_backend
from ._keys import KeyTable, as_keys
from ._brute_backend import BruteScan
from ._code_backend import CodeSearch
from ._forest_backend import ForestSearch
from .. import _devices
from .._protocol import FaissNames, SearchIndex
from .._typing import ArrayLike, Device, DTypeLike, StrPath, TorchDType

__all__ = ["HSRIndex", "BruteForceIndex", "SearchStats", "KeyView", "ForestView"]

#: Largest top-k (larger values only exhaust memory; leaf and buffer sizes: ``_config.py``).
MAX_TOPK = 1 << 24
#: Builds over at least this many keys report progress on stderr (hsr._progress: on a
#: terminal, or with HSR_PROGRESS=1); the code filter codes them this many rows a step.
PROGRESS_MIN_KEYS = 1_000_000
_PROGRESS_CHUNK = 1 << 17  # a multiple of CodeStore.sync's own 8192-row step: the same codes
#: The backend of each ``index.backend``: the one place where one is chosen.
_BACKENDS: dict[str, type[SearchBackend]] = {"code": CodeSearch, "tree": ForestSearch, "brute": BruteScan}


def _reads(method):
    """:func:`hsr._lock.reads`, after indexing the appended keys (a short write, so it cannot
    run under the read)."""
    locked = reads(method)

    @functools.wraps(method)
    def caught_up(self, *args, **kwargs):
        self._catch_up()
        return locked(self, *args, **kwargs)
    return caught_up


class HSRIndex(FaissNames):
    """Exact half-space reporting: ``{j : score(q, k_j) >= tau}`` for batches of queries.

    At dimension ``AUTO_CODE_MIN_DIM`` (16) and above, the default (``method="auto"``) is the
    **code filter**: per-key int8 codes with an exact error bound rule most keys out, and the
    few candidates are scored exactly. Below it, a forest of **partition trees** over the keys
    (principal-direction median splits; each node bounded by a ball and by a box), or the
    exact BLAS scan where the trees would read most keys anyway. The comparison is inclusive
    (``>=``), scores are the library's canonical dot products (summed in dimension order in
    the working dtype, see :func:`hsr.index.canonical_scores`), and every backend returns
    exactly the same set.

    Ids are positions: key ``j`` keeps id ``j`` after others are removed, so ids run up to
    :attr:`n_total` (ids handed out), not :attr:`ntotal` (live keys). A result as a sparse
    matrix with scikit-learn's radius-graph shape ``(n_queries, n_total)`` is
    ``index.range_search(q, tau).to_csr()``: one column per id, removed ids empty columns.

    Parameters
    ----------
    keys : array_like or torch.Tensor, (n, d), optional
        Initial keys; float16/bfloat16/float32/float64. Their ids are ``0 .. n-1``.
    dim : int, optional
        Dimension, needed only when no keys are given.
    leaf_size : int, default 32
        Keys per leaf (every leaf is full but the last). 32 takes a faster, fixed-width
        scan kernel; other sizes a generic one.
    split : {"pca", "axis"}, default "pca"
        Split direction: the node's top principal direction, or its widest coordinate.
    rotate : bool, default False
        Bound boxes in the keys' principal basis (True) or the input coordinates: the basis
        pruned no better on clustered and real keys and costs an n*d^2 product per build.
    method : {"auto", "code", "tree", "brute"}, default "auto"
        ``"code"`` is the code filter (per-key int8 codes with an exact error bound, then the
        canonical score of the few candidates; appends are O(d), nothing is rebuilt);
        ``"tree"`` the partition-tree forest; ``"brute"`` the exact blocked BLAS scan.
        ``"auto"`` is ``"code"`` from dimension ``AUTO_CODE_MIN_DIM`` up; below it, the trees,
        with the scan per batch when fewer than ``AUTO_MIN_KEYS`` keys are live or when a
        pilot of up to 8 of the batch's queries scores more than ``AUTO_MAX_SCAN`` of the keys.
        The resolved choice is :attr:`backend`.
    code_rotation : {"random", "pca", "none"}, default "random"
        Code filter only: rotation applied before quantising (see :class:`hsr.index.codes.CodeStore`).
    buffer_size : int, default 1024
        Appended keys wait in an exactly-scanned buffer of this size before joining the forest.
    dtype : {None, "float32", "float64"}
        Working dtype; float32 unless float64 is asked for.
    seed : int, default 0
        Seeds the sample for the PCA basis. Same keys and seed, identical trees.
    copy : bool, default True
        False: C-contiguous keys of the working dtype are used in place (read-only; a 4M x 64
        code index then peaks at 1.3x the keys instead of 2.3x) and must not change; the first
        :meth:`add` copies them. Keys that need a conversion are converted once either way.

    Examples
    --------
    >>> import numpy as np, hsr
    >>> rng = np.random.default_rng(0)
    >>> keys = rng.standard_normal((5000, 16)).astype(np.float32)
    >>> index = hsr.HSRIndex(keys)
    >>> q = rng.standard_normal((3, 16)).astype(np.float32)
    >>> lims, D, I = index.range_search(q, 8.0)
    >>> dense = hsr.index.canonical_scores(q, keys)
    >>> all(set(I[lims[i]:lims[i+1]]) == set(np.flatnonzero(dense[i] >= 8.0)) for i in range(3))
    True
    """

    def __init__(self, keys: ArrayLike | None = None, *, dim: int | None = None, leaf_size: int = 32,
                 split: str = "pca", rotate: bool = False, method: str = "auto", buffer_size: int = 1024,
                 dtype: DTypeLike = None, seed: int = 0, code_rotation: str = "random", copy: bool = True) -> None:
        self._lock = RWLock()
        check_options(split, method, code_rotation, leaf_size, buffer_size, copy)
        dt = resolve_dtype(dtype)
        arr = as_keys(keys, dim, dt)
        d = arr.shape[1]
        self._configure(IndexConfig(d, dt, method, resolve_backend(method, d), int(leaf_size), split, bool(rotate),
                                    int(buffer_size), int(seed), code_rotation, PROGRESS_MIN_KEYS))
        kept = kept_in_place(arr, keys, copy)
        self._table = KeyTable(kept if kept is not None else np.zeros((max(arr.shape[0], 16), d), dtype=dt))
        self._search = _BACKENDS[self.backend](self._config)
        if arr.shape[0]:
            self._append(self._table.keys if kept is not None else arr)

    def _configure(self, config: IndexConfig) -> None:
        """Take the options of ``config``; its fields are this index's public attributes."""
        self._config = config
        self.dim, self.dtype, self.method, self.backend = config.dim, config.dtype, config.method, config.backend
        self.leaf_size, self.split, self.rotate = config.leaf_size, config.split, config.rotate
        self.buffer_size, self.seed, self.code_rotation = config.buffer_size, config.seed, config.code_rotation

    # ------------------------------------------------------------------ size and content
    def __len__(self) -> int:
        return self._table.n_live

    @property
    def n_total(self) -> int:
        """Ids handed out so far (live and removed)."""
        return self._table.n_total

    @property
    def n_trees(self) -> int:
        """Static trees in the forest (the buffer not counted)."""
        return self._search.n_trees

    def reading(self) -> AbstractContextManager[object]:
        """Context manager: hold the index still (searches may run, changes wait) for a
        sequence of calls that must see one state, e.g. a search and then :meth:`key_view`."""
        self._catch_up()
        return self._lock.read()

    def writing(self) -> AbstractContextManager[object]:
        """Context manager: one change made of several calls (``KVIndex.append`` writes its
        values and adds the keys under one write); searches wait."""
        return self._lock.write()

    @property
    def _codes(self) -> object:
        """The code filter's store (None for the other backends): white-box tests read it."""
        return self._search.store if isinstance(self._search, CodeSearch) else None

    def _catch_up(self) -> None:
        """Index the keys appended since the last search (a lazy backend: the code filter
        codes them), under the write lock. Skipped by a thread that already reads: it searches
        the keys indexed so far."""
        search = self._search
        if not search.pending(self._table.n_total) or self._lock.held() == "read":
            return
        with self._lock.write():
            n = self._table.n_total
            done = n - search.pending(n)
            if n - done < PROGRESS_MIN_KEYS:
                search.sync(self._table.keys[:n])
                return
            search.reserve(n)  # once, as a single sync would
            with Progress(search.sync_label, total=n - done, unit="keys") as progress:
                for e in range(done + _PROGRESS_CHUNK, n + _PROGRESS_CHUNK, _PROGRESS_CHUNK):
                    search.sync(self._table.keys[:min(e, n)])
                    progress.update(min(e, n) - max(e - _PROGRESS_CHUNK, done))

    def key_view(self) -> KeyView:
        """Read-only views of the keys and their liveness (see :class:`KeyView`)."""
        return self._table.view()

    @_reads
    def forest_view(self, queries: ArrayLike) -> ForestView:
        """The forest and ``queries (m, d)`` in its bounds' basis (tree backend only)."""
        return self._search.forest_view(queries)

    @_reads
    def score_bounds(self, queries: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Sound per-key bounds of the canonical scores from the codes (code backend only).

        Parameters
        ----------
        queries : array_like, (m, d)

        Returns
        -------
        upper, lower : ndarray, (m, n_total) float64
            ``lower[i, j] <= score(q_i, k_j) <= upper[i, j]`` for every id j (removed ids
            included; mask them with :meth:`key_view`).
        """
        return self._search.score_bounds(queries, self._table)

    @_reads
    def upper_bounds(self, queries: ArrayLike, *, out: np.ndarray | None = None) -> np.ndarray:
        """The upper half of :meth:`score_bounds`, ``(m, n_total)`` float64, in one pass and
        into ``out`` when given (C-contiguous, that shape): what the certified softmax reads."""
        return self._search.upper_bounds(queries, self._table, out)

    @_reads
    def to(self, device: Device, *, dtype: TorchDType | None = None) -> HSRIndex | SearchIndex:
        """This index on ``device``: ``"cpu"`` returns it as is; another device (``"cuda"``) gives
        a :class:`hsr.kernels.code_index.GPUCodeIndex`, the same keys, ids and removals, the
        same :class:`hsr.SearchIndex` methods in tensors. ``dtype`` defaults to float32."""
        import torch

        dev = torch.device(device)
        if dev.type == "cpu":
            return self
        GPUCodeIndex = _devices.lookup("code_index")  # registered by hsr.kernels (a room above)
        with warnings.catch_warnings():  # keys used in place (copy=False) are read-only; .to copies
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            keys = torch.from_numpy(self._table.keys[:self._table.n_total]).to(dev, dtype or torch.float32)
        moved = GPUCodeIndex(keys, seed=self.seed)
        if self._table.n_dead:
            dead = np.setdiff1d(np.arange(self._table.n_total), self._table.live_ids())
            moved.remove(torch.from_numpy(dead).to(dev))
        return moved

    @_reads
    def live_ids(self) -> np.ndarray:
        """Ids of the keys not removed, ascending, ``(len(self),)`` int64."""
        return self._table.live_ids()

    @_reads
    def get_keys(self, ids: ArrayLike) -> np.ndarray:
        """Keys ``(len(ids), d)`` of the given ids (removed ones included)."""
        ids = self._table.check_ids(ids, allow_dead=True)
        return self._table.keys[ids].copy()

    def __repr__(self):
        return (f"HSRIndex(n={len(self)}, dim={self.dim}, dtype={self.dtype.name}, {self._search.describe()}, "
                f"method={self.method!r})")

    def code_bytes_per_key(self) -> int:
        """Bytes the code filter reads per key (code, step, error); 0 for other backends."""
        return self._search.code_bytes_per_key()

    # ------------------------------------------------------------------ grow and shrink
    @writes
    def add(self, keys: ArrayLike) -> np.ndarray:
        """Append keys ``(k, d)`` (or one key ``(d,)``); returns their new ids ``(k,)`` int64.

        Cost: with the code filter, ``O(d)`` per key (a copy now; the code is written by the
        next search, in one batch). With trees, the keys wait in a scanned buffer of
        ``buffer_size``; a full buffer is merged with every smaller tree into one new tree
        (logarithmic method), so each key is rebuilt ``O(log(n / buffer_size))`` times.
        """
        if self._search.lazy and self._table.append_one(keys):  # the decode step's one key: a copy
            return np.arange(self._table.n_total - 1, self._table.n_total, dtype=np.int64)
        arr = as_float_array(keys, "keys", self.dtype, ndim=2, dim=self.dim)
        start = self._table.n_total
        self._append(arr)
        return np.arange(start, start + arr.shape[0], dtype=np.int64)

    def _append(self, arr: np.ndarray) -> None:
        """:meth:`add` after validation (``arr`` may be the key table's own buffer: the keys
        the constructor adopted, then already in place)."""
        start = self._table.append(arr)
        if arr.shape[0]:
            self._search.added(self._table, start, arr.shape[0])

    @writes
    def remove(self, ids: ArrayLike) -> None:
        """Delete keys by id. Trees keep their bounds (still valid for the survivors); a tree
        that is more than half dead is rebuilt from its live keys.

        Raises
        ------
        ValueError
            An id out of range, repeated, or already removed.
        """
        self._table.remove(ids)
        self._search.removed(self._table)

    @writes
    def rebuild(self) -> None:
        """Rebuild everything as one tree over the live keys (fresh PCA basis); with the code
        filter, re-code every key (a fresh ``"pca"`` rotation from the current keys)."""
        self._search.rebuild(self._table)

    # ------------------------------------------------------------------ queries
    @_reads
    def range_search(self, queries: ArrayLike, tau: float | ArrayLike, *, max_id: int | ArrayLike | None = None,
                     return_scores: bool = True, return_stats: bool = False, remainder_scale: float | None = None
                     ) -> RangeResult | tuple[np.ndarray, np.ndarray, np.ndarray, SearchStats]:
        """All keys with ``score(q_i, k) >= tau_i``, for each query, as CSR (FAISS's layout).

        Parameters
        ----------
        queries : array_like or torch.Tensor, (m, d) or (d,)
        tau : float or array_like (m,)
            Inclusive thresholds, one for all queries or one per query.
        max_id : int or array_like (m,) of int, optional
            Report only ids ``<= max_id[i]`` (causal attention: ids are cache positions). Nodes
            whose smallest id is past the limit are pruned without computing anything.
        return_scores : bool, default True
            When False, keys of a node whose lower bound is at least tau are reported without
            computing their scores (``D`` is then not meaningful for them).
        return_stats : bool, default False
            Also return a :class:`SearchStats`.
        remainder_scale : float, optional
            Code filter only: also bound the softmax mass of what is not reported.
            ``stats.remainder[i]`` is then an upper bound of ``sum exp(s (score_j - tau_i))``
            over the visible live keys j not reported, ``s = remainder_scale`` (the certified
            softmax over a threshold's keys uses it).

        Returns
        -------
        RangeResult ``(lims, D, I)``
            ``lims`` (m + 1,) int64: query i's results are ``I[lims[i]:lims[i+1]]`` (key ids,
            int64, in no particular order) with canonical scores ``D[lims[i]:lims[i+1]]``
            (float32; float64 for a float64 index). ``.to_csr()`` is the ``(m, n_total)``
            sparse matrix (ids are positions, removed ones included; ``.n_total`` is
            :attr:`n_total` at the search).
        stats : SearchStats
            Only with ``return_stats=True``: the return value is then ``(lims, D, I, stats)``.
        """
        Q, t, lim = self._search.prepare(queries, tau, max_id, self._table.max_norm)
        m = Q.shape[0]
        if remainder_scale is not None:
            self._search.check_remainder_scale(remainder_scale)
        if len(self) == 0 or m == 0:
            lims, ids, scores, work = Found.nothing(m, self.dtype)
        else:
            lims, ids, scores, work = self._search.range_search(Q, t, lim, self._table, return_scores,
                                                                remainder_scale)
        res = RangeResult(lims, scores, ids, n_total=self._table.n_total)
        if not return_stats:
            return res
        remainder = work.remainder
        if remainder_scale is not None and remainder is None:  # empty index or no query: nothing dropped
            remainder = np.zeros(m)
        st = SearchStats(work.visited, work.scored, np.diff(lims), len(self), work.method, work.coded)
        st.remainder = remainder
        return (*res, st)

    def query(self, q: ArrayLike, tau: float | ArrayLike, *, max_id: int | ArrayLike | None = None
              ) -> SearchResult:
        """The paper's QUERY(a, b) for one query ``(d,)``: ``(D, I)``, the scores and ids of
        the keys with ``score >= tau``."""
        qa = as_float_array(q, "q", self.dtype, ndim=1, dim=self.dim)
        _, D, I = self.range_search(qa[None, :], tau, max_id=max_id)
        return SearchResult(D, I)

    @_reads
    def count(self, queries: ArrayLike, tau: float | ArrayLike, *, max_id: int | ArrayLike | None = None
              ) -> np.ndarray:
        """Number of keys with ``score >= tau`` per query, ``(m,)`` int64. Whole nodes are
        counted without computing their scores."""
        Q, t, lim = self._search.prepare(queries, tau, max_id, self._table.max_norm)
        if len(self) == 0 or Q.shape[0] == 0:
            return np.zeros(Q.shape[0], dtype=np.int64)
        return self._search.count(Q, t, lim, self._table)

    def search(self, queries: ArrayLike, k: int, *, max_id: int | ArrayLike | None = None, return_stats: bool = False
               ) -> SearchResult | tuple[np.ndarray, np.ndarray, SearchStats]:
        """FAISS's name for :meth:`topk`: ``(D, I)``, the k best keys per query."""
        return self.topk(queries, k, max_id=max_id, return_stats=return_stats)

    @_reads
    def topk(self, queries: ArrayLike, k: int, *, max_id: int | ArrayLike | None = None, return_stats: bool = False
             ) -> SearchResult | tuple[np.ndarray, np.ndarray, SearchStats]:
        """The ``k`` highest-scoring keys per query, best first (ties: smaller id first).

        Best-first search over the same bounds: nodes are opened in order of upper bound,
        and the search stops when the best unopened bound is below the k-th best score.

        Returns
        -------
        SearchResult ``(D, I)``
            ``D`` (m, k) scores, descending, ``-inf`` where fewer than k keys are visible;
            ``I`` (m, k) int64 ids, ``-1`` there. With ``return_stats=True``:
            ``(D, I, stats)``.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_TOPK:
            raise ValueError(f"k must be an integer in [1, {MAX_TOPK}], got {k!r}")
        Q, _, lim = self._search.prepare(queries, 0.0, max_id, self._table.max_norm)
        m = Q.shape[0]
        top_s = np.full((m, k), -np.inf)
        top_i = np.full((m, k), -1, dtype=np.int64)
        if len(self) and m:
            work = self._search.topk(Q, int(k), lim, self._table, top_s, top_i)
        else:
            work = Work(self.backend, np.zeros(m, dtype=np.int64), np.zeros(m, dtype=np.int64))
        scores, ids = best_first(top_s, top_i, self.dtype)
        res = SearchResult(scores, ids)
        if return_stats:
            st = SearchStats(work.visited, work.scored, (ids >= 0).sum(axis=1), len(self), work.method, work.coded)
            return (*res, st)
        return res

    # ------------------------------------------------------------------ persistence
    def _state(self):
        meta = self._config.meta()
        arrays = {}
        for part in (self._table, self._search):
            part_meta, part_arrays = part.state()
            meta.update(part_meta)
            arrays.update(part_arrays)
        meta["sha256"] = _digest(arrays)
        return meta, arrays

    @classmethod
    def _from_state(cls, meta, arrays):
        # every field is checked, and every derived array (tree nodes and bounds, codes) is
        # rebuilt from the keys by the backend: the file's checksum authenticates nothing
        self = cls.__new__(cls)
        self._lock = RWLock()
        self._configure(IndexConfig.from_meta(meta, arrays, PROGRESS_MIN_KEYS))
        self._table = KeyTable.from_state(meta, arrays, self.dim, self.dtype)
        self._search = _BACKENDS[self.backend].from_state(self._config, meta, arrays, self._table)
        return self

    @_reads
    def save(self, path: StrPath) -> None:
        """Write the index to ``path`` (a zip of ``.npy`` arrays with a JSON header and a
        SHA-256 of the arrays; no pickle, so loading runs no code). Atomic: the file is written
        beside the target, fsynced and renamed over it, so an interrupted save never loses the
        previous file. The SHA-256 is an integrity check, not authentication: anyone can
        recompute it, so :meth:`load` validates the arrays themselves too."""
        meta, arrays = self._state()
        write_index_file(path, meta, arrays)

    @classmethod
    def load(cls, path: StrPath) -> HSRIndex:
        """Read an index written by :meth:`save`.

        Raises
        ------
        ValueError
            The file is truncated, corrupted, or not an hsr index.
        """
        meta, arrays = read_index_file(path)
        try:
            return cls._from_state(meta, arrays)
        except ValueError:
            raise
        except Exception as exc:  # a field of the wrong type or size: the file is not one we wrote
            raise ValueError(f"hsr index file {path!s} is inconsistent: {type(exc).__name__} {exc}") from exc

    @_reads
    def __getstate__(self):
        return self._state()

    def __setstate__(self, state):
        meta, arrays = state
        other = type(self)._from_state(meta, arrays)
        self.__dict__.update(other.__dict__)


class BruteForceIndex(HSRIndex):
    """The exact blocked BLAS scan behind the :class:`HSRIndex` interface (builds no tree):
    the naive O(mn) baseline and the oracle the other backends are tested against.

    Same as ``HSRIndex(keys, method="brute")``; a subclass so that ``isinstance`` works.
    """

    def __init__(self, keys: ArrayLike | None = None, *, dim: int | None = None, dtype: DTypeLike = None) -> None:
        super().__init__(keys, dim=dim, dtype=dtype, method="brute")
