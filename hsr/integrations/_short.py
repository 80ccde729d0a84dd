"""The transformers backends' short-context path: no index, dense attention in torch.

Below ``dense_below`` cached keys the index cannot win (measured on SmolLM2-135M, 2 CPU cores:
decoding with the index at 8K tokens runs at 0.4-0.6x the speed of SDPA end to end), so the
backend attends densely and no index is built or updated:

- ``kind="softmax"`` with ``eps`` (the default): every visible key enters the softmax, nothing
  is dropped, which is exactly what torch's ``scaled_dot_product_attention`` computes. At a
  CPU decode step the backend runs the library's decode kernel
  (:func:`hsr.attention.batched.layer_dense_softmax`, faster than SDPA there); elsewhere it
  calls SDPA itself (:func:`sdpa_attention`) with the mask transformers passed where keys are
  padded (or the causal rule), grouped-query attention and the scaling done the way
  transformers' own ``sdpa`` backend does them.
- ``tau``, ``topk`` and ReLU^alpha select keys by their scores, which SDPA cannot express:
  :func:`dense_attention` computes the score matrix in torch with the same selection rule
  (``tau``: raw score ``>= tau``; ``topk``: at least the k-th best score; ReLU^alpha: the keys
  that fire) over the causally visible, non-pad keys.

Scores here are torch's float32 matmul, not the index's canonical sums: a key whose score is
within float rounding of ``tau`` (or of the k-th best) may be kept here and not by the index,
or the reverse. ReLU^alpha is unaffected (such a key's weight is zero either way).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

#: default ``dense_below`` of the transformers backends (cached keys): the index is only
#: searched from this cache length on. On the CPU the index decoded SmolLM2-135M slower than
#: SDPA at every length up to its 8K context (docs/transformers.md), hence 16K.
MODEL_DENSE_BELOW = 16384


def uses_sdpa(settings: dict) -> bool:
    """Whether the backend's rule below ``dense_below`` is plain softmax over every key (SDPA)."""
    return settings["kind"] == "softmax" and settings.get("tau") is None and settings.get("topk") is None


def sdpa_attention(query, key, value, attention_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Causal softmax attention of the last ``M`` positions through torch's SDPA.

    Mirrors transformers' ``sdpa`` backend, so the cost is SDPA's: no mask and ``M == N``
    uses ``is_causal``; grouped-query attention folds the query heads onto their KV head for
    one query (decode: 1.3-1.9x faster than ``enable_gqa`` at 16K-32K keys on the CPU,
    ``bench/results/dense_decode_cpu.json``), uses ``enable_gqa`` without a mask otherwise, and
    repeats the KV heads with one.

    Parameters
    ----------
    query : Tensor (B, Hq, M, D); key, value : Tensor (B, Hkv, N, D), ``Hq % Hkv == 0``
    attention_mask : Tensor or None
        The mask transformers passed (boolean, True = attend, or additive float), already
        checked to be causal with key padding; None for plain causal.
    scale : float

    Returns
    -------
    Tensor (B, Hq, M, D) in query's dtype
        Rows with no visible key (pad queries of a left-padded batch) are zeros.
    """
    B, Hq, M, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    G = Hq // Hkv
    q, k, v, mask = query.detach(), key.detach(), value.detach(), attention_mask
    kwargs = {}
    if mask is None and M > 1 and M < N:
        # queries are the last M positions: bottom-right causal, which is_causal (top-left) is not
        mask = (torch.arange(N, device=q.device)[None, :]
                <= (torch.arange(M, device=q.device) + (N - M))[:, None])[None, None]
    if G > 1:
        if M == 1:  # (B, Hq, 1, D) -> (B, Hkv, G, D): each KV head attends for its G query heads
            q = q.reshape(B, Hkv, G, D)
        elif mask is None:
            kwargs["enable_gqa"] = True
        else:
            k = k[:, :, None].expand(B, Hkv, G, N, D).reshape(B, Hq, N, D)
            v = v[:, :, None].expand(B, Hkv, G, N, v.shape[-1]).reshape(B, Hq, N, v.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, is_causal=mask is None and M > 1, **kwargs)
    out = out.reshape(B, Hq, M, v.shape[-1])
    if attention_mask is not None:  # a fully masked row is NaN (or 0, by kernel): zeros
        out = torch.nan_to_num(out)
    return out


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
