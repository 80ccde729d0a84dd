"""Search results in FAISS's order and names.

``range_search`` returns ``RangeResult(lims, D, I)`` as FAISS's ``range_search`` does, and
``search``/``topk`` return ``SearchResult(D, I)`` as FAISS's ``search`` does: ``D`` holds
scores (inner products), ``I`` key ids. Both are NamedTuples, so
``lims, D, I = index.range_search(q, tau)`` and ``index.range_search(q, tau).I`` both work.
"""

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .._typing import lazy

if TYPE_CHECKING:
    from scipy.sparse import csr_array
else:  # scipy.sparse loads on the first to_csr
    csr_array = lazy("scipy.sparse", "csr_array")

__all__ = ["RangeResult", "SearchResult"]


class RangeResult(NamedTuple):
    """All keys above a threshold, per query, as CSR (FAISS ``range_search`` layout).

    Attributes
    ----------
    lims : (m + 1,) int64
        Query i's results are ``D[lims[i]:lims[i+1]]`` and ``I[lims[i]:lims[i+1]]``.
    D : (lims[-1],) float32 (float64 for a float64 index)
        Canonical scores ``<q_i, k_j>``.
    I : (lims[-1],) int64
        Key ids, in no particular order within a query.
    """

    lims: np.ndarray
    D: np.ndarray
    I: np.ndarray  # noqa: E741  (FAISS's name)

    def to_csr(self, n_keys: int | None = None) -> csr_array:
        """The result as a ``scipy.sparse.csr_array`` of shape ``(m, n_keys)`` holding the scores.

        ``n_keys`` defaults to one past the largest id reported. Explicit zeros are kept, so
        a reported key whose score is exactly 0 stays a stored entry.
        """
        from scipy.sparse import csr_array

        lims, D, I = (np.asarray(x) for x in self)
        if n_keys is None:
            n_keys = int(I.max()) + 1 if I.size else 0
        elif I.size and int(I.max()) >= n_keys:
            raise ValueError(f"n_keys={n_keys} but id {int(I.max())} was reported")
        return csr_array((D, I, lims), shape=(len(lims) - 1, int(n_keys)))


class SearchResult(NamedTuple):
    """The k best keys per query, best first (FAISS ``search`` layout).

    Attributes
    ----------
    D : (m, k)
        Scores, descending; ``-inf`` where fewer than k keys are visible.
    I : (m, k) int64
        Key ids; ``-1`` where fewer than k keys are visible.
    """

    D: np.ndarray
    I: np.ndarray  # noqa: E741

