"""Results in FAISS's order and names."""
import numpy as np
import pytest

import hsr
from hsr.index import canonical_scores


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    K = rng.standard_normal((700, 24)).astype(np.float32)
    Q = rng.standard_normal((5, 24)).astype(np.float32)
    tau = np.quantile(canonical_scores(Q, K), 0.97, axis=1)
    return K, Q, tau


@pytest.mark.parametrize("method", ["code", "tree", "brute"])
def test_range_search_is_lims_D_I(data, method):
    K, Q, tau = data
    idx = hsr.HSRIndex(K, method=method)
    res = idx.range_search(Q, tau)
    assert isinstance(res, hsr.RangeResult) and res._fields == ("lims", "D", "I")
    lims, D, I = res
    assert I.dtype == np.int64 and D.dtype == np.float32 and lims.dtype == np.int64
    S = canonical_scores(Q, K)
    for i in range(len(Q)):
        sl = slice(lims[i], lims[i + 1])
        assert set(I[sl].tolist()) == set(np.flatnonzero(S[i] >= tau[i]).tolist())
        np.testing.assert_array_equal(D[sl], S[i, I[sl]])
    lims2, D2, I2, st = idx.range_search(Q, tau, return_stats=True)
    np.testing.assert_array_equal(I2, I)
    assert isinstance(st, hsr.SearchStats) and np.array_equal(st.keys_selected, np.diff(lims))


def test_to_csr(data):
    K, Q, tau = data
    res = hsr.HSRIndex(K).range_search(Q, tau)
    A = res.to_csr(len(K))
    assert A.shape == (len(Q), len(K)) and A.nnz == len(res.I)
    S = canonical_scores(Q, K)
    dense = A.toarray()
    r, c = np.nonzero(S >= tau[:, None])
    np.testing.assert_array_equal(dense[r, c], S[r, c])
    with pytest.raises(ValueError, match="n_keys"):
        res.to_csr(int(res.I.max()))


@pytest.mark.parametrize("method", ["code", "tree", "brute"])
def test_to_csr_default_shape_is_queries_by_n_total(data, method):
    # scikit-learn's radius-graph shape (n_queries, n_samples): one column per id handed out,
    # whatever the largest id reported, removed ids included as empty columns
    K, Q, tau = data
    idx = hsr.HSRIndex(K, method=method)
    idx.remove([len(K) - 1, 3])
    res = idx.range_search(Q, tau * 10)  # a high threshold: few hits, far from the last id
    assert res.n_total == idx.n_total == len(K)
    A = res.to_csr()
    assert A.shape == (len(Q), len(K)) and A.nnz == len(res.I)
    assert res.to_csr(len(K) + 5).shape == (len(Q), len(K) + 5)
    empty = idx.range_search(Q, 1e30)
    assert empty.to_csr().shape == (len(Q), len(K)) and empty.to_csr().nnz == 0
    lims, D, I = res  # still three fields
    assert res._replace(D=D).n_total == len(K)
    idx.add(K[:2])
    assert res.to_csr().shape[1] == len(K)  # the count at the search
    assert idx.range_search(Q, tau).to_csr().shape == (len(Q), len(K) + 2)


def test_to_csr_without_n_total_keeps_max_id_default(data):
    K, Q, tau = data
    res = hsr.HSRIndex(K).range_search(Q, tau)
    bare = hsr.RangeResult(*res)
    assert bare.n_total is None
    assert bare.to_csr().shape == (len(Q), int(res.I.max()) + 1)
    assert hsr.RangeResult(np.zeros(3, np.int64), np.zeros(0, np.float32),
                           np.zeros(0, np.int64)).to_csr().shape == (2, 0)


def test_search_and_topk_are_D_I(data):
    K, Q, _ = data
    idx = hsr.HSRIndex(K)
    D, I = idx.search(Q, 7)
    res = idx.topk(Q, 7)
    assert isinstance(res, hsr.SearchResult) and res._fields == ("D", "I")
    np.testing.assert_array_equal(res.I, I)
    S = canonical_scores(Q, K)
    want = np.argsort(-S, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(I, want)
    np.testing.assert_array_equal(D, np.take_along_axis(S, want, axis=1))
    D1, I1 = idx.query(Q[0], float(D[0, -1]))
    assert set(I1.tolist()) == set(I[0].tolist()) | set(np.flatnonzero(S[0] >= D[0, -1]).tolist())


def test_faiss_attributes_and_classes(data):
    K, _, _ = data
    idx = hsr.HSRIndex(K)
    assert idx.ntotal == len(K) and idx.d == 24
    idx.remove([0, 1])
    assert idx.ntotal == len(K) - 2
    b = hsr.BruteForceIndex(K)
    assert isinstance(b, hsr.BruteForceIndex) and isinstance(b, hsr.HSRIndex) and b.backend == "brute"



def test_stats_vocabulary(data):
    K, Q, tau = data
    lims, *_, st = hsr.HSRIndex(K).range_search(Q, tau, return_stats=True)
    np.testing.assert_array_equal(st.keys_selected, np.diff(lims))
    assert not hasattr(st, "keys_reported")
