"""hsr.index: exact half-space reporting data structures (CPU, numba)."""

from __future__ import annotations

import numpy as np

from .._typing import ArrayLike, DTypeLike
from ._kernels import canonical_scores as _canonical_scores_kernel
from .._arrays import as_float_array
from ._validate import resolve_dtype
from .results import RangeResult, SearchResult
from ._forest_backend import AUTO_MAX_SCAN, AUTO_MIN_KEYS
from .tree import BruteForceIndex, HSRIndex, SearchStats

__all__ = ["HSRIndex", "BruteForceIndex", "SearchStats", "RangeResult", "SearchResult", "canonical_scores", "AUTO_MIN_KEYS", "AUTO_MAX_SCAN"]


def canonical_scores(queries: ArrayLike, keys: ArrayLike, dtype: DTypeLike = None) -> np.ndarray:
    """The library's canonical scores, ``(m, n)``: each dot product summed in dimension order
    in the working dtype (float32 unless ``dtype="float64"``), no fused multiply-add.

    This O(mn) function is the oracle every index backend agrees with bit for bit.
    """
    dt = resolve_dtype(dtype)
    Q = as_float_array(queries, "queries", dt)
    K = as_float_array(keys, "keys", dt)
    if Q.shape[1] != K.shape[1]:
        raise ValueError(f"queries have dimension {Q.shape[1]}, keys {K.shape[1]}")
    if Q.shape[1] == 0:
        raise ValueError("dimension must be >= 1")
    return _canonical_scores_kernel(Q, K)
