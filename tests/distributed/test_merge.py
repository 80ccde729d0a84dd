"""The merges, in one process: shards simulated by slicing one cache, checked with hypothesis
against the single index and a float64 dense reference (no torch.distributed needed)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsr
import hsr.distributed as hd
from hsr.distributed.kv import _local_topk_scores
from hsr.distributed.partial import row_runs


def _simulate(k, v, q, cuts, kind, causal, *, alpha=2, bias=0.0, tau=None, topk=None, eps=None, method="auto"):
    """What ShardedKVCache computes, with the shards [cuts[i], cuts[i+1]) in one process."""
    B, Hkv, N, d = k.shape
    Hq, M = q.shape[1], q.shape[2]
    s = d ** -0.5
    locs = [(a, hsr.KVCacheIndex(k[:, :, a:b], v[:, :, a:b], method=method)) for a, b in zip(cuts[:-1], cuts[1:])]
    tau_rows = None if tau is None else np.broadcast_to(np.float64(tau), (B, Hq, M)).copy()
    if topk is not None:
        parts = np.stack([_local_topk_scores(loc, q, topk, a, N, causal) for a, loc in locs])
        kth = hd.kth_best(parts.reshape(len(locs), -1, topk), topk).reshape(B, Hq, M)
        tau_rows = np.maximum(kth, float(np.finfo(np.float32).min))
    parts = [hd.cpu_partial(loc, q, start=a, n_global=N, kind=kind, alpha=alpha, bias=np.full(Hq, bias), scale=s,
                            eps=eps, tau_rows=tau_rows, causal=causal, dense_below=0) for a, loc in locs]
    R = len(parts)
    out, lse = hd.merge_attention(np.stack([p[0] for p in parts]).reshape(R, -1, v.shape[-1]),
                                  np.stack([p[1] for p in parts]).reshape(R, -1))
    lu = np.logaddexp.reduce(np.stack([p[2] for p in parts]).reshape(R, -1), axis=0)
    return out.reshape(B, Hq, M, -1), lse.reshape(B, Hq, M), hd.dropped_fraction(lse, lu).reshape(B, Hq, M)


def _dense64(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    K = np.repeat(k, g, axis=1)
    S = np.einsum("bhmd,bhnd->bhmn", q.astype(np.float64), K.astype(np.float64)) * q.shape[-1] ** -0.5
    C = np.stack([np.stack([hsr.canonical_scores(q[b, h], K[b, h]) for h in range(q.shape[1])])
                  for b in range(q.shape[0])]).astype(np.float64)
    if causal:
        M, N = S.shape[-2:]
        vis = np.arange(N)[None] <= (N - M + np.arange(M))[:, None]
        S, C = np.where(vis, S, -np.inf), np.where(vis, C, -np.inf)
    top = S.max(-1, keepdims=True)
    W = np.exp(S - top)
    out = np.einsum("bhmn,bhnd->bhmd", W, np.repeat(v, g, axis=1).astype(np.float64)) / W.sum(-1)[..., None]
    return out, np.log(W.sum(-1)) + top[..., 0], S, C


def _true_dropped(S, C, lse, t):
    drop = np.where(C < t[..., None], S, -np.inf)
    top = np.max(drop, axis=-1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.exp(np.log(np.exp(drop - safe).sum(-1)) + safe[..., 0] - lse)


@st.composite
def _problem(draw):
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(8, 160))
    R = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=R - 1, max_size=R - 1, unique=True)))
    hkv, g = draw(st.sampled_from([(1, 1), (2, 1), (1, 3), (2, 2)]))
    M = draw(st.integers(1, min(n, 12)))
    d = draw(st.sampled_from([8, 16]))
    k = rng.standard_normal((1, hkv, n, d)).astype(np.float32) * draw(st.sampled_from([0.5, 1.0, 2.0]))
    v = rng.standard_normal((1, hkv, n, d)).astype(np.float32)
    q = rng.standard_normal((1, hkv * g, M, d)).astype(np.float32) * 1.5
    return k, v, q, [0, *cuts, n]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_problem(), st.booleans(), st.sampled_from(["relu", "tau", "topk", "eps"]), st.sampled_from(["tree", "code"]))
def test_sharded_equals_single_and_bound_is_certified(problem, causal, mode, method):
    k, v, q, cuts = problem
    single = hsr.KVCacheIndex(k, v, method=method)
    opts = {"relu": dict(kind="relu", bias=0.2), "tau": dict(kind="softmax", tau=1.0),
            "topk": dict(kind="softmax", topk=3), "eps": dict(kind="softmax", eps=1e-3)}[mode]
    out, lse, bound = _simulate(k, v, q, cuts, causal=causal, method=method, **opts)
    ref, info = hsr.hsr_attention(q, single, causal=causal, return_info=True, dense_below=0, **opts)
    dense, d_lse, S, C = _dense64(q, k, v, causal)
    vmax = float(np.abs(v).max())
    if mode == "eps":
        assert (bound <= 1e-3).all()
    else:  # the same keys as one index: the same output and normaliser
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        fin = np.isfinite(info.lse)
        np.testing.assert_array_equal(np.isfinite(lse), fin)
        np.testing.assert_allclose(lse[fin], info.lse[fin], rtol=1e-9, atol=1e-7)
    if mode != "relu":
        if mode == "tau":
            t = np.full(C.shape[:3], 1.0)
        elif mode == "topk":
            t = -np.sort(-C, axis=-1)[..., 2] if C.shape[-1] >= 3 else np.full(C.shape[:3], -np.inf)
        if mode in ("tau", "topk"):  # the global bound holds against the exact dropped mass
            true = _true_dropped(S, C, d_lse, t)
            assert (true <= bound * (1 + 1e-4) + 1e-12).all()
        # and bounds the error of the output, as the single index's does
        assert np.abs(out - dense).max() <= 2 * bound.max() * vmax + 1e-5


def test_bound_is_not_the_max_of_the_shards():
    """Two shards, each dropping half its mass: the global fraction is their mass-weighted mean."""
    lse = np.log([[1.0], [3.0]])          # kept masses 1 and 3
    eps = np.array([[0.5], [0.25]])       # dropped 1 and 1
    lu = hd.dropped_log_mass(lse, eps)
    np.testing.assert_allclose(np.exp(lu), [[1.0], [1.0]], rtol=1e-8)
    total = hd.dropped_fraction(np.logaddexp.reduce(lse, axis=0), np.logaddexp.reduce(lu, axis=0))
    np.testing.assert_allclose(total, [2.0 / 6.0], rtol=1e-8)


def test_dropped_log_mass_edges():
    lu = hd.dropped_log_mass(np.array([0.0, -np.inf, 0.0, 0.0]), np.array([0.0, 1.0, 1.0, 0.5]))
    assert lu[0] == -np.inf and np.isnan(lu[1]) and np.isnan(lu[2])
    assert lu[3] == pytest.approx(np.log1p(1e-9))
    assert hd.dropped_fraction(-np.inf, 0.0) == 1.0 and hd.dropped_fraction(-np.inf, -np.inf) == 0.0


def test_merge_attention_handles_empty_shards_and_large_alpha():
    O = np.array([[[1.0, 2.0]], [[0.0, 0.0]], [[3.0, 4.0]]])
    L = np.array([[800.0], [-np.inf], [800.0 + np.log(3.0)]])  # exp(800) overflows: merged in logs
    out, lse = hd.merge_attention(O, L)
    np.testing.assert_allclose(out, [[2.5, 3.5]])
    np.testing.assert_allclose(lse, [800.0 + np.log(4.0)])
    out, lse = hd.merge_attention(np.zeros((2, 1, 2)), np.full((2, 1), -np.inf))
    assert (out == 0).all() and lse[0] == -np.inf


@given(st.integers(0, 500), st.integers(1, 9))
def test_shard_range_tiles_the_sequence(n, world):
    parts = [hd.shard_range(n, world, r) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_rejects_bad_input():
    with pytest.raises(ValueError, match="rank"):
        hd.shard_range(10, 2, 2)
    with pytest.raises(TypeError, match="world"):
        hd.shard_range(10, 2.0, 0)


def test_merge_range_and_topk_give_global_ids():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    cuts = [0, 70, 71, 300]
    single = hsr.HSRIndex(keys)
    parts = [hsr.HSRIndex(keys[a:b]).range_search(q, 1.0) for a, b in zip(cuts[:-1], cuts[1:])]
    lims, D, I = hd.merge_range(parts, cuts[:-1], 5)
    ref = single.range_search(q, 1.0)
    for i in range(5):
        assert sorted(I[lims[i]:lims[i + 1]]) == sorted(ref.I[ref.lims[i]:ref.lims[i + 1]])
    tk = [hsr.HSRIndex(keys[a:b]).topk(q, 6) for a, b in zip(cuts[:-1], cuts[1:])]
    res = hd.merge_topk(np.stack([t.D for t in tk]), np.stack([np.where(t.I >= 0, t.I + a, -1)
                                                               for t, a in zip(tk, cuts)]), 6)
    ref = single.topk(q, 6)
    np.testing.assert_array_equal(res.I, ref.I)
    np.testing.assert_array_equal(res.D, ref.D)


def test_row_runs():
    # 10 queries at positions 90..99 of 100; a shard [50, 95) sees rows 0..4 causally, none fully
    assert row_runs(10, 100, 50, 95, True) == (0, 5)
    assert row_runs(10, 100, 95, 100, True) == (5, 10)
    assert row_runs(10, 100, 0, 50, True) == (0, 0)
    assert row_runs(10, 100, 0, 50, False) == (0, 0)


def test_hsr_attention_takes_one_tau_per_query_row():
    """The seam the sharded topk uses: tau shaped like q without d equals one call per row."""
    rng = np.random.default_rng(5)
    k = rng.standard_normal((1, 2, 200, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 200, 16)).astype(np.float32)
    q = rng.standard_normal((1, 4, 3, 16)).astype(np.float32)
    tau = rng.uniform(0.0, 2.0, (1, 4, 3))
    cache = hsr.KVCacheIndex(k, v)
    out = hsr.hsr_attention(q, cache, kind="softmax", tau=tau)
    for h in range(4):
        for m in range(3):
            one = hsr.KVIndex(k[0, h // 2], v[0, h // 2])
            ref = hsr.hsr_attention(q[0, h, m], one, kind="softmax", tau=float(tau[0, h, m]))
            np.testing.assert_allclose(out[0, h, m], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tau must be"):
        hsr.hsr_attention(q, cache, kind="softmax", tau=np.zeros((1, 4, 2)))


@pytest.fixture
def one_rank_group(tmp_path):
    import datetime

    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", init_method="file://" + str(tmp_path / "store"), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=10))
    yield
    dist.destroy_process_group()


def test_bad_input_names_the_problem(one_rank_group):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 2, 50, 8)).astype(np.float32)
    cache = hd.ShardedKVCache.from_full(k, k)
    with pytest.raises(ValueError, match=r"q must be \(batch=1"):
        hsr.hsr_attention(np.zeros((1, 4, 8), np.float32), cache)
    with pytest.raises(ValueError, match="bias='paper'"):
        hsr.hsr_attention(np.zeros((1, 4, 1, 8), np.float32), cache, bias="paper")
    with pytest.raises(ValueError, match="tau must be"):
        hsr.hsr_attention(np.zeros((1, 4, 1, 8), np.float32), cache, kind="softmax", tau=np.zeros(3))
    with pytest.raises(TypeError, match="local must be"):
        hd.ShardedKVCache(k)
    with pytest.raises(TypeError, match="local must be an HSRIndex"):
        hd.ShardedIndex(cache)
    # after reported failures the group still works; one rank equals one cache
    q = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    ref = hsr.hsr_attention(q, hsr.KVCacheIndex(k, k), kind="relu", bias=0.1)
    np.testing.assert_allclose(hsr.hsr_attention(q, cache, kind="relu", bias=0.1), ref, rtol=1e-6, atol=1e-6)
    idx = hd.ShardedIndex.from_full(k[0, 0])
    with pytest.raises(ValueError, match="queries must be"):
        idx.range_search(np.zeros((2, 3), np.float32), 0.0)
    with pytest.raises(ValueError, match="k must be"):
        idx.search(k[0, 0, :2], 0)


def test_needs_an_initialised_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        hd.ShardedIndex(hsr.HSRIndex(np.zeros((4, 3), np.float32)))
