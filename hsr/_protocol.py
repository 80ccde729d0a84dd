"""The two protocols: attention over a cache, and search over an index.

Attention: what to compute, what comes back, and the one method every cache has.

``hsr_attention(q, cache, **options)`` builds an :class:`AttentionSpec` (validated once, here),
checks that the cache :attr:`~AttentionCache.supports` every feature the spec uses, and calls
``cache.attend(q, spec, with_info=...)``. Nothing else dispatches. A cache is anything with
``supports`` and ``attend``: the CPU caches (``KVIndex``, ``KVCacheIndex``), the GPU ones
(``hsr.kernels.CodeKVCache``, ``hsr.kernels.GPUBlockIndex``) and the sharded one
(``hsr.distributed.ShardedKVCache``). docs/design.md, "Two protocols", says how to add one.

Search: :class:`SearchIndex`, FAISS's contract (``add``, ``remove``, ``range_search``,
``search``, ``count``, ``ntotal``, ``d``, ``to``), numpy on the CPU and tensors on a device:
``HSRIndex``, ``BruteForceIndex``, ``hsr.kernels.GPUCodeIndex``,
``hsr.distributed.ShardedIndex``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._typing import Array, ArrayLike

__all__ = ["AttentionSpec", "AttentionInfo", "AttentionCache", "SearchIndex", "FaissNames", "FEATURES", "DEFAULT_EPS",
           "check_share", "check_supported"]

#: the certified dropped fraction a softmax call keeps when it is given no eps, tau or topk
DEFAULT_EPS = 1e-3

#: what a spec (and a call) may use beyond plain ReLU^alpha with a numeric bias, and what each
#: means; a cache lists the ones it implements in ``supports``
FEATURES = {
    "eps": "softmax with a certified dropped fraction eps (also softmax given no eps/tau/topk)",
    "tau": "softmax keeping the keys with score >= tau",
    "topk": "softmax keeping the keys scoring at least the k-th best",
    "paper_bias": "bias='paper' (the bias computed from the keys)",
    "info": "return_info=True (an AttentionInfo beside the output)",
    "dense_below": "dense_below= (score every key below a cache length)",
    "group_union": "group_union=True (softmax: every query row of a GQA group keeps the keys any row of it keeps)",
    "tau_eps": "softmax with tau and eps together: score >= tau, and every key for a row whose certified "
               "dropped share under tau may exceed eps",
}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_share(x, name: str) -> float:
    """``x`` as a float in the open interval (0, 1): a share of softmax mass (``eps``,
    ``calibrate_at``); anything else (a bool, NaN, 0, 1, a string) is a ``ValueError`` naming
    ``name``. The one check of every place that takes such a share."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 < x < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {x!r}")
    return float(x)


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """What one attention call computes; validated at construction (``ValueError`` naming the
    bad option), shared by every cache.

    Parameters
    ----------
    kind : {"relu", "softmax"}, default "relu"
        ReLU^alpha (exact wherever it runs) or softmax (keeps a subset: eps, tau or topk).
    alpha : int >= 1, default 2
        ReLU power.
    bias : float, array (Hq,), or "paper"
        ReLU threshold b: entries fire where ``scale * <q, k> > b``.
    scale : float > 0, optional
        Default ``1 / sqrt(d)``.
    eps, tau, topk
        Softmax only, at most one: the certified dropped fraction, a raw-score threshold
        (scalar, per query head or per query row), the count of best keys.
        Softmax with none of them keeps a certified :data:`DEFAULT_EPS`. ``tau`` and ``eps``
        together (the ``"tau_eps"`` feature, GPU code cache): each row keeps ``score >= tau``
        where the certified bound on the mass that drops is at most ``eps``, and every key
        where it may be more — a threshold chosen ahead (calibrated, no search per step) with
        a per-row guarantee.
    causal : bool, default False
        Queries are the last M positions of the cache (bottom-right alignment).
    dense_below : int >= 0, optional
        Score every key below this cache length (CPU caches).
    group_union : bool, default False
        Softmax with ``tau``: every query row keeps the union of the kept sets of its GQA
        group (the query heads that share a kv head, and with ``causal`` the M positions, each
        within its own causal limit). The GPU code filter reads that union anyway; attending
        it drops less mass for the same bytes (GPU code cache only).
    """

    kind: str = "relu"
    alpha: int = 2
    bias: Any = 0.0
    scale: float | None = None
    eps: float | None = None
    tau: Any = None
    topk: int | None = None
    causal: bool = False
    dense_below: int | None = None
    group_union: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("relu", "softmax"):
            raise ValueError(f"kind must be 'relu' or 'softmax', got {self.kind!r}")
        if not _is_int(self.alpha) or self.alpha < 1:
            raise ValueError(f"alpha must be an integer >= 1, got {self.alpha!r}")
        object.__setattr__(self, "alpha", int(self.alpha))
        if self.scale is not None and (isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real)
                                       or not np.isfinite(self.scale) or self.scale <= 0):
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r}")
        if isinstance(self.bias, str) and self.bias != "paper":
            raise ValueError(f"bias must be a number, an array of one per head, or 'paper', got {self.bias!r}")
        if not isinstance(self.causal, (bool, np.bool_)):
            raise ValueError(f"causal must be True or False, got {self.causal!r}")
        if self.dense_below is not None and (not _is_int(self.dense_below) or self.dense_below < 0):
            raise ValueError(f"dense_below must be a non-negative integer, got {self.dense_below!r}")
        if not isinstance(self.group_union, (bool, np.bool_)):
            raise ValueError(f"group_union must be True or False, got {self.group_union!r}")
        given = [x is not None for x in (self.eps, self.tau, self.topk)]
        if self.kind == "relu":
            if any(given) or self.group_union:
                raise ValueError("eps, tau, topk and group_union apply to kind='softmax' only")
            return
        if sum(given) > 1 and not (self.topk is None and sum(given) == 2):  # tau with eps: guarded
            raise ValueError("give at most one of eps, tau and topk (or tau with eps: a guarded threshold)")
        if self.eps is not None:
            check_share(self.eps, "eps")
        if self.topk is not None and (not _is_int(self.topk) or self.topk < 1):
            raise ValueError(f"topk must be a positive integer, got {self.topk!r}")

    @property
    def softmax_eps(self) -> float | None:
        """The eps a softmax call certifies: as given, :data:`DEFAULT_EPS` when no eps, tau or
        topk is given; None otherwise (and for ReLU)."""
        if self.kind != "softmax" or self.tau is not None or self.topk is not None:
            return None
        return float(self.eps) if self.eps is not None else DEFAULT_EPS

    @property
    def guard_eps(self) -> float | None:
        """The eps a guarded threshold holds per row (``tau`` and ``eps`` together, the
        ``"tau_eps"`` feature); None otherwise."""
        return float(self.eps) if self.tau is not None and self.eps is not None else None

    def scale_for(self, d: int) -> float:
        """The score scale for head dimension ``d``: as given, else ``1 / sqrt(d)``."""
        return float(self.scale) if self.scale is not None else float(d) ** -0.5

    def features(self, *, with_info: bool = False) -> frozenset[str]:
        """The :data:`FEATURES` this call uses (a cache must support every one)."""
        used = set()
        if self.softmax_eps is not None:
            used.add("eps")
        if self.tau is not None:
            used.add("tau")
        if self.guard_eps is not None:
            used.add("tau_eps")
        if self.topk is not None:
            used.add("topk")
        if isinstance(self.bias, str):
            used.add("paper_bias")
        if self.dense_below is not None:
            used.add("dense_below")
        if self.group_union:
            used.add("group_union")
        if with_info:
            used.add("info")
        return frozenset(used)


@dataclass
class AttentionInfo:
    """Per-query statistics of one attention call, shaped like q without its last dim (numpy
    on a CPU cache, tensors on a GPU one).

    Attributes
    ----------
    keys_scored : int64 array
        Keys whose score was computed in full precision.
    keys_selected : int64 array or None
        Keys that contributed (reported by the index / kept by the softmax). None where the
        cache does not count them (the GPU code cache: its attention kernel does not count).
    dropped_bound : float array
        Softmax: certified upper bound on the dropped fraction of the softmax mass. ReLU: 0.
    lse : float array
        Softmax: log of the kept mass ``log sum_kept exp(s * score)``. ReLU: log of ``D_ii``.
    n_keys : int
        Keys in the cache.
    """

    keys_scored: Array
    keys_selected: Array | None
    dropped_bound: Array
    lse: Array
    n_keys: int

    @property
    def scan_fraction(self) -> float:
        """``keys_scored / n_keys``, averaged over the rows."""
        n = self.keys_scored.numel() if hasattr(self.keys_scored, "numel") else self.keys_scored.size
        if not n:
            return 0.0
        return float(self.keys_scored.sum()) / n / max(self.n_keys, 1)


@runtime_checkable
class AttentionCache(Protocol):
    """What :func:`hsr.hsr_attention` needs of a cache.

    Attributes
    ----------
    supports : frozenset of str
        The :data:`FEATURES` it implements.
    """

    supports: frozenset[str]

    def attend(self, q: ArrayLike | None, spec: AttentionSpec, *, with_info: bool = False
               ) -> tuple[Array, AttentionInfo | None]:
        """Attention of ``q`` over the cache as ``spec`` says; ``info`` is None unless
        ``with_info``."""
        ...


def check_supported(cache: Any, spec: AttentionSpec, *, with_info: bool = False) -> None:
    """``TypeError`` if ``cache`` is not an :class:`AttentionCache`; ``ValueError`` naming
    each feature of ``spec`` it lacks."""
    if not isinstance(cache, AttentionCache):
        raise TypeError(f"{type(cache).__name__} is not an attention cache (it needs `supports` and "
                        "`attend(q, spec, with_info=)`): pass a KVIndex, KVCacheIndex, CodeKVCache, "
                        "GPUBlockIndex or ShardedKVCache")
    missing = sorted(spec.features(with_info=with_info) - frozenset(cache.supports))
    if missing:
        lacks = "; ".join(f"{m}: {FEATURES[m]}" for m in missing)
        raise ValueError(f"{type(cache).__name__} does not support {', '.join(missing)} ({lacks}). "
                         f"It supports: {', '.join(sorted(cache.supports)) or 'ReLU^alpha with a numeric bias only'}")


@runtime_checkable
class SearchIndex(Protocol):
    """What every half-space reporting index has, on every device (FAISS's names and results;
    numpy arrays from a CPU index, tensors on the index's device from a GPU one).

    ``ntotal`` / ``len(index)`` count live keys; ids are handed out in order and never shift
    (``remove`` leaves a hole). ``range_search(Q, tau)`` returns a ``RangeResult(lims, D, I)``
    of every live key with ``<q, k> >= tau``; ``search(Q, k)`` a ``SearchResult(D, I)`` of the
    k best, padded with ``-inf`` / ``-1``; ``count`` the range search's sizes; ``to(device)``
    the same keys, ids and removals on another device.
    """

    @property
    def ntotal(self) -> int: ...

    @property
    def d(self) -> int: ...

    def __len__(self) -> int: ...

    def add(self, keys: Any) -> Any: ...

    def remove(self, ids: Any) -> Any: ...

    def range_search(self, queries: Any, tau: Any) -> Any: ...

    def search(self, queries: Any, k: int) -> Any: ...

    def count(self, queries: Any, tau: Any) -> Any: ...

    def to(self, device: Any) -> Any: ...


class FaissNames:
    """FAISS's names beside ours, for an index with ``__len__`` (live keys) and ``dim``."""

    @property
    def ntotal(self) -> int:
        """Live keys (``len(index)``; ids stay ``0 .. n_total - 1``)."""
        return len(self)

    @property
    def d(self) -> int:
        """The key dimension (:attr:`dim`)."""
        return self.dim
