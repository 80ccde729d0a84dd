"""Indexed KV caches: keys in an :class:`~hsr.HSRIndex`, values beside them.

``KVIndex`` is one attention head; ``KVCacheIndex`` is a whole ``(batch, kv_heads, seq, dim)``
cache, one ``KVIndex`` per (batch, kv head), for grouped-query attention. A key's id is its
position in the cache, so causal attention is an id limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._typing import Array, ArrayLike, Device, TorchDType, lazy
from ..index import HSRIndex
from .._arrays import as_float_array, is_torch, kept_in_place, to_numpy
from .core import attend_heads, cpu_queries
from .._protocol import FEATURES, AttentionInfo, AttentionSpec

if TYPE_CHECKING:
    from ..kernels.codes import CodeKVCache
else:  # torch and the Triton kernels load only when a cache moves to a GPU
    CodeKVCache = lazy("hsr.kernels.codes", "CodeKVCache")

__all__ = ["KVIndex", "KVCacheIndex", "cache_queries", "framework_out"]

#: the CPU caches implement every feature of the attention protocol
CPU_FEATURES = frozenset(FEATURES) - {"group_union", "tau_eps"}  # the GPU code filter's alone


def _value_buffer(V: np.ndarray) -> np.ndarray:
    """A growable float32 copy of values ``(n, dv)`` (room for at least 16 rows)."""
    buf = np.zeros((max(16, V.shape[0]), V.shape[1]), dtype=np.float32)
    buf[:V.shape[0]] = V
    return buf


class KVIndex:
    """Keys ``(n, d)`` with an index over them and values ``(n, dv)`` beside them (one head).

    Parameters
    ----------
    keys : (n, d) array or tensor
    values : (n, dv) array or tensor
    **index_kwargs
        Passed to :class:`~hsr.HSRIndex` (``leaf_size``, ``method``, ``buffer_size``, ...).
        ``copy=False`` applies to the values too: float32 C-contiguous values are then read in
        place (read-only) instead of copied, until the first :meth:`add`.

    Notes
    -----
    Values are kept in float32. ``add`` adds a decode step's keys and values; the index
    grows incrementally (buffer plus logarithmic merging), with no rebuild per step.
    """

    def __init__(self, keys: ArrayLike, values: ArrayLike, **index_kwargs: Any) -> None:
        K = as_float_array(keys, "keys", np.float32, ndim=2)
        V = as_float_array(values, "values", np.float32, ndim=2)
        if K.shape[0] != V.shape[0]:
            raise ValueError(f"keys and values differ in length: {K.shape[0]} vs {V.shape[0]}")
        self.index = HSRIndex(K, dim=K.shape[1], **index_kwargs)
        self.value_dim = V.shape[1]
        # as the index does with the keys (copy=False: the caller's values in place)
        kept = kept_in_place(V, values, index_kwargs.get("copy", True))
        self._values = kept if kept is not None else _value_buffer(V)

    @classmethod
    def from_index(cls, index: HSRIndex, values: ArrayLike) -> "KVIndex":
        """A KVIndex around an existing index (a loaded one, say: no rebuild) and the values
        ``(index.n_total, dv)`` of its key ids, copied."""
        V = as_float_array(values, "values", np.float32, ndim=2)
        if V.shape[0] != index.n_total:
            raise ValueError(f"values {V.shape} do not match the index ({index.n_total} key ids)")
        kvi = cls.__new__(cls)
        kvi.index = index
        kvi.value_dim = V.shape[1]
        kvi._values = _value_buffer(V)
        return kvi

    @property
    def dim(self) -> int:
        return self.index.dim

    def __len__(self) -> int:
        return len(self.index)

    @property
    def values(self) -> np.ndarray:
        """Values ``(n_total, dv)`` float32, row i belonging to key id i."""
        return self._values[:self.index.n_total]

    def add(self, keys: ArrayLike, values: ArrayLike) -> np.ndarray:
        """Add keys ``(t, d)`` and values ``(t, dv)`` (or one of each); returns their ids."""
        K = as_float_array(keys, "keys", np.float32, ndim=2, dim=self.dim)
        V = as_float_array(values, "values", np.float32, ndim=2, dim=self.value_dim)
        if K.shape[0] != V.shape[0]:
            raise ValueError(f"keys and values differ in length: {K.shape[0]} vs {V.shape[0]}")
        with self.index.writing():  # values and keys change together: searches see both or neither
            start = self.index.n_total
            if start + len(V) > self._values.shape[0]:
                nv = np.zeros((max(2 * self._values.shape[0], start + len(V)), self.value_dim), dtype=np.float32)
                nv[:start] = self._values[:start]
                self._values = nv
            self._values[start:start + len(V)] = V
            return self.index.add(K)

    supports = CPU_FEATURES

    def attend(self, q: ArrayLike, spec: AttentionSpec, *, with_info: bool = False
               ) -> tuple[Array, AttentionInfo | None]:
        """Attention of ``q (m, d)`` or ``(d,)`` over this head, as ``spec`` says (the CPU
        engine, :func:`hsr.attention.core.attend_heads`); ``out`` like q, ``info`` rows like q
        without d, or None unless ``with_info``. Usually called through :func:`hsr.hsr_attention`."""
        Qn = cpu_queries(q, type(self).__name__)
        single = Qn.ndim == 1
        Q4 = as_float_array(Qn, "q", np.float32, ndim=2, dim=self.dim)[None, None]
        out, info = attend_heads([[self]], Q4, spec, tau_rows=(Q4.shape[2],))
        out = out[0, 0]
        rows = [a[0, 0] for a in (info.keys_scored, info.keys_selected, info.dropped_bound, info.lse)]
        if single:
            out, rows = out[0], [a[0] for a in rows]
        return framework_out(out, q), (AttentionInfo(*rows, info.n_keys) if with_info else None)

    def __repr__(self):
        return f"KVIndex(n={len(self)}, dim={self.dim}, value_dim={self.value_dim})"


class KVCacheIndex:
    """A ``(batch, kv_heads, seq, dim)`` KV cache with one :class:`KVIndex` per (batch, head).

    Parameters
    ----------
    keys : (B, Hkv, S, D) array or tensor (post-RoPE, as attention receives them)
    values : (B, Hkv, S, Dv) array or tensor
    **index_kwargs
        Passed to each head's :class:`~hsr.HSRIndex`.
    """

    def __init__(self, keys: ArrayLike, values: ArrayLike, **index_kwargs: Any) -> None:
        K = to_numpy(keys, "keys")
        V = to_numpy(values, "values")
        if K.ndim != 4 or V.ndim != 4:
            raise ValueError(f"keys and values must be (batch, kv_heads, seq, dim), got {K.shape} and {V.shape}")
        if K.shape[:3] != V.shape[:3]:
            raise ValueError(f"keys {K.shape} and values {V.shape} differ in batch, heads or length")
        self.batch, self.kv_heads = K.shape[0], K.shape[1]
        self.heads = [[KVIndex(K[b, h], V[b, h], **index_kwargs) for h in range(K.shape[1])]
                      for b in range(K.shape[0])]

    @classmethod
    def from_heads(cls, heads: list[list[KVIndex]]) -> "KVCacheIndex":
        """A cache over existing per-head indexes, ``heads[b][h]`` (a loaded shard, say)."""
        if not heads or not heads[0] or any(len(row) != len(heads[0]) for row in heads):
            raise ValueError("heads must be a non-empty (batch x kv_heads) list of lists of KVIndex")
        if not all(isinstance(kvi, KVIndex) for row in heads for kvi in row):
            raise TypeError("heads must hold KVIndex objects")
        cache = cls.__new__(cls)
        cache.batch, cache.kv_heads, cache.heads = len(heads), len(heads[0]), heads
        return cache

    def __len__(self) -> int:
        return len(self.heads[0][0]) if self.batch else 0

    @property
    def dim(self) -> int:
        return self.heads[0][0].dim

    @property
    def value_dim(self) -> int:
        return self.heads[0][0].value_dim

    def add(self, keys: ArrayLike, values: ArrayLike) -> None:
        """Add ``(B, Hkv, t, D)`` keys and ``(B, Hkv, t, Dv)`` values (a decode step: t = 1)."""
        K = to_numpy(keys, "keys")
        V = to_numpy(values, "values")
        if K.shape[:2] != (self.batch, self.kv_heads) or V.shape[:3] != K.shape[:3] or K.ndim != 4:
            raise ValueError(f"add expects ({self.batch}, {self.kv_heads}, t, dim) keys and values, "
                             f"got {K.shape} and {V.shape}")
        for b in range(self.batch):
            for h in range(self.kv_heads):
                self.heads[b][h].add(K[b, h], V[b, h])

    supports = CPU_FEATURES

    def attend(self, q: ArrayLike, spec: AttentionSpec, *, with_info: bool = False
               ) -> tuple[Array, AttentionInfo | None]:
        """Attention of ``q (B, Hq, M, D)`` over the cache as ``spec`` says, ``Hq`` a multiple
        of the kv heads (grouped-query attention); ``out`` like q, ``info`` of ``(B, Hq, M)``
        arrays or None unless ``with_info``. Usually called through :func:`hsr.hsr_attention`."""
        Qn = cache_queries(cpu_queries(q, type(self).__name__), self.batch, self.kv_heads, self.dim)
        out, info = attend_heads(self.heads, Qn, spec, tau_rows=Qn.shape[:3])
        return framework_out(out, q), (info if with_info else None)

    def to(self, device: Device, *, dtype: TorchDType | None = None, seed: int = 0) -> CodeKVCache:
        """This cache on another device: a :class:`hsr.kernels.CodeKVCache` (per-key int8 codes
        over the same keys and values, stacked to ``(B, Hkv, n, D)``) that
        :func:`hsr.hsr_attention` runs with Triton kernels. Removed keys are not supported
        there (a ValueError says so).

        Parameters
        ----------
        device : str or torch.device, e.g. ``"cuda"``
        dtype : torch dtype, default bfloat16 on CUDA, float32 elsewhere
        """
        import torch

        from ..kernels.codes import CodeKVCache

        dev = torch.device(device)
        if any(len(kv) != kv.index.n_total for row in self.heads for kv in row):
            raise ValueError("a cache with removed keys cannot move to the device: positions would shift")
        dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        ids = self.heads[0][0].index.live_ids()
        k = np.stack([np.stack([kv.index.get_keys(ids) for kv in row]) for row in self.heads])
        v = np.stack([np.stack([kv.values for kv in row]) for row in self.heads])
        return CodeKVCache(torch.from_numpy(k).to(dev, dt), torch.from_numpy(v).to(dev, dt), seed=seed)

    def __repr__(self):
        return (f"KVCacheIndex(batch={self.batch}, kv_heads={self.kv_heads}, seq={len(self)}, "
                f"dim={self.dim})")


def cache_queries(Qn: np.ndarray, batch: int, kv_heads: int, dim: int) -> np.ndarray:
    """Queries ``(batch, Hq, M, dim)`` for a cache of ``kv_heads`` heads (``Hq`` a multiple of
    them), as finite float32 C-contiguous; ``ValueError`` naming what does not fit."""
    if Qn.ndim != 4 or Qn.shape[0] != batch or Qn.shape[-1] != dim:
        raise ValueError(f"q must be (batch={batch}, heads, seq, dim={dim}), got {Qn.shape}")
    if Qn.shape[1] % kv_heads:
        raise ValueError(f"query heads ({Qn.shape[1]}) must be a multiple of kv heads ({kv_heads})")
    Q4 = np.ascontiguousarray(Qn, dtype=np.float32)
    if not np.isfinite(Q4).all():
        raise ValueError("q contains NaN or Inf")
    return Q4


def framework_out(out: np.ndarray, like: ArrayLike) -> Array:
    """Return ``out`` in the framework, dtype and device of ``like``."""
    if is_torch(like):
        import torch

        return torch.from_numpy(out).to(device=like.device, dtype=like.dtype)
    dt = np.asarray(like).dtype
    return out.astype(dt if dt.kind == "f" else np.float32)
