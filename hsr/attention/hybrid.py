"""Hybrid attention: a static block-sparse pattern united with the keys an index reports.

This module owns :func:`hybrid_attention` (a CPU reference of softmax over the union of a
:class:`~hsr.attention.patterns.Pattern`'s keys and the keys a :class:`~hsr.KVCacheIndex`
reports, by threshold or rank) and :func:`remove_key_padding`, which takes pad keys out of a
``KVCacheIndex``. It reads the index only through its public methods (``live_ids``,
``get_keys``, ``range_search``, ``topk``, ``remove``).
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple, Union

import numpy as np

from .._typing import Tensor
from .core import paper_bias
from .kv import KVCacheIndex
from .patterns import Pattern

__all__ = ["hybrid_attention", "remove_key_padding"]


def remove_key_padding(index: KVCacheIndex, key_padding: np.ndarray,
                       already_removed: Optional[np.ndarray] = None) -> np.ndarray:
    """Remove the pad keys of every row of ``index`` (ids are cache positions).

    Parameters
    ----------
    index : KVCacheIndex
        ``batch`` rows over ``n`` key ids.
    key_padding : np.ndarray, bool, shape (batch, n)
        True at real keys, False at pad keys (removed from every kv head of the row).
    already_removed : np.ndarray, bool, shape (batch, n'), optional
        Pad ids removed by an earlier call (``n' <= n``): skipped, since removing an id twice
        is an error in the index. Ignored when its batch size differs.

    Returns
    -------
    np.ndarray, bool, shape (batch, n)
        The pad mask (``~key_padding``), to pass as ``already_removed`` next time.
    """
    n = index.heads[0][0].index.n_total if index.batch else 0
    if key_padding.shape != (index.batch, n):
        raise ValueError(f"key padding {key_padding.shape} does not match the index ({index.batch}, {n})")
    pad = ~key_padding
    if already_removed is not None and already_removed.shape[0] == pad.shape[0]:
        m = min(already_removed.shape[1], pad.shape[1])
        new = pad.copy()
        new[:, :m] &= ~already_removed[:, :m]
    else:
        new = pad
    for b in range(index.batch):
        ids = np.flatnonzero(new[b, :n])
        if ids.size:
            for kvi in index.heads[b]:
                kvi.index.remove(ids)
    return pad.copy()


def hybrid_attention(query: Tensor, key: Tensor, value: Tensor, index: Optional[KVCacheIndex], pattern: Pattern, *,
                     tau: Union[float, str, None] = None, topk: Optional[int] = None, scale: Optional[float] = None,
                     key_padding: Optional[np.ndarray] = None, q_chunk: int = 512, return_info: bool = False
                     ) -> Union[Tensor, Tuple[Tensor, Dict[str, float]]]:
    """Causal softmax over ``pattern``'s keys united with the keys the index reports.

    Parameters
    ----------
    query : torch.Tensor (B, Hq, M, D)
        The last M positions of the cache.
    key, value : torch.Tensor (B, Hkv, N, D)
    index : KVCacheIndex or None
        Over ``key``/``value`` (ids = positions). Built here when None.
    pattern : hsr.attention.patterns.Pattern
        Its dense token mask is united with the reported keys.
    tau : float or "paper"
        Index reports keys with raw score ``<q, k> >= tau`` (``"paper"``: per query head
        ``b / scale`` with ``b = sigma sqrt(0.4 ln n)``, :func:`hsr.paper_bias`).
    topk : int
        Index reports the ``topk`` best keys instead. Give exactly one of tau and topk.
    scale : float, default ``1/sqrt(D)``
    key_padding : (B, N) bool, optional
        False at pad keys (excluded everywhere).
    q_chunk : int
        Queries per materialised mask chunk (memory ``q_chunk * N`` bools per head group).

    Returns
    -------
    out : torch.Tensor (B, Hq, M, D), dtype of query
    info : dict, with ``return_info``: keys_scored, keys_selected, search_s, attend_s.

    Notes
    -----
    A reference implementation: the union is a dense boolean mask per query chunk and the
    softmax runs in float32 SDPA over all N keys with that mask, so its cost is dense. It shows
    what the union computes (quality), not how fast a kernel over it would be.
    """
    import torch  # lazily: importing hsr does not import torch
    if (tau is None) == (topk is None):
        raise ValueError("give exactly one of tau and topk")
    if isinstance(tau, str) and tau != "paper":
        raise ValueError(f"tau must be a number or 'paper', got {tau!r}")
    B, Hq, M, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    g = Hq // Hkv
    s = D ** -0.5 if scale is None else float(scale)
    if index is None:
        index = KVCacheIndex(key.detach(), value.detach())
        if key_padding is not None:
            remove_key_padding(index, key_padding)
    pmask = torch.from_numpy(pattern.dense_mask(N, M))  # (M, N), causal included
    qn = query.detach().float().cpu().numpy()
    lim_all = np.arange(M, dtype=np.int64) + (N - M)
    out = torch.empty(B, Hq, M, value.shape[-1], dtype=query.dtype, device=query.device)
    info = {"keys_scored": 0, "keys_selected": 0, "search_s": 0.0, "attend_s": 0.0}
    for b in range(B):
        for hk in range(Hkv):
            hidx = index.heads[b][hk].index
            Qg = np.ascontiguousarray(qn[b, hk * g:(hk + 1) * g].reshape(g * M, D))
            lim = np.tile(lim_all, g)
            t0 = time.perf_counter()
            t = None
            if topk is None:  # "paper" depends on the head's live keys: per (b, kv head)
                t = _paper_tau(hidx, qn[b, hk * g:(hk + 1) * g], s, M) if isinstance(tau, str) else float(tau)
            rep, st = _reported(hidx, Qg, lim, N, t, topk)
            info["search_s"] += time.perf_counter() - t0
            info["keys_scored"] += int(st.keys_scored.sum())
            t0 = time.perf_counter()
            mask = rep.view(g, M, N) | pmask[None]
            if key_padding is not None:
                mask &= torch.from_numpy(key_padding[b])[None, None, :]
            info["keys_selected"] += int(mask.sum())
            kk = key[b:b + 1, hk:hk + 1].float()
            vv = value[b:b + 1, hk:hk + 1].float()
            for c0 in range(0, M, q_chunk):
                c1 = min(M, c0 + q_chunk)
                qq = query[b:b + 1, hk * g:(hk + 1) * g, c0:c1].float()
                o = torch.nn.functional.scaled_dot_product_attention(
                    qq, kk.expand(1, g, N, D), vv.expand(1, g, N, vv.shape[-1]),
                    attn_mask=mask[None, :, c0:c1], scale=s)
                out[b, hk * g:(hk + 1) * g, c0:c1] = torch.nan_to_num(o[0]).to(query.dtype)
            info["attend_s"] += time.perf_counter() - t0
    return (out, info) if return_info else out


def _paper_tau(hidx, q_heads: np.ndarray, scale: float, M: int) -> np.ndarray:
    """Per-row raw-score thresholds ``b / scale`` of ``tau="paper"``.

    ``q_heads`` is float32 ``(g, M, D)``: the query heads sharing one kv head. Each head's bias
    ``b = sigma sqrt(0.4 ln n)`` (:func:`hsr.paper_bias`) is measured on the live keys only
    (pad keys removed from the index do not count). Returns ``(g * M,)``, head-major like the
    stacked query rows.
    """
    live = hidx.get_keys(hidx.live_ids())
    return np.repeat([paper_bias(q_heads[j], live, scale) / scale for j in range(q_heads.shape[0])], M)


def _reported(hidx, Qg: np.ndarray, lim: np.ndarray, N: int, tau, topk: Optional[int]):
    """Keys the index reports for the stacked query rows ``Qg`` ``(R, D)``.

    By rank (``topk``) or by raw score ``>= tau`` (a float or ``(R,)``), causal through the id
    limits ``lim`` ``(R,)``. Returns ``(bool tensor (R, N), SearchStats)``.
    """
    import torch  # lazily: importing hsr does not import torch
    rep = torch.zeros(Qg.shape[0], N, dtype=torch.bool)
    if topk is not None:
        _, ids, st = hidx.topk(Qg, int(topk), max_id=lim, return_stats=True)
        rows = np.repeat(np.arange(Qg.shape[0]), ids.shape[1])
        ok = ids.ravel() >= 0  # -1 pads rows with fewer than topk visible keys
        rep[torch.from_numpy(rows[ok]), torch.from_numpy(ids.ravel()[ok])] = True
    else:
        lims, _, ids, st = hidx.range_search(Qg, tau, max_id=lim, return_stats=True)
        rows = np.repeat(np.arange(Qg.shape[0]), np.diff(lims))
        rep[torch.from_numpy(rows), torch.from_numpy(ids)] = True
    return rep, st
