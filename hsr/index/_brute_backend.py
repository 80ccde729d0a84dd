"""The brute-force backend: the exact blocked BLAS scan, holding nothing but its options.

BLAS scores pick the candidates within a rounding band of the threshold
(``2.2 gamma_d |q| max|k|``, more than the gap between any float summation and the canonical
one) and the canonical kernel decides each candidate, so the scan returns exactly the set the
other backends do. It is the oracle the others are tested against, and the forest's fallback
for batches where the trees would read most keys anyway.
"""

from __future__ import annotations

import numpy as np

from ._backend import Found, SearchBackend, Work
from ._keys import KeyTable
from ._kernels import verify_candidates

__all__ = ["BruteScan"]


class BruteScan(SearchBackend):
    """``method="brute"``: every search scans every key (nothing is built or saved)."""

    name = "brute"

    def range_search(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable,
                     with_scores: bool = True, remainder_scale: float | None = None) -> Found:
        lims, ids, scores = self.scan(Q, tau, lim, table)
        m = Q.shape[0]
        return Found(lims, ids, scores, Work(self.name, np.zeros(m, dtype=np.int64),
                                             np.full(m, table.n_live, dtype=np.int64)))

    def count(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable) -> np.ndarray:
        return np.diff(self.scan(Q, tau, lim, table)[0])

    def scan(self, Q: np.ndarray, tau: np.ndarray, lim: np.ndarray, table: KeyTable, q_chunk: int = 256,
             k_chunk: int = 32768) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The range search as CSR ``(lims, ids, scores)``, ``q_chunk`` queries by
        ``k_chunk`` keys a BLAS product."""
        m = Q.shape[0]
        n = table.n_total
        keys = table.keys[:n]
        alive = table.alive[:n]
        knorm = np.sqrt(np.einsum("ij,ij->i", keys, keys, dtype=np.float64)) if n else np.zeros(0)
        qn = np.sqrt(np.einsum("ij,ij->i", Q, Q, dtype=np.float64))
        rows, cols = [], []
        for qs in range(0, m, q_chunk):
            Qc = Q[qs:qs + q_chunk]
            for ks in range(0, n, k_chunk):
                S = Qc @ keys[ks:ks + k_chunk].T
                band = 2.2 * self.gamma * qn[qs:qs + q_chunk] * knorm[ks:ks + k_chunk].max() + self.slack_abs
                r, c = np.nonzero(S >= (tau[qs:qs + q_chunk] - band)[:, None])
                rows.append(r + qs)
                cols.append(c + ks)
        rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        keep = (alive[cols] == 1) & (cols <= lim[rows])
        rows, cols = rows[keep].astype(np.int64), cols[keep].astype(np.int64)
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
        sc = np.empty(len(rows), dtype=self.config.dtype)
        verify_candidates(Q, keys, rows, cols, sc)
        keep = sc >= tau[rows]
        rows, cols, sc = rows[keep], cols[keep], sc[keep]
        lims = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=m), out=lims[1:])
        return lims, cols, sc

    def topk(self, Q: np.ndarray, k: int, lim: np.ndarray, table: KeyTable, top_s: np.ndarray,
             top_i: np.ndarray) -> Work:
        # the k-th best BLAS score less the rounding band is a threshold no higher than the
        # k-th best canonical score: its candidates, scored canonically, hold the exact top k
        n = table.n_total
        keys = table.keys[:n]
        dead = table.alive[:n] == 0
        kk = min(k, table.n_live)
        knmax = float(np.sqrt(np.einsum("ij,ij->i", keys, keys, dtype=np.float64).max()))
        for qs in range(0, Q.shape[0], 256):
            Qc = Q[qs:qs + 256]
            S = (Qc @ keys.T).astype(np.float64)
            S[:, dead] = -np.inf
            S[np.arange(n)[None, :] > lim[qs:qs + 256, None]] = -np.inf
            kth = -np.partition(-S, kk - 1, axis=1)[:, kk - 1]
            kth = np.where(np.isneginf(kth), np.inf, kth)  # rows with fewer than k keys
            band = 2.2 * self.gamma * np.sqrt(np.einsum("ij,ij->i", Qc, Qc, dtype=np.float64)) * knmax \
                + self.slack_abs
            r, c = np.nonzero((S >= (kth - band)[:, None]) | ((S > -np.inf) & np.isinf(kth)[:, None]))
            sc = np.empty(len(r), dtype=self.config.dtype)
            verify_candidates(Qc, keys, r.astype(np.int64), c.astype(np.int64), sc)
            order = np.lexsort((c, -sc.astype(np.float64), r))
            r, c, sc = r[order], c[order], sc[order]
            starts = np.searchsorted(r, np.arange(len(Qc)))
            for i in range(len(Qc)):
                j = starts[i]
                take = min(kk, np.searchsorted(r, i, side="right") - j)
                top_i[qs + i, :take] = c[j:j + take]
                top_s[qs + i, :take] = sc[j:j + take]
        m = Q.shape[0]
        return Work(self.name, np.zeros(m, dtype=np.int64), np.full(m, table.n_live, dtype=np.int64))

    def describe(self) -> str:
        return f"trees=0, buffered=0, leaf_size={self.config.leaf_size}"
