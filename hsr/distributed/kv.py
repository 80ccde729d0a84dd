"""``ShardedKVCache``: a KV cache split by sequence position over the ranks of a process group.

Each rank holds the keys and values of one contiguous run of positions ``[start, end)`` in its
own cache: a :class:`hsr.KVIndex` (one head), a :class:`hsr.KVCacheIndex` (``(B, Hkv)`` heads,
grouped-query attention) or, on a GPU, a :class:`hsr.kernels.CodeKVCache`. Every rank calls
the same methods with the same arguments (SPMD); every rank gets the same result.

One attention step: rank 0's queries are broadcast (a header with their shape and the global
length, then the queries); each rank attends over its own keys; one ``all_gather`` of the
packed partials ``[out | lse | log dropped mass | keys scored | keys selected | failed]`` lets
every rank merge them exactly (``hsr.distributed.merge``). ``topk`` first gathers each
shard's k best scores to find the global k-th best, then runs as that threshold.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .._typing import Array, ArrayLike, ProcessGroup, StrPath, lazy
from .._protocol import FEATURES, AttentionInfo, AttentionSpec
from ..attention.kv import KVCacheIndex, KVIndex, cache_queries, framework_out
from .._arrays import as_float_array, to_numpy
from ._comm import Comm, Sharded
from .merge import dropped_fraction, kth_best, merge_attention, shard_range
from .partial import cpu_partial, heads_of
from . import _device, _files

if TYPE_CHECKING:
    from ..kernels.codes import CodeKVCache
else:  # torch and the Triton kernels load only with a GPU shard
    CodeKVCache = lazy("hsr.kernels.codes", "CodeKVCache")

__all__ = ["ShardedKVCache"]

_KINDS = {"KVIndex": 0, "KVCacheIndex": 1, "CodeKVCache": 2}
_CPU_FEATURES = frozenset(FEATURES) - {"paper_bias", "group_union", "tau_eps"}
_GPU_FEATURES = frozenset({"tau"})


class ShardedKVCache(Sharded):
    """A KV cache whose sequence is split over the ranks of a ``torch.distributed`` group.

    Parameters
    ----------
    local : KVIndex, KVCacheIndex or hsr.kernels.CodeKVCache
        This rank's shard: the keys and values at this rank's contiguous run of positions.
        Ranks hold consecutive runs in rank order. Every rank holds the same kind, heads and
        dims (checked).
    group : torch.distributed.ProcessGroup, optional
        Default: the default group.
    broadcast_queries : bool, default True
        Broadcast rank 0's queries to every rank at each call (other ranks may pass
        ``q=None``). False: every rank passes its own, identical queries (one collective less
        per step; the caller guarantees they are identical).
    dense_below : int, optional
        Passed to each CPU shard's :func:`hsr.hsr_attention` (a shard with fewer keys scores
        them all; 0: always search the index). Default: that function's default.

    Notes
    -----
    Construction is collective (one ``all_gather`` of the shard sizes). Use it through
    :func:`hsr.hsr_attention` (``hsr_attention(q, sharded, ...)``, every option of the
    single-device cache) or :meth:`hsr_attention`. ``add`` appends to the last rank.
    ``last_timing`` holds the seconds of the last call's phases (``broadcast``, ``local``,
    ``gather``, ``merge``; with ``sync_timing=True`` a CUDA shard synchronises between them).
    """

    def __init__(self, local: KVIndex | KVCacheIndex | CodeKVCache, *, group: ProcessGroup | None = None,
                 broadcast_queries: bool = True, dense_below: int | None = None) -> None:
        super().__init__(local, group, broadcast_queries)
        self.dense_below = dense_below
        self.sync_timing = False
        self.last_timing: dict = {}
        meta = self.comm.attempt(_describe, local)
        got = self.comm.gather_rows(meta if meta is not None else np.zeros(6), "ShardedKVCache construction")
        self._kind = int(got[self.rank, 0])
        self.batch, self.kv_heads, self.dim, self.value_dim = (int(x) for x in got[self.rank, 1:5])
        if not (got[:, :5] == got[0, :5]).all():
            raise ValueError(f"ranks hold different kinds of shards (kind, B, Hkv, d, dv per rank): "
                             f"{got[:, :5].astype(int).tolist()}")
        self._set_sizes(got[:, 5])

    @classmethod
    def from_full(cls, keys: ArrayLike, values: ArrayLike, *, group: ProcessGroup | None = None,
                  broadcast_queries: bool = True, dense_below: int | None = None, **index_kwargs: Any
                  ) -> ShardedKVCache:
        """Every rank passes the whole cache; each keeps its :func:`shard_range` slice.

        ``keys (n, d)`` and ``values (n, dv)`` make :class:`KVIndex` shards; ``(B, Hkv, n, d)``
        make :class:`KVCacheIndex` shards. ``index_kwargs`` go to each shard's index.
        """
        comm = Comm(group)

        def build():
            K, V = to_numpy(keys, "keys"), to_numpy(values, "values")
            if K.ndim not in (2, 4) or V.ndim != K.ndim:
                raise ValueError(f"keys and values must both be (n, d) or (B, Hkv, n, d), got {K.shape} and {V.shape}")
            a, b = shard_range(K.shape[-2], comm.world, comm.rank)
            if K.ndim == 2:
                return KVIndex(K[a:b], V[a:b], **index_kwargs)
            return KVCacheIndex(K[:, :, a:b], V[:, :, a:b], **index_kwargs)

        local = comm.attempt(build)
        comm.agree("ShardedKVCache.from_full")
        return cls(local, group=group, broadcast_queries=broadcast_queries, dense_below=dense_below)

    # ------------------------------------------------------------------ sizes
    def _local_n(self) -> int:
        if self._kind == 2:
            return len(self.local)
        return heads_of(self.local)[0][0].index.n_total

    @property
    def n_total(self) -> int:
        """Positions in the whole cache (all ranks)."""
        return self._n

    @property
    def end(self) -> int:
        return self.start + self._local_n()

    def add(self, keys: ArrayLike, values: ArrayLike) -> np.ndarray:
        """Append a step's keys and values (every rank passes the same ones): the last rank
        stores them, every rank counts them. No communication. Returns their global positions."""
        K = to_numpy(keys, "keys") if self._kind != 2 else keys
        t = K.shape[-2] if (self._kind != 0 or K.ndim == 2) else 1
        first = self._n
        if self.rank == self.world - 1:
            self.local.add(keys, values)
        self._n += int(t)
        return np.arange(first, first + t, dtype=np.int64)

    # ------------------------------------------------------------------ attention
    @property
    def supports(self) -> frozenset[str]:
        """CPU shards: every feature but ``bias='paper'`` (it needs every key in one place); a
        CodeKVCache shard: ``tau``."""
        return _GPU_FEATURES if self._kind == 2 else _CPU_FEATURES

    def attend(self, q: ArrayLike | None, spec: AttentionSpec, *, with_info: bool = False
               ) -> tuple[Array, AttentionInfo | None]:
        """Attention of ``q`` over the whole sharded cache as ``spec`` says (the attention
        protocol's method: :func:`hsr.hsr_attention` calls it). Collective: every rank calls
        it; with ``broadcast_queries`` only rank 0's ``q`` counts (others may pass None).

        Returns the same as one cache holding every position (ReLU^alpha, softmax with
        ``tau``/``topk``: the same keys, equal up to float rounding; softmax with ``eps``: each
        shard meets ``eps`` on its own, so the whole does too), on every rank. The
        ``AttentionInfo``'s ``dropped_bound`` is the global certified fraction (the shards'
        dropped masses summed, over the global normaliser). ``spec.dense_below`` overrides the
        cache's ``dense_below`` for this call.
        """
        kind, alpha, bias, scale, tau, topk, causal = (spec.kind, spec.alpha, spec.bias, spec.scale, spec.tau,
                                                       spec.topk, spec.causal)
        eps = spec.softmax_eps
        dense_below = self.dense_below if spec.dense_below is None else spec.dense_below
        timing = {}
        t0 = time.perf_counter()
        Qn, like = self._sync_queries(q, timing)
        B, Hq, M, d = Qn.shape if Qn is not None else (0, 0, 0, 0)
        s = float(scale) if scale is not None else d ** -0.5
        bias_h = self.comm.attempt(_per_head, bias, Hq, "bias")
        tau_rows = None
        if tau is not None:
            tau_rows = self.comm.attempt(_per_row_tau, tau, B, Hq, M)
        if topk is not None:
            tau_rows = self._global_kth(Qn, int(topk), causal)
        t1 = time.perf_counter()
        if self._kind == 2:
            part = self.comm.attempt(_device.partial, self.local, Qn, kind=kind, alpha=int(alpha),
                                     bias=bias_h, scale=s, tau_rows=tau_rows, causal=causal)
            timing["local"] = self._stamp(t1)
            merged = _device.gather_merge(self, part, (B, Hq, M), timing)
            out = merged
        else:
            part = self.comm.attempt(cpu_partial, self.local, Qn, start=self.start, n_global=self._n, kind=kind,
                                     alpha=int(alpha), bias=bias_h, scale=s, eps=eps, tau_rows=tau_rows,
                                     causal=causal, dense_below=dense_below)
            timing["local"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            dv = self.value_dim
            packed = np.zeros((B, Hq, M, dv + 4))
            if part is not None:
                o, lse, lu, sc, sel = part
                packed[..., :dv], packed[..., dv], packed[..., dv + 1] = o, lse, lu
                packed[..., dv + 2], packed[..., dv + 3] = sc, sel
            got = self.comm.gather_rows(packed, "sharded attention")
            timing["gather"] = time.perf_counter() - t2
            t3 = time.perf_counter()
            rows = B * Hq * M
            g = got.reshape(self.world, rows, dv + 4)
            o, lse = merge_attention(g[:, :, :dv], g[:, :, dv])
            out = o.reshape(B, Hq, M, dv).astype(np.float32)
            lse = lse.reshape(B, Hq, M)
            if kind == "softmax":
                lu = np.logaddexp.reduce(g[:, :, dv + 1], axis=0).reshape(B, Hq, M)
                dropped = dropped_fraction(lse, lu)
            else:
                dropped = np.zeros((B, Hq, M))
            scored = g[:, :, dv + 2].sum(0).reshape(B, Hq, M).astype(np.int64)
            sel = g[:, :, dv + 3].sum(0).reshape(B, Hq, M).astype(np.int64)
            timing["merge"] = time.perf_counter() - t3
        timing["total"] = time.perf_counter() - t0
        self.last_timing = timing
        if self._kind == 2:
            return (out.to(like.dtype) if like is not None else out), None
        info = [scored, sel, dropped, lse]
        if self._kind == 0:
            out, info = out[0, 0], [a[0, 0] for a in info]
            if like is not None and len(like.shape) == 1:
                out, info = out[0], [a[0] for a in info]
        result = framework_out(out, like if like is not None else out)
        return result, (AttentionInfo(*info, n_keys=self._n) if with_info else None)

    def _stamp(self, t):
        if self.sync_timing:
            self.comm.torch.cuda.synchronize()
        return time.perf_counter() - t

    def _sync_queries(self, q, timing):
        """``(Q (B, Hq, M, d), like)``: the queries every rank uses (rank 0's when broadcasting),
        float32 numpy for CPU shards, a device tensor for a CodeKVCache."""
        t = time.perf_counter()
        root = self.rank == 0
        mine = None
        if root or not self.broadcast_queries:
            mine = self.comm.attempt(self._own_queries, q)
        if not self.broadcast_queries:
            timing["broadcast"] = 0.0
            if mine is None:  # failed here: the next gather reports it; go on with zeros
                return np.zeros((self.batch, self.kv_heads, 0, self.dim), dtype=np.float32), None
            return mine
        torch = self.comm.torch
        head = torch.zeros(8, dtype=torch.int64)
        if root:
            head[0] = 1 if self.comm.failed else 0
            if mine is not None:
                Q = mine[0]
                head[1:5] = torch.tensor(list(Q.shape))
                head[5] = self._n
                head[6] = len(np.shape(mine[0])) if self._kind != 0 else _ndim(mine[1])
        self.comm.broadcast(head, "query header")
        if int(head[0]):
            self.comm.check(np.r_[1, np.zeros(self.world - 1)], "sharded attention (queries on rank 0)")
        shape = tuple(int(x) for x in head[1:5])
        if self._kind == 2:  # float32 on the wire (gloo has no bfloat16 everywhere)
            buf = mine[0].float() if root else torch.empty(shape, dtype=torch.float32, device=self.local.device)
            self.comm.broadcast(buf, "queries")
            Q = mine[0] if root else buf.to(self.local.dtype)
            like = mine[1] if root else q if q is not None else Q
        else:
            buf = torch.from_numpy(mine[0]) if root else torch.empty(shape, dtype=torch.float32)
            self.comm.broadcast(buf, "queries")
            Q = buf.numpy()
            like = mine[1] if root else q if q is not None else \
                (Q[0, 0] if int(head[6]) == 2 else Q[0, 0, 0] if int(head[6]) == 1 else Q)
        if int(head[5]) != self._n:
            self.comm.attempt(_raise, ValueError(f"rank {self.rank} counts {self._n} positions, rank 0 counts "
                                                 f"{int(head[5])}: add() was not called alike on every rank"))
        timing["broadcast"] = time.perf_counter() - t
        return Q, like

    def _own_queries(self, q):
        if q is None:
            raise ValueError("q is None on rank 0 (only other ranks may pass None when broadcasting)")
        if self._kind == 2:
            return _device.check_queries(self.local, q), q
        Qn = to_numpy(q, "q")
        if self._kind == 0:
            Q2 = as_float_array(Qn, "q", np.float32, ndim=2, dim=self.dim)
            return np.ascontiguousarray(Q2[None, None]), q
        return cache_queries(Qn, self.batch, self.kv_heads, self.dim), q

    def _global_kth(self, Qn, k, causal):
        """Per query row, the k-th best score over every shard (``-inf``: fewer than k visible)."""
        B, Hq, M, d = Qn.shape
        part = self.comm.attempt(_local_topk_scores, self.local, Qn, k, self.start, self._n, causal)
        got = self.comm.gather_rows(part if part is not None else np.zeros((B, Hq, M, k)), "sharded topk")
        kth = kth_best(got.reshape(self.world, B * Hq * M, k), k).reshape(B, Hq, M)
        # fewer than k keys visible: keep them all (as the single cache does)
        return np.maximum(kth, float(np.finfo(np.float32).min))

    # ------------------------------------------------------------------ files
    def save(self, path: StrPath) -> None:
        """Write this rank's shard under the folder ``path`` (``shard-<rank>-of-<world>/``); no
        communication. CPU shards only."""
        if self._kind == 2:
            raise ValueError("a CodeKVCache shard cannot be saved: save the CPU cache it was made from")
        _files.save_kv(path, self.local, self.rank, self.world, self.start)

    @classmethod
    def load(cls, path: StrPath, *, group: ProcessGroup | None = None, broadcast_queries: bool = True
             ) -> ShardedKVCache:
        """Each rank reads its own shard from the folder ``path`` (collective: the ranks check
        that the world size and the shard starts match what was saved)."""
        return cls._load(_files.load_kv, path, group, broadcast_queries)

    def __repr__(self):
        return (f"ShardedKVCache(rank={self.rank}/{self.world}, positions [{self.start}, {self.end}) of {self._n}, "
                f"local={self.local!r})")


def _describe(local):
    kind = type(local).__name__
    if kind not in _KINDS:
        raise TypeError(f"local must be a KVIndex, KVCacheIndex or CodeKVCache, got {kind}")
    if kind == "CodeKVCache":
        dims, n = (local.B, local.Hkv, local.D, local.D), len(local)
    elif kind == "KVCacheIndex":
        dims, n = (local.batch, local.kv_heads, local.dim, local.value_dim), local.heads[0][0].index.n_total
    else:
        dims, n = (1, 1, local.dim, local.value_dim), local.index.n_total
    return np.array([_KINDS[kind], *dims, n], dtype=np.float64)


def _ndim(x) -> int:
    return len(x.shape) if hasattr(x, "shape") else np.ndim(x)


def _raise(exc):
    raise exc


def _per_head(bias, Hq, name):
    b = np.asarray(bias, dtype=np.float64)
    if b.ndim and b.shape != (Hq,):
        raise ValueError(f"{name} must be a scalar or have shape ({Hq},), got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return np.ascontiguousarray(np.broadcast_to(b, (Hq,)))


def _per_row_tau(tau, B, Hq, M):
    t = np.asarray(tau, dtype=np.float64)
    if t.ndim and t.shape not in ((Hq,), (B, Hq, M)):
        raise ValueError(f"tau must be a scalar or have shape ({Hq},) or {(B, Hq, M)}, got {t.shape}")
    if not np.isfinite(t).all():
        raise ValueError("tau contains NaN or Inf")
    return np.ascontiguousarray(t if t.ndim == 3 else np.broadcast_to(t[..., None], (B, Hq, M)))


def _local_topk_scores(local, Qn, k, start, n_global, causal):
    """``(B, Hq, M, k)`` this shard's k best scores per query row (``-inf`` padded)."""
    from .partial import row_runs

    heads = heads_of(local)
    B, Hq, M, d = Qn.shape
    group = Hq // len(heads[0])
    out = np.full((B, Hq, M, k), -np.inf)
    n_local = heads[0][0].index.n_total
    m_lo, _ = row_runs(M, n_global, start, start + n_local, causal)
    if n_local == 0 or m_lo >= M:
        return out
    lim = (n_global - M + np.arange(m_lo, M) - start) if causal else None
    for b in range(B):
        for h in range(Hq):
            idx = heads[b][h // group].index
            out[b, h, m_lo:] = idx.topk(Qn[b, h, m_lo:], k, max_id=lim).D
    return out
