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


class _RangeFields(NamedTuple):
    lims: np.ndarray
    D: np.ndarray
    I: np.ndarray  # noqa: E741  (FAISS's name)


class RangeResult(_RangeFields):
    """All keys above a threshold, per query, as CSR (FAISS ``range_search`` layout).

    A NamedTuple of three fields, so ``lims, D, I = result`` works; the number of ids the
    index had handed out rides along as an attribute, not a field.

    Attributes
    ----------
    lims : (m + 1,) int64
        Query i's results are ``D[lims[i]:lims[i+1]]`` and ``I[lims[i]:lims[i+1]]``.
    D : (lims[-1],) float32 (float64 for a float64 index)
        Canonical scores ``<q_i, k_j>``.
    I : (lims[-1],) int64
        Key ids, in no particular order within a query.
    n_total : int or None
        The searched index's :attr:`~hsr.HSRIndex.n_total` (ids handed out, removed ones
        included) when the result comes from :meth:`hsr.HSRIndex.range_search`; None when
        the producer did not say (a result built by hand, the GPU indexes).
    """

    n_total: int | None = None

    def __new__(cls, lims, D, I, n_total: int | None = None):  # noqa: E741
        self = super().__new__(cls, lims, D, I)
        if n_total is not None:
            self.n_total = int(n_total)
        return self

    def _replace(self, **fields) -> "RangeResult":
        out = super()._replace(**fields)
        out.__dict__.update(self.__dict__)
        return out

    def to_csr(self, n_keys: int | None = None) -> csr_array:
        """The result as a ``scipy.sparse.csr_array`` of shape ``(m, n_keys)`` holding the scores.

        ``n_keys`` defaults to :attr:`n_total`, so a result of :meth:`hsr.HSRIndex.range_search`
        gives scikit-learn's radius-graph shape ``(n_queries, index.n_total)``: one column
        per id, removed ids empty columns. Without ``n_total`` (a result built by hand) it
        defaults to one past the largest id reported. Explicit zeros are kept, so a
        reported key whose score is exactly 0 stays a stored entry.

        Raises
        ------
        ValueError
            If an id reported is ``>= n_keys``.

        Examples
        --------
        >>> import numpy as np, hsr
        >>> keys = np.eye(4, dtype=np.float32)
        >>> res = hsr.HSRIndex(keys).range_search(keys[:2], 0.5)
        >>> res.to_csr().shape, res.to_csr(6).shape
        ((2, 4), (2, 6))
        >>> hsr.RangeResult(res.lims, res.D, res.I).to_csr().shape  # no n_total: max id + 1
        (2, 2)
        """
        from scipy.sparse import csr_array

        lims, D, I = (np.asarray(x) for x in self)
        if n_keys is None:
            n_keys = self.n_total
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

