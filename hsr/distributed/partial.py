"""One shard's partial attention: the library's own attention over the shard's keys.

A shard holds the keys at global positions ``[start, start + n_local)`` of a sequence of
``n_global``. Causal queries sit at the last positions of the *global* sequence: query m of M
at ``p_m = n_global - M + m``, seeing positions ``<= p_m``. On a shard this splits the rows in
three runs: ``p_m < start`` (nothing visible: no contribution), ``start <= p_m < end`` (the
last of these is at ``end - 1``, so they are the shard's own last positions: a causal call),
and ``p_m >= end`` (every key visible: a non-causal call).

:func:`cpu_partial` calls :func:`hsr.hsr_attention` on the shard's ``KVIndex`` /
``KVCacheIndex`` with ``return_info=True`` and turns each row's ``(lse, dropped_bound)`` into
the log of its certified dropped mass (``hsr.distributed.merge``); where that cannot be
recovered (the shard kept nothing), it bounds the dropped mass by ``n_unkept * exp(s * m)``
with ``m`` the shard's best visible score (``topk(1)``), capped at ``tau`` in threshold mode.
"""

from __future__ import annotations

import numpy as np

from ..attention.core import hsr_attention
from ..attention.kv import KVCacheIndex, KVIndex
from .merge import dropped_log_mass

__all__ = ["row_runs", "cpu_partial", "heads_of"]

#: relative inflation of the direct bound n * exp(s * best) (float rounding of scores)
_DIRECT_SLACK = 1e-6


def heads_of(local):
    """``[[KVIndex]]`` (batch x kv heads) of a CPU shard."""
    if isinstance(local, KVIndex):
        return [[local]]
    if isinstance(local, KVCacheIndex):
        return local.heads
    raise TypeError(f"a CPU shard is a KVIndex or KVCacheIndex, got {type(local).__name__}")


def row_runs(M: int, n_global: int, start: int, end: int, causal: bool) -> tuple[int, int]:
    """``(m_lo, m_c)``: rows ``< m_lo`` see nothing of the shard, rows ``[m_lo, m_c)`` are its
    last positions (causal call), rows ``>= m_c`` see all of it."""
    if not causal:
        return 0, 0
    first = n_global - M  # position of row 0
    m_lo = min(M, max(0, start - first))
    m_c = min(M, max(m_lo, end - first))
    return m_lo, m_c


def cpu_partial(local: KVIndex | KVCacheIndex, Qn: np.ndarray, *, start: int, n_global: int, kind: str, alpha: int,
                bias: np.ndarray, scale: float, eps: float | None, tau_rows: np.ndarray | None, causal: bool,
                dense_below: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Partial attention of ``Qn (B, Hq, M, d)`` float32 over one CPU shard.

    Parameters
    ----------
    local : KVIndex or KVCacheIndex
        The shard (a KVIndex takes ``B = Hq = 1``).
    start, n_global : int
        The shard's first global position and the global sequence length.
    bias : (Hq,) float64
    scale : float
    eps : float or None
    tau_rows : (B, Hq, M) float64 or None
        Softmax thresholds per query row (eps mode: None).
    causal : bool
    dense_below : int, optional
        Passed to :func:`hsr.hsr_attention` (below this many keys a shard scores every key).

    Returns
    -------
    out : (B, Hq, M, dv) float32
    lse, log_dropped : (B, Hq, M) float64
        Log normaliser and log of the certified dropped mass (``-inf``: none).
    scored, selected : (B, Hq, M) int64
    """
    heads = heads_of(local)
    B, Hq, M, d = Qn.shape
    n_local = heads[0][0].index.n_total
    dv = heads[0][0].value_dim
    out = np.zeros((B, Hq, M, dv), dtype=np.float32)
    lse = np.full((B, Hq, M), -np.inf)
    logu = np.full((B, Hq, M), -np.inf)
    scored = np.zeros((B, Hq, M), dtype=np.int64)
    selected = np.zeros((B, Hq, M), dtype=np.int64)
    if n_local == 0 or M == 0:
        return out, lse, logu, scored, selected
    m_lo, m_c = row_runs(M, n_global, start, start + n_local, causal)
    for a, b, is_causal in ((m_lo, m_c, True), (m_c, M, False)):
        if b <= a:
            continue
        rows = slice(a, b)
        q = Qn[:, :, rows]
        tau = None if tau_rows is None else tau_rows[:, :, rows]
        if isinstance(local, KVIndex):
            q, tau = q[0, 0], None if tau is None else tau[0, 0]
        extra = {} if dense_below is None else {"dense_below": dense_below}
        o, info = hsr_attention(q, local, kind=kind, alpha=alpha, bias=bias, scale=scale, eps=eps, tau=tau,
                                causal=is_causal, return_info=True, **extra)
        shape = (B, Hq, b - a)
        out[:, :, rows] = np.asarray(o).reshape(shape + (dv,))
        lse[:, :, rows] = info.lse.reshape(shape)
        scored[:, :, rows] = info.keys_scored.reshape(shape)
        selected[:, :, rows] = info.keys_selected.reshape(shape)
        if kind == "softmax":
            lu = dropped_log_mass(info.lse.reshape(shape), info.dropped_bound.reshape(shape))
            need = np.isnan(lu)
            if need.any():
                lu[need] = _direct_bound(heads, Qn[:, :, rows], need, selected[:, :, rows], scale,
                                         None if tau is None else tau_rows[:, :, rows], start, n_global, M, a,
                                         is_causal)
            logu[:, :, rows] = lu
    return out, lse, logu, scored, selected


def _direct_bound(heads, Q, need, selected, scale, tau, start, n_global, M, row0, is_causal):
    """``log(n_unkept * exp(s * best))`` for the rows of ``need`` (B, Hq, m): every key not
    kept scores at most the shard's best visible score (and below tau in threshold mode)."""
    B, Hq = need.shape[:2]
    group = Hq // len(heads[0])
    res = []
    for b, h, i in zip(*np.nonzero(need)):
        idx = heads[b][h // group].index
        lim = n_global - M + row0 + i - start if is_causal else None
        best = float(idx.topk(Q[b, h, i][None], 1, max_id=lim).D[0, 0])
        if lim is None:
            visible = len(idx)
        elif idx.n_total == len(idx):
            visible = min(lim + 1, idx.n_total)
        else:
            visible = int(np.searchsorted(idx.live_ids(), lim, side="right"))
        unkept = visible - int(selected[b, h, i])
        if tau is not None:
            best = min(best, float(tau[b, h, i]))
        if unkept <= 0 or not np.isfinite(best):
            res.append(-np.inf)
        else:
            res.append(np.log(unkept) + scale * best + abs(scale * best) * _DIRECT_SLACK + np.log1p(_DIRECT_SLACK))
    return np.asarray(res)
