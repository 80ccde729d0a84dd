"""Regression micro-benchmark of a CPU decode step: ``hsr.hsr_attention`` of one new token's
queries over a ``KVCacheIndex`` (docs/benchmarks.md, "Regression micro-benchmarks").

SmolLM2-135M's head layout (3 KV heads, 9 query heads, head dimension 64) at 8K cached keys
per head, clustered like real keys; above ``DENSE_BELOW``, so the index path is what runs.
"""
import numpy as np
import pytest

import hsr
from hsr.attention.core import DENSE_BELOW

B, HKV, G, N, D = 1, 3, 3, 8192, 64
pytestmark = pytest.mark.benchmark(max_time=0.5, min_rounds=5)


@pytest.fixture(scope="module")
def cache():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((16, D)) * 2.0
    K = (centres[rng.integers(0, 16, (B, HKV, N))] + 0.5 * rng.standard_normal((B, HKV, N, D))).astype(np.float32)
    V = rng.standard_normal((B, HKV, N, D)).astype(np.float32)
    q = 0.4 * rng.standard_normal((B, HKV * G, 1, D)) + 0.6 * np.repeat(K[:, :, -1:], G, axis=1)
    assert N > DENSE_BELOW
    return hsr.KVCacheIndex(K, V), np.ascontiguousarray(q, dtype=np.float32)


@pytest.mark.parametrize("kind,kw", [("softmax", {"eps": 1e-3}), ("relu", {"bias": 2.0})],
                         ids=["softmax-eps1e-3", "relu-bias2"])
def test_decode_step(benchmark, cache, kind, kw):
    index, q = cache
    out = hsr.hsr_attention(q, index, kind=kind, **kw)  # compile outside the timing
    assert out.shape == q.shape and np.isfinite(out).all()
    benchmark(hsr.hsr_attention, q, index, kind=kind, **kw)
