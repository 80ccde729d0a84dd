"""``ShardedIndex``: an :class:`hsr.HSRIndex` split by id over the ranks of a process group.

Rank r holds the keys of global ids ``[start_r, start_r + n_r)`` in its own ``HSRIndex`` (its
local id i is global id ``start_r + i``). A search broadcasts rank 0's queries, each rank
searches its own index, and the results are gathered into one answer with global ids, the
same on every rank, as FAISS's sharded indexes do: ``range_search`` one CSR
(:class:`hsr.RangeResult`), ``search``/``topk`` the global k best (:class:`hsr.SearchResult`).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from .._typing import ArrayLike, Device, ProcessGroup, StrPath
from ..index import HSRIndex
from .._arrays import to_numpy
from ..index.results import RangeResult, SearchResult
from ._comm import Comm, Sharded
from . import _files
from .merge import merge_range, merge_topk, shard_range

__all__ = ["ShardedIndex"]


class ShardedIndex(Sharded):
    """An exact half-space reporting index whose keys are split over the ranks of a group.

    Parameters
    ----------
    local : HSRIndex
        This rank's keys (consecutive ids, rank order).
    group : torch.distributed.ProcessGroup, optional
    broadcast_queries : bool, default True
        Search rank 0's queries (other ranks may pass None); False: every rank passes the
        same queries itself.

    Notes
    -----
    Construction, searches and :meth:`load` are collective (every rank calls them, with the
    same arguments); :meth:`add` and :meth:`save` are not.
    """

    def __init__(self, local: HSRIndex, *, group: ProcessGroup | None = None, broadcast_queries: bool = True) -> None:
        super().__init__(local, group, broadcast_queries)
        meta = self.comm.attempt(_describe, local)
        got = self.comm.gather_rows(meta if meta is not None else np.zeros(3), "ShardedIndex construction")
        if not (got[:, 0] == got[0, 0]).all():
            raise ValueError(f"ranks hold keys of different dimensions: {got[:, 0].astype(int).tolist()}")
        self._set_sizes(got[:, 1])
        self._live = int(got[:, 2].sum())

    @classmethod
    def from_full(cls, keys: ArrayLike, *, group: ProcessGroup | None = None, broadcast_queries: bool = True,
                  **index_kwargs: Any) -> ShardedIndex:
        """Every rank passes all keys ``(n, d)``; each indexes its :func:`shard_range` slice."""
        comm = Comm(group)

        def build():
            K = to_numpy(keys, "keys")
            if K.ndim != 2:
                raise ValueError(f"keys must be (n, d), got {K.shape}")
            a, b = shard_range(K.shape[0], comm.world, comm.rank)
            return HSRIndex(K[a:b], dim=K.shape[1], **index_kwargs)

        local = comm.attempt(build)
        comm.agree("ShardedIndex.from_full")
        return cls(local, group=group, broadcast_queries=broadcast_queries)

    @property
    def d(self) -> int:
        return self.local.d

    @property
    def ntotal(self) -> int:
        """Live keys over every rank, as :attr:`hsr.HSRIndex.ntotal` (``len(index)`` too)."""
        return self._live

    def __len__(self) -> int:
        return self._live

    @property
    def n_total(self) -> int:
        """Global ids handed out, ``0 .. n_total - 1`` (live and removed)."""
        return self._n

    def add(self, keys: ArrayLike) -> np.ndarray:
        """Add keys (every rank passes the same): the last rank indexes them. No communication.
        Returns their global ids."""
        t = np.shape(keys)[0] if np.ndim(keys) == 2 else 1
        first = self._n
        if self.rank == self.world - 1:
            self.local.add(keys)
        self._n += int(t)
        self._live += int(t)
        return np.arange(first, first + t, dtype=np.int64)

    def remove(self, ids: ArrayLike) -> None:
        """Delete keys by global id (every rank passes the same ids; each removes its own).
        Collective: one gather, so that a bad id raises on every rank and every rank's
        :attr:`ntotal` stays the same.

        Raises
        ------
        TypeError
            Ids that are not integers.
        ValueError
            An id out of range, repeated, or already removed (on every rank).
        """
        got = self.comm.attempt(self._remove_own, ids)
        done = self.comm.gather_rows(np.array([0.0 if got is None else got]), "sharded remove")
        self._live -= int(done.sum())

    def _remove_own(self, ids):
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64).ravel()
        bad = (arr < 0) | (arr >= self._n)
        if bad.any():
            raise ValueError(f"ids out of range [0, {self._n}): {arr[bad][:5].tolist()}")
        if np.unique(arr).size != arr.size:
            raise ValueError("ids are repeated")
        end = self._n if self.rank == self.world - 1 else int(self.starts[self.rank + 1])
        mine = arr[(arr >= self.start) & (arr < end)] - self.start
        if mine.size:
            self.local.remove(mine)
        return float(mine.size)

    def to(self, device: Device) -> ShardedIndex:
        """``"cpu"``: this index. A sharded index searches on the CPU only (its merge is in
        numpy): for GPU shards, move each rank's ``HSRIndex`` (``local.to("cuda")``) and search
        it on its own."""
        import torch

        if torch.device(device).type != "cpu":
            raise ValueError("ShardedIndex searches on the CPU only; move each rank's shard "
                             "(sharded.local.to(device)) and search it there")
        return self

    # ------------------------------------------------------------------ search
    def _queries(self, queries, tau, max_id):
        """Rank 0's ``(Q (m, d) float32, tau (m,) float64, lim (m,) int64)``, on every rank."""
        torch = self.comm.torch
        mine = None
        if self.rank == 0 or not self.broadcast_queries:
            mine = self.comm.attempt(self._own, queries, tau, max_id)
        if not self.broadcast_queries:
            if mine is None:
                return np.zeros((0, self.d), dtype=np.float32), np.zeros(0), np.zeros(0, dtype=np.int64)
            return mine
        head = torch.zeros(3, dtype=torch.int64)
        if self.rank == 0:
            head[0] = 1 if self.comm.failed else 0
            head[1] = 0 if mine is None else mine[0].shape[0]
            head[2] = self._n
        self.comm.broadcast(head, "query header")
        if int(head[0]):
            self.comm.check(np.r_[1, np.zeros(self.world - 1)], "sharded search (queries on rank 0)")
        m = int(head[1])
        buf = torch.zeros(m, self.d + 2, dtype=torch.float64)
        if self.rank == 0:
            Q, t, lim = mine
            buf[:, :self.d] = torch.from_numpy(Q.astype(np.float64))
            buf[:, self.d] = torch.from_numpy(t)
            buf[:, self.d + 1] = torch.from_numpy(lim.astype(np.float64))
        self.comm.broadcast(buf, "queries")
        if int(head[2]) != self._n:
            self.comm.attempt(_raise, ValueError(f"rank {self.rank} counts {self._n} ids, rank 0 counts "
                                                 f"{int(head[2])}: add() was not called alike on every rank"))
        b = buf.numpy()
        lim = np.minimum(b[:, self.d + 1], float(np.iinfo(np.int64).max // 2)).astype(np.int64)
        return np.ascontiguousarray(b[:, :self.d], dtype=np.float32), b[:, self.d].copy(), lim

    def _own(self, queries, tau, max_id):
        if queries is None:
            raise ValueError("queries is None on rank 0 (only other ranks may pass None when broadcasting)")
        Q = to_numpy(queries, "queries")
        Q = np.ascontiguousarray((Q[None] if Q.ndim == 1 else Q), dtype=np.float32)
        if Q.ndim != 2 or Q.shape[1] != self.d:
            raise ValueError(f"queries must be (m, {self.d}) or ({self.d},), got {np.shape(queries)}")
        if not np.isfinite(Q).all():
            raise ValueError("queries contain NaN or Inf")
        m = Q.shape[0]
        t = np.broadcast_to(np.asarray(tau, dtype=np.float64), (m,)).copy() if np.ndim(tau) == 0 \
            else np.asarray(tau, dtype=np.float64)
        if t.shape != (m,):
            raise ValueError(f"tau must be a scalar or have shape ({m},), got {np.shape(tau)}")
        if max_id is None:
            lim = np.full(m, np.iinfo(np.int64).max // 2, dtype=np.int64)
        else:
            a = np.asarray(max_id)
            if a.dtype.kind not in "iu":
                raise TypeError(f"max_id must be integer, got dtype {a.dtype}")
            lim = np.broadcast_to(a.astype(np.int64), (m,)).copy() if a.ndim == 0 else a.astype(np.int64)
            if lim.shape != (m,):
                raise ValueError(f"max_id must be a scalar or have shape ({m},), got shape {a.shape}")
        return Q, t, lim

    def _local_limits(self, lim):
        """Global id limits as this shard's local ones (``-1``: nothing visible here)."""
        return np.maximum(lim - self.start, -1)

    def range_search(self, queries: ArrayLike | None, tau: float | ArrayLike, *, max_id: int | ArrayLike | None = None
                     ) -> RangeResult:
        """All keys with ``<q_i, k> >= tau_i`` over every shard, as one CSR with global ids.

        Parameters
        ----------
        queries : (m, d) or (d,) array or tensor (rank 0's are used when broadcasting)
        tau : float or (m,)
        max_id : int or (m,) int, optional
            Global id limits (causal search).

        Returns
        -------
        RangeResult ``(lims, D, I)``
            ``I`` global ids, query i's keys from rank 0's shard first; on every rank.
        """
        Q, t, lim = self._queries(queries, tau, max_id)
        m = Q.shape[0]
        part = self.comm.attempt(self._local_range, Q, t, lim)
        blobs = self.comm.gather_bytes(part, "sharded range_search")
        parts = []
        for blob in blobs:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                parts.append((z["lims"], z["D"], z["I"]))
        return merge_range(parts, self.starts, m)

    def _local_range(self, Q, t, lim):
        loc = self._local_limits(lim)
        m = Q.shape[0]
        vis = loc >= 0
        lims = np.zeros(m + 1, dtype=np.int64)
        D, I = np.zeros(0, dtype=self.local.dtype), np.zeros(0, dtype=np.int64)  # noqa: E741
        if vis.any() and len(self.local):
            r = self.local.range_search(Q[vis], t[vis], max_id=loc[vis])
            counts = np.zeros(m, dtype=np.int64)
            counts[vis] = np.diff(r.lims)
            np.cumsum(counts, out=lims[1:])
            D, I = r.D, r.I  # noqa: E741
        buf = io.BytesIO()
        np.savez(buf, lims=lims, D=D, I=I)
        return buf.getvalue()

    def topk(self, queries: ArrayLike | None, k: int, *, max_id: int | ArrayLike | None = None) -> SearchResult:
        """The k best keys over every shard, best first, global ids (``-1``/``-inf`` where fewer
        than k are visible); ties broken by the smaller id, as :meth:`hsr.HSRIndex.topk`."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        Q, _, lim = self._queries(queries, 0.0, max_id)
        m = Q.shape[0]
        part = self.comm.attempt(self._local_topk, Q, int(k), lim)
        got = self.comm.gather_rows(part if part is not None else np.zeros((m, 2 * k)), "sharded topk")
        D = got[:, :, :k]
        I = got[:, :, k:].astype(np.int64)  # noqa: E741
        res = merge_topk(D, I, int(k))
        return SearchResult(res.D.astype(self.local.dtype), res.I)

    search = topk

    def count(self, queries: ArrayLike | None, tau: float | ArrayLike, *, max_id: int | ArrayLike | None = None
              ) -> np.ndarray:
        """Per query, the number of keys with ``<q, k> >= tau`` over every shard, ``(m,)``
        int64, on every rank (one gather of the shards' counts)."""
        Q, t, lim = self._queries(queries, tau, max_id)
        part = self.comm.attempt(self._local_count, Q, t, lim)
        got = self.comm.gather_rows(part if part is not None else np.zeros(Q.shape[0]), "sharded count")
        return got.sum(0).astype(np.int64)

    def _local_count(self, Q, t, lim):
        loc = self._local_limits(lim)
        out = np.zeros(Q.shape[0])
        vis = loc >= 0
        if vis.any() and len(self.local):
            out[vis] = self.local.count(Q[vis], t[vis], max_id=loc[vis])
        return out

    def _local_topk(self, Q, k, lim):
        loc = self._local_limits(lim)
        m = Q.shape[0]
        out = np.concatenate([np.full((m, k), -np.inf), np.full((m, k), -1.0)], axis=1)
        vis = loc >= 0
        if vis.any() and len(self.local):
            r = self.local.topk(Q[vis], k, max_id=loc[vis])
            out[vis, :k] = r.D
            out[vis, k:] = np.where(r.I >= 0, r.I + self.start, -1)
        return out

    # ------------------------------------------------------------------ files
    def save(self, path: StrPath) -> None:
        """Write this rank's index under the folder ``path``; no communication."""
        _files.save_index(path, self.local, self.rank, self.world, self.start)

    @classmethod
    def load(cls, path: StrPath, *, group: ProcessGroup | None = None, broadcast_queries: bool = True
             ) -> ShardedIndex:
        """Each rank reads its own shard (collective: checks world size and starts)."""
        return cls._load(_files.load_index, path, group, broadcast_queries)

    def __repr__(self):
        return f"ShardedIndex(rank={self.rank}/{self.world}, ids from {self.start}, ntotal={self._live}, n_total={self._n}, d={self.d})"


def _raise(exc):
    raise exc


def _describe(local):
    if not isinstance(local, HSRIndex):
        raise TypeError(f"local must be an HSRIndex, got {type(local).__name__}")
    return np.array([local.d, local.n_total, len(local)], dtype=np.float64)
