"""The code backend: the code filter of :class:`~hsr.index.codes.CodeStore` behind the
backend interface.

The store holds per-key int8 codes with exact error bounds; a search filters by the codes and
verifies the few candidates canonically. Coding is lazy (``lazy = True``): an append is a
copy into the index's keys, and the next search codes every key appended since, in one batch
(``HSRIndex._catch_up`` calls :meth:`CodeSearch.sync`).
"""

from __future__ import annotations

import numpy as np

from .._typing import ArrayLike
from ._backend import Found, SearchBackend, Work
from ._config import IndexConfig
from ._keys import KeyTable
from .codes import CodeStore

__all__ = ["CodeSearch", "CODE_LIMIT"]

#: The code filter's steps and bounds are float32: |k| and |q|*|k| must stay below this.
CODE_LIMIT = 1e37


class CodeSearch(SearchBackend):
    """``method="code"``: a :class:`CodeStore` over the keys, coded up to ``store.n``."""

    name = "code"
    lazy = True
    sync_label = "hsr: coding keys"

    def __init__(self, config: IndexConfig, store: CodeStore | None = None) -> None:
        super().__init__(config)
        self.store = self._new_store() if store is None else store

    def _new_store(self) -> CodeStore:
        u = 2.0 ** -24 if self.config.dtype == np.float32 else 2.0 ** -53
        return CodeStore(self.config.dim, self.config.code_rotation, self.config.seed, u)

    def describe(self) -> str:
        return f"backend='code', code_rotation={self.config.code_rotation!r}"

    def code_bytes_per_key(self) -> int:
        return self.store.nbytes_per_key()

    # ------------------------------------------------------------------ inputs
    def check_range(self, qmax: float, max_norm: float) -> None:
        if qmax * max_norm >= CODE_LIMIT or max_norm >= CODE_LIMIT:
            # the code filter keeps float32 steps and bounds: past this they would overflow
            raise ValueError(
                f"|q|*|k| reaches {qmax * max_norm:.3g} (|k| up to {max_norm:.3g}): beyond the code "
                f"filter's float32 range ({CODE_LIMIT:.0e}); rescale the inputs or use method='tree' or 'brute'")

    def check_remainder_scale(self, scale: float) -> None:
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"remainder_scale must be a positive finite number, got {scale!r}")

    # ------------------------------------------------------------------ growth
    def pending(self, n_total: int) -> int:
        return max(0, n_total - self.store.n)

    def reserve(self, n: int) -> None:
        self.store._reserve(n)

    def sync(self, keys: np.ndarray) -> None:
        self.store.sync(keys)

    def rebuild(self, table: KeyTable) -> None:
        self.store = self._new_store()  # re-coded by the next search (a fresh "pca" rotation)

    # ------------------------------------------------------------------ searches
    def range_search(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable,
                     with_scores: bool = True, remainder_scale: float | None = None) -> Found:
        lims, ids, scores, coded, scored, remainder = self.store.range_search(
            Q, tau, lim, table.keys, table.alive, table.has_dead, table.max_norm, remainder_scale)
        return Found(lims, ids, scores, Work(self.name, np.zeros(Q.shape[0], dtype=np.int64), scored, coded,
                                             remainder))

    def count(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable) -> np.ndarray:
        return np.diff(self.range_search(Q, tau, lim, table).lims)

    def topk(self, Q: np.ndarray, k: int, lim: np.ndarray, table: KeyTable, top_s: np.ndarray,
             top_i: np.ndarray) -> Work:
        m = Q.shape[0]
        stats = np.zeros((m, 2), dtype=np.int64)
        self.store.topk(Q, k, lim, table.keys, table.alive, table.has_dead, table.max_norm, top_s, top_i, stats)
        return Work(self.name, np.zeros(m, dtype=np.int64), stats[:, 1], stats[:, 0].copy())

    def score_bounds(self, queries: ArrayLike, table: KeyTable) -> tuple[np.ndarray, np.ndarray]:
        Q, _, _ = self.prepare(queries, 0.0, None, table.max_norm)
        return self.store.bounds(Q, table.max_norm)

    def upper_bounds(self, queries: ArrayLike, table: KeyTable, out: np.ndarray | None) -> np.ndarray:
        Q, _, _ = self.prepare(queries, 0.0, None, table.max_norm)
        want = (Q.shape[0], table.n_total)
        if out is not None and (not isinstance(out, np.ndarray) or out.shape != want or out.dtype != np.float64
                                or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError(f"out must be a writeable C-contiguous float64 array of shape {want}")
        return self.store.upper_bounds(Q, table.max_norm, out)

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict, dict]:
        cmeta, carrays = self.store.state()
        return {"codes": cmeta}, carrays

    @classmethod
    def from_state(cls, config: IndexConfig, meta: dict, arrays: dict, table: KeyTable) -> CodeSearch:
        # codes are derived data: recomputed from the keys at the first search, so a file
        # cannot carry codes that disagree with its keys
        codes_meta = meta.get("codes")
        if not isinstance(codes_meta, dict):
            raise ValueError("hsr index file is inconsistent: no code settings")
        u = 2.0 ** -24 if config.dtype == np.float32 else 2.0 ** -53
        return cls(config, CodeStore.from_state(config.dim, codes_meta, arrays, u))
