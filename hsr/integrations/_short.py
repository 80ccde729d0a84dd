"""The transformers backends' short-context path: dense attention in torch, no index.

Below ``dense_below`` cached keys the index cannot win (measured: ``bench/eval_decode_long.py``
at 8K tokens decodes 2.5x slower with the index than SDPA on the CPU), so the backend computes
the same attention densely: the same selection rule (``eps``: every key, so nothing is
dropped; ``tau``: raw score ``>= tau``; ``topk``: at least the k-th best score; ReLU^alpha: the
keys that fire) over the causally visible, non-pad keys, and no index is built or updated.
Scores here are torch's float32 matmul, not the index's canonical sums: a key whose score is
within float rounding of ``tau`` (or of the k-th best) may be kept here and not by the index,
or the reverse. ReLU^alpha is unaffected (such a key's weight is zero either way).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

#: default ``dense_below`` of the transformers backends (cached keys): the index is only
#: searched from this cache length on. 8K measured slower than SDPA end to end, hence 16K.
MODEL_DENSE_BELOW = 16384


def dense_attention(query, key, value, settings: dict, scale: float,
                    key_padding: Optional[np.ndarray]) -> Tuple[torch.Tensor, int, int]:
    """Causal attention of the last ``M`` positions, computed densely with the backend's rule.

    Parameters
    ----------
    query : Tensor (B, Hq, M, D); key, value : Tensor (B, Hkv, N, D), ``Hq % Hkv == 0``
    settings : the backend's ``kind``, ``alpha``, ``bias`` (a number), ``eps``, ``tau``, ``topk``
    scale : float
    key_padding : (B, N) bool, True = real key, or None

    Returns
    -------
    out : Tensor (B, Hq, M, D) in query's dtype
    scored : int
        Visible (query head, query, key) triples, all of which were scored.
    selected : int
        Triples that entered the attention.
    """
    B, Hq, M, D = query.shape
    N = key.shape[2]
    G = Hq // key.shape[1]
    q = query.detach().float()
    k = key.detach().float().repeat_interleave(G, 1)
    v = value.detach().float().repeat_interleave(G, 1)
    S = q @ k.transpose(-1, -2)  # raw scores (B, Hq, M, N)
    vis = torch.arange(N)[None, :] <= (torch.arange(M) + (N - M))[:, None]  # bottom-right causal
    vis = vis.to(S.device)[None, None].expand(B, Hq, M, N)
    if key_padding is not None:
        vis = vis & torch.from_numpy(key_padding).to(S.device)[:, None, None, :]
    kind = settings["kind"]
    if kind == "relu":
        z = torch.where(vis, scale * S - float(settings["bias"]), torch.zeros_like(S)).clamp_min(0)
        zmax = z.amax(-1, keepdim=True)
        w = (z / torch.where(zmax > 0, zmax, torch.ones_like(zmax))) ** int(settings["alpha"])  # no overflow
        keep = z > 0
    else:
        if settings.get("tau") is not None:
            keep = vis & (S >= float(settings["tau"]))
        elif settings.get("topk") is not None:
            masked = torch.where(vis, S, torch.full_like(S, -torch.inf))
            kk = min(int(settings["topk"]), N)
            kth = masked.topk(kk, dim=-1).values[..., -1:]
            keep = vis & (masked >= kth)
        else:  # eps: every visible key, nothing dropped
            keep = vis
        x = torch.where(keep, scale * S, torch.full_like(S, -torch.inf))
        mx = x.amax(-1, keepdim=True)
        w = torch.exp(x - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    den = w.sum(-1, keepdim=True)
    out = (w @ v) / torch.where(den > 0, den, torch.ones_like(den))
    return out.to(query.dtype), int(vis.sum()), int(keep.sum())
