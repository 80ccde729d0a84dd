"""The keys of an ``HSRIndex`` in id order, with their liveness: what the index owns, grows
and saves, and what every search backend reads (never writes).

Ids are positions: key ``j`` is row ``j`` for good; removal is a tombstone in ``alive``.
"""

from __future__ import annotations

import math

import numpy as np

from .._arrays import as_float_array
from .._typing import ArrayLike
from ._files import _meta_int
from ._views import KeyView

__all__ = ["KeyTable", "as_keys", "max_sq_norm"]


class KeyTable:
    """Every key handed an id, in id order, and whether it is live.

    Parameters
    ----------
    keys : ndarray, (capacity, d), the working dtype
        The buffer the rows go to; the constructor adopts it (keys used in place, or an empty
        buffer that :meth:`append` fills and grows).

    Attributes
    ----------
    keys : ndarray, (capacity, d)
        Row j is key id j; rows from ``n_total`` on are unused capacity.
    alive : ndarray, (capacity,) uint8
        0 where the id was removed (or not handed out yet).
    n_total, n_dead : int
        Ids handed out, and removed.
    max_norm : float
        Largest norm of any key handed out (float64 arithmetic); ``max_norm_sq`` its square.
    """

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self.alive = np.zeros(keys.shape[0], dtype=np.uint8)
        self.n_total = 0
        self.n_dead = 0
        self.max_norm = 0.0
        self.max_norm_sq = 0.0

    @property
    def n_live(self) -> int:
        """Keys not removed."""
        return self.n_total - self.n_dead

    @property
    def has_dead(self) -> bool:
        """Whether any id was removed (kernels skip the liveness test otherwise)."""
        return self.n_dead > 0

    # ------------------------------------------------------------------ growth
    def append(self, arr: np.ndarray) -> int:
        """Give the validated keys ``arr (k, d)`` the next ids; returns the first. ``arr`` may
        be :attr:`keys` itself: keys the index adopted, already in place."""
        k = arr.shape[0]
        start = self.n_total
        if start + k > self.keys.shape[0]:
            cap = max(2 * self.keys.shape[0], start + k)
            nk = np.zeros((cap, self.keys.shape[1]), dtype=self.keys.dtype)
            nk[:start] = self.keys[:start]
            na = np.zeros(cap, dtype=np.uint8)
            na[:start] = self.alive[:start]
            self.keys, self.alive = nk, na
        if arr is not self.keys:
            self.keys[start:start + k] = arr
        self.alive[start:start + k] = 1
        self.n_total += k
        if k:
            self.max_norm = max(self.max_norm, math.sqrt(max_sq_norm(arr)))
            self.max_norm_sq = self.max_norm ** 2
        return start

    def append_one(self, keys: object) -> bool:
        """The decode step's append: one key that is already a C-contiguous array of the
        working dtype is copied with no further conversion. Returns False (and leaves
        everything as it was) for anything else, which then takes the validating path; a
        NaN/Inf or huge key always does (its squared norm is not below 1e30)."""
        d = self.keys.shape[1]
        if type(keys) is not np.ndarray or keys.dtype != self.keys.dtype or keys.size != d \
                or keys.ndim > 2 or not keys.flags.c_contiguous:
            return False
        row = keys.reshape(d)
        sq = float(np.dot(row, row))
        if not sq < 1e30:
            return False
        start = self.n_total
        if start == self.keys.shape[0]:
            return False
        self.keys[start] = row
        self.alive[start] = 1
        self.n_total = start + 1
        if sq >= self.max_norm_sq * (1.0 - 1e-3):
            # the float32 dot may be off by d*2^-24 relative: near the maximum, decide in float64
            r64 = row.astype(np.float64)
            self.max_norm_sq = max(self.max_norm_sq, float(np.dot(r64, r64)))
            self.max_norm = max(self.max_norm, math.sqrt(self.max_norm_sq))
        return True

    def remove(self, ids: ArrayLike) -> np.ndarray:
        """Mark live ids removed; returns them ``(k,)`` int64. ``ValueError`` for an id out
        of range, repeated, or already removed (then nothing changes)."""
        ids = self.check_ids(ids, allow_dead=False)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("remove: ids contain duplicates")
        self.alive[ids] = 0
        self.n_dead += len(ids)
        return ids

    def check_ids(self, ids: ArrayLike, allow_dead: bool) -> np.ndarray:
        """``ids`` as ``(k,)`` int64 after checking each is handed out (and live, unless
        ``allow_dead``)."""
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            if arr.size == 0:
                arr = arr.astype(np.int64)
            else:
                raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64).ravel()
        bad = (arr < 0) | (arr >= self.n_total)
        if bad.any():
            raise ValueError(f"ids out of range [0, {self.n_total}): {arr[bad][:5].tolist()}")
        if not allow_dead and (self.alive[arr] == 0).any():
            raise ValueError(f"ids already removed: {arr[self.alive[arr] == 0][:5].tolist()}")
        return arr

    # ------------------------------------------------------------------ reading
    def live_ids(self) -> np.ndarray:
        """Ids of the keys not removed, ascending, ``(n_live,)`` int64."""
        return np.flatnonzero(self.alive[:self.n_total]).astype(np.int64)

    def view(self) -> KeyView:
        """Read-only views of the keys handed out and their liveness."""
        keys = self.keys[:self.n_total].view()
        alive = self.alive[:self.n_total].view()
        keys.flags.writeable = False
        alive.flags.writeable = False
        return KeyView(keys, alive, self.has_dead)

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict, dict]:
        """``(meta, arrays)`` of a saved file: the counts, and the keys and liveness."""
        meta = {"n_total": self.n_total, "n_dead": self.n_dead, "max_norm": self.max_norm}
        return meta, {"keys": self.keys[:self.n_total], "alive": self.alive[:self.n_total]}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict, dim: int, dtype: np.dtype) -> KeyTable:
        """The keys of a saved file, checked (shapes, dtypes, 0/1 liveness, finite keys);
        the counts and the largest norm are recomputed from them, not read."""
        n_total = _meta_int(meta, "n_total", 0, 1 << 40)
        keys = arrays.get("keys")
        alive = arrays.get("alive")
        if keys is None or keys.shape != (n_total, dim) or keys.dtype != dtype:
            raise ValueError("hsr index file is inconsistent: keys array has the wrong shape or dtype")
        if alive is None or alive.shape != (n_total,) or alive.dtype != np.uint8 or (alive > 1).any():
            raise ValueError("hsr index file is inconsistent: the liveness array is not 0/1 per key")
        if keys.size and not (np.isfinite(keys.min()) and np.isfinite(keys.max())):  # min/max carry NaN
            raise ValueError("hsr index file is inconsistent: keys contain NaN or Inf")
        if n_total and keys.flags.owndata and keys.flags.c_contiguous and keys.flags.writeable:
            self = cls(keys)  # freshly read: kept, not copied (the first add grows it)
        else:
            self = cls(np.zeros((max(n_total, 16), dim), dtype=dtype))
            self.keys[:n_total] = keys
        self.alive[:n_total] = alive
        self.n_total = n_total
        self.n_dead = int(n_total - int(alive.sum()))
        self.max_norm = math.sqrt(max_sq_norm(keys)) if n_total else 0.0
        self.max_norm_sq = self.max_norm ** 2
        return self


def as_keys(keys: ArrayLike | None, dim: int | None, dtype: np.dtype) -> np.ndarray:
    """The constructor's ``keys`` (or none, with ``dim``) as a ``(n, d)`` array of ``dtype``."""
    if keys is not None and dim is None and np.ndim(keys) == 1:
        raise ValueError(f"keys must be (n, d), got a 1-D array of {np.shape(keys)[0]} values: pass "
                         "keys[None] for one key, or dim= to say which it is")
    if keys is None:
        if dim is None:
            raise ValueError("give keys, or dim for an empty index")
        arr = np.zeros((0, int(dim)), dtype=dtype)
    else:
        arr = as_float_array(keys, "keys", dtype, ndim=2, dim=dim)
    if arr.shape[1] < 1:
        raise ValueError("keys must have dimension >= 1")
    return arr


def max_sq_norm(x: np.ndarray, chunk: int = 1 << 16) -> float:
    """Largest squared row norm of ``x`` (float64), ``chunk`` rows at a time: bounded
    temporaries instead of a float64 per key."""
    return max(float(np.einsum("ij,ij->i", c, c, dtype=np.float64).max())
               for c in (x[s:s + chunk] for s in range(0, x.shape[0], chunk)))
