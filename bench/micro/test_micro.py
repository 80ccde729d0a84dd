"""Micro-benchmarks on pytest-benchmark: the index's hot calls at one modest size.

    python -m pytest bench/micro --benchmark-only --benchmark-json=bench/out/micro.json

Not part of the test suite (``testpaths`` is ``tests``); numba is compiled in the fixtures, so
compile time never enters a measurement. Sizes: 64K keys of dimension 64 (clustered), 16
queries, the top 1% per query.
"""
import numpy as np
import pytest

import hsr


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((256, 64)).astype(np.float32) * 2
    K = c[rng.integers(0, 256, 1 << 16)] + 0.5 * rng.standard_normal((1 << 16, 64)).astype(np.float32)
    V = rng.standard_normal(K.shape).astype(np.float32)
    Q = K[rng.integers(0, len(K), 16)] + 0.3 * rng.standard_normal((16, 64)).astype(np.float32)
    tau = np.quantile(hsr.canonical_scores(Q, K), 0.99, axis=1)
    return K, V, Q, tau


@pytest.fixture(scope="module", params=["code", "brute"])
def index(request, data):
    K, _, Q, tau = data
    idx = hsr.HSRIndex(K, method=request.param)
    idx.range_search(Q[:1], tau[:1])  # compile and code the keys outside the timing
    idx.topk(Q[:1], 8)
    return idx


def test_range_search(benchmark, index, data):
    _, _, Q, tau = data
    lims, _, _ = benchmark(index.range_search, Q, tau)
    assert lims[-1] > 0


def test_range_search_one_query(benchmark, index, data):
    _, _, Q, tau = data
    benchmark(index.range_search, Q[:1], tau[:1])


def test_topk(benchmark, index, data):
    _, _, Q, _ = data
    benchmark(index.topk, Q, 16)


def test_add_one_key(benchmark, data):
    K = data[0]
    idx = hsr.HSRIndex(K[:1000])
    idx.add(K[:1])
    benchmark(idx.add, K[1:2])


@pytest.mark.parametrize("kind", ["relu", "softmax"])
def test_decode_attention(benchmark, data, kind):
    K, V, Q, tau = data
    kv = hsr.KVIndex(K, V)
    kw = dict(alpha=2, bias=float(np.median(tau)) / 8) if kind == "relu" else dict(kind="softmax", tau=float(np.median(tau)))
    hsr.hsr_attention(Q[:1], kv, **kw)
    benchmark(hsr.hsr_attention, Q[:1], kv, **kw)
