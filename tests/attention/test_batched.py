"""The one-call-per-layer decode kernels (hsr.attention.batched) against the per-head path:
the same kept keys, the same output and the same certificate, bit for bit."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hsr import KVCacheIndex, hsr_attention
from hsr.attention import batched
from hsr.attention import _kernels as AK
from hsr.attention.core import DENSE_BELOW


def _cache(B, Hkv, n, d, seed, clustered=True, dead=0):
    rng = np.random.default_rng(seed)
    if clustered:  # real keys are clustered: a few directions, a heavy-tailed norm
        centres = rng.standard_normal((8, d)) * 2.0
        K = centres[rng.integers(0, 8, (B, Hkv, n))] + 0.5 * rng.standard_normal((B, Hkv, n, d))
    else:
        K = rng.standard_normal((B, Hkv, n, d))
    K = K.astype(np.float32)
    K[..., 5, :] = K[..., 3, :]  # duplicate keys
    K[..., 7, :] = 0.0  # a zero key
    V = rng.standard_normal((B, Hkv, n, d)).astype(np.float32)
    index = KVCacheIndex(K, V)
    if dead:
        for b in range(B):
            ids = rng.choice(n - 1, dead, replace=False)
            for h in range(Hkv):
                index.heads[b][h].index.remove(ids)
    return K, V, index


def _queries(B, Hq, M, d, seed, K):
    rng = np.random.default_rng(seed + 1)
    # queries near keys score a few keys high (a selective head), others spread the mass
    Q = 0.4 * rng.standard_normal((B, Hq, M, d)) + 0.6 * K[:, :1, -M:, :]
    return np.ascontiguousarray(Q, dtype=np.float32)


@pytest.mark.parametrize("B,Hkv,G,M", [(1, 3, 3, 1), (2, 2, 2, 3), (1, 1, 4, 1)])
@pytest.mark.parametrize("clustered", [True, False])
@pytest.mark.parametrize("dead", [0, 37])
def test_bounds_rows_equal_the_per_head_kernel(B, Hkv, G, M, clustered, dead):
    n, d = 1500, 32
    K, V, index = _cache(B, Hkv, n, d, seed=B + M, clustered=clustered, dead=dead)
    Q = _queries(B, Hkv * G, M, d, 3, K)
    rph = G * M
    R = B * Hkv * rph
    Qr = Q.reshape(R, d)
    lim = np.tile(np.tile(np.arange(M, dtype=np.int64) + n - M, G), B * Hkv)
    for eps in (1e-1, 1e-2, 1e-4):
        ub = np.empty((R, n))
        out0 = np.zeros((R, d), np.float32)
        info0 = np.zeros((R, 5))
        heads = [kvi for row in index.heads for kvi in row]
        for h, kvi in enumerate(heads):
            sl = slice(h * rph, (h + 1) * rph)
            ub[sl] = kvi.index.score_bounds(Qr[sl])[0]
            kv = kvi.index.key_view()
            AK.softmax_from_bounds(Qr[sl], kv.keys, kv.alive, kv.has_dead, ub[sl], kvi.values, 0.17, 0, eps,
                                   np.zeros(rph), lim[sl], out0[sl], info0[sl])
        alive = np.stack([kvi.index.key_view().alive for kvi in heads]) if dead else np.ones((len(heads), 0), np.uint8)
        # the caller's buffers have room past n (a growing cache): rows past n are never read
        cap = n + 50
        Kb = np.full((B * Hkv, cap, d), np.nan, np.float32)
        Vb = np.full((B * Hkv, cap, d), np.nan, np.float32)
        Kb[:, :n] = K.reshape(-1, n, d)
        Vb[:, :n] = V.reshape(-1, n, d)
        out1 = np.zeros((R, d), np.float32)
        info1 = np.zeros((R, 5))
        batched.softmax_bounds_rows(Qr, Kb, Vb, alive, bool(dead), ub, rph, 0.17, eps, lim, out1, info1)
        np.testing.assert_array_equal(out1, out0)
        np.testing.assert_array_equal(info1, info0)
        assert (info1[:, 3] < info1[:, 4]).any() or eps < 1e-3  # something was pruned


@pytest.mark.parametrize("mode", [dict(eps=1e-2), dict(eps=1e-3), dict(topk=16), dict(topk=1), dict(tau=1.5)])
@pytest.mark.parametrize("dead", [0, 11])
def test_layer_softmax_equals_hsr_attention(mode, dead):
    B, Hkv, G, M, n, d = 2, 2, 3, 1, max(DENSE_BELOW, 1100), 64
    K, V, index = _cache(B, Hkv, n, d, seed=5, dead=dead)
    Q = _queries(B, Hkv * G, M, d, 9, K)
    ref, info = hsr_attention(Q, index, kind="softmax", scale=0.125, causal=True, return_info=True, **mode)
    out, scored, selected, dropped = batched.layer_softmax(
        Q, index, K.reshape(-1, n, d), V.reshape(-1, n, d), n, 0.125, causal=True, **mode)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(scored, info.keys_scored)
    np.testing.assert_array_equal(selected, info.keys_selected)
    np.testing.assert_array_equal(dropped, info.dropped_bound)


def test_csr_rows_equal_the_per_head_kernel():
    rng = np.random.default_rng(2)
    H, rph, n, dv = 3, 4, 300, 8
    values = rng.standard_normal((H, n, dv)).astype(np.float32)
    counts = rng.integers(0, 20, H * rph)
    counts[3] = 0  # a row with nothing reported
    lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ids = rng.integers(0, n, lims[-1]).astype(np.int64)
    scores = rng.standard_normal(lims[-1]).astype(np.float32) * 3
    tau = rng.standard_normal(H * rph)
    rem = np.abs(rng.standard_normal(H * rph))
    rem[5] = 0.0
    out0 = np.zeros((H * rph, dv), np.float32)
    info0 = np.zeros((H * rph, 5))
    for h in range(H):
        a, b = lims[h * rph], lims[(h + 1) * rph]
        sl = slice(h * rph, (h + 1) * rph)
        AK.softmax_from_csr(lims[h * rph:(h + 1) * rph + 1] - a, ids[a:b], scores[a:b], values[h], 0.3, tau[sl],
                            rem[sl], out0[sl], info0[sl])
    out1 = np.zeros_like(out0)
    info1 = np.zeros_like(info0)
    batched.softmax_csr_rows(lims, ids, scores, values, rph, 0.3, tau, rem, out1, info1)
    np.testing.assert_array_equal(out1, out0)
    np.testing.assert_array_equal(info1, info0)


# ------------------------------------------------------------------------------ dense decode

def _dense_ref(Q, keys, values, n, scale, causal):
    """float64 softmax of every visible key: (B, Hq, M, dv) and the log of each row's sum."""
    B, Hq, M, d = Q.shape
    Hkv = keys.shape[0] // B
    G = Hq // Hkv
    K = keys[:, :n].astype(np.float64).reshape(B, Hkv, n, d)
    V = values[:, :n].astype(np.float64).reshape(B, Hkv, n, -1)
    s = np.einsum("bhgmd,bhnd->bhgmn", Q.astype(np.float64).reshape(B, Hkv, G, M, d), K) * scale
    if causal:
        s = np.where(np.arange(n)[None, :] <= (np.arange(M) + n - M)[:, None], s, -np.inf)
    mx = s.max(-1, keepdims=True)
    w = np.exp(s - mx)
    lse = np.log(w.sum(-1)) + mx[..., 0]
    out = np.einsum("bhgmn,bhnd->bhgmd", w / w.sum(-1, keepdims=True), V)
    return out.reshape(B, Hq, M, -1), lse.reshape(B, Hq, M)


@pytest.mark.parametrize("B,Hkv,G,M,n,d,dv", [(1, 3, 3, 1, 1, 64, 64), (1, 3, 3, 1, 777, 64, 64),
                                              (2, 2, 4, 3, 300, 32, 16), (1, 1, 1, 5, 5, 8, 8),
                                              (3, 1, 2, 16, 2049, 16, 24), (1, 2, 1, 2, 5000, 64, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_layer_dense_softmax_equals_float64_softmax(B, Hkv, G, M, n, d, dv, causal):
    # chunks of 256..2048 keys: sizes on and off a chunk's edge, M rows whose last chunk may
    # hold only ids past an early row's limit, a cache with room past n (never read)
    if M > n:
        pytest.skip("M <= n")
    rng = np.random.default_rng(n + M)
    cap = n + 37
    keys = rng.standard_normal((B * Hkv, cap, d)).astype(np.float32) * 2
    values = rng.standard_normal((B * Hkv, cap, dv)).astype(np.float32)
    keys[:, n:] = np.nan  # past the cache: must not be read
    values[:, n:] = np.nan
    Q = rng.standard_normal((B, Hkv * G, M, d)).astype(np.float32)
    scale = d ** -0.5
    out, lse = batched.layer_dense_softmax(Q, keys, values, n, scale, causal=causal)
    ref, ref_lse = _dense_ref(Q, keys, values, n, scale, causal)
    assert out.shape == (B, Hkv * G, M, dv) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-6)


def test_layer_dense_softmax_chunk_edges_and_a_masked_chunk():
    # n one past a chunk (256 keys, 1 thread): the last chunk holds one id, past row 0's
    # limit with M = 2; duplicate keys and a zero query; extreme but finite magnitudes
    n, M, d = 257, 2, 16
    keys = np.ones((1, n, d), np.float32)
    keys[0, ::3] = 0.0
    values = np.arange(n * d, dtype=np.float32).reshape(1, n, d) / n
    Q = np.zeros((1, 1, M, d), np.float32)
    Q[0, 0, 1] = 30.0
    assert batched.dense_chunk(n, 1, 1) == 256
    out, lse = batched.layer_dense_softmax(Q, keys, values, n, 1.0, threads=1)
    ref, ref_lse = _dense_ref(Q, keys, values, n, 1.0, True)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], values[0, :n - 1].mean(0), rtol=1e-5)  # zero query: the mean


@pytest.mark.parametrize("where", ["q", "key", "value", "inf_key"])
def test_layer_dense_softmax_bad_input_gives_nan_not_a_finite_answer(where):
    rng = np.random.default_rng(1)
    n, d = 600, 16
    keys = rng.standard_normal((2, n, d)).astype(np.float32)
    values = rng.standard_normal((2, n, d)).astype(np.float32)
    Q = rng.standard_normal((1, 4, 1, d)).astype(np.float32)
    if where == "q":
        Q[0, 1, 0, 3] = np.nan
    elif where == "key":
        keys[0, 400, 2] = np.nan
    elif where == "value":
        values[0, 10, 0] = np.nan
    else:
        keys[0, 5, :] = np.inf
    out, _ = batched.layer_dense_softmax(Q, keys, values, n, 0.25)
    bad = np.isnan(out).any(-1)[0, :, 0]
    assert bad.tolist() == ([False, True, False, False] if where == "q" else [True, True, False, False])
    assert np.isfinite(out[0, 2:]).all()


def test_layer_dense_softmax_refuses_shapes_by_name():
    keys = np.zeros((2, 10, 8), np.float32)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        batched.layer_dense_softmax(np.zeros((1, 3, 1, 8), np.float32), keys, keys, 10, 1.0)
    with pytest.raises(ValueError, match="M <= n <= capacity"):
        batched.layer_dense_softmax(np.zeros((1, 2, 1, 8), np.float32), keys, keys, 11, 1.0)


def _exp_reference(row, m):
    """exp of the float32 differences, in float64 (what exp_shifted approximates)."""
    return np.exp((row - np.float32(m)).astype(np.float64))


@pytest.mark.parametrize("w", [1, 7, 64, 300])
def test_exp_shifted_is_within_4e7_of_exp(w):
    rng = np.random.default_rng(w)
    row = (rng.standard_normal(w) * 30).astype(np.float32)
    m = row.max()
    ref = _exp_reference(row, m)
    got = row.copy()
    tot = batched.exp_shifted(got, w, m, np.empty(w, np.int32))
    live = ref > 1.7e-38  # above e^-87: the rest are 0 by design
    assert np.all(np.abs(got[live] - ref[live]) <= 4e-7 * ref[live])
    assert np.all(got[~live] <= 1.7e-38)
    assert abs(tot - ref.sum()) <= 1e-6 * ref.sum()


@given(st.lists(st.floats(-200, 0, width=32), min_size=1, max_size=70))
@settings(max_examples=60, deadline=None)
def test_exp_shifted_property(xs):
    # differences from 0 to -200 (the max at 0): ties, exact integers, the underflow edge
    row = np.array(xs + [0.0], np.float32)
    got = row.copy()
    batched.exp_shifted(got, row.size, np.float32(0.0), np.empty(row.size, np.int32))
    ref = _exp_reference(row, 0.0)
    assert got[-1] == 1.0  # the maximum's weight is exactly 1
    assert np.all(np.abs(got - ref) <= 4e-7 * ref + 1.7e-38)
    assert np.all(got[row < -87.0] == 0.0)


def test_exp_shifted_special_values():
    row = np.array([0.0, -np.inf, np.nan, -87.5, -1e30, -87.0, -1.0], np.float32)
    got = row.copy()
    tot = batched.exp_shifted(got, row.size, np.float32(0.0), np.empty(row.size, np.int32))
    assert got[0] == 1.0 and got[1] == 0.0 and np.isnan(got[2])  # -inf: 0, NaN: NaN
    assert got[3] == 0.0 and got[4] == 0.0  # below e^-87: 0, not a denormal
    assert abs(got[5] - np.exp(-87.0)) <= 4e-7 * np.exp(-87.0)
    assert np.isnan(tot)  # a NaN weight makes the sum NaN: the row's answer cannot be finite
    part = row[[0, 1, 6]].copy()  # only the first w entries are touched
    before = part.copy()
    batched.exp_shifted(part, 2, np.float32(0.0), np.empty(2, np.int32))
    assert part[2] == before[2]


def test_exp_shifted_refuses_a_length_past_its_arrays():
    with pytest.raises(ValueError, match="longer than row or bits"):
        batched.exp_shifted(np.zeros(4, np.float32), 5, np.float32(0.0), np.empty(8, np.int32))
    with pytest.raises(ValueError, match="longer than row or bits"):
        batched.exp_shifted(np.zeros(8, np.float32), 5, np.float32(0.0), np.empty(4, np.int32))
