"""hsr_attention against the dense references."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsr
from hsr import KVCacheIndex, KVIndex, dense_relu_attention, dense_softmax_attention, hsr_attention

from .._data import clustered, rel_err


@pytest.mark.parametrize("method", ["tree", "code"])
@pytest.mark.parametrize("alpha", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 37, 1000, 4099])
def test_relu_exact(alpha, n, method):
    rng = np.random.default_rng(n + alpha)
    K = clustered(rng, n, 24)
    V = rng.standard_normal((n, 20)).astype(np.float32)
    kv = KVIndex(K, V, method=method, leaf_size=16)
    Q = clustered(rng, 9, 24)
    for bias in [-1e9, 0.0, 0.8, 1e9]:  # all firing ... none firing
        out, info = hsr_attention(Q, kv, alpha=alpha, bias=bias, return_info=True)
        ref = dense_relu_attention(Q, K, V, alpha=alpha, bias=bias)
        assert np.isfinite(out).all()
        if bias >= 1e9:
            assert (out == 0).all() and (info.keys_selected == 0).all()
        else:
            assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("method", ["tree", "code"])
def test_relu_ties_at_threshold(method):
    # lattice keys: many scores land exactly on the threshold, where ReLU is 0 either way
    rng = np.random.default_rng(1)
    K = rng.integers(-2, 3, size=(600, 8)).astype(np.float32)
    V = rng.standard_normal((600, 5)).astype(np.float32)
    Q = rng.integers(-2, 3, size=(7, 8)).astype(np.float32)
    kv = KVIndex(K, V, method=method, leaf_size=4)
    s = 0.5
    for b in [0.0, 1.0, 2.0]:
        out = hsr_attention(Q, kv, alpha=2, bias=b, scale=s)
        assert rel_err(out, dense_relu_attention(Q, K, V, alpha=2, bias=b, scale=s)) <= 1e-5


@pytest.mark.parametrize("method", ["tree", "code"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 400), seed=st.integers(0, 2**31 - 1), eps=st.sampled_from([0.5, 1e-1, 1e-2, 1e-3]),
       spread=st.sampled_from([0.05, 0.5, 3.0]), scale=st.sampled_from([0.1, 1.0, 4.0]))
def test_softmax_certificate_holds(method, n, seed, eps, spread, scale):
    rng = np.random.default_rng(seed)
    K = clustered(rng, n, 12, spread)
    V = rng.standard_normal((n, 6)).astype(np.float32)
    kv = KVIndex(K, V, method=method, leaf_size=8, buffer_size=max(n // 3, 1))
    Q = clustered(rng, 5, 12, spread)
    out, info = hsr_attention(Q, kv, kind="softmax", eps=eps, scale=scale, return_info=True)
    ref, lse = dense_softmax_attention(Q, K, V, scale=scale, return_lse=True)
    # float32 scores carry a rounding error of at most gamma_d |q| |k|; scaled, it moves each
    # exponent by up to this much (the certificate is about the mass, not float32 rounding)
    rounding = scale * 2 * 12 * 2.0**-24 * np.linalg.norm(Q, axis=1) * np.linalg.norm(K, axis=1).max()
    realised = 1.0 - np.exp(info.lse - lse)  # dropped fraction of the mass
    assert (realised <= info.dropped_bound + rounding + 1e-6).all()
    assert (info.dropped_bound <= eps / (1 + eps) + 1e-9).all()
    err = np.abs(out - ref).max(axis=-1)
    assert (err <= (2 * info.dropped_bound + 2 * rounding) * np.abs(V).max() + 1e-4).all()


@pytest.mark.parametrize("method", ["tree", "code"])
@pytest.mark.parametrize("mode", ["tau", "topk"])
def test_softmax_threshold_and_topk_modes(mode, method):
    rng = np.random.default_rng(2)
    K = clustered(rng, 3000, 16)
    V = rng.standard_normal((3000, 8)).astype(np.float32)
    kv = KVIndex(K, V, method=method)
    Q = clustered(rng, 6, 16)
    S = hsr.canonical_scores(Q, K)
    kw = {"tau": 5.0} if mode == "tau" else {"topk": 40}
    out, info = hsr_attention(Q, kv, kind="softmax", return_info=True, **kw)
    ref, lse = dense_softmax_attention(Q, K, V, return_lse=True)
    if mode == "tau":
        want = (S >= 5.0).sum(axis=1)
    else:
        kth = np.sort(S, axis=1)[:, -40]
        want = (S >= kth[:, None]).sum(axis=1)
    assert info.keys_selected.tolist() == want.tolist()
    realised = 1.0 - np.exp(info.lse - lse)
    assert (realised <= info.dropped_bound + 1e-5).all()
    assert (np.abs(out - ref).max(axis=-1) <= 2 * info.dropped_bound * np.abs(V).max() + 1e-4).all()


@pytest.mark.parametrize("method", ["tree", "code"])
@pytest.mark.parametrize("kind", ["relu", "softmax"])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_cache_gqa_causal_prefill(kind, group, method):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(group)
    B, Hkv, S, D = 2, 2, 301, 16
    K = np.stack([[clustered(rng, S, D) for _ in range(Hkv)] for _ in range(B)])
    V = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    Q = np.stack([[clustered(rng, S, D) for _ in range(Hkv * group)] for _ in range(B)])
    cache = KVCacheIndex(K, V, method=method, leaf_size=8)
    Kr = np.repeat(K, group, axis=1)
    Vr = np.repeat(V, group, axis=1)
    kw = {"eps": 1e-4} if kind == "softmax" else {"bias": 0.5}
    out = hsr_attention(torch.from_numpy(Q), cache, kind=kind, causal=True, **kw)
    assert isinstance(out, torch.Tensor) and out.shape == (B, Hkv * group, S, D)
    if kind == "relu":
        ref = dense_relu_attention(Q, Kr, Vr, alpha=2, bias=0.5, causal=True)
        assert rel_err(out.numpy(), ref) <= 1e-5
    else:
        ref = dense_softmax_attention(Q, Kr, Vr, causal=True)
        assert np.abs(out.numpy() - ref).max() <= 2 * 1e-4 * np.abs(V).max() + 1e-4


def test_decode_after_appends_equals_fresh():
    rng = np.random.default_rng(3)
    K = clustered(rng, 3000, 16)
    V = rng.standard_normal((3000, 8)).astype(np.float32)
    grown = KVIndex(K[:500], V[:500], buffer_size=64)
    for t in range(500, 3000):
        grown.add(K[t], V[t])
    fresh = KVIndex(K, V)
    q = clustered(rng, 3, 16)
    for kind, kw in [("relu", {"bias": 0.7}), ("softmax", {"eps": 1e-3})]:
        a = hsr_attention(q, grown, kind=kind, **kw)
        b = hsr_attention(q, fresh, kind=kind, **kw)
        r = (dense_relu_attention(q, K, V, bias=0.7) if kind == "relu" else dense_softmax_attention(q, K, V))
        assert np.abs(a - r).max() <= 2e-3 * np.abs(V).max() + 1e-5
        assert np.abs(b - r).max() <= 2e-3 * np.abs(V).max() + 1e-5


def test_dtypes_and_frameworks():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    K = clustered(rng, 500, 16)
    V = rng.standard_normal((500, 8)).astype(np.float32)
    kv = KVIndex(torch.from_numpy(K).bfloat16(), torch.from_numpy(V).half())
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.from_numpy(clustered(rng, 3, 16)).to(dt)
        out = hsr_attention(q, kv, bias=0.5)
        assert out.dtype == dt and out.shape == (3, 8)
    one = hsr_attention(clustered(rng, 1, 16)[0], kv, bias=0.5)
    assert one.shape == (8,)


def test_paper_bias_policy():
    rng = np.random.default_rng(5)
    K = rng.standard_normal((4096, 32)).astype(np.float32)
    V = rng.standard_normal((4096, 8)).astype(np.float32)
    kv = KVIndex(K, V)
    q = rng.standard_normal((4, 32)).astype(np.float32)
    b = hsr.paper_bias(q, K)
    out, info = hsr_attention(q, kv, bias="paper", return_info=True)
    ref = dense_relu_attention(q, K, V, bias=b)
    assert rel_err(out, ref) <= 1e-4
    frac = info.keys_selected.mean() / 4096
    # Gaussian scores fire with probability 1 - Phi(sqrt(0.4 ln n)) = 3.4% at 4K: n^{4/5} (18.9%)
    # only up to the Gaussian tail's 1/(x sqrt(2 pi)) factor
    assert 0.02 < frac < 0.06


def test_bad_inputs():
    rng = np.random.default_rng(6)
    K = rng.standard_normal((50, 8)).astype(np.float32)
    kv = KVIndex(K, K)
    q = K[:2]
    with pytest.raises(ValueError, match="alpha"):
        hsr_attention(q, kv, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        hsr_attention(q, kv, alpha=0)
    with pytest.raises(ValueError, match="eps"):
        hsr_attention(q, kv, kind="softmax", eps=1.0)
    with pytest.raises(ValueError, match="eps"):
        hsr_attention(q, kv, kind="softmax", eps=0.0)
    with pytest.raises(ValueError, match="at most one"):
        hsr_attention(q, kv, kind="softmax", eps=0.1, topk=3)
    with pytest.raises(ValueError, match="apply to kind"):
        hsr_attention(q, kv, eps=0.1)
    with pytest.raises(ValueError, match="kind"):
        hsr_attention(q, kv, kind="linear")
    with pytest.raises(ValueError, match="NaN"):
        hsr_attention(np.full((1, 8), np.nan, dtype=np.float32), kv)
    with pytest.raises(ValueError, match="dimension"):
        hsr_attention(np.ones((1, 7), dtype=np.float32), kv)
    with pytest.raises(ValueError, match="differ in length"):
        KVIndex(K, K[:10])
    with pytest.raises(TypeError, match="KVIndex"):
        hsr_attention(q, hsr.HSRIndex(K))
    with pytest.raises(ValueError, match="scale"):
        hsr_attention(q, kv, scale=-1.0)
    # bias is one per query head (one head here), not one per query row
    with pytest.raises(ValueError, match=r"bias must be a scalar or one per query head, shape \(1,\)"):
        hsr_attention(q, kv, bias=np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="bias contains NaN or Inf"):
        hsr_attention(q, kv, bias=np.array([np.inf]))
    cache = KVCacheIndex(K[None, None], K[None, None])
    with pytest.raises(ValueError, match="multiple"):
        hsr_attention(np.ones((1, 3, 1, 8), dtype=np.float32), KVCacheIndex(np.stack([K, K])[None], np.stack([K, K])[None]))
    with pytest.raises(ValueError, match="batch"):
        hsr_attention(np.ones((2, 1, 1, 8), dtype=np.float32), cache)


def test_empty_cache_gives_zeros():
    kv = KVIndex(np.zeros((0, 4), np.float32), np.zeros((0, 3), np.float32))
    out = hsr_attention(np.ones((2, 4), np.float32), kv, kind="softmax")
    assert out.shape == (2, 3) and (out == 0).all()


def test_large_alpha_is_stable():
    """relu(z) ** alpha overflows float64 from alpha ~ 300: the weights are scaled by the row's
    largest z first, so any alpha gives the average of the values at the top-scoring keys."""
    rng = np.random.default_rng(11)
    k = rng.standard_normal((500, 16)).astype(np.float32)
    v = rng.standard_normal((500, 8)).astype(np.float32)
    q = rng.standard_normal((3, 16)).astype(np.float32) * 4
    kv = hsr.KVIndex(k, v)
    for alpha in (5000, 10 ** 5, 2 ** 62):
        out, info = hsr.hsr_attention(q, kv, alpha=alpha, bias=0.1, return_info=True)
        assert np.isfinite(out).all() and np.isfinite(info.lse).all()
        top = np.argmax(q @ k.T, axis=1)
        np.testing.assert_allclose(out, v[top], rtol=1e-5, atol=1e-6)
    out2 = hsr.hsr_attention(q, kv, alpha=3, bias=0.1)
    np.testing.assert_allclose(out2, hsr.dense_relu_attention(q, k, v, alpha=3, bias=0.1), rtol=1e-4, atol=1e-5)


def test_causal_needs_no_more_queries_than_keys_and_tau_finite():
    rng = np.random.default_rng(13)
    k = rng.standard_normal((1, 1, 5, 16)).astype(np.float32)
    v = rng.standard_normal((1, 1, 5, 16)).astype(np.float32)
    kv = hsr.KVCacheIndex(k, v)
    q = rng.standard_normal((1, 2, 7, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="causal"):
        hsr.hsr_attention(q, kv, causal=True)
    assert hsr.hsr_attention(q, kv, causal=False).shape == (1, 2, 7, 16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        hsr.hsr_attention(q, kv, kind="softmax", tau=float("nan"))


@pytest.mark.parametrize("method", ["tree", "code"])
@pytest.mark.parametrize("mode", [dict(kind="softmax", eps=1e-3), dict(kind="relu", bias=-5.0),
                                  dict(kind="softmax", tau=-50.0)])
def test_keys_scored_never_exceeds_visible(method, mode):
    # causal prefill: a scanned leaf mixes positions; only the visible keys are counted
    rng = np.random.default_rng(7)
    K = rng.standard_normal((1, 1, 900, 32)).astype(np.float32)
    Q = rng.standard_normal((1, 2, 300, 32)).astype(np.float32)
    cache = KVCacheIndex(K, K, method=method)
    cache.heads[0][0].index.remove([3, 700])
    _, info = hsr_attention(Q, cache, causal=True, return_info=True, **mode)
    visible = np.arange(601, 901) - (np.arange(601, 901) > 3) - (np.arange(601, 901) > 700)
    assert (info.keys_scored <= visible[None, None, :]).all()
    assert (info.keys_selected <= info.keys_scored).all()


def test_kv_index_from_an_existing_index(tmp_path):
    """KVIndex.from_index wraps a loaded index (no rebuild) with its values; KVCacheIndex.from_heads
    assembles heads; both attend as the originals do, and bad parts are refused."""
    rng = np.random.default_rng(11)
    K = rng.standard_normal((400, 12)).astype(np.float32)
    V = rng.standard_normal((400, 5)).astype(np.float32)
    q = rng.standard_normal((3, 12)).astype(np.float32)
    kv = KVIndex(K, V)
    kv.index.save(tmp_path / "i.hsr")
    again = KVIndex.from_index(hsr.HSRIndex.load(tmp_path / "i.hsr"), V)
    np.testing.assert_array_equal(hsr_attention(q, kv, alpha=2, bias=0.2), hsr_attention(q, again, alpha=2, bias=0.2))
    cache = KVCacheIndex.from_heads([[kv, again]])
    assert (cache.batch, cache.kv_heads) == (1, 2)
    with pytest.raises(ValueError, match="do not match the index"):
        KVIndex.from_index(kv.index, V[:10])
    with pytest.raises(ValueError, match="list of lists"):
        KVCacheIndex.from_heads([[kv], [kv, again]])
    with pytest.raises(TypeError, match="KVIndex"):
        KVCacheIndex.from_heads([[kv.index]])


def test_device_queries_on_a_cpu_index_are_refused():
    # a tensor on another device must not be copied to the host silently (the "meta" device
    # stands in for a GPU on a CPU-only machine)
    torch = pytest.importorskip("torch")
    import hsr

    rng = np.random.default_rng(0)
    kv = hsr.KVIndex(rng.standard_normal((64, 16)).astype(np.float32),
                     rng.standard_normal((64, 16)).astype(np.float32))
    with pytest.raises(TypeError, match="CPU index"):
        hsr.hsr_attention(torch.zeros(2, 16, device="meta"), kv)
