"""``HSRIndex``: exact half-space reporting over a growing set of keys.

A thin class over the numba kernels. It holds every key ever added, in the caller's id order
(``_keys``, ``(capacity, d)``), with an ``_alive`` flag per id (removal is a tombstone), and
one of three backends (``index.backend``):

* ``"code"`` (the default from d = 16): a :class:`~hsr.index.codes.CodeStore` of per-key
  int8 codes with exact error bounds; a search filters by the codes and verifies the few
  candidates canonically (``codes.py``, ``_code_kernels.py``);
* ``"tree"``: a *forest* of static partition trees (``_forest.py``) over disjoint sets of ids,
  sizes kept roughly geometric by logarithmic merging (Bentley and Saxe), plus a small
  exactly-scanned *buffer* of the most recent keys; a query runs the four-case traversal on
  every tree and on the buffer (count pass, prefix sum, fill pass);
* ``"brute"``: the exact blocked BLAS scan.

Searches and changes are serialised by a readers-writer lock (``_lock.py``); files are read
defensively (``_files.py``).
"""

from __future__ import annotations

import functools
import math
import warnings
from contextlib import AbstractContextManager

import numpy as np
from numba.typed import List

from . import _kernels as K
from ._files import _digest, _meta_ids, _meta_int, read_index_file, write_index_file
from ._forest import _build_tree, _empty_buffer, _pca_rotation, _Tree
from .._lock import RWLock, reads, writes
from .._progress import Progress
from ._views import ForestView, KeyView, SearchStats
from ._validate import as_float_array, as_tau, kept_in_place, resolve_dtype
from .results import RangeResult, SearchResult
from .codes import ROTATIONS, CodeStore
from .. import _devices
from .._devices import DeviceIndex
from .._typing import ArrayLike, Device, DTypeLike, StrPath, TorchDType

__all__ = ["HSRIndex", "BruteForceIndex", "SearchStats", "KeyView", "ForestView"]

_FORMAT = "hsr-index"
_FORMAT_VERSION = 2

#: ``method="auto"`` uses the code filter from this dimension up (partition-tree bounds prune
#: little there: measured on real model keys at d = 64, docs/benchmarks.md), trees below it.
AUTO_CODE_MIN_DIM = 16
#: ``method="auto"`` (trees) scans by brute force below this many live keys.
AUTO_MIN_KEYS = 4096
#: ``method="auto"`` falls back to brute force when a pilot of the batch's queries makes the
#: trees score more than this fraction of the keys (the blocked BLAS scan is then faster).
AUTO_MAX_SCAN = 0.35
#: The code filter's steps and bounds are float32: |k| and |q|*|k| must stay below this.
_CODE_LIMIT = 1e37
#: Largest leaf of a tree, append buffer, and top-k (larger values only exhaust memory).
MAX_LEAF_SIZE = 1 << 16
MAX_BUFFER_SIZE = 1 << 24
MAX_TOPK = 1 << 24
#: The count pass remembers up to this many reporting nodes per query and tree, so the fill
#: pass revisits only them; a query with more traverses again.
_HITS = 256
#: Builds over at least this many keys report progress on stderr (hsr._progress: on a
#: terminal, or with HSR_PROGRESS=1); the code filter codes them this many rows a step.
PROGRESS_MIN_KEYS = 1_000_000
_PROGRESS_CHUNK = 1 << 17  # a multiple of CodeStore.sync's own 8192-row step: the same codes


def _reads(method):
    """:func:`hsr._lock.reads`, after coding the appended keys (a short write, so it cannot
    run under the read)."""
    locked = reads(method)

    @functools.wraps(method)
    def caught_up(self, *args, **kwargs):
        self._catch_up()
        return locked(self, *args, **kwargs)
    return caught_up


class HSRIndex:
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
        Bound boxes in the keys' principal basis (True) or in the input coordinates (False).
        Measured on clustered and real keys, the principal basis pruned no better (slightly
        worse) and costs an n*d^2 product per build, hence the default. Splits always follow
        the principal directions.
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
        False: keys that are already a C-contiguous array of the working dtype are used in
        place, through a read-only view, instead of copied (the index then holds no second
        copy of them: building a 4M x 64 code index peaks at 1.3x the keys instead of 2.3x);
        they must not change while the index uses them. The first later :meth:`add` copies
        them into a buffer of its own. Keys that need a conversion (another dtype, a strided
        array) are converted once either way, and the index keeps the result.

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
        if split not in ("pca", "axis"):
            raise ValueError(f"split must be 'pca' or 'axis', got {split!r}")
        if method not in ("auto", "code", "tree", "brute"):
            raise ValueError(f"method must be 'auto', 'code', 'tree' or 'brute', got {method!r}")
        if code_rotation not in ROTATIONS:
            raise ValueError(f"code_rotation must be one of {ROTATIONS}, got {code_rotation!r}")
        if isinstance(leaf_size, bool) or not isinstance(leaf_size, (int, np.integer)) \
                or not 1 <= leaf_size <= MAX_LEAF_SIZE:
            raise ValueError(f"leaf_size must be an integer in [1, {MAX_LEAF_SIZE}], got {leaf_size!r}")
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, (int, np.integer)) \
                or not 1 <= buffer_size <= MAX_BUFFER_SIZE:
            raise ValueError(f"buffer_size must be an integer in [1, {MAX_BUFFER_SIZE}], got {buffer_size!r}")
        if not isinstance(copy, (bool, np.bool_)):
            raise ValueError(f"copy must be True or False, got {copy!r}")
        self.dtype = resolve_dtype(dtype)
        self.leaf_size = int(leaf_size)
        self.split = split
        self.rotate = bool(rotate)
        self.method = method
        self.buffer_size = int(buffer_size)
        self.seed = int(seed)
        if keys is not None and dim is None and np.ndim(keys) == 1:
            raise ValueError(f"keys must be (n, d), got a 1-D array of {np.shape(keys)[0]} values: pass "
                             "keys[None] for one key, or dim= to say which it is")
        if keys is None:
            if dim is None:
                raise ValueError("give keys, or dim for an empty index")
            arr = np.zeros((0, int(dim)), dtype=self.dtype)
        else:
            arr = as_float_array(keys, "keys", self.dtype, ndim=2, dim=dim)
        if arr.shape[1] < 1:
            raise ValueError("keys must have dimension >= 1")
        self.dim = arr.shape[1]
        self.code_rotation = code_rotation
        self.backend = _resolve_backend(method, self.dim)
        kept = kept_in_place(arr, keys, copy)
        self._keys = kept if kept is not None else np.zeros((max(arr.shape[0], 16), self.dim), dtype=self.dtype)
        self._alive = np.zeros(self._keys.shape[0], dtype=np.uint8)
        self._n_total = 0
        self._n_dead = 0
        self._max_norm = 0.0
        self._max_norm_sq = 0.0
        self._trees: list[_Tree] = []
        self._rot = None
        self._buffer = _empty_buffer(self.buffer_size, self.dim, self.dtype) if self.backend == "tree" else None
        self._codes = self._new_codes() if self.backend == "code" else None
        self._slack_rel, self._slack_abs, self._gamma, self._overflow = _precision(self.dtype, self.dim, self.rotate)
        if arr.shape[0]:
            self._append(self._keys if kept is not None else arr)

    # ------------------------------------------------------------------ size and content
    def __len__(self) -> int:
        return self._n_total - self._n_dead

    @property
    def ntotal(self) -> int:
        """Live keys, FAISS's name (same as ``len(index)``; ids stay ``0 .. n_total - 1``)."""
        return len(self)

    @property
    def d(self) -> int:
        """Dimension, FAISS's name (same as :attr:`dim`)."""
        return self.dim

    @property
    def n_total(self) -> int:
        """Ids handed out so far (live and removed)."""
        return self._n_total

    @property
    def n_trees(self) -> int:
        """Static trees in the forest (the buffer not counted)."""
        return len(self._trees)

    def reading(self) -> AbstractContextManager[object]:
        """Context manager: hold the index still (searches may run, changes wait) for a
        sequence of calls that must see one state, e.g. a search and then :meth:`key_view`."""
        self._catch_up()
        return self._lock.read()

    def writing(self) -> AbstractContextManager[object]:
        """Context manager: one change made of several calls (``KVIndex.append`` writes its
        values and adds the keys under one write); searches wait."""
        return self._lock.write()

    def _catch_up(self) -> None:
        """Code the keys appended since the last search (code backend), under the write lock.
        Skipped by a thread that already reads: it searches the keys coded so far."""
        if self._codes is None or self._codes.n >= self._n_total or self._lock.held() == "read":
            return
        with self._lock.write():
            n, done = self._n_total, self._codes.n
            if n - done < PROGRESS_MIN_KEYS:
                self._codes.sync(self._keys[:n])
                return
            self._codes._reserve(n)  # once, as a single sync would
            with Progress("hsr: coding keys", total=n - done, unit="keys") as progress:
                for e in range(done + _PROGRESS_CHUNK, n + _PROGRESS_CHUNK, _PROGRESS_CHUNK):
                    self._codes.sync(self._keys[:min(e, n)])
                    progress.update(min(e, n) - max(e - _PROGRESS_CHUNK, done))

    def key_view(self) -> KeyView:
        """Read-only views of the keys and their liveness (see :class:`KeyView`)."""
        keys = self._keys[:self._n_total].view()
        alive = self._alive[:self._n_total].view()
        keys.flags.writeable = False
        alive.flags.writeable = False
        return KeyView(keys, alive, self._n_dead > 0)

    @_reads
    def forest_view(self, queries: ArrayLike) -> ForestView:
        """The forest and ``queries (m, d)`` in its bounds' basis (tree backend only)."""
        if self.backend != "tree":
            raise ValueError(f"forest_view needs the tree backend; this index uses {self.backend!r}")
        Q = as_float_array(queries, "queries", self.dtype, ndim=2, dim=self.dim)
        trees = List()
        for t in self._components():
            trees.append((t.kf, np.int64(t.stride), t.ids, np.int64(t.n_levels), t.node_start, t.node_end,
                          t.center, t.radius, t.lo, t.hi, t.maxnorm, t.minid, t.maxid))
        QR, qn = self._rotated(Q)
        return ForestView(trees, QR, qn, self._slack_rel, self._slack_abs)

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
        if self.backend != "code":
            raise ValueError(f"score_bounds needs the code backend; this index uses {self.backend!r}")
        Q, _, _ = self._prepare(queries, 0.0)
        return self._codes.upper_bounds(Q, self._max_norm)

    @_reads
    def to(self, device: Device, *, dtype: TorchDType | None = None) -> HSRIndex | DeviceIndex:
        """This index on ``device``: ``"cpu"`` returns it as is; another device (``"cuda"``) gives
        a :class:`hsr.kernels.code_index.GPUCodeIndex` over the same keys and ids (the code filter
        in Triton; ``range_search``, ``count`` and ``add`` take and return torch tensors).
        ``dtype`` defaults to float32 (bfloat16/float16 halve the bytes). An index with removed
        keys cannot move (ids would shift)."""
        import torch

        dev = torch.device(device)
        if dev.type == "cpu":
            return self
        if self._n_dead:
            raise ValueError("an index with removed keys cannot move to a device: ids would shift")
        GPUCodeIndex = _devices.lookup("code_index")  # registered by hsr.kernels (a room above)
        with warnings.catch_warnings():  # keys used in place (copy=False) are read-only; .to copies
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            keys = torch.from_numpy(self._keys[:self._n_total]).to(dev, dtype or torch.float32)
        return GPUCodeIndex(keys, seed=self.seed)

    @_reads
    def live_ids(self) -> np.ndarray:
        """Ids of the keys not removed, ascending, ``(len(self),)`` int64."""
        return np.flatnonzero(self._alive[:self._n_total]).astype(np.int64)

    @_reads
    def get_keys(self, ids: ArrayLike) -> np.ndarray:
        """Keys ``(len(ids), d)`` of the given ids (removed ones included)."""
        ids = self._check_ids(ids, allow_dead=True)
        return self._keys[ids].copy()

    def __repr__(self):
        if self.backend == "code":
            return (f"HSRIndex(n={len(self)}, dim={self.dim}, dtype={self.dtype.name}, backend='code', "
                    f"code_rotation={self.code_rotation!r}, method={self.method!r})")
        return (f"HSRIndex(n={len(self)}, dim={self.dim}, dtype={self.dtype.name}, trees={self.n_trees}, "
                f"buffered={0 if self._buffer is None else self._buffer.n}, leaf_size={self.leaf_size}, "
                f"method={self.method!r})")

    def _new_codes(self) -> CodeStore:
        u = 2.0 ** -24 if self.dtype == np.float32 else 2.0 ** -53
        return CodeStore(self.dim, self.code_rotation, self.seed, u)

    def code_bytes_per_key(self) -> int:
        """Bytes the code filter reads per key (code, step, error); 0 for other backends."""
        return self._codes.nbytes_per_key() if self._codes is not None else 0

    # ------------------------------------------------------------------ grow and shrink
    @writes
    def add(self, keys: ArrayLike) -> np.ndarray:
        """Append keys ``(k, d)`` (or one key ``(d,)``); returns their new ids ``(k,)`` int64.

        Cost: with the code filter, ``O(d)`` per key (a copy now; the code is written by the
        next search, in one batch). With trees, the keys wait in a scanned buffer of
        ``buffer_size``; a full buffer is merged with every smaller tree into one new tree
        (logarithmic method), so each key is rebuilt ``O(log(n / buffer_size))`` times.
        """
        if self._codes is not None and self._add_one_fast(keys):
            return np.arange(self._n_total - 1, self._n_total, dtype=np.int64)
        arr = as_float_array(keys, "keys", self.dtype, ndim=2, dim=self.dim)
        start = self._n_total
        self._append(arr)
        return np.arange(start, start + arr.shape[0], dtype=np.int64)

    def _append(self, arr: np.ndarray) -> None:
        """:meth:`add` after validation (``arr`` may be ``self._keys`` itself: the keys the
        constructor adopted, then already in place)."""
        k = arr.shape[0]
        start = self._n_total
        if start + k > self._keys.shape[0]:
            cap = max(2 * self._keys.shape[0], start + k)
            nk = np.zeros((cap, self.dim), dtype=self.dtype)
            nk[:start] = self._keys[:start]
            na = np.zeros(cap, dtype=np.uint8)
            na[:start] = self._alive[:start]
            self._keys, self._alive = nk, na
        if arr is not self._keys:
            self._keys[start:start + k] = arr
        self._alive[start:start + k] = 1
        self._n_total += k
        if k:
            self._max_norm = max(self._max_norm, math.sqrt(_max_sq_norm(arr)))
            self._max_norm_sq = self._max_norm ** 2
        if self._buffer is not None and k:
            self._insert(start, k)

    def _add_one_fast(self, keys) -> bool:
        """The decode step's append (code backend): one key that is already a C-contiguous
        array of the working dtype is copied with no further conversion. Returns False (and
        leaves everything as it was) for anything else, which then takes the validating path;
        a NaN/Inf or huge key always does (its squared norm is not below 1e30)."""
        if type(keys) is not np.ndarray or keys.dtype != self.dtype or keys.size != self.dim \
                or keys.ndim > 2 or not keys.flags.c_contiguous:
            return False
        row = keys.reshape(self.dim)
        sq = float(np.dot(row, row))
        if not sq < 1e30:
            return False
        start = self._n_total
        if start == self._keys.shape[0]:
            return False
        self._keys[start] = row
        self._alive[start] = 1
        self._n_total = start + 1
        if sq >= self._max_norm_sq * (1.0 - 1e-3):
            # the float32 dot may be off by d*2^-24 relative: near the maximum, decide in float64
            r64 = row.astype(np.float64)
            self._max_norm_sq = max(self._max_norm_sq, float(np.dot(r64, r64)))
            self._max_norm = max(self._max_norm, math.sqrt(self._max_norm_sq))
        return True

    def _insert(self, start: int, k: int) -> None:
        """Append ids ``start .. start+k-1`` (already in ``_keys``) to the buffer, or flush it."""
        buf = self._buffer
        nb = int(buf.node_end[0])
        if nb + k < self.buffer_size:
            buf.ids[nb:nb + k] = np.arange(start, start + k)
            buf.kf.reshape(self.dim, self.buffer_size)[:, nb:nb + k] = self._keys[start:start + k].T
            buf.node_end[0] = nb + k
            buf.minid[0] = buf.ids[0]
            buf.maxid[0] = start + k - 1
            return
        pending = np.arange(start, start + k, dtype=np.int64)
        if nb:
            pending = np.concatenate([buf.ids[:nb], pending])
        buf.node_end[0] = 0
        self._merge_in(pending)

    def _merge_in(self, ids: np.ndarray) -> None:
        # every copy of ids is skipped when it would not change them (an int64 per key each)
        if self._n_dead:
            ids = ids[self._alive[ids] == 1]
        merged = False
        while self._trees and self._trees[-1].n <= len(ids):
            t = self._trees.pop()
            ids = np.concatenate([ids, t.ids[self._alive[t.ids] == 1]])
            merged = True
        if len(ids) == 0:
            return
        if merged or (ids[1:] < ids[:-1]).any():
            ids = np.sort(ids)  # the tree depends on the set of ids only, not on merge history
        self._trees.append(self._build(ids))
        self._trees.sort(key=lambda t: -t.n)

    def _build(self, ids: np.ndarray) -> _Tree:
        n = len(ids)
        # sorted and unique ids 0..n-1 read the keys as a view; others through ids, in place
        rows = None if n and ids[0] == 0 and ids[-1] == n - 1 else np.ascontiguousarray(ids, dtype=np.int64)
        keys = self._keys[:n] if rows is None else self._keys
        with Progress(f"hsr: building a tree over {n} keys", total=1 + (self._rot is None), unit="steps",
                      enabled=None if n >= PROGRESS_MIN_KEYS else False) as progress:
            if self._rot is None:
                progress.stage("principal axes")
                self._rot = _pca_rotation(keys, self.seed, rows)
            progress.stage("partition")
            return _build_tree(keys, ids, self._rot, self.leaf_size, self.split == "pca", self.rotate, rows)

    @writes
    def remove(self, ids: ArrayLike) -> None:
        """Delete keys by id. Trees keep their bounds (still valid for the survivors); a tree
        that is more than half dead is rebuilt from its live keys.

        Raises
        ------
        ValueError
            An id out of range, repeated, or already removed.
        """
        ids = self._check_ids(ids, allow_dead=False)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("remove: ids contain duplicates")
        self._alive[ids] = 0
        self._n_dead += len(ids)
        rebuilt = []
        for t in list(self._trees):
            live = int(self._alive[t.ids].sum())
            if 2 * live < t.n:
                self._trees.remove(t)
                rebuilt.append(t.ids[self._alive[t.ids] == 1])
        for r in rebuilt:
            if len(r):
                self._trees.append(self._build(np.sort(r)))
        self._trees.sort(key=lambda t: -t.n)

    def _check_ids(self, ids, allow_dead: bool) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            if arr.size == 0:
                arr = arr.astype(np.int64)
            else:
                raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64).ravel()
        bad = (arr < 0) | (arr >= self._n_total)
        if bad.any():
            raise ValueError(f"ids out of range [0, {self._n_total}): {arr[bad][:5].tolist()}")
        if not allow_dead and (self._alive[arr] == 0).any():
            raise ValueError(f"ids already removed: {arr[self._alive[arr] == 0][:5].tolist()}")
        return arr

    @writes
    def rebuild(self) -> None:
        """Rebuild everything as one tree over the live keys (fresh PCA basis); with the code
        filter, re-code every key (a fresh ``"pca"`` rotation from the current keys)."""
        if self.backend == "code":
            self._codes = self._new_codes()
            return
        if self.backend == "brute":
            return
        live = np.flatnonzero(self._alive[:self._n_total]).astype(np.int64)
        self._trees = []
        self._rot = None  # a fresh PCA basis
        self._buffer = _empty_buffer(self.buffer_size, self.dim, self.dtype)
        if len(live):
            self._trees.append(self._build(live))

    # ------------------------------------------------------------------ queries
    def _prepare(self, queries, tau, max_id=None):
        Q = as_float_array(queries, "queries", self.dtype, ndim=2, dim=self.dim)
        t = as_tau(tau, Q.shape[0])
        lim = _as_limits(max_id, Q.shape[0])
        if Q.shape[0] and self._max_norm > 0:
            qmax = float(np.sqrt(np.einsum("ij,ij->i", Q, Q, dtype=np.float64).max()))
            if qmax * self._max_norm >= self._overflow:
                raise ValueError(
                    f"|q|*|k| reaches {qmax * self._max_norm:.3g}: scores would overflow {self.dtype.name}; "
                    "rescale the inputs or build the index with dtype='float64'")
            if self.backend == "code" and (qmax * self._max_norm >= _CODE_LIMIT or self._max_norm >= _CODE_LIMIT):
                # the code filter keeps float32 steps and bounds: past this they would overflow
                raise ValueError(
                    f"|q|*|k| reaches {qmax * self._max_norm:.3g} (|k| up to {self._max_norm:.3g}): beyond the code "
                    f"filter's float32 range ({_CODE_LIMIT:.0e}); rescale the inputs or use method='tree' or 'brute'")
        return Q, t, lim

    def _components(self):
        comps = list(self._trees)
        if self._buffer is not None and self._buffer.n > 0:
            comps.append(self._buffer)
        return comps

    def _rotated(self, Q):
        """Queries in the bounds' basis (float64) and their norms."""
        Q64 = Q.astype(np.float64)
        QR = Q64 @ self._rot.T if (self.rotate and self._rot is not None) else Q64
        return np.ascontiguousarray(QR), np.sqrt(np.einsum("ij,ij->i", Q64, Q64))

    def _choose_method(self, Q, tau, lim) -> str:
        if self.method != "auto" or self.backend == "code":
            return self.backend
        live = len(self)
        if live < AUTO_MIN_KEYS:
            return "brute"
        m = Q.shape[0]
        pick = np.unique(np.linspace(0, m - 1, min(m, 8)).astype(np.int64))
        counts, stats, _ = self._forest_count(Q[pick], tau[pick], lim[pick], with_scores=False)
        return "brute" if stats[:, 1].mean() > AUTO_MAX_SCAN * live else "tree"

    def _tree_args(self, t: _Tree, has_dead: bool) -> tuple:
        """The arguments every tree kernel takes after the queries, in the kernels' order."""
        return (t.kf, t.stride, t.ids, self._alive, has_dead, t.n_levels, t.node_start, t.node_end, t.center,
                t.radius, t.lo, t.hi, t.maxnorm, t.minid, t.maxid, self._slack_rel, self._slack_abs)

    def _forest_count(self, Q, tau, lim, with_scores, rotated=None):
        comps = self._components()
        QR, qn = self._rotated(Q) if rotated is None else rotated
        m = Q.shape[0]
        counts = np.zeros((len(comps), m), dtype=np.int64)
        stats = np.zeros((m, 2), dtype=np.int64)
        hits = np.empty((len(comps), m, _HITS), dtype=np.int64)
        has_dead = self._n_dead > 0
        for c, t in enumerate(comps):
            K.tree_range_count(Q, QR, qn, tau, lim, *self._tree_args(t, has_dead), with_scores, counts[c], stats,
                               hits[c])
        return counts, stats, hits

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
        Q, t, lim = self._prepare(queries, tau, max_id)
        m = Q.shape[0]
        if remainder_scale is not None:
            if self.backend != "code":
                raise ValueError(f"remainder_scale needs the code backend; this index uses {self.backend!r}")
            if not (np.isfinite(remainder_scale) and remainder_scale > 0):
                raise ValueError(f"remainder_scale must be a positive finite number, got {remainder_scale!r}")
        method = "brute" if (len(self) == 0 or m == 0) else self._choose_method(Q, t, lim)
        coded = remainder = None
        if method == "code":
            lims, ids, scores, coded, scored, remainder = self._code_range(Q, t, lim, remainder_scale)
            visited = np.zeros(m, dtype=np.int64)
        elif method == "brute":
            lims, ids, scores = self._brute_range(Q, t, lim)
            visited = np.zeros(m, dtype=np.int64)
            scored = np.full(m, len(self), dtype=np.int64)
        else:
            lims, ids, scores, stats = self._forest_range(Q, t, lim, return_scores)
            visited, scored = stats[:, 0].copy(), stats[:, 1].copy()
        res = RangeResult(lims, scores, ids, n_total=self._n_total)
        if not return_stats:
            return res
        if remainder_scale is not None and remainder is None:  # empty index or no query: nothing dropped
            remainder = np.zeros(m)
        st = SearchStats(visited, scored, np.diff(lims), len(self), method, coded)
        st.remainder = remainder
        return (*res, st)

    def _code_range(self, Q, tau, lim, remainder_scale=None):
        return self._codes.range_search(Q, tau, lim, self._keys, self._alive, self._n_dead > 0, self._max_norm,
                                        remainder_scale)

    def _forest_range(self, Q, tau, lim, with_scores):
        comps = self._components()
        QR, qn = self._rotated(Q)
        counts, stats, hits = self._forest_count(Q, tau, lim, with_scores, (QR, qn))
        m = Q.shape[0]
        lims = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(counts.sum(axis=0), out=lims[1:])
        ids = np.empty(lims[-1], dtype=np.int64)
        scores = np.zeros(lims[-1], dtype=self.dtype)
        offsets = lims[:-1].copy()
        has_dead = self._n_dead > 0
        for c, t in enumerate(comps):
            K.tree_range_fill(Q, QR, qn, tau, lim, *self._tree_args(t, has_dead), with_scores, offsets, ids, scores,
                              hits[c])
            offsets += counts[c]
        return lims, ids, scores, stats

    def _brute_range(self, Q, tau, lim, q_chunk=256, k_chunk=32768):
        """Exact blocked scan: BLAS scores pick candidates within a rounding band of tau
        (``2*gamma_d*|q|*max|k|``), and the canonical kernel decides each candidate."""
        m = Q.shape[0]
        n = self._n_total
        keys = self._keys[:n]
        alive = self._alive[:n]
        knorm = np.sqrt(np.einsum("ij,ij->i", keys, keys, dtype=np.float64)) if n else np.zeros(0)
        qn = np.sqrt(np.einsum("ij,ij->i", Q, Q, dtype=np.float64))
        rows, cols = [], []
        for qs in range(0, m, q_chunk):
            Qc = Q[qs:qs + q_chunk]
            for ks in range(0, n, k_chunk):
                S = Qc @ keys[ks:ks + k_chunk].T
                band = 2.2 * self._gamma * qn[qs:qs + q_chunk] * knorm[ks:ks + k_chunk].max() + self._slack_abs
                r, c = np.nonzero(S >= (tau[qs:qs + q_chunk] - band)[:, None])
                rows.append(r + qs)
                cols.append(c + ks)
        rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        keep = (alive[cols] == 1) & (cols <= lim[rows])
        rows, cols = rows[keep].astype(np.int64), cols[keep].astype(np.int64)
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
        sc = np.empty(len(rows), dtype=self.dtype)
        K.verify_candidates(Q, keys, rows, cols, sc)
        keep = sc >= tau[rows]
        rows, cols, sc = rows[keep], cols[keep], sc[keep]
        lims = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=m), out=lims[1:])
        return lims, cols, sc

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
        Q, t, lim = self._prepare(queries, tau, max_id)
        if len(self) == 0 or Q.shape[0] == 0:
            return np.zeros(Q.shape[0], dtype=np.int64)
        method = self._choose_method(Q, t, lim)
        if method == "code":
            return np.diff(self._code_range(Q, t, lim)[0])
        if method == "brute":
            return np.diff(self._brute_range(Q, t, lim)[0])
        counts, _, _ = self._forest_count(Q, t, lim, with_scores=False)
        return counts.sum(axis=0)

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
        Q, _, lim = self._prepare(queries, 0.0, max_id)
        m = Q.shape[0]
        top_s = np.full((m, k), -np.inf)
        top_i = np.full((m, k), -1, dtype=np.int64)
        stats = np.zeros((m, 2), dtype=np.int64)
        method = self.backend
        if len(self) and m:
            if method == "code":
                self._codes.topk(Q, int(k), lim, self._keys, self._alive, self._n_dead > 0,
                                          self._max_norm, top_s, top_i, stats)
            elif method == "brute":
                self._brute_topk(Q, lim, top_s, top_i)
                stats[:, 1] = len(self)
            else:
                QR, qn = self._rotated(Q)
                for t in self._components():
                    K.tree_topk(Q, QR, qn, lim, *self._tree_args(t, self._n_dead > 0), top_s, top_i, stats)
        order = np.lexsort((np.where(top_i < 0, np.iinfo(np.int64).max, top_i), -top_s), axis=1) \
            if m else np.zeros((0, k), dtype=np.int64)
        ids = np.take_along_axis(top_i, order, axis=1)
        scores = np.take_along_axis(top_s, order, axis=1).astype(self.dtype)
        res = SearchResult(scores, ids)
        if return_stats:
            codes = stats[:, 0].copy() if method == "code" else None
            visited = np.zeros(m, dtype=np.int64) if method == "code" else stats[:, 0]
            st = SearchStats(visited, stats[:, 1], (ids >= 0).sum(axis=1), len(self), method, codes)
            return (*res, st)
        return res

    def _brute_topk(self, Q, lim, top_s, top_i):
        n = self._n_total
        keys = self._keys[:n]
        dead = self._alive[:n] == 0
        k = top_s.shape[1]
        kk = min(k, len(self))
        knmax = float(np.sqrt(np.einsum("ij,ij->i", keys, keys, dtype=np.float64).max()))
        for qs in range(0, Q.shape[0], 256):
            Qc = Q[qs:qs + 256]
            S = (Qc @ keys.T).astype(np.float64)
            S[:, dead] = -np.inf
            S[np.arange(n)[None, :] > lim[qs:qs + 256, None]] = -np.inf
            kth = -np.partition(-S, kk - 1, axis=1)[:, kk - 1]
            kth = np.where(np.isneginf(kth), np.inf, kth)  # rows with fewer than k keys
            band = 2.2 * self._gamma * np.sqrt(np.einsum("ij,ij->i", Qc, Qc, dtype=np.float64)) * knmax + self._slack_abs
            r, c = np.nonzero((S >= (kth - band)[:, None]) | ((S > -np.inf) & np.isinf(kth)[:, None]))
            sc = np.empty(len(r), dtype=self.dtype)
            K.verify_candidates(Qc, keys, r.astype(np.int64), c.astype(np.int64), sc)
            order = np.lexsort((c, -sc.astype(np.float64), r))
            r, c, sc = r[order], c[order], sc[order]
            starts = np.searchsorted(r, np.arange(len(Qc)))
            for i in range(len(Qc)):
                j = starts[i]
                take = min(kk, np.searchsorted(r, i, side="right") - j)
                top_i[qs + i, :take] = c[j:j + take]
                top_s[qs + i, :take] = sc[j:j + take]

    # ------------------------------------------------------------------ persistence
    def _state(self):
        meta = {
            "format": _FORMAT, "version": _FORMAT_VERSION, "dim": self.dim,
            "dtype": self.dtype.name, "leaf_size": self.leaf_size, "split": self.split,
            "rotate": self.rotate, "method": self.method, "buffer_size": self.buffer_size,
            "seed": self.seed, "n_total": self._n_total, "n_dead": self._n_dead,
            "max_norm": self._max_norm, "n_trees": len(self._trees),
            "n_levels": [t.n_levels for t in self._trees],
            "strides": [t.stride for t in self._trees],
            "has_buffer": self._buffer is not None,
            "backend": self.backend, "code_rotation": self.code_rotation,
        }
        arrays = {"keys": self._keys[:self._n_total], "alive": self._alive[:self._n_total]}
        if self._rot is not None:
            arrays["rot"] = self._rot
        if self._codes is not None:
            cmeta, carrays = self._codes.state()
            meta["codes"] = cmeta
            arrays.update(carrays)
        comps = list(self._trees) + ([self._buffer] if self._buffer is not None else [])
        for i, t in enumerate(comps):
            name = f"t{i}" if i < len(self._trees) else "buf"
            for a in _Tree._ARRAYS:
                arrays[f"{name}_{a}"] = getattr(t, a)
        meta["sha256"] = _digest(arrays)
        return meta, arrays

    @classmethod
    def _from_state(cls, meta, arrays):
        if not isinstance(meta, dict):
            raise ValueError(f"hsr index file is inconsistent: its header is a {type(meta).__name__}, not an object")
        if meta.get("format") != _FORMAT or meta.get("version") not in (1, _FORMAT_VERSION):
            raise ValueError(f"not an hsr index file of version {_FORMAT_VERSION}: {meta.get('format')!r} "
                             f"version {meta.get('version')!r}")
        if _digest(arrays) != meta.get("sha256"):
            raise ValueError("hsr index file is corrupted: checksum mismatch")
        # the checksum authenticates nothing (anyone can recompute it): every field is checked,
        # and every derived array (tree nodes and bounds, codes) is rebuilt from the keys
        dim = _meta_int(meta, "dim", 1, 1 << 20)
        dtype = meta.get("dtype")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"hsr index file is inconsistent: dtype {dtype!r} (float32 or float64)")
        method = meta.get("method")
        if method not in ("auto", "code", "tree", "brute"):
            raise ValueError(f"hsr index file is inconsistent: method {method!r}")
        if meta.get("split") not in ("pca", "axis"):
            raise ValueError(f"hsr index file is inconsistent: split {meta.get('split')!r}")
        self = cls.__new__(cls)
        self._lock = RWLock()
        self.dtype = np.dtype(dtype)
        self.dim = dim
        self.leaf_size = _meta_int(meta, "leaf_size", 1, MAX_LEAF_SIZE)
        self.split = meta["split"]
        self.rotate = bool(meta.get("rotate"))
        self.method = method
        self.code_rotation = meta.get("code_rotation", "random")
        self.backend = meta.get("backend", _resolve_backend(self.method, dim))
        if self.backend not in ("code", "tree", "brute") or self.code_rotation not in ROTATIONS:
            raise ValueError(f"hsr index file is inconsistent: backend {self.backend!r}, "
                             f"code_rotation {self.code_rotation!r}")
        self.buffer_size = _meta_int(meta, "buffer_size", 1, MAX_BUFFER_SIZE)
        self.seed = _meta_int(meta, "seed", -(1 << 63), (1 << 63) - 1)
        n_total = _meta_int(meta, "n_total", 0, 1 << 40)
        keys = arrays.get("keys")
        alive = arrays.get("alive")
        if keys is None or keys.shape != (n_total, dim) or keys.dtype != self.dtype:
            raise ValueError("hsr index file is inconsistent: keys array has the wrong shape or dtype")
        if alive is None or alive.shape != (n_total,) or alive.dtype != np.uint8 or (alive > 1).any():
            raise ValueError("hsr index file is inconsistent: the liveness array is not 0/1 per key")
        if keys.size and not (np.isfinite(keys.min()) and np.isfinite(keys.max())):  # min/max carry NaN
            raise ValueError("hsr index file is inconsistent: keys contain NaN or Inf")
        if n_total and keys.flags.owndata and keys.flags.c_contiguous and keys.flags.writeable:
            self._keys = keys  # freshly read: kept, not copied (the first add grows it)
        else:
            self._keys = np.zeros((max(n_total, 16), dim), dtype=self.dtype)
            self._keys[:n_total] = keys
        self._alive = np.zeros(self._keys.shape[0], dtype=np.uint8)
        self._alive[:n_total] = alive
        self._n_total = n_total
        self._n_dead = int(n_total - int(alive.sum()))
        self._max_norm = math.sqrt(_max_sq_norm(keys)) if n_total else 0.0
        self._max_norm_sq = self._max_norm ** 2
        rot = arrays.get("rot")
        if rot is not None:
            rot = np.ascontiguousarray(rot, dtype=np.float64)
            if rot.shape != (dim, dim) or not np.isfinite(rot).all() \
                    or np.abs(rot @ rot.T - np.eye(dim)).max() > 1e-6:
                raise ValueError("hsr index file is inconsistent: the PCA basis is not a (d, d) rotation")
        self._rot = rot
        self._slack_rel, self._slack_abs, self._gamma, self._overflow = _precision(self.dtype, dim, self.rotate)
        self._trees = []
        self._buffer = None
        self._codes = None
        if self.backend == "tree":
            self._buffer = _empty_buffer(self.buffer_size, dim, self.dtype)
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
                    self._trees.append(self._build(ids))
            self._trees.sort(key=lambda t: -t.n)
            for s0 in range(0, len(buffered), self.buffer_size):
                part = np.sort(buffered[s0:s0 + self.buffer_size])
                self._buffer.ids[:len(part)] = part
                self._buffer.kf.reshape(dim, self.buffer_size)[:, :len(part)] = self._keys[part].T
                self._buffer.node_end[0] = len(part)
                self._buffer.minid[0] = part[0]
                self._buffer.maxid[0] = part[-1]
        elif self.backend == "code":
            u = 2.0 ** -24 if self.dtype == np.float32 else 2.0 ** -53
            # codes are derived data: recomputed from the keys at the first search, so a file
            # cannot carry codes that disagree with its keys
            codes_meta = meta.get("codes")
            if not isinstance(codes_meta, dict):
                raise ValueError("hsr index file is inconsistent: no code settings")
            self._codes = CodeStore.from_state(dim, codes_meta, arrays, u)
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


def _max_sq_norm(x: np.ndarray, chunk: int = 1 << 16) -> float:
    """Largest squared row norm of ``x`` (float64), ``chunk`` rows at a time: bounded
    temporaries instead of a float64 per key."""
    return max(float(np.einsum("ij,ij->i", c, c, dtype=np.float64).max())
               for c in (x[s:s + chunk] for s in range(0, x.shape[0], chunk)))


def _resolve_backend(method: str, dim: int) -> str:
    """The structure an index holds for ``method`` at dimension ``dim``."""
    if method == "auto":
        return "code" if dim >= AUTO_CODE_MIN_DIM else "tree"
    return method


def _precision(dtype, d: int, rotate: bool):
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


def _as_limits(max_id, m: int) -> np.ndarray:
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


class BruteForceIndex(HSRIndex):
    """The exact blocked BLAS scan behind the :class:`HSRIndex` interface (builds no tree):
    the naive O(mn) baseline and the oracle the other backends are tested against.

    Same as ``HSRIndex(keys, method="brute")``; a subclass so that ``isinstance`` works.
    """

    def __init__(self, keys: ArrayLike | None = None, *, dim: int | None = None, dtype: DTypeLike = None) -> None:
        super().__init__(keys, dim=dim, dtype=dtype, method="brute")
