"""The code filter (``method="code"``) against the canonical oracle, and its own properties."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsr
from hsr.index import canonical_scores

from .._data import fixture_keys
from .test_index import as_sets, check


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 200), d=st.integers(1, 80),
       scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e15]), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["gauss", "lattice", "clustered"]),
       rotation=st.sampled_from(["random", "pca", "none"]))
def test_property_exact(n, d, scale, seed, kind, rotation):
    rng = np.random.default_rng(seed)
    K = fixture_keys(rng, n, d, kind) * np.float32(scale)
    Q = fixture_keys(rng, 5, d, kind)
    Q[1] *= np.float32(1e3)  # one query of another magnitude in the same batch
    index = hsr.HSRIndex(K, dim=d, method="code", code_rotation=rotation, seed=seed % 7)
    if n == 0:
        lims, scores, ids = index.range_search(Q, 0.0)
        assert lims.tolist() == [0] * 6 and len(ids) == 0
        return
    S = canonical_scores(Q, K)
    tau = S[np.arange(5), rng.integers(0, n, size=5)].astype(np.float64)  # ties at tau
    check(index, Q, K, tau)
    check(index, Q, K, np.nextafter(tau, np.inf))
    check(index, Q, K, np.nextafter(tau, -np.inf))


def test_auto_uses_codes_from_dim_16():
    rng = np.random.default_rng(0)
    assert hsr.HSRIndex(rng.standard_normal((100, 64)).astype(np.float32)).backend == "code"
    assert hsr.HSRIndex(rng.standard_normal((100, 8)).astype(np.float32)).backend == "tree"
    assert hsr.HSRIndex(dim=16, method="brute").backend == "brute"


def test_single_key_appends_match_batch_build_and_ids_ascend():
    rng = np.random.default_rng(1)
    K = fixture_keys(rng, 3000, 64, "clustered")
    grown = hsr.HSRIndex(K[:100], method="code")
    Q = fixture_keys(rng, 12, 64, "clustered")
    for s in range(100, 3000):
        grown.add(K[s])
        if s % 997 == 0:  # searches in between code what was appended so far
            grown.count(Q, 0.0)
    fresh = hsr.HSRIndex(K, method="code")
    tau = np.quantile(canonical_scores(Q, K), 0.99, axis=1)
    la, sa, ia = grown.range_search(Q, tau)
    lb, sb, ib = fresh.range_search(Q, tau)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ia, ib)  # same order: ascending ids per query
    for i in range(len(Q)):
        assert (np.diff(ia[la[i]:la[i + 1]]) > 0).all()
    check(grown, Q, K, tau)


def test_many_hits_overflow_the_first_buffer():
    # tau far below every score: every key is a hit, far past the first buffer's guess
    rng = np.random.default_rng(2)
    K = fixture_keys(rng, 20000, 32, "gauss")
    Q = fixture_keys(rng, 3, 32, "gauss")
    idx = hsr.HSRIndex(K, method="code")
    lims, ids = check(idx, Q, K, -1e9)
    assert lims[-1] == 3 * 20000


@pytest.mark.parametrize("dtype", ["float64", "torch16", "torchbf16"])
def test_other_dtypes(dtype):
    rng = np.random.default_rng(3)
    K = rng.standard_normal((900, 24))
    Q = rng.standard_normal((5, 24))
    if dtype == "float64":
        idx = hsr.HSRIndex(K, dtype="float64", method="code")
        S = canonical_scores(Q, K, dtype="float64")
        lims, sc, ids = idx.range_search(Q, S[:, 3])
        assert sc.dtype == np.float64
        assert as_sets(lims, ids) == [set(np.flatnonzero(S[i] >= S[i, 3]).tolist()) for i in range(5)]
        return
    torch = pytest.importorskip("torch")
    dt = torch.float16 if dtype == "torch16" else torch.bfloat16
    Kt = torch.from_numpy(K).to(dt)
    idx = hsr.HSRIndex(Kt, method="code")
    Kn = Kt.float().numpy()
    Qn = torch.from_numpy(Q).to(dt).float().numpy()
    check(idx, Qn, Kn, canonical_scores(Qn, Kn)[:, 5].astype(np.float64))


def test_stats_count_codes_and_candidates():
    rng = np.random.default_rng(4)
    K = fixture_keys(rng, 10000, 64, "gauss")
    Q = fixture_keys(rng, 4, 64, "gauss")
    idx = hsr.HSRIndex(K, method="code")
    tau = np.quantile(canonical_scores(Q, K), 0.99, axis=1)
    lims, _, ids, st_ = idx.range_search(Q, tau, return_stats=True)
    assert st_.method == "code"
    assert st_.codes_evaluated.tolist() == [10000] * 4
    assert (st_.keys_scored >= np.diff(lims)).all()
    # int8 codes after a rotation: few candidates beyond the answer on Gaussian keys
    assert st_.keys_scored.sum() <= 2 * np.diff(lims).sum()
    lims, _, ids, st_ = idx.range_search(Q, tau, max_id=4999, return_stats=True)
    assert st_.codes_evaluated.tolist() == [5000] * 4  # causal: codes past the limit are not read


def test_score_bounds_contain_scores():
    rng = np.random.default_rng(5)
    K = fixture_keys(rng, 777, 40, "clustered")
    Q = fixture_keys(rng, 6, 40, "clustered")
    idx = hsr.HSRIndex(K, method="code")
    up, lo = idx.score_bounds(Q)
    S = canonical_scores(Q, K).astype(np.float64)
    assert (lo <= S).all() and (S <= up).all()
    with pytest.raises(ValueError, match="code backend"):
        hsr.HSRIndex(K, method="tree").score_bounds(Q)
    # the upper half alone, in one pass: the same floats, into the caller's array too
    np.testing.assert_array_equal(idx.upper_bounds(Q), up)
    out = np.full((9, 777), np.nan)
    assert idx.upper_bounds(Q, out=out[2:8]) is not None
    np.testing.assert_array_equal(out[2:8], up)
    assert np.isnan(out[:2]).all() and np.isnan(out[8:]).all()
    for bad in (np.empty((6, 776)), np.empty((6, 777), np.float32), np.empty((777, 6)).T):
        with pytest.raises(ValueError, match="out must be"):
            idx.upper_bounds(Q, out=bad)
    with pytest.raises(ValueError, match="code backend"):
        hsr.HSRIndex(K, method="tree").upper_bounds(Q)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 11, 12, 13])
def test_bounds_of_any_row_count_are_the_rows_own(m):
    """Rows in groups of 8 and a last group of at most 4 (two product forms): every row's
    bounds equal its bounds computed alone, and contain the canonical scores; key counts off
    the 32-key blocks and the 16-block chunks."""
    rng = np.random.default_rng(m)
    K = fixture_keys(rng, 16 * 32 + 45, 64, "lattice")
    Q = fixture_keys(rng, m, 64, "lattice")
    idx = hsr.HSRIndex(K, method="code")
    up, lo = idx.score_bounds(Q)
    S = canonical_scores(Q, K).astype(np.float64)
    assert (lo <= S).all() and (S <= up).all()
    for r in range(m):
        u1, l1 = idx.score_bounds(Q[r:r + 1])
        np.testing.assert_array_equal(u1[0], up[r])
        np.testing.assert_array_equal(l1[0], lo[r])


def test_save_load_recodes(tmp_path):
    rng = np.random.default_rng(6)
    K = fixture_keys(rng, 3000, 32, "clustered")
    idx = hsr.HSRIndex(K[:2500], method="code", code_rotation="pca")
    idx.remove([3, 4, 2001])
    Q = fixture_keys(rng, 6, 32, "clustered")
    tau = np.quantile(canonical_scores(Q, K[:2500]), 0.95, axis=1)
    want = idx.range_search(Q, tau)
    idx.save(tmp_path / "c.hsr")
    back = hsr.HSRIndex.load(tmp_path / "c.hsr")
    assert back.backend == "code" and back.code_rotation == "pca"
    for a, b in zip(want, back.range_search(Q, tau)):
        np.testing.assert_array_equal(a, b)
    back.add(K[2500:])
    assert len(back) == 2997


def test_bad_code_arguments():
    with pytest.raises(ValueError, match="code_rotation"):
        hsr.HSRIndex(dim=4, code_rotation="hadamard")
    idx = hsr.HSRIndex(np.ones((40, 16), dtype=np.float32), method="code")
    for bad in (np.float32(np.nan), np.float32(np.inf)):
        key = np.ones(16, dtype=np.float32)
        key[3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            idx.add(key)  # the single-key fast path hands bad keys to the validating path
    assert len(idx) == 40
    big = np.full(16, 1e17, dtype=np.float32)  # its float32 squared norm overflows: slow path
    idx.add(big)
    assert idx.get_keys([40])[0, 0] == np.float32(1e17)


def test_float64_magnitudes_beyond_float32_are_refused_not_wrong():
    rng = np.random.default_rng(8)
    K = rng.standard_normal((300, 20)) * 1e100
    Q = rng.standard_normal((3, 20))
    with pytest.raises(ValueError, match="float32 range"):
        hsr.HSRIndex(K, dtype="float64", method="code").range_search(Q, 0.0)
    S = canonical_scores(Q, K, dtype="float64")
    lims, _, ids = hsr.HSRIndex(K, dtype="float64", method="tree").range_search(Q, S[:, 7])
    assert as_sets(lims, ids) == [set(np.flatnonzero(S[i] >= S[i, 7]).tolist()) for i in range(3)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 400), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.01, 0.125, 1.0, 8.0]),
       kind=st.sampled_from(["gauss", "lattice", "clustered"]))
def test_remainder_bounds_the_unreported_mass(n, seed, scale, kind):
    rng = np.random.default_rng(seed)
    K = fixture_keys(rng, n, 24, kind)
    Q = fixture_keys(rng, 4, 24, kind)
    idx = hsr.HSRIndex(K, method="code")
    gone = rng.choice(n, size=n // 5, replace=False)
    if len(gone):
        idx.remove(gone)
    alive = np.ones(n, dtype=bool)
    alive[gone] = False
    S = canonical_scores(Q, K).astype(np.float64)
    tau = S[np.arange(4), rng.integers(0, n, 4)]
    lim = rng.integers(-1, n + 2, 4)
    lims, _, ids, st_ = idx.range_search(Q, tau, max_id=lim, remainder_scale=scale, return_stats=True)
    for i in range(4):
        vis = alive & (np.arange(n) <= lim[i]) & (S[i] < tau[i])
        true = np.exp(scale * (S[i][vis] - tau[i])).sum()
        assert st_.remainder[i] >= true * (1 - 1e-12) and np.isfinite(st_.remainder[i])
    with pytest.raises(ValueError, match="remainder_scale"):
        idx.range_search(Q, tau, remainder_scale=0.0)
