"""Regression micro-benchmarks of the CPU index: range search (1 and 64 queries), top-k and
the single-key append, at one small size (docs/benchmarks.md, "Regression micro-benchmarks").

    python -m pytest bench/micro --benchmark-only

Not part of the test suite (``testpaths`` is ``tests``). numba compiles and the keys are coded
in the fixtures, so neither enters a measurement. Sizes: 64K clustered keys of dimension 64,
thresholds at each query's top 1%.
"""
import numpy as np
import pytest

import hsr

N, D, M = 1 << 16, 64, 64
# half a second of rounds each (at least 5): the whole file runs in about 10 s
pytestmark = pytest.mark.benchmark(max_time=0.5, min_rounds=5)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((256, D)).astype(np.float32) * 2
    K = c[rng.integers(0, 256, N)] + 0.5 * rng.standard_normal((N, D)).astype(np.float32)
    Q = K[rng.integers(0, N, M)] + 0.3 * rng.standard_normal((M, D)).astype(np.float32)
    tau = np.quantile(hsr.canonical_scores(Q, K), 0.99, axis=1)
    return K, Q, tau


@pytest.fixture(scope="module", params=["code", "brute"])
def index(request, data):
    K, Q, tau = data
    idx = hsr.HSRIndex(K, method=request.param)
    idx.range_search(Q[:1], tau[:1])  # compile, and code the keys, outside the timing
    idx.topk(Q[:1], 8)
    return idx


def test_range_search_64_queries(benchmark, index, data):
    _, Q, tau = data
    lims, _, _ = benchmark(index.range_search, Q, tau)
    assert lims[-1] >= M * N // 100


def test_range_search_1_query(benchmark, index, data):
    _, Q, tau = data
    lims, _, _ = benchmark(index.range_search, Q[:1], tau[:1])
    assert lims[-1] >= N // 100


def test_topk_64_queries(benchmark, index, data):
    _, Q, _ = data
    D_, _ = benchmark(index.topk, Q, 16)
    assert np.isfinite(D_).all()


@pytest.mark.parametrize("method", ["code", "tree"])
def test_add_one_key(benchmark, data, method):
    # the decode step's append: one C-contiguous float32 key (the code filter's fast path; the
    # trees' buffer, merged into the forest every buffer_size keys)
    K = data[0]
    idx = hsr.HSRIndex(K[:4096], method=method)
    idx.range_search(K[:1], 0.0)
    key = np.ascontiguousarray(K[4096:4097])
    idx.add(key)
    benchmark(idx.add, key)
    assert idx.n_total > 4097
