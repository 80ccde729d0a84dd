"""Sharded index and KV cache over 2-4 gloo processes on the CPU equal the single index."""

import numpy as np
import pytest

import hsr
import hsr.distributed  # noqa: F401  (hsr does not import it itself)
from tests.distributed import _data
from tests.distributed._launch import run_world

pytest.importorskip("torch.distributed")


def _dense64(q, k, v, causal):
    """float64 softmax attention, its lse and the scores (GQA: each kv head serves HQ / HKV
    query heads); also the canonical float32 scores (the index's, which decide what is kept)."""
    g = _data.HQ // _data.HKV
    K = np.repeat(k, g, axis=1)
    V = np.repeat(v, g, axis=1).astype(np.float64)
    S = np.einsum("bhmd,bhnd->bhmn", q.astype(np.float64), K.astype(np.float64)) * q.shape[-1] ** -0.5
    C = np.stack([np.stack([hsr.canonical_scores(q[b, h], K[b, h]) for h in range(q.shape[1])])
                  for b in range(q.shape[0])]).astype(np.float64)
    if causal:
        M, N = S.shape[-2:]
        vis = np.arange(N)[None] <= (N - M + np.arange(M))[:, None]
        S, C = np.where(vis, S, -np.inf), np.where(vis, C, -np.inf)
    top = S.max(-1, keepdims=True)
    W = np.exp(S - top)
    lse = np.log(W.sum(-1)) + top[..., 0]
    return np.einsum("bhmn,bhnd->bhmd", W, V) / W.sum(-1)[..., None], lse, np.abs(v).max(), S, C


def _true_dropped(S, C, lse, opts):
    """The exact (float64) fraction of the softmax mass outside the kept keys: those whose
    canonical score reaches tau or the k-th best."""
    if "tau" in opts:
        t = np.broadcast_to(np.reshape(opts["tau"], (1, -1, 1)) if np.ndim(opts["tau"]) else opts["tau"],
                            C.shape[:3])
    else:
        t = -np.sort(-C, axis=-1)[..., opts["topk"] - 1]
    drop = np.where(C < t[..., None], S, -np.inf)
    top = np.max(drop, axis=-1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.exp(np.log(np.exp(drop - safe).sum(-1)) + safe[..., 0] - lse)


def _single_refs():
    k, v = _data.kv_cache()
    single = hsr.KVCacheIndex(k, v)
    refs = {}
    for m_name, m in (("decode", _data.M_DECODE), ("prefill", _data.M_PREFILL)):
        q = _data.queries(m)
        for causal in (False, True):
            for name, kind, opts in _data.CASES:
                if m_name == "prefill" and name in ("soft_topk", "relu_a3_heads"):
                    continue
                out, info = hsr.hsr_attention(q, single, kind=kind, causal=causal, return_info=True, **opts)
                refs[(m_name, causal, name)] = (out, info.lse, info.dropped_bound, info.keys_selected)
                if kind == "softmax":
                    refs[(m_name, causal, name, "dense")] = _dense64(q, k, v, causal)
    kn, vn = _data.new_tokens()
    single.add(kn, vn)
    refs["after_add"] = hsr.hsr_attention(_data.queries(1), single, kind="softmax", tau=2.0, causal=True)
    return refs


@pytest.fixture(scope="module")
def refs():
    return _single_refs()


@pytest.fixture(scope="module", params=[2, 3, 4])
def world_results(request, tmp_path_factory):
    world = request.param
    results, seconds = run_world("battery", world, tmp_path_factory.mktemp(f"w{world}"), deadline=55.0)
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} of {world} left no result ({seconds:.1f} s)"
        assert "error" not in res, f"rank {r} of {world}: {res['error'][2]}"
    return world, results


def test_every_rank_gets_the_same_result(world_results):
    world, results = world_results
    for res in results[1:]:
        for key, val in results[0].items():
            if key == "after_add_local" or key[0] == "remove_error":  # per-rank values (messages name the rank)
                continue
            a, b = val, res[key]
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(key))


def test_shards_are_contiguous_and_balanced(world_results):
    world, results = world_results
    starts = results[0]["starts"]
    assert starts == [hsr.distributed.shard_range(_data.N, world, r)[0] for r in range(world)]


@pytest.mark.parametrize("m_name", ["decode", "prefill"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_single_index(world_results, refs, m_name, causal):
    world, results = world_results
    res = results[0]
    for name, kind, opts in _data.CASES:
        key = (m_name, causal, name)
        if key not in refs:
            continue
        out, lse, bound, sel = res[key]
        r_out, r_lse, r_bound, r_sel = refs[key]
        if name == "soft_eps":  # each shard meets eps alone: other keys, same certificate
            dense, d_lse, vmax = refs[key + ("dense",)][:3]
            assert (bound <= 1e-3).all()
            assert np.abs(out - dense).max() <= 2 * bound.max() * vmax + 1e-5
            continue
        np.testing.assert_array_equal(sel, r_sel, err_msg=str(key))  # the same keys
        np.testing.assert_allclose(out, r_out, rtol=2e-5, atol=2e-5, err_msg=str(key))
        fin = np.isfinite(r_lse)
        np.testing.assert_array_equal(np.isfinite(lse), fin)
        np.testing.assert_allclose(lse[fin], r_lse[fin], rtol=1e-9, atol=1e-9, err_msg=str(key))
        if kind == "softmax":  # the combined bound is certified against the dense softmax
            dense, d_lse, vmax, S, C = refs[key + ("dense",)]
            true = _true_dropped(S, C, d_lse, opts)
            # certified, up to the float32 rounding of the scores the index computes
            assert (true <= bound * (1 + 1e-4) + 1e-12).all(), str(key)
            assert (bound <= 1.0).all()
            assert np.abs(out - dense).max() <= 2 * bound.max() * vmax + 1e-5


def test_add_goes_to_the_last_rank(world_results, refs):
    world, results = world_results
    n = [hsr.distributed.shard_range(_data.N, world, r) for r in range(world)]
    for r, res in enumerate(results):
        extra = 3 if r == world - 1 else 0
        assert res["after_add_local"] == n[r][1] - n[r][0] + extra
    np.testing.assert_allclose(results[0]["after_add"], refs["after_add"], rtol=2e-5, atol=2e-5)


def test_save_and_load_per_rank(world_results):
    world, results = world_results
    res = results[0]
    assert res["loaded_n"] == _data.N + 3
    np.testing.assert_array_equal(res["loaded"], res["after_add"])


def test_one_head_tree_shards(world_results):
    world, results = world_results
    k, v, q = _data.one_head()
    single = hsr.KVIndex(k, v, method="tree")
    for name, kind, opts in (("relu", "relu", dict(alpha=2, bias=0.2)), ("soft_tau", "softmax", dict(tau=1.5)),
                             ("soft_eps", "softmax", dict(eps=1e-4)), ("soft_topk", "softmax", dict(topk=7))):
        out, lse, bound = results[0][("one", name)]
        ref, info = hsr.hsr_attention(q, single, kind=kind, causal=True, return_info=True, **opts)
        if name == "soft_eps":
            dense = hsr.dense_softmax_attention(q, k, v, causal=True)
            assert (bound <= 1e-4).all()
            assert np.abs(out - dense).max() <= 2 * bound.max() * np.abs(v).max() + 1e-5
        else:
            np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5, err_msg=name)
            np.testing.assert_allclose(lse, info.lse, rtol=1e-9, atol=1e-9, err_msg=name)
    one = results[0][("one", "single")]
    assert one.shape == (_data.D1,)
    np.testing.assert_allclose(one, hsr.hsr_attention(q[0], single, kind="relu", bias=0.2), rtol=2e-5, atol=2e-5)


def _sets(res):
    lims, D, I = res
    return [dict(zip(I[lims[i]:lims[i + 1]].tolist(), D[lims[i]:lims[i + 1]].tolist())) for i in range(len(lims) - 1)]


def test_range_search_global_ids(world_results):
    world, results = world_results
    ks, qs = _data.search_keys()
    single = hsr.HSRIndex(ks)
    res = results[0]
    assert isinstance(res["range"][0], np.ndarray) and res["range"][2].dtype == np.int64
    assert _sets(res["range"]) == _sets(single.range_search(qs, 2.5))
    assert _sets(res["range_causal"]) == _sets(single.range_search(qs, np.linspace(1.0, 3.0, 6),
                                                                  max_id=np.arange(6) * 350))
    assert _sets(res["range_loaded"]) == _sets(res["range"])
    D, I = single.search(qs, 9, max_id=1700)
    np.testing.assert_array_equal(res["topk"][1], I)
    np.testing.assert_array_equal(res["topk"][0], D)
    np.testing.assert_array_equal(res["added_ids"], np.arange(2000, 2004))
    single.add(ks[:4] * 3)
    assert _sets(res["range_added"]) == _sets(single.range_search(qs, 2.5))


def test_remove_count_and_live_ntotal(world_results):
    world, results = world_results
    ks, qs = _data.search_keys()
    single = hsr.HSRIndex(ks)
    single.add(ks[:4] * 3)
    single.remove(np.r_[0, 3, 999, 1000, 1499, 1999, 2001])
    for res in results:
        ntotal, n_live, n_total = res["removed_sizes"]
        rng, counts, (D, I) = res["removed_range"], res["removed_count"], res["removed_topk"]
        assert ntotal == n_live == single.ntotal == 1997 and n_total == 2004
        assert _sets(rng) == _sets(single.range_search(qs, 2.5))
        np.testing.assert_array_equal(counts, single.count(qs, 2.5))
        D1, I1 = single.search(qs, 9)
        np.testing.assert_array_equal(I, I1)
        np.testing.assert_array_equal(D, D1)
        assert "already removed" in res[("remove_error", 0)]
        assert "out of range" in res[("remove_error", 2004)]
        assert "repeated" in res[("remove_error", 5)]
        assert res["after_errors"] == 1997


def test_code_cache_shards_match_one_cache(tmp_path):
    """CodeKVCache shards (the GPU path; Triton's interpreter on CPU tensors), 2 ranks."""
    pytest.importorskip("triton")
    results, seconds = run_world("code", 2, tmp_path, deadline=55.0)
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, (r, res)
        for kind in ("softmax", "relu"):
            out, ref = res[kind]
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=kind)
            np.testing.assert_array_equal(out, results[0][kind][0])


@pytest.mark.parametrize("world", [2, 3])
def test_striped_decode_step_equals_one_cache(tmp_path, world):
    """StripedDecodeStep (positions striped over the ranks, partials merged on the device) gives
    one cache's decode loop, step by step, on every rank; a NaN query row is NaN, and check()
    raises on every rank."""
    pytest.importorskip("triton")
    results, seconds = run_world("striped", world, tmp_path, deadline=110.0, timeout=60.0)
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, (r, res)
        for kind in ("softmax", "relu"):
            outs, refs, held = res[kind]
            assert held == len(range(r, 26, world))  # 21 prompt + 5 decoded, striped
            for i, (out, ref) in enumerate(zip(outs, refs)):
                np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=f"{kind} step {i}")
                np.testing.assert_array_equal(out, results[0][kind][0][i])
        assert np.isnan(res["nan_row"][0, 1]).all() and np.isfinite(res["nan_row"][0, 0]).all()
        assert res["check"] is not None and "NaN" in res["check"][1], res["check"]
        # certify=True: the same outputs, and a bound on the dropped share over the whole cache
        # (every rank's keys) that holds at every step, is the same on every rank, and says something
        couts, bounds, shares = res["certified"]
        for i in range(len(couts)):
            np.testing.assert_array_equal(couts[i], res["softmax"][0][i])
            assert (shares[i] <= bounds[i]).all() and (bounds[i] <= 1).all(), (i, shares[i], bounds[i])
            np.testing.assert_array_equal(bounds[i], results[0]["certified"][1][i])
        assert 0 < np.mean(bounds) < 1
