"""Array helpers every room uses at its boundary: torch or numpy in, validated numpy out.

The index, the attention and the distributed KV cache all take numpy arrays or torch tensors
and hand kernels C-contiguous float32 (or float64) arrays of the right rank, with no NaN or
Inf, so numba never recompiles for a stray dtype. Importing this module imports neither torch
nor numba.
"""

from __future__ import annotations

import numpy as np

__all__ = ["is_torch", "to_numpy", "as_float_array", "kept_in_place", "tensor_version"]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def is_torch(x) -> bool:
    """True when ``x`` is a torch tensor (checked without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x, name: str) -> np.ndarray:
    """Turn a numpy array, torch tensor or sequence into a numpy array, without copying floats
    that are already float32/float64. bfloat16 and float16 tensors become float32."""
    if is_torch(x):
        import torch

        if not (x.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        return t.numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "f":
        raise TypeError(
            f"{name} must have a floating dtype (one of {', '.join(_FLOAT_NAMES)}), got {arr.dtype}"
        )
    return arr


def as_float_array(x, name: str, dtype: np.dtype, ndim: int = 2, dim: int | None = None) -> np.ndarray:
    """Validate ``x`` and return it as a C-contiguous ``dtype`` array.

    Parameters
    ----------
    x : array_like or torch.Tensor
        Floating-point input.
    name : str
        Used in error messages.
    dtype : numpy dtype
        float32 or float64.
    ndim : int
        Required rank. A 1-D input is accepted where ``ndim == 2`` and promoted to one row.
    dim : int, optional
        Required size of the last axis.
    """
    arr = to_numpy(x, name)
    if ndim == 2 and arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if dim is not None and arr.shape[-1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[-1]}, the index has dimension {dim}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    # min and max propagate NaN and are +-inf when any value is: no (n, d) bool temporary
    # (a quarter of float32 keys' bytes) as np.isfinite(arr).all() would make
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def kept_in_place(arr: np.ndarray, given, copy: bool) -> np.ndarray | None:
    """The array a store (keys, values) may keep instead of copying ``arr``, the validated form
    of the caller's ``given``; None when it must copy.

    An array the validation made (a conversion: nothing else references it) is kept as is;
    with ``copy=False`` the caller's own memory is kept too, through a read-only view (the
    store never writes it: it grows into a new buffer). Empty arrays are never kept: the store
    starts with room to grow.
    """
    if arr.shape[0] == 0:
        return None
    if arr is not given and arr.flags.owndata:
        return arr
    if copy:
        return None
    view = arr.view()
    view.flags.writeable = False
    return view


def tensor_version(x) -> int | None:
    """A torch tensor's version counter (bumped by every in-place write to it or a view of it),
    or None where it has none (tensors made under ``torch.inference_mode``): then "the same
    tensor, unwritten since" cannot be known, and callers must assume it was written."""
    try:
        return x._version
    except RuntimeError:
        return None
