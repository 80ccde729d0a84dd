"""Dense O(mn) attention references: the oracles of the tests and the baseline of the benchmarks.

Shapes follow torch's ``scaled_dot_product_attention``: ``q (..., m, d)``, ``k (..., n, d)``,
``v (..., n, dv)``; with ``causal=True`` the queries are the *last* m positions of the n keys
(query i sits at position ``n - m + i`` and sees keys ``0 .. n - m + i``).
Inputs may be numpy arrays or torch tensors; numpy is computed in float64, torch in float32 (or
float64 for float64 input), and the result comes back in the input's framework and dtype.
"""

from __future__ import annotations

import numpy as np

from ..index._validate import is_torch

__all__ = ["dense_relu_attention", "dense_softmax_attention"]


def _causal_mask(m: int, n: int, xp):
    qpos = xp.arange(m)[:, None] + (n - m)
    return xp.arange(n)[None, :] <= qpos


def dense_relu_attention(q, k, v, *, alpha: int = 2, bias=0.0, scale=None, causal: bool = False):
    """``out = D^-1 A V`` with ``A = ReLU(scale * q k^T - bias) ** alpha`` and ``D = diag(A 1)``.

    A row where nothing fires (``D_ii = 0``) is defined as zeros, never NaN.

    Parameters
    ----------
    q : (..., m, d)
    k : (..., n, d)
    v : (..., n, dv)
    alpha : int >= 1
    bias : float or array broadcastable to ``(..., m, 1)``
    scale : float, default ``1/sqrt(d)``
    causal : bool
    """
    if is_torch(q):
        import torch

        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        z = s * (qf @ kf.transpose(-1, -2)) - torch.as_tensor(bias, dtype=dt, device=q.device)
        a = torch.relu(z) ** alpha
        if causal:
            a = a * _causal_mask(q.shape[-2], k.shape[-2], torch).to(q.device)
        den = a.sum(-1, keepdim=True)
        out = (a @ vf) / torch.where(den > 0, den, torch.ones_like(den))
        return out.to(q.dtype)
    qf, kf, vf = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    s = scale if scale is not None else qf.shape[-1] ** -0.5
    a = np.maximum(s * (qf @ np.swapaxes(kf, -1, -2)) - np.asarray(bias, dtype=np.float64), 0.0) ** alpha
    if causal:
        a = a * _causal_mask(qf.shape[-2], kf.shape[-2], np)
    den = a.sum(-1, keepdims=True)
    out = (a @ vf) / np.where(den > 0, den, 1.0)
    return out.astype(np.result_type(np.asarray(q).dtype, np.float32))


def dense_softmax_attention(q, k, v, *, scale=None, causal: bool = False, return_lse: bool = False):
    """Softmax attention ``softmax(scale * q k^T) v`` (numerically stable).

    Returns ``out (..., m, dv)`` and, with ``return_lse``, ``lse (..., m)`` (natural log of the
    row sums of ``exp(scale * q k^T)``).
    """
    if is_torch(q):
        import torch

        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        z = s * (qf @ kf.transpose(-1, -2))
        if causal:
            z = z.masked_fill(~_causal_mask(q.shape[-2], k.shape[-2], torch).to(q.device), float("-inf"))
        lse = torch.logsumexp(z, dim=-1)
        out = (torch.softmax(z, dim=-1) @ vf).to(q.dtype)
        return (out, lse) if return_lse else out
    qf, kf, vf = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    s = scale if scale is not None else qf.shape[-1] ** -0.5
    z = s * (qf @ np.swapaxes(kf, -1, -2))
    if causal:
        z = np.where(_causal_mask(qf.shape[-2], kf.shape[-2], np), z, -np.inf)
    mx = z.max(-1, keepdims=True)
    e = np.exp(z - mx)
    den = e.sum(-1, keepdims=True)
    out = (e @ vf) / den
    out = out.astype(np.result_type(np.asarray(q).dtype, np.float32))
    if return_lse:
        return out, (mx + np.log(den))[..., 0]
    return out
