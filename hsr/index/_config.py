"""The options of an ``HSRIndex`` as one frozen, validated object: from the constructor's
arguments, and from (and to) the header of a saved file.

The index hands the same :class:`IndexConfig` to its search backend, which reads its own
options there (leaf size and split for the forest, rotation for the code filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._files import _digest, _meta_int
from .codes import ROTATIONS

__all__ = ["IndexConfig", "check_options", "resolve_backend", "AUTO_CODE_MIN_DIM", "BACKENDS", "MAX_LEAF_SIZE",
           "MAX_BUFFER_SIZE"]

#: ``method="auto"`` uses the code filter from this dimension up (partition-tree bounds prune
#: little there: measured on real model keys at d = 64, docs/benchmarks.md), trees below it
#: (``AUTO_MIN_KEYS`` and ``AUTO_MAX_SCAN``, ``_forest_backend.py``, hand batches to the scan).
AUTO_CODE_MIN_DIM = 16
#: The structures an index can hold (``index.backend``).
BACKENDS = ("code", "tree", "brute")
_METHODS = ("auto",) + BACKENDS
#: Largest leaf of a tree and append buffer (larger values only exhaust memory).
MAX_LEAF_SIZE = 1 << 16
MAX_BUFFER_SIZE = 1 << 24
_FORMAT = "hsr-index"
_FORMAT_VERSION = 2


@dataclass(frozen=True)
class IndexConfig:
    """The options an index was built with (see ``HSRIndex``'s parameters).

    ``backend`` is the resolved structure (one of :data:`BACKENDS`), ``method`` the caller's
    choice (``"auto"`` lets the forest hand a batch to the scan). ``progress_min_keys``:
    builds over this many keys report progress.
    """

    dim: int
    dtype: np.dtype
    method: str
    backend: str
    leaf_size: int
    split: str
    rotate: bool
    buffer_size: int
    seed: int
    code_rotation: str
    progress_min_keys: int

    def meta(self) -> dict:
        """The header fields of a saved file that name its format and hold these options."""
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "dim": self.dim, "dtype": self.dtype.name, "leaf_size": self.leaf_size, "split": self.split,
                "rotate": self.rotate, "method": self.method, "buffer_size": self.buffer_size, "seed": self.seed,
                "backend": self.backend, "code_rotation": self.code_rotation}

    @classmethod
    def from_meta(cls, meta: dict, arrays: dict, progress_min_keys: int) -> IndexConfig:
        """The options in a saved file's header; ``ValueError`` for a file not of this format,
        whose ``arrays`` fail its checksum, or with any field out of place."""
        if not isinstance(meta, dict):
            raise ValueError(f"hsr index file is inconsistent: its header is a {type(meta).__name__}, not an object")
        if meta.get("format") != _FORMAT or meta.get("version") not in (1, _FORMAT_VERSION):
            raise ValueError(f"not an hsr index file of version {_FORMAT_VERSION}: {meta.get('format')!r} "
                             f"version {meta.get('version')!r}")
        if _digest(arrays) != meta.get("sha256"):
            raise ValueError("hsr index file is corrupted: checksum mismatch")
        # the checksum authenticates nothing (anyone can recompute it): every field is checked
        dim = _meta_int(meta, "dim", 1, 1 << 20)
        dtype = meta.get("dtype")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"hsr index file is inconsistent: dtype {dtype!r} (float32 or float64)")
        method = meta.get("method")
        if method not in _METHODS:
            raise ValueError(f"hsr index file is inconsistent: method {method!r}")
        if meta.get("split") not in ("pca", "axis"):
            raise ValueError(f"hsr index file is inconsistent: split {meta.get('split')!r}")
        leaf_size = _meta_int(meta, "leaf_size", 1, MAX_LEAF_SIZE)
        code_rotation = meta.get("code_rotation", "random")
        backend = meta.get("backend", resolve_backend(method, dim))
        if backend not in BACKENDS or code_rotation not in ROTATIONS:
            raise ValueError(f"hsr index file is inconsistent: backend {backend!r}, code_rotation {code_rotation!r}")
        return cls(dim, np.dtype(dtype), method, backend, leaf_size, meta["split"], bool(meta.get("rotate")),
                   _meta_int(meta, "buffer_size", 1, MAX_BUFFER_SIZE),
                   _meta_int(meta, "seed", -(1 << 63), (1 << 63) - 1), code_rotation, progress_min_keys)


def check_options(split: str, method: str, code_rotation: str, leaf_size: int, buffer_size: int, copy: bool) -> None:
    """``ValueError`` naming the first of the constructor's options that is out of place."""
    if split not in ("pca", "axis"):
        raise ValueError(f"split must be 'pca' or 'axis', got {split!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be 'auto', 'code', 'tree' or 'brute', got {method!r}")
    if code_rotation not in ROTATIONS:
        raise ValueError(f"code_rotation must be one of {ROTATIONS}, got {code_rotation!r}")
    if isinstance(leaf_size, bool) or not isinstance(leaf_size, (int, np.integer)) \
            or not 1 <= leaf_size <= MAX_LEAF_SIZE:
        raise ValueError(f"leaf_size must be an integer in [1, {MAX_LEAF_SIZE}], got {leaf_size!r}")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, (int, np.integer)) \
            or not 1 <= buffer_size <= MAX_BUFFER_SIZE:
        raise ValueError(f"buffer_size must be an integer in [1, {MAX_BUFFER_SIZE}], got {buffer_size!r}")
    if not isinstance(copy, (bool, np.bool_)):
        raise ValueError(f"copy must be True or False, got {copy!r}")


def resolve_backend(method: str, dim: int) -> str:
    """The structure an index holds for ``method`` at dimension ``dim``."""
    if method == "auto":
        return "code" if dim >= AUTO_CODE_MIN_DIM else "tree"
    return method
