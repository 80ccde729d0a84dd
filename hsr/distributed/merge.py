"""Exact merges of per-shard results (pure numpy, no communication).

A sequence of ``N`` keys is split into contiguous shards ``[start_r, end_r)``. Each shard
returns partial results over its own keys; these functions combine them into the result over
all ``N`` keys, the same on every rank.

Attention (both kinds)
    A shard returns ``out_r`` (its normalised output) and ``lse_r = log W_r``, the log of its
    normaliser: ``W_r = sum_kept exp(s * score)`` (softmax) or ``W_r = sum_j relu(s * score_j - b)
    ** alpha`` (ReLU^alpha). Both are weighted means ``out = sum_j w_j v_j / sum_j w_j`` over
    disjoint key sets, so ``out = sum_r W_r out_r / sum_r W_r`` and ``lse = log sum_r W_r``,
    computed relative to ``max_r lse_r`` so that nothing overflows for any alpha.

Certified softmax bound
    A shard's ``dropped_bound`` is ``eps_r = U_r / (S_r + U_r)``, with ``S_r = exp(lse_r)`` its
    kept mass and ``U_r`` a certified upper bound of its dropped mass ``T_r``: it is relative to
    the shard's own normaliser. The dropped masses add, the fractions do not: with
    ``T = sum T_r <= U = sum U_r`` and ``S = sum S_r``, the global dropped fraction is
    ``T / (S + T) <= U / (S + U)`` because ``x / (S + x)`` grows with ``x``. So each shard sends
    ``log U_r = lse_r + log(eps_r / (1 - eps_r))`` and the global bound is
    ``U / (S + U) = sigmoid(logsumexp(log U_r) - logsumexp(lse_r))``: the average of the
    ``eps_r`` weighted by ``S_r + U_r`` (at most ``max_r eps_r``, and usually far below it).
    Where ``S_r = 0`` (nothing kept on the shard) ``eps_r`` is 1 and carries no ``U_r``: the
    shard then bounds its dropped mass directly (``hsr.distributed.partial``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .._typing import ArrayLike
from ..index.results import RangeResult, SearchResult

__all__ = ["shard_range", "merge_attention", "dropped_log_mass", "dropped_fraction", "merge_range",
           "merge_topk", "kth_best"]

#: relative inflation of a dropped mass recovered from (lse, eps): covers the float64 rounding
#: of the kernels' ``eps`` and of the recovery (relative error ~1e-16 / (1 - eps))
_RECOVER_SLACK = 1e-9
#: recover ``U_r`` from ``eps_r`` only below this (above, ``1 - eps_r`` has too few digits)
_RECOVER_MAX_EPS = 1.0 - 1e-6


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous slice ``[start, end)`` of ``n`` positions that ``rank`` of ``world`` holds.

    Shards differ in length by at most one (the first ``n % world`` ranks hold one more).
    """
    for name, x in (("n", n), ("world", world), ("rank", rank)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(x).__name__}")
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need n >= 0, world >= 1 and 0 <= rank < world, got n={n}, world={world}, rank={rank}")
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _logsumexp(x: np.ndarray, axis: int = 0) -> np.ndarray:
    top = np.max(x, axis=axis)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - np.expand_dims(safe, axis)), axis=axis)) + safe


def merge_attention(out_parts: ArrayLike, lse_parts: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard attention outputs exactly.

    Parameters
    ----------
    out_parts : (R, rows, dv) array
        Each shard's normalised output (zeros where the shard kept nothing).
    lse_parts : (R, rows) array
        Each shard's log normaliser (``-inf`` where it kept nothing).

    Returns
    -------
    out : (rows, dv) float64
        ``sum_r W_r out_r / sum_r W_r``; zeros where no shard kept anything.
    lse : (rows,) float64
        ``log sum_r W_r``.
    """
    O = np.asarray(out_parts, dtype=np.float64)
    L = np.asarray(lse_parts, dtype=np.float64)
    if O.ndim != 3 or L.shape != O.shape[:2]:
        raise ValueError(f"out_parts must be (R, rows, dv) and lse_parts (R, rows), got {O.shape} and {L.shape}")
    lse = _logsumexp(L, axis=0)
    safe = np.where(np.isfinite(lse), lse, 0.0)
    w = np.where(np.isfinite(L), np.exp(L - safe[None]), 0.0)  # W_r / W, zero for empty shards
    out = np.einsum("rn,rnd->nd", w, O)
    return out, lse


def dropped_log_mass(lse: ArrayLike, eps: ArrayLike) -> np.ndarray:
    """``log U`` of a shard's certified dropped mass from its ``(lse, dropped_bound)``.

    ``U = S eps / (1 - eps)`` with ``S = exp(lse)``, inflated by 1e-9 (rounding). ``-inf`` where
    ``eps == 0``; NaN where it cannot be recovered (nothing kept, or ``eps`` within 1e-6 of 1):
    the caller bounds those rows another way.
    """
    lse = np.asarray(lse, dtype=np.float64)
    eps = np.asarray(eps, dtype=np.float64)
    out = np.full(np.broadcast(lse, eps).shape, np.nan)
    out[eps <= 0.0] = -np.inf
    ok = (eps > 0.0) & (eps < _RECOVER_MAX_EPS) & np.isfinite(lse)
    out[ok] = lse[ok] + np.log(eps[ok]) - np.log1p(-eps[ok]) + np.log1p(_RECOVER_SLACK)
    return out


def dropped_fraction(lse: ArrayLike, log_dropped: ArrayLike) -> np.ndarray:
    """The certified dropped fraction ``U / (S + U)`` from ``log S`` and ``log U`` (both over
    all shards): 0 where nothing is dropped, 1 where nothing is kept but something dropped."""
    lse = np.asarray(lse, dtype=np.float64)
    lu = np.asarray(log_dropped, dtype=np.float64)
    frac = np.zeros(np.broadcast(lse, lu).shape)
    has_u = np.isfinite(lu)
    frac[has_u & ~np.isfinite(lse)] = 1.0
    both = has_u & np.isfinite(lse)
    frac[both] = 1.0 / (1.0 + np.exp(lse[both] - lu[both]))  # sigmoid(log U - log S)
    return frac


def merge_range(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], starts: ArrayLike, m: int) -> RangeResult:
    """One CSR with global ids from per-shard range-search results.

    Parameters
    ----------
    parts : sequence of R ``(lims, D, I)``
        Shard r's result with local ids.
    starts : (R,) int
        Global id of each shard's local id 0.
    m : int
        Queries.

    Returns
    -------
    RangeResult
        Query i's keys from shard 0 first, then shard 1, ...; ids ``I + starts[r]``.
    """
    if len(parts) != len(starts):
        raise ValueError(f"{len(parts)} parts but {len(starts)} starts")
    counts = np.zeros((len(parts), m), dtype=np.int64)
    for r, (lims, _, _) in enumerate(parts):
        if len(lims) != m + 1:
            raise ValueError(f"shard {r} answered {len(lims) - 1} queries, expected {m}")
        counts[r] = np.diff(lims)
    lims = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(counts.sum(axis=0), out=lims[1:])
    dtype = np.result_type(*[p[1].dtype for p in parts]) if parts else np.float32
    D = np.empty(int(lims[-1]), dtype=dtype)
    I = np.empty(int(lims[-1]), dtype=np.int64)  # noqa: E741
    before = np.cumsum(counts, axis=0) - counts  # keys of shards < r, per query
    for r, (plims, pD, pI) in enumerate(parts):
        total = int(plims[-1])
        if total == 0:
            continue
        shift = lims[:-1] + before[r] - plims[:-1]
        dest = np.repeat(shift, counts[r]) + np.arange(total)
        D[dest] = pD[:total]
        I[dest] = np.asarray(pI[:total], dtype=np.int64) + int(starts[r])
    return RangeResult(lims, D, I)


def merge_topk(D_parts: ArrayLike, I_parts: ArrayLike, k: int) -> SearchResult:
    """The global k best from per-shard top-k lists (ids already global).

    Parameters
    ----------
    D_parts : (R, m, k) scores, ``-inf`` for missing entries
    I_parts : (R, m, k) int64 global ids, ``-1`` for missing entries

    Returns
    -------
    SearchResult ``(D (m, k), I (m, k))``, best first, ties broken by the smaller id (as
    :meth:`hsr.HSRIndex.topk`).
    """
    D = np.asarray(D_parts)
    I = np.asarray(I_parts, dtype=np.int64)  # noqa: E741
    if D.shape != I.shape or D.ndim != 3:
        raise ValueError(f"D_parts and I_parts must both be (R, m, k), got {D.shape} and {I.shape}")
    R, m, kk = D.shape
    Dm = np.moveaxis(D, 0, 1).reshape(m, R * kk)
    Im = np.moveaxis(I, 0, 1).reshape(m, R * kk)
    order = np.lexsort((np.where(Im < 0, np.iinfo(np.int64).max, Im), -Dm.astype(np.float64)), axis=1) \
        if m else np.zeros((0, R * kk), dtype=np.int64)
    order = order[:, :k]
    return SearchResult(np.take_along_axis(Dm, order, axis=1), np.take_along_axis(Im, order, axis=1))


def kth_best(D_parts: ArrayLike, k: int) -> np.ndarray:
    """Per row, the k-th best score over all shards' top-k scores ``(R, rows, k)``; ``-inf``
    where fewer than k keys are visible over all shards."""
    D = np.asarray(D_parts, dtype=np.float64)
    R, rows, kk = D.shape
    flat = np.moveaxis(D, 0, 1).reshape(rows, R * kk)
    if k > flat.shape[1]:
        return np.full(rows, -np.inf)
    return -np.partition(-flat, k - 1, axis=1)[:, k - 1]
