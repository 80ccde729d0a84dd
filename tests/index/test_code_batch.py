"""The code filter's blocked batch kernel (``hsr/index/_batch_kernels.py``) against the oracle.

Batches of 1 (one row against four blocks at once), 2-3 (the same path), 7-9 (one 8-row
group, padded), 64-65 and 513 (several query tiles); key counts off every tile size; exact
ties at tau, duplicates, zero keys and queries, causal limits, removed keys; 1 and 2 threads.
"""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsr
from hsr.index import canonical_scores
from hsr.index import _code_kernels as CK

from .._data import fixture_keys
from .test_index import as_sets, check

#: 32-key blocks, 16-block key tiles (512 keys), 4-block groups of the single-row path
N_ODD = [1, 31, 33, 127, 129, 511, 513, 3 * 512 + 17]


def _ties(rng, Q, K):
    """Per-query thresholds equal to one of the query's canonical scores (an exact tie)."""
    S = canonical_scores(Q, K)
    return S[np.arange(len(Q)), rng.integers(0, K.shape[0], size=len(Q))].astype(np.float64)


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 64, 65, 513])
@pytest.mark.parametrize("kind", ["gauss", "lattice"])
def test_batch_sizes_match_oracle(m, kind):
    rng = np.random.default_rng(m)
    K = fixture_keys(rng, 3 * 512 + 17, 64, kind)  # zero key 0, duplicate keys 1 and 2
    Q = fixture_keys(rng, m, 64, kind)
    if m > 1:
        Q[m // 2] = 0  # every key ties at 0
    index = hsr.HSRIndex(K, method="code")
    tau = _ties(rng, Q, K)
    check(index, Q, K, tau)
    check(index, Q, K, np.nextafter(tau, np.inf))
    check(index, Q, K, np.nextafter(tau, -np.inf))
    check(index, Q, K, np.quantile(canonical_scores(Q, K), 0.99, axis=1))


@pytest.mark.parametrize("n", N_ODD)
@pytest.mark.parametrize("m", [1, 3, 8, 70])
def test_key_counts_off_the_tiles(n, m):
    rng = np.random.default_rng(n + m)
    K = fixture_keys(rng, n, 48, "clustered")
    Q = fixture_keys(rng, m, 48, "clustered")
    index = hsr.HSRIndex(K, method="code")
    check(index, Q, K, _ties(rng, Q, K))
    check(index, Q, K, np.full(m, -1e30))  # everything, up to the last lane of the last block


@pytest.mark.parametrize("m", [1, 9, 64])
def test_limits_and_removals(m):
    rng = np.random.default_rng(5)
    n = 2000
    K = fixture_keys(rng, n, 64, "lattice")
    Q = fixture_keys(rng, m, 64, "lattice")
    index = hsr.HSRIndex(K, method="code")
    dead = rng.choice(n, 300, replace=False)
    index.remove(dead)
    alive = np.ones(n, dtype=bool)
    alive[dead] = False
    tau = _ties(rng, Q, K)
    lim = rng.integers(-1, n + 40, size=m)
    lims, _, ids = index.range_search(Q, tau, max_id=lim)
    S = canonical_scores(Q, K)
    want = [set(np.flatnonzero((S[i] >= tau[i]) & alive & (np.arange(n) <= lim[i])).tolist()) for i in range(m)]
    assert as_sets(lims, ids) == want
    for i in range(m):  # ids ascend within each row
        assert (np.diff(ids[lims[i]:lims[i + 1]]) > 0).all()


@pytest.mark.parametrize("m", [1, 7, 64, 513])
def test_threads_give_the_same_result(m):
    rng = np.random.default_rng(9)
    K = fixture_keys(rng, 5000, 64, "gauss")
    Q = fixture_keys(rng, m, 64, "gauss")
    index = hsr.HSRIndex(K, method="code")
    tau = np.quantile(canonical_scores(Q, K), 0.99, axis=1)
    before = numba.get_num_threads()
    try:
        out = []
        for t in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(t)
            out.append(index.range_search(Q, tau))
    finally:
        numba.set_num_threads(before)
    for r in out[1:]:
        for a, b in zip(out[0], r):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("m", [1, 7, 64])
def test_search_and_count_share_the_codes(m):
    rng = np.random.default_rng(3)
    K = fixture_keys(rng, 1500, 64, "lattice")
    Q = fixture_keys(rng, m, 64, "lattice")
    index = hsr.HSRIndex(K, method="code")
    S = canonical_scores(Q, K).astype(np.float64)
    D, I = index.search(Q, 10)
    order = np.lexsort((np.broadcast_to(np.arange(K.shape[0]), S.shape), -S), axis=1)[:, :10]
    np.testing.assert_array_equal(I, order)
    np.testing.assert_array_equal(D, np.take_along_axis(S, order, axis=1).astype(np.float32))


@pytest.mark.parametrize("dp", [64, 1024])
@pytest.mark.parametrize("R,B", [(1, 1), (1, 4), (4, 1), (8, 1)])
def test_pair_dot_is_exact_at_the_extremes(R, B, dp):
    """The int32 sums of the multiply-add-pairs intrinsic equal int64 products, with codes
    and query entries at their largest magnitudes (the worst case of the overflow bound)."""
    rng = np.random.default_rng(R * 10 + B)
    qmax = min(32767, (2 ** 31 - 1) // (CK.CMAX * dp))  # as CodeStore sets it: binding at dp = 1024
    nb = B + 2
    codes = rng.choice(np.array([-127, 127, 0, 1], dtype=np.int8), size=(nb, dp // 2, CK.BLOCK, 2))
    codes[0] = 127
    QI = rng.choice(np.array([-qmax, qmax, 1], dtype=np.int16), size=(R, dp))
    QI[0] = qmax
    fn = {(1, 1): CK.pair_dot_1x1, (1, 4): CK.pair_dot_1x4, (4, 1): CK.pair_dot_4x1, (8, 1): CK.pair_dot_8x1}[(R, B)]

    @numba.njit
    def run(codes, QP, b):
        out = np.empty(R * B * CK.BLOCK, dtype=np.int32)
        dh = QP.shape[1]
        fn(codes.reshape(-1), b * dh * 2 * CK.BLOCK, dh * 2 * CK.BLOCK, QP.reshape(-1), 0, dh, dh, out)
        return out

    for b in range(nb - B + 1):
        got = run(codes, QI.view(np.int32), b).reshape(R, B, CK.BLOCK)
        full = codes[b:b + B].transpose(0, 2, 1, 3).reshape(B, CK.BLOCK, dp).astype(np.int64)
        want = np.einsum("rj,ktj->rkt", QI.astype(np.int64), full)
        np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 700), m=st.integers(1, 80), d=st.integers(16, 72), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["gauss", "lattice", "clustered"]))
def test_property_batches(n, m, d, seed, kind):
    rng = np.random.default_rng(seed)
    K = fixture_keys(rng, n, d, kind)
    Q = fixture_keys(rng, m, d, kind)
    index = hsr.HSRIndex(K, method="code")
    tau = _ties(rng, Q, K)
    check(index, Q, K, tau)
    check(index, Q, K, np.nextafter(tau, -np.inf))


@pytest.mark.slow
def test_generic_flavour_is_exact(tmp_path):
    """The portable vector IR (any CPU: ``NUMBA_CPU_NAME`` set) returns the same sets."""
    code = (
        "import numpy as np, hsr\n"
        "from hsr.index import _code_kernels as CK\n"
        "assert CK._FLAVOUR == 'generic', CK._FLAVOUR\n"
        "rng = np.random.default_rng(0)\n"
        "K = rng.integers(-2, 3, (700, 64)).astype(np.float32)\n"
        "for m in (1, 9):\n"
        "    Q = rng.integers(-2, 3, (m, 64)).astype(np.float32)\n"
        "    S = hsr.canonical_scores(Q, K)\n"
        "    tau = S[:, 5].astype(np.float64)\n"
        "    lims, D, I = hsr.HSRIndex(K, method='code').range_search(Q, tau)\n"
        "    for i in range(m):\n"
        "        assert sorted(I[lims[i]:lims[i + 1]]) == list(np.flatnonzero(S[i] >= tau[i]))\n"
    )
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=900)


@pytest.mark.parametrize("m", [1, 70])
def test_hits_past_the_buffer_are_re_run_exactly(m):
    """Every key a hit (far past the first buffer), then a high threshold, then all again:
    the buffer's size follows the searches and the re-run path returns the same sets."""
    rng = np.random.default_rng(11)
    K = fixture_keys(rng, 6000, 32, "gauss")
    Q = fixture_keys(rng, m, 32, "gauss")
    index = hsr.HSRIndex(K, method="code")
    lims, _ = check(index, Q, K, np.full(m, -1e30))
    assert lims[-1] == m * 6000
    check(index, Q, K, np.quantile(canonical_scores(Q, K), 0.999, axis=1))
    check(index, Q, K, np.full(m, -1e30))
