"""Input normalisation of the index's own arguments: the working dtype and the thresholds.

The array helpers every room shares (``as_float_array``, ``to_numpy``...) live in
``hsr/_arrays.py``; this module adds what only the index takes.
"""

from __future__ import annotations

import math

import numpy as np

from .._arrays import is_torch

__all__ = ["as_tau", "resolve_dtype"]


def resolve_dtype(dtype) -> np.dtype:
    """The computation dtype: float32 (default) or float64."""
    if dtype is None:
        return np.dtype(np.float32)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def as_tau(tau, m: int) -> np.ndarray:
    """Thresholds as a float64 array of shape ``(m,)`` (a scalar is broadcast)."""
    if type(tau) is float:  # the common case, without numpy's scalar round trip
        if not math.isfinite(tau):
            raise ValueError("tau contains NaN or Inf")
        return np.full(m, tau)
    if is_torch(tau):
        tau = tau.detach().cpu().double().numpy()
    t = np.asarray(tau)
    if t.dtype.kind not in "fiu":
        raise TypeError(f"tau must be numeric, got dtype {t.dtype}")
    t = t.astype(np.float64)
    if t.ndim == 0:
        t = np.full(m, float(t))
    elif t.shape != (m,):
        raise ValueError(f"tau must be a scalar or have shape ({m},), got shape {t.shape}")
    if not np.isfinite(t).all():
        raise ValueError("tau contains NaN or Inf")
    return np.ascontiguousarray(t)
