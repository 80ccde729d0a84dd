"""The dense path of hsr_attention (short caches): same keys, same weights, honest info."""
import numpy as np
import pytest

import hsr
import hsr.attention.core as core
from hsr import KVCacheIndex, KVIndex, dense_relu_attention, dense_softmax_attention, hsr_attention

from .._data import rel_err


@pytest.fixture
def head():
    rng = np.random.default_rng(3)
    K = rng.standard_normal((300, 16)).astype(np.float32)
    V = rng.standard_normal((300, 6)).astype(np.float32)
    Q = rng.standard_normal((5, 16)).astype(np.float32)
    return K, V, Q


@pytest.mark.parametrize("alpha", [1, 2, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_relu_matches_index_and_dense(head, alpha, causal):
    K, V, Q = head
    kv = KVIndex(K, V)
    for bias in [-1e9, 0.0, 0.4, 1e9]:
        a, ia = hsr_attention(Q, kv, alpha=alpha, bias=bias, causal=causal, dense_below=10**9, return_info=True)
        b, ib = hsr_attention(Q, kv, alpha=alpha, bias=bias, causal=causal, dense_below=0, return_info=True)
        ref = dense_relu_attention(Q, K, V, alpha=alpha, bias=bias, causal=causal)
        np.testing.assert_array_equal(ia.keys_selected, ib.keys_selected)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert rel_err(a, ref) <= 1e-5
        visible = np.arange(300 - 5, 300) + 1 if causal else np.full(5, 300)
        np.testing.assert_array_equal(ia.keys_scored, visible)


@pytest.mark.parametrize("mode", [dict(eps=1e-3), dict(tau=1.0), dict(topk=7)])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_modes(head, mode, causal):
    K, V, Q = head
    kv = KVIndex(K, V)
    a, ia = hsr_attention(Q, kv, kind="softmax", causal=causal, dense_below=10**9, return_info=True, **mode)
    b, ib = hsr_attention(Q, kv, kind="softmax", causal=causal, dense_below=0, return_info=True, **mode)
    ref = dense_softmax_attention(Q, K, V, causal=causal)
    if "eps" in mode:  # dense keeps everything: exact, nothing dropped
        assert (ia.dropped_bound == 0).all()
        assert rel_err(a, ref) <= 1e-5
    else:  # the same threshold, so the same keys and weights as the index path
        np.testing.assert_array_equal(ia.keys_selected, ib.keys_selected)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # the dense path's dropped fraction is exact, so it is at most the index's bound
        assert (ia.dropped_bound <= ib.dropped_bound * (1 + 1e-9) + 1e-12).all()
        err = np.abs(a - ref).max(axis=1)
        assert (err <= 2 * ia.dropped_bound * np.abs(V).max() + 1e-5).all()


def test_removed_keys_and_gqa():
    rng = np.random.default_rng(5)
    K = rng.standard_normal((1, 2, 200, 16)).astype(np.float32)
    V = rng.standard_normal((1, 2, 200, 8)).astype(np.float32)
    Q = rng.standard_normal((1, 4, 3, 16)).astype(np.float32)
    cache = KVCacheIndex(K, V)
    for h in cache.heads[0]:
        h.index.remove([0, 5, 199])
    a = hsr_attention(Q, cache, kind="softmax", tau=0.5, causal=True, dense_below=10**9)
    b = hsr_attention(Q, cache, kind="softmax", tau=0.5, causal=True, dense_below=0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_default_threshold_is_used_and_validated(head):
    K, V, Q = head
    kv = KVIndex(K, V)
    assert hsr.attention.core.DENSE_BELOW > 0 or core.DENSE_BELOW == 0  # the suite sets it to 0
    _, info = hsr_attention(Q, kv, alpha=2, bias=0.5, return_info=True)
    assert (info.keys_scored < 300).any()  # index path: the suite's setting
    old = core.DENSE_BELOW
    core.DENSE_BELOW = 301
    try:
        _, info = hsr_attention(Q, kv, alpha=2, bias=0.5, return_info=True)
        assert (info.keys_scored == 300).all()  # dense path: every key scored
    finally:
        core.DENSE_BELOW = old
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="dense_below"):
            hsr_attention(Q, kv, alpha=2, dense_below=bad)


@pytest.mark.parametrize("mode", [dict(kind="softmax", tau=1.0), dict(kind="softmax", topk=9),
                                  dict(kind="relu", alpha=2, bias=0.5)])
def test_ties_and_chunks_match_the_index_path(mode):
    # lattice keys: many scores exactly at the threshold; 1100 queries: more than one chunk of rows
    rng = np.random.default_rng(9)
    K = rng.integers(-2, 3, size=(500, 8)).astype(np.float32)
    V = rng.standard_normal((500, 4)).astype(np.float32)
    Q = rng.integers(-2, 3, size=(1100, 8)).astype(np.float32)
    kv = KVIndex(K, V)
    kv.index.remove([0, 7, 499])
    a, ia = hsr_attention(Q, kv, scale=0.5, dense_below=10**9, return_info=True, **mode)
    b, ib = hsr_attention(Q, kv, scale=0.5, dense_below=0, return_info=True, **mode)
    np.testing.assert_array_equal(ia.keys_selected, ib.keys_selected)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (ia.keys_scored == 497).all()
