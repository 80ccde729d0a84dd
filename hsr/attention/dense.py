"""Dense O(mn) attention references: the oracles of the tests and the baseline of the benchmarks.

Shapes follow torch's ``scaled_dot_product_attention``: ``q (..., Hq, m, d)``, ``k (..., Hkv, n, d)``,
``v (..., Hkv, n, dv)``. Inputs may be numpy arrays or torch tensors; numpy is computed in float64,
torch in float32 (or float64 for float64 input), and the result comes back in the input's framework
and dtype.

Two causal alignments (they differ only when m != n):

- ``causal=True`` (this library): query ``i`` sees keys ``0 .. n - m + i`` (bottom-right), as
  FlashAttention >= 2.1's ``causal=True`` and ``torch.nn.attention.bias.causal_lower_right``;
- ``is_causal=True``: query ``i`` sees keys ``0 .. i`` (top-left), as SDPA's ``is_causal=True``
  and ``torch.nn.attention.bias.causal_upper_left``.

``causal`` (bottom-right: the m queries are the *last* m of the n positions) is what a KV-cache
decode needs and what every kernel of this library uses; ``is_causal`` is SDPA's top-left
alignment, for code written against SDPA. Passing both raises ``ValueError``.

Grouped-query attention as SDPA's ``enable_gqa=True``: ``Hq`` a multiple of ``Hkv``, kv head
``j`` shared by query heads ``j * Hq/Hkv .. (j + 1) * Hq/Hkv - 1`` (``repeat_interleave``).
"""

from __future__ import annotations

import numpy as np

from .._typing import Array, ArrayLike
from .._arrays import is_torch

__all__ = ["dense_relu_attention", "dense_softmax_attention"]


def _causal_mask(m: int, n: int, xp, top_left: bool = False):
    """Boolean ``(m, n)``, True = attend: bottom-right (``kv <= n - m + i``) or top-left (``kv <= i``)."""
    qpos = xp.arange(m)[:, None] + (0 if top_left else n - m)
    return xp.arange(n)[None, :] <= qpos


def _mask_for(m: int, n: int, xp, causal: bool, is_causal: bool):
    """The mask of the ``causal`` / ``is_causal`` arguments, or None."""
    if causal and is_causal:
        raise ValueError("pass causal=True (bottom-right aligned, FlashAttention's convention) or "
                         "is_causal=True (top-left aligned, SDPA's), not both")
    if causal or is_causal:
        return _causal_mask(m, n, xp, top_left=bool(is_causal))
    return None


def _heads(q, k, v, enable_gqa: bool, torch_mod=None):
    """k, v with their heads repeated for GQA (``enable_gqa``); a clear error otherwise."""
    if q.ndim < 3 or k.ndim < 3:
        return k, v
    hq, hk = q.shape[-3], k.shape[-3]
    if v.shape[-3] != hk:
        raise ValueError(f"k and v must have the same number of heads, got {hk} and {v.shape[-3]}")
    if hq == hk:
        return k, v
    if not enable_gqa:
        if hk == 1:
            return k, v  # broadcasts
        raise ValueError(f"q has {hq} heads and k, v have {hk}: pass enable_gqa=True (as "
                         f"scaled_dot_product_attention) to share each kv head among query heads")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"enable_gqa needs query heads ({hq}) to be a multiple of kv heads ({hk})")
    g = hq // hk
    if torch_mod is not None:
        return k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    return np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)


def dense_relu_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, alpha: int = 2, bias: float | ArrayLike = 0.0,
                         scale: float | None = None, causal: bool = False, is_causal: bool = False,
                         enable_gqa: bool = False) -> Array:
    """``out = D^-1 A V`` with ``A = ReLU(scale * q k^T - bias) ** alpha`` and ``D = diag(A 1)``.

    A row where nothing fires (``D_ii = 0``) is defined as zeros, never NaN.

    Parameters
    ----------
    q : (..., Hq, m, d)
    k : (..., Hkv, n, d)
    v : (..., Hkv, n, dv)
    alpha : int >= 1
    bias : float or array broadcastable to ``(..., m, 1)``
    scale : float, default ``1/sqrt(d)``
    causal : bool
        Bottom-right aligned: query ``i`` sees keys ``0 .. n - m + i`` (FlashAttention's
        ``causal``, ``torch.nn.attention.bias.causal_lower_right``).
    is_causal : bool
        Top-left aligned: query ``i`` sees keys ``0 .. i`` (SDPA's ``is_causal``).
    enable_gqa : bool
        ``Hq`` a multiple of ``Hkv``; each kv head serves ``Hq / Hkv`` consecutive query heads.

    Returns
    -------
    out : (..., Hq, m, dv), q's framework and dtype

    Raises
    ------
    ValueError
        ``causal`` and ``is_causal`` together; head counts that differ without
        ``enable_gqa`` (other than ``Hkv == 1``) or are not a multiple with it.
    """
    if is_torch(q):
        import torch

        mask = _mask_for(q.shape[-2], k.shape[-2], torch, causal, is_causal)
        k, v = _heads(q, k, v, enable_gqa, torch)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        z = s * (qf @ kf.transpose(-1, -2)) - torch.as_tensor(bias, dtype=dt, device=q.device)
        x = torch.relu(z)
        if mask is not None:
            x = x * mask.to(q.device)
        # powers of the row-max-scaled scores: relu(z) ** 16 underflows float32 for z < 4e-3
        # (a row whose only firing key has z = 1e-3 would come out as subnormal noise)
        mx = x.amax(-1, keepdim=True) if x.shape[-1] else x.new_zeros(x.shape[:-1] + (1,))
        a = (x / torch.where(mx > 0, mx, torch.ones_like(mx))) ** alpha
        den = a.sum(-1, keepdim=True)
        out = (a @ vf) / torch.where(den > 0, den, torch.ones_like(den))
        return out.to(q.dtype)
    mask = _mask_for(np.shape(q)[-2], np.shape(k)[-2], np, causal, is_causal)
    qf, kf, vf = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    kf, vf = _heads(qf, kf, vf, enable_gqa)
    s = scale if scale is not None else qf.shape[-1] ** -0.5
    x = np.maximum(s * (qf @ np.swapaxes(kf, -1, -2)) - np.asarray(bias, dtype=np.float64), 0.0)
    if mask is not None:
        x = x * mask
    mx = x.max(-1, keepdims=True) if x.shape[-1] else np.zeros(x.shape[:-1] + (1,))
    a = (x / np.where(mx > 0, mx, 1.0)) ** alpha
    den = a.sum(-1, keepdims=True)
    out = (a @ vf) / np.where(den > 0, den, 1.0)
    return out.astype(np.result_type(np.asarray(q).dtype, np.float32))


def dense_softmax_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, scale: float | None = None,
                            causal: bool = False, return_lse: bool = False, is_causal: bool = False,
                            enable_gqa: bool = False, attn_mask: ArrayLike | None = None
                            ) -> Array | tuple[Array, Array]:
    """Softmax attention ``softmax(scale * q k^T) v`` (numerically stable).

    Parameters
    ----------
    q : (..., Hq, m, d)
    k : (..., Hkv, n, d)
    v : (..., Hkv, n, dv)
    scale : float, default ``1/sqrt(d)``
    causal : bool
        Bottom-right aligned: query ``i`` sees keys ``0 .. n - m + i`` (FlashAttention's
        ``causal``, ``torch.nn.attention.bias.causal_lower_right``). With ``m > n`` the first
        ``m - n`` rows see no key: output 0, lse ``-inf``.
    return_lse : bool
        Also return ``lse (..., Hq, m)``: natural log of the row sums of ``exp(scale * q k^T)``.
    is_causal : bool
        Top-left aligned: query ``i`` sees keys ``0 .. i`` (SDPA's ``is_causal``).
    enable_gqa : bool
        ``Hq`` a multiple of ``Hkv``; each kv head serves ``Hq / Hkv`` consecutive query heads
        (SDPA's ``enable_gqa``).
    attn_mask : bool array or tensor broadcastable to ``(..., Hq, m, n)``, optional
        True = attend (SDPA's boolean mask); combined with ``causal``/``is_causal``. Rows it
        empties: output 0, lse ``-inf``.

    Returns
    -------
    out : (..., Hq, m, dv), q's framework and dtype (and ``lse``, float32/float64).

    Raises
    ------
    ValueError
        As :func:`dense_relu_attention` (the causal flags, the head counts).
    TypeError
        An ``attn_mask`` that is not boolean.
    """
    if is_torch(q):
        import torch

        mask = _mask_for(q.shape[-2], k.shape[-2], torch, causal, is_causal)
        if attn_mask is not None:
            am = torch.as_tensor(attn_mask, device=q.device)
            if am.dtype != torch.bool:
                raise TypeError(f"attn_mask must be boolean (True = attend), got {am.dtype}")
            mask = am if mask is None else (mask.to(q.device) & am)
        k, v = _heads(q, k, v, enable_gqa, torch)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        z = s * (qf @ kf.transpose(-1, -2))
        if mask is not None:
            z = z.masked_fill(~mask.to(q.device), float("-inf"))
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
        out = (p @ vf).to(q.dtype)  # a row with no key: p = 0, out = 0
        return (out, lse) if return_lse else out
    mask = _mask_for(np.shape(q)[-2], np.shape(k)[-2], np, causal, is_causal)
    if attn_mask is not None:
        am = np.asarray(attn_mask)
        if am.dtype != np.bool_:
            raise TypeError(f"attn_mask must be boolean (True = attend), got {am.dtype}")
        mask = am if mask is None else (mask & am)
    qf, kf, vf = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    kf, vf = _heads(qf, kf, vf, enable_gqa)
    s = scale if scale is not None else qf.shape[-1] ** -0.5
    z = s * (qf @ np.swapaxes(kf, -1, -2))
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    mx = z.max(-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(z - mx)
    den = e.sum(-1, keepdims=True)
    out = (e @ vf) / np.where(den > 0, den, 1.0)
    out = out.astype(np.result_type(np.asarray(q).dtype, np.float32))
    if return_lse:
        with np.errstate(divide="ignore"):
            return out, (mx + np.log(den))[..., 0]
    return out
