"""Memory-saving paths of the index: ``copy=False`` and the copy-free tree build.

Peak memory itself is measured by ``bench/bench_memory.py`` (a benchmark, not a test); these
tests check that the paths that save it give the same answers and never write the caller's keys.
"""
import numpy as np
import pytest

import hsr
from hsr.index import canonical_scores


def _keys(n=700, d=24, seed=0):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((n, d)).astype(np.float32)
    K[5] = K[9]  # a duplicate
    K[11] = 0.0  # a zero key
    return K, rng.standard_normal((6, d)).astype(np.float32)


def _sets(idx, Q, tau):
    lims, D, I = idx.range_search(Q, tau)
    return [(np.sort(I[lims[i]:lims[i + 1]]).tolist()) for i in range(len(Q))], D, I


@pytest.mark.parametrize("method", ["code", "tree", "brute"])
@pytest.mark.parametrize("rotate", [False, True])
def test_copy_false_same_answers_and_caller_keys_untouched(method, rotate):
    K, Q = _keys()
    before = K.copy()
    tau = np.quantile(canonical_scores(Q, K), 0.8, axis=1)
    a = hsr.HSRIndex(K, method=method, rotate=rotate, leaf_size=16)
    b = hsr.HSRIndex(K, method=method, rotate=rotate, leaf_size=16, copy=False)
    assert _sets(a, Q, tau)[0] == _sets(b, Q, tau)[0]
    np.testing.assert_array_equal(a.topk(Q, 7).I, b.topk(Q, 7).I)
    # the index reads the caller's memory and never writes it, not even through its views
    assert np.shares_memory(b.key_view().keys, K)
    assert not b.key_view().keys.flags.writeable
    # growth copies the keys into the index's own buffer; removal only marks them
    extra = np.random.default_rng(1).standard_normal((40, K.shape[1])).astype(np.float32)
    for idx in (a, b):
        idx.remove([3, 4, 9])
        idx.add(extra)
        idx.add(extra[0])
    np.testing.assert_array_equal(K, before)
    assert not np.shares_memory(b.key_view().keys, K)
    Kall = np.concatenate([K, extra, extra[:1]])
    want = [np.flatnonzero(row >= t).tolist() for row, t in zip(canonical_scores(Q, Kall), tau)]
    want = [[j for j in w if j not in (3, 4, 9)] for w in want]
    assert _sets(a, Q, tau)[0] == want
    assert _sets(b, Q, tau)[0] == want


def test_copy_false_converts_when_it_must():
    """Keys of another dtype or layout cannot be used in place: they are converted once, and
    the caller's array is neither referenced nor changed."""
    K, Q = _keys(200, 8)
    K64 = K.astype(np.float64)
    strided = np.asfortranarray(K)
    for keys in (K64, strided, K.tolist()):
        idx = hsr.HSRIndex(keys, copy=False)
        if isinstance(keys, np.ndarray):
            assert not np.shares_memory(idx.key_view().keys, keys)
        assert idx.count(Q, 0.5).tolist() == (canonical_scores(Q, K) >= 0.5).sum(1).tolist()


def test_copy_false_save_load_and_pickle(tmp_path):
    import pickle

    K, Q = _keys(300, 16)
    idx = hsr.HSRIndex(K, copy=False)
    idx.save(tmp_path / "i.hsr")
    for other in (hsr.HSRIndex.load(tmp_path / "i.hsr"), pickle.loads(pickle.dumps(idx))):
        assert other.count(Q, 1.0).tolist() == idx.count(Q, 1.0).tolist()
        other.add(K[:3])  # the copy owns writable keys
        assert len(other) == 303


def test_copy_must_be_a_bool():
    with pytest.raises(ValueError, match="copy must be True or False"):
        hsr.HSRIndex(np.ones((4, 3), np.float32), copy="no")


@pytest.mark.parametrize("n", [1, 31, 32, 33, 257, 1000])
@pytest.mark.parametrize("leaf", [1, 7, 32])
def test_tree_build_without_copies_is_exact(n, leaf):
    """The tree build gathers leaves through the permutation and permutes rows in place:
    exact at sizes that are not multiples of the leaf size, with duplicates and ties."""
    rng = np.random.default_rng(n * 31 + leaf)
    K = rng.integers(-2, 3, size=(n, 5)).astype(np.float32)  # lattice: many exact ties
    Q = rng.integers(-2, 3, size=(4, 5)).astype(np.float32)
    for rotate in (False, True):
        idx = hsr.HSRIndex(K, method="tree", leaf_size=leaf, rotate=rotate)
        S = canonical_scores(Q, K)
        for tau in (-1.0, 0.0, 1.0, 2.0):
            assert _sets(idx, Q, np.full(4, tau))[0] == [np.flatnonzero(r >= tau).tolist() for r in S]


@pytest.mark.parametrize("method", ["code", "tree", "brute"])
def test_copy_false_over_a_memory_mapped_file(tmp_path, method):
    """Keys memory-mapped read-only from a .npy file are indexed in place (no copy in RAM)."""
    K, Q = _keys(900, 20)
    np.save(tmp_path / "k.npy", K)
    M = np.load(tmp_path / "k.npy", mmap_mode="r")
    idx = hsr.HSRIndex(M, method=method, copy=False)
    assert np.shares_memory(idx.key_view().keys, M)
    S = canonical_scores(Q, K)
    assert idx.count(Q, 1.0).tolist() == (S >= 1.0).sum(1).tolist()
    idx.add(K[:2])  # growth copies into the index's own buffer; the file is never written
    assert len(idx) == 902
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), K)


def test_kv_index_copy_false_reads_keys_and_values_in_place():
    """KVIndex/KVCacheIndex pass copy=False to their indexes and apply it to the values too:
    the same attention, the caller's arrays shared and never written, growth copies."""
    rng = np.random.default_rng(3)
    k = rng.standard_normal((1, 2, 600, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 600, 16)).astype(np.float32)
    k0, v0 = k.copy(), v.copy()
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    a = hsr.KVCacheIndex(k, v)
    b = hsr.KVCacheIndex(k, v, copy=False)
    kv = b.heads[0][1]
    assert np.shares_memory(kv.values, v) and not kv.values.flags.writeable
    for kind, kw in (("relu", dict(alpha=2, bias=0.3)), ("softmax", dict(eps=1e-3))):
        np.testing.assert_array_equal(hsr.hsr_attention(q, a, kind=kind, **kw), hsr.hsr_attention(q, b, kind=kind, **kw))
    step_k = rng.standard_normal((1, 2, 1, 16)).astype(np.float32)
    for c in (a, b):
        c.add(step_k, step_k)
    assert not np.shares_memory(b.heads[0][1].values, v)
    np.testing.assert_array_equal(hsr.hsr_attention(q, a, alpha=2, bias=0.3), hsr.hsr_attention(q, b, alpha=2, bias=0.3))
    np.testing.assert_array_equal(k, k0)
    np.testing.assert_array_equal(v, v0)
