"""``hsr_attention``: attention computed only where the index reports keys.

ReLU^alpha attention (``kind="relu"``)
    ``A = ReLU(s * q k^T - b) ** alpha``, ``out = D^-1 A V``. Entry (i, j) is non-zero exactly
    when ``<q_i, k_j> > b / s``, so the keys with ``score >= b / s`` (one half-space query) are
    all the keys that matter: the result equals dense attention up to float rounding. A row
    where nothing fires is zeros.

Softmax attention (``kind="softmax"``)
    Best-first over the index's node bounds; keeps every key it scores and returns, per query,
    a certified upper bound ``eps_cert`` on the fraction of the softmax mass it dropped
    (module ``_kernels``). Then ``|out - out_dense|_inf <= 2 * eps_cert * |V|_inf``. Modes:
    ``eps`` (stop once the certified remainder is at most ``eps`` times the mass found),
    ``tau`` (keep ``score >= tau``), ``topk`` (keep the keys scoring at least the k-th best).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._typing import Array, ArrayLike
from ..index import canonical_scores
from .._arrays import as_float_array, is_torch, to_numpy
from . import _kernels as AK
from .._protocol import AttentionCache, AttentionInfo, AttentionSpec, check_supported

__all__ = ["hsr_attention", "attend_heads", "cpu_queries", "paper_bias"]


def paper_bias(q: ArrayLike, keys: ArrayLike, scale: float | None = None, n: int | None = None, sample: int = 2048,
               seed: int = 0) -> float:
    """The paper's threshold ``b = sigma * sqrt(0.4 * ln n)``, with ``sigma`` the standard
    deviation of the scaled scores ``scale * <q, k>`` over the given queries and a seeded
    sample of at most ``sample`` keys. About ``n^{4/5}`` keys per row then fire when scores
    are roughly Gaussian."""
    Q = as_float_array(q, "q", np.float32)
    K = as_float_array(keys, "keys", np.float32, dim=Q.shape[1])
    n = K.shape[0] if n is None else n
    if K.shape[0] == 0 or n < 2:
        return 0.0
    s = Q.shape[1] ** -0.5 if scale is None else scale
    rng = np.random.default_rng(seed)
    pick = K if K.shape[0] <= sample else K[rng.choice(K.shape[0], sample, replace=False)]
    sigma = float(np.std(s * (Q.astype(np.float64) @ pick.T.astype(np.float64))))
    return sigma * math.sqrt(0.4 * math.log(n))


#: rows of per-key bounds computed at once by the code-backed softmax (bounds are (rows, n))
_BOUND_ROWS = 256


#: below this many keys in the cache, ``hsr_attention`` scores every key (the dense path) instead
#: of searching the index: measured on the CPU, decode of one SmolLM2-shaped layer (9/3 heads,
#: d 64), the index paths only pay off from about this length (``bench/bench_crossover.py``,
#: ``bench/results/crossover_cpu.json``). The dense path gives the same keys and weights.
DENSE_BELOW = 1024

#: rows of the dense path's score matrix computed at once
_DENSE_ROWS = 512


def _attend_head(kvi: Any, Q, kind, alpha, bias, scale, eps, tau, topk, lim, dense):
    """Attention of queries ``Q (m, d)`` float32 against one head; returns out and info rows.
    The whole computation holds the index still (a concurrent add waits)."""
    with kvi.index.reading():
        if dense:
            ids = kvi.index.live_ids()  # once per head, not per chunk of rows
            keys = kvi.index.get_keys(ids)
            out, scored, selected, dropped, lse = [], [], [], [], []
            for s in range(0, max(Q.shape[0], 1), _DENSE_ROWS):
                r = _dense_head_locked(kvi, ids, keys, Q[s:s + _DENSE_ROWS], kind, alpha, bias[s:s + _DENSE_ROWS],
                                       scale, None if tau is None else tau[s:s + _DENSE_ROWS], topk,
                                       lim[s:s + _DENSE_ROWS])
                for acc, x in zip((out, scored, selected, dropped, lse), r):
                    acc.append(x)
            return tuple(np.concatenate(x) for x in (out, scored, selected, dropped, lse))
        return _attend_head_locked(kvi, Q, kind, alpha, bias, scale, eps, tau, topk, lim)


def _dense_head_locked(kvi: Any, ids, keys, Q, kind, alpha, bias, scale, tau, topk, lim):
    """The dense path of :func:`_attend_head` over the head's live ``ids`` and their ``keys``:
    every visible key's canonical score, then the same selection and the same weight kernels
    as the index path (so the same keys and the same weights). Nothing is dropped without
    being counted: the softmax's dropped fraction is the exact mass of the visible keys not kept."""
    m = Q.shape[0]
    out = np.zeros((m, kvi.value_dim), dtype=np.float32)
    S = canonical_scores(Q, keys) if m else np.zeros((0, len(ids)), dtype=np.float32)
    vis = ids[None, :] <= lim[:, None]
    if kind == "relu":
        t = bias / scale
    elif topk is not None:
        masked = np.where(vis, S.astype(np.float64), -np.inf)
        k = min(int(topk), masked.shape[1])
        t = -np.partition(-masked, k - 1, axis=1)[:, k - 1] if k else np.full(m, -np.inf)
    elif tau is not None:
        t = np.asarray(tau, dtype=np.float64)
    else:  # eps: every visible key is kept, nothing is dropped
        t = np.full(m, -np.inf)
    t = np.maximum(t, float(np.finfo(np.float32).min))
    keep = vis & (S >= t[:, None])
    rows, cols = np.nonzero(keep)
    lims = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(keep.sum(1), out=lims[1:])
    sel_ids, sc = ids[cols], S[rows, cols]
    scored = vis.sum(1).astype(np.int64)
    if kind == "relu":
        lse = np.zeros(m)
        AK.relu_from_csr(lims, sel_ids, sc, kvi.values, float(scale), bias, int(alpha), out, lse)
        return out, scored, np.diff(lims), np.zeros(m), lse
    rr, rc = np.nonzero(vis & ~keep)  # visible, not kept: scores below t, so each term is < 1
    remainder = np.bincount(rr, weights=np.exp(scale * (S[rr, rc].astype(np.float64) - t[rr])), minlength=m)
    info = np.zeros((m, 5))
    AK.softmax_from_csr(lims, sel_ids, sc, kvi.values, float(scale), t, remainder, out, info)
    return out, scored, np.diff(lims), info[:, 1], info[:, 0]


def _attend_head_locked(kvi: Any, Q, kind, alpha, bias, scale, eps, tau, topk, lim):
    index = kvi.index
    m = Q.shape[0]
    out = np.zeros((m, kvi.value_dim), dtype=np.float32)
    scored = np.zeros(m, dtype=np.int64)
    selected = np.zeros(m, dtype=np.int64)
    dropped = np.zeros(m)
    lse = np.full(m, -np.inf)
    if len(index) == 0 or m == 0:
        return out, scored, selected, dropped, lse
    if kind == "relu":
        lims, sc, ids, st = index.range_search(Q, bias / scale, max_id=lim, return_stats=True)
        lse = np.zeros(m)
        AK.relu_from_csr(lims, ids, sc, kvi.values, float(scale), bias, int(alpha), out, lse)
        return out, st.keys_scored, np.diff(lims), dropped, lse
    if index.backend == "brute":  # a brute-force index has nothing to bound the remainder with
        raise ValueError("softmax with a certificate needs bounds: build the index with "
                         "method='auto', 'code' or 'tree', not 'brute'")
    if topk is not None:
        sc, ids = index.topk(Q, int(topk), max_id=lim)
        tau_arr = np.where(ids[:, -1] >= 0, sc[:, -1].astype(np.float64), -np.inf)
        mode = 1
    elif tau is not None:
        tau_arr = np.broadcast_to(np.asarray(tau, dtype=np.float64), (m,)).copy()
        mode = 1
    else:
        tau_arr = np.zeros(m)
        mode = 0
    info = np.zeros((m, 5))
    kv = index.key_view()
    e = float(eps if eps is not None else 0.0)
    if index.backend == "code" and mode == 1:
        # a threshold: the range search reports the kept keys and bounds the rest's mass
        # (a row with fewer than topk keys keeps them all: its -inf becomes the lowest float32)
        t_fin = np.maximum(tau_arr, float(np.finfo(np.float32).min))
        lims, sc, ids, st = index.range_search(Q, t_fin, max_id=lim, remainder_scale=float(scale),
                                               return_stats=True)
        AK.softmax_from_csr(lims, ids, sc, kvi.values, float(scale), t_fin, st.remainder, out, info)
        return out, st.keys_scored, info[:, 2].astype(np.int64), info[:, 1], info[:, 0]
    if index.backend == "code":
        for s in range(0, m, _BOUND_ROWS):
            sl = slice(s, s + _BOUND_ROWS)
            ub = index.upper_bounds(Q[sl])
            AK.softmax_from_bounds(Q[sl], kv.keys, kv.alive, kv.has_dead, ub, kvi.values, float(scale), mode, e,
                                   tau_arr[sl], lim[sl], out[sl], info[sl])
    else:
        fv = index.forest_view(Q)
        AK.softmax_certified(Q, fv.rotated, fv.qnorm, fv.trees, kv.alive, kv.has_dead, kvi.values, float(scale),
                             mode, e, tau_arr, lim, fv.slack_rel, fv.slack_abs, out, info)
    return out, info[:, 3].astype(np.int64), info[:, 2].astype(np.int64), info[:, 1], info[:, 0]


def hsr_attention(q: ArrayLike | None, index: AttentionCache, *, kind: str = "relu", alpha: int = 2,
                  bias: float | ArrayLike | str = 0.0, scale: float | None = None, eps: float | None = None,
                  tau: float | ArrayLike | None = None, topk: int | None = None, causal: bool = False,
                  return_info: bool = False, dense_below: int | None = None, group_union: bool = False
                  ) -> Array | tuple[Array, AttentionInfo]:
    """Attention of ``q`` over an indexed KV cache, computed only at the keys the index reports.

    Parameters
    ----------
    q : array or tensor
        ``(m, d)`` or ``(d,)`` for a :class:`KVIndex`; ``(B, Hq, M, D)`` for a
        :class:`KVCacheIndex` with ``Hq`` a multiple of its kv heads (grouped-query attention:
        query head h reads kv head ``h // (Hq // Hkv)``). float16/bfloat16/float32.
    index : an attention cache
        :class:`KVIndex`, :class:`KVCacheIndex`, ``hsr.kernels.CodeKVCache``,
        ``hsr.kernels.GPUBlockIndex``, ``hsr.distributed.ShardedKVCache``: anything with
        ``supports`` and ``attend(q, spec, with_info=)`` (:class:`hsr.AttentionCache`).
        A cache that lacks a feature the call uses raises a ``ValueError`` naming it.
    kind : {"relu", "softmax"}
    alpha : int, default 2
        ReLU power.
    bias : float, array (Hq,) or "paper"
        ReLU threshold b (entries fire where ``s * <q, k> > b``). ``"paper"`` uses
        :func:`paper_bias` per head: ``sigma * sqrt(0.4 ln n)``.
    scale : float, default ``1/sqrt(d)``
    eps : float in (0, 1), softmax only
        Target certified dropped fraction (default 1e-3 when no tau/topk is given).
    tau : float or array (Hq,) or shaped like q without d, softmax only
        Keep keys with ``<q, k> >= tau`` (raw, unscaled score), one threshold for all query
        heads, one per query head, or one per query row (``(B, Hq, M)``; ``(m,)`` for a
        :class:`KVIndex`).
    topk : int, softmax only
        Keep the keys scoring at least the k-th best score.
    causal : bool
        Queries are the last positions of the cache: query j of M sits at ``n - M + j`` and
        sees ids ``<= n - M + j``. The index prunes nodes by position as well as by score.
    return_info : bool
        Also return an :class:`AttentionInfo`.
    dense_below : int, optional
        Below this many keys in the cache, score every key instead of searching the index
        (same keys, same weights; short contexts never cost more than dense). Default
        :data:`DENSE_BELOW`; 0 always searches the index. CPU caches only.
    group_union : bool
        Softmax with ``tau``: every query row keeps the keys that any row of its GQA group
        keeps (each within its own causal limit): less dropped mass for the bytes the GPU
        filter reads anyway. ``hsr.kernels.CodeKVCache`` only.

    Returns
    -------
    out : like q, last dim ``dv``
        In q's framework, dtype and device.
    info : AttentionInfo
        With ``return_info=True``.

    Raises
    ------
    ValueError
        A bad option (named), or one the cache does not support (named, with what it does).
    TypeError
        ``index`` is not an attention cache; CUDA queries given to a CPU cache.

    Notes
    -----
    On the GPU: pass a ``hsr.kernels.CodeKVCache`` (``KVCacheIndex.to("cuda")``, or built from
    CUDA ``(B, Hkv, N, D)`` keys and values) and CUDA queries ``(B, Hq, M, D)``: the code filter,
    the compaction of the survivors and the attention run as three Triton launches. ReLU^alpha
    is exact there; softmax keeps the keys with ``score >= tau`` (``tau=`` required). Or pass a
    ``hsr.kernels.GPUBlockIndex`` (built with ``hsr.kernels.build_index``
    from CUDA ``(B, Hkv, N, D)`` keys and values) and CUDA queries ``(B, Hq, M, D)``; the call
    runs the Triton filter + attention (``hsr.kernels.hsr_decode``). ReLU^alpha is exact there
    too; softmax keeps the keys of the blocks that may hold a score ``>= tau`` (``tau=``
    required: the certified ``eps`` mode is CPU-only). A :class:`KVIndex` /
    :class:`KVCacheIndex` runs the CPU (numba) path and refuses CUDA queries (``TypeError``:
    no silent host round trip). Every cache is reached the same way: this function builds an
    :class:`hsr.AttentionSpec` and calls ``index.attend(q, spec, with_info=return_info)``.

    Examples
    --------
    >>> import numpy as np, hsr
    >>> rng = np.random.default_rng(0)
    >>> k = rng.standard_normal((4096, 32)).astype(np.float32)
    >>> v = rng.standard_normal((4096, 32)).astype(np.float32)
    >>> kv = hsr.KVIndex(k, v)
    >>> q = rng.standard_normal((4, 32)).astype(np.float32)
    >>> out = hsr.hsr_attention(q, kv, alpha=2, bias=0.5)
    >>> ref = hsr.dense_relu_attention(q, k, v, alpha=2, bias=0.5)
    >>> bool(np.allclose(out, ref, rtol=1e-4, atol=1e-5))
    True
    """
    spec = AttentionSpec(kind=kind, alpha=alpha, bias=bias, scale=scale, eps=eps, tau=tau, topk=topk,
                         causal=causal, dense_below=dense_below, group_union=group_union)
    check_supported(index, spec, with_info=return_info)
    out, info = index.attend(q, spec, with_info=return_info)
    return (out, info) if return_info else out


def cpu_queries(q: ArrayLike, cache_name: str) -> np.ndarray:
    """``q`` as a numpy array for a CPU cache; CUDA queries are refused (never a silent round
    trip through the host)."""
    dev = getattr(q, "device", None)
    if getattr(dev, "type", "cpu") != "cpu":
        raise TypeError(f"q is on {dev} but {cache_name} is a CPU index: move the index "
                        "(index.to(q.device)) or the queries (q.cpu())")
    return to_numpy(q, "q")


def attend_heads(heads: list[list[Any]], Qn: np.ndarray, spec: AttentionSpec, *,
                 tau_rows: tuple[int, ...]) -> tuple[np.ndarray, AttentionInfo]:
    """The CPU engine behind ``KVIndex.attend`` and ``KVCacheIndex.attend``.

    Parameters
    ----------
    heads : list (B) of lists (Hkv) of KVIndex
        (typed ``Any`` here: the caches import this module, not the other way round)
    Qn : (B, Hq, M, d) float32, finite
    spec : AttentionSpec
    tau_rows : tuple
        The per-row shape a ``tau`` array may have besides ``(Hq,)`` (``(M,)`` for one head,
        ``(B, Hq, M)`` for a cache).

    Returns
    -------
    out : (B, Hq, M, dv) float32
    info : AttentionInfo of (B, Hq, M) arrays
    """
    B, Hq, M, d = Qn.shape
    group = Hq // len(heads[0])
    n_cache = heads[0][0].index.n_total if B else 0
    dense_below = DENSE_BELOW if spec.dense_below is None else spec.dense_below
    dense = n_cache < dense_below
    causal = spec.causal
    if causal and M > n_cache:
        raise ValueError(f"causal attention puts the {M} queries at the last positions of the cache, but it "
                         f"holds {n_cache} keys: give at most {n_cache} queries (or causal=False)")
    s = spec.scale_for(d)
    bias = spec.bias
    if isinstance(bias, str):
        bias_h = None
    else:
        if np.ndim(bias) and np.shape(bias) != (Hq,):  # before broadcasting: numpy's message names no argument
            raise ValueError(f"bias must be a scalar or one per query head, shape ({Hq},), got {np.shape(bias)}")
        bias_h = np.broadcast_to(np.asarray(bias, dtype=np.float64), (Hq,)) if np.ndim(bias) else np.full(Hq, float(bias))
        if not np.isfinite(bias_h).all():
            raise ValueError("bias contains NaN or Inf")
    tau = spec.tau
    if tau is not None:
        tau_h = np.asarray(to_numpy(tau, "tau") if is_torch(tau) else tau, dtype=np.float64)
        if tau_h.ndim and tau_h.shape not in ((Hq,), tau_rows):
            raise ValueError(f"tau must be a scalar or have shape ({Hq},) or {tau_rows}, got {tau_h.shape}")
        if not np.isfinite(tau_h).all():
            raise ValueError("tau contains NaN or Inf")
        tau_h = tau_h.reshape(B, Hq, M) if tau_h.shape == tau_rows else np.broadcast_to(tau_h[..., None], (B, Hq, M))
    kind, alpha, eps = spec.kind, spec.alpha, spec.softmax_eps
    dv = heads[0][0].value_dim
    out = np.zeros((B, Hq, M, dv), dtype=np.float32)
    info = [np.zeros((B, Hq, M), dtype=np.int64), np.zeros((B, Hq, M), dtype=np.int64),
            np.zeros((B, Hq, M)), np.zeros((B, Hq, M))]
    for b in range(B):
        for hk, kvi in enumerate(heads[b]):
            n = kvi.index.n_total
            Qg = Qn[b, hk * group:(hk + 1) * group].reshape(group * M, d)
            lim = np.tile(np.arange(M, dtype=np.int64) + (n - M), group) if causal \
                else np.full(group * M, np.iinfo(np.int64).max, dtype=np.int64)
            if bias_h is None:
                live = kvi.index.get_keys(kvi.index.live_ids())
                bq = np.repeat([paper_bias(Qn[b, hk * group + g], live, s) for g in range(group)], M)
            else:
                bq = np.repeat(bias_h[hk * group:(hk + 1) * group], M)
            tq = None if tau is None else np.ascontiguousarray(tau_h[b, hk * group:(hk + 1) * group]).reshape(-1)
            o, sc, sel, dr, ls = _attend_head(kvi, Qg, kind, alpha, np.ascontiguousarray(bq), s, eps, tq,
                                              spec.topk, lim, dense)
            out[b, hk * group:(hk + 1) * group] = o.reshape(group, M, dv)
            for arr, val in zip(info, (sc, sel, dr, ls)):
                arr[b, hk * group:(hk + 1) * group] = val.reshape(group, M)
    return out, AttentionInfo(info[0], info[1], info[2], info[3], len(heads[0][0]) if B else 0)
