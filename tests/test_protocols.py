"""The two protocols (hsr/_protocol.py): every index answers the search protocol alike, every
cache the attention protocol, and a cache refuses, by name, what it does not support."""
import numpy as np
import pytest

import hsr
from hsr import AttentionSpec, SearchIndex

torch = pytest.importorskip("torch")
#: where the GPU index's tensors live: a GPU, else the CPU under the Triton interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _lattice(n, d, seed):
    # small integers: every score is exact in float32 on both devices, so ties at tau are real ties
    rng = np.random.default_rng(seed)
    return rng.integers(-3, 4, size=(n, d)).astype(np.float32)


def _indexes(keys):
    from hsr.kernels.code_index import GPUCodeIndex

    return {"code": hsr.HSRIndex(keys, method="code"), "tree": hsr.HSRIndex(keys, method="tree", leaf_size=8),
            "brute": hsr.BruteForceIndex(keys), "gpu_code": GPUCodeIndex(_t(keys))}


def _t(x):
    return torch.as_tensor(x).to(DEV)


def _np(x):
    return x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _sets(res):
    lims, _, ids = (_np(x) for x in res)
    return [set(ids[lims[i]:lims[i + 1]].tolist()) for i in range(len(lims) - 1)]


def test_every_index_answers_the_search_protocol_alike():
    d = 16
    keys = _lattice(300, d, 0)
    more = _lattice(40, d, 1)
    Q = _lattice(7, d, 2)
    gone = np.array([0, 5, 299, 310])
    live = np.setdiff1d(np.arange(340), gone)
    every = np.vstack([keys, more])
    scores = every[live] @ Q.T  # exact: small integers
    want_sets = [set(live[scores[:, i] >= 4.0].tolist()) for i in range(len(Q))]
    for name, idx in _indexes(keys).items():
        assert isinstance(idx, SearchIndex), name
        q = _t(Q) if name == "gpu_code" else Q
        added = idx.add(_t(more) if name == "gpu_code" else more)
        np.testing.assert_array_equal(_np(added), np.arange(300, 340), err_msg=name)
        idx.remove(_t(gone) if name == "gpu_code" else gone)
        assert idx.ntotal == len(idx) == len(live) and idx.d == d, name
        assert _sets(idx.range_search(q, 4.0)) == want_sets, name
        np.testing.assert_array_equal(_np(idx.count(q, 4.0)), [len(s) for s in want_sets], err_msg=name)
        D, I = (_np(x) for x in idx.search(q, 5))
        best = -np.sort(-scores, axis=0)[:5].T  # the k best scores per query (ids may tie)
        np.testing.assert_array_equal(D, best, err_msg=name)
        assert all(set(I[i]) <= set(live.tolist()) for i in range(len(Q))), name
        with pytest.raises(ValueError, match="already removed"):
            idx.remove(_t([5]) if name == "gpu_code" else [5])
        moved = idx.to("cpu")
        assert isinstance(moved, SearchIndex) and moved.ntotal == len(live), name
        assert _sets(moved.range_search(Q, 4.0)) == want_sets, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="HSRIndex.to('cpu') is the index itself")
def test_hsrindex_moves_with_its_removals():
    keys = _lattice(100, 16, 3)
    idx = hsr.HSRIndex(keys, method="code")
    idx.remove([1, 50])
    gpu = idx.to("cuda")
    assert gpu.ntotal == 98
    assert _sets(gpu.range_search(torch.from_numpy(keys[:3]).cuda(), 1.0)) == _sets(idx.range_search(keys[:3], 1.0))


def test_search_on_an_index_with_fewer_live_keys_than_k_pads():
    from hsr.kernels.code_index import GPUCodeIndex

    keys = _lattice(3, 16, 4)
    gpu = GPUCodeIndex(_t(keys))
    gpu.remove(_t([1]))
    D, I = gpu.search(_t(keys[:1]), 4)
    assert (I[0, 2:] == -1).all() and torch.isinf(D[0, 2:]).all() and set(I[0, :2].tolist()) == {0, 2}


def test_every_cache_answers_the_attention_protocol():
    rng = np.random.default_rng(5)
    k = rng.standard_normal((1, 2, 64, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 64, 16)).astype(np.float32)
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    cpu = hsr.KVCacheIndex(k, v)
    spec = AttentionSpec(kind="softmax", tau=0.3, causal=True)
    out, info = cpu.attend(q, spec, with_info=True)
    ref, _ = hsr.hsr_attention(q, cpu, kind="softmax", tau=0.3, causal=True, return_info=True)
    np.testing.assert_array_equal(out, ref)
    assert info.keys_selected.shape == (1, 4, 1) and info.n_keys == 64
    assert cpu.attend(q, spec)[1] is None


@pytest.mark.parametrize("options, feature", [(dict(kind="softmax"), "eps"), (dict(kind="softmax", topk=3), "topk"),
                                              (dict(bias="paper"), "paper_bias"), (dict(dense_below=0), "dense_below"),
                                              (dict(kind="softmax", tau=1.0, eps=0.1), "tau_eps")])
def test_a_cache_refuses_what_it_does_not_support_by_name(options, feature):
    class TauOnly:  # the smallest cache: ReLU^alpha and softmax at a threshold, nothing else
        supports = frozenset({"tau"})

        def attend(self, q, spec, *, with_info=False):
            return q, None

    with pytest.raises(ValueError, match=f"TauOnly does not support {feature}"):
        hsr.hsr_attention(np.zeros(4), TauOnly(), **options)
    assert hsr.hsr_attention(np.ones(4), TauOnly(), kind="softmax", tau=1.0)[0] == 1.0


def test_not_a_cache_is_a_type_error():
    with pytest.raises(TypeError, match="not an attention cache"):
        hsr.hsr_attention(np.zeros(4), object())


@pytest.mark.parametrize("options, match", [(dict(kind="linear"), "kind must be"), (dict(alpha=0), "alpha must be"),
                                            (dict(alpha=2.5), "alpha must be"), (dict(scale=-1.0), "scale must be"),
                                            (dict(kind="softmax", eps=2.0), "eps must be"),
                                            (dict(kind="softmax", eps=0.1, topk=3), "at most one"),
                                            (dict(kind="softmax", eps=0.1, tau=1.0, topk=3), "at most one"),
                                            (dict(tau=1.0), "apply to kind='softmax' only"), (dict(bias="median"), "bias must be"),
                                            (dict(causal="yes"), "causal must be"), (dict(dense_below=-1), "dense_below")])
def test_the_spec_names_a_bad_option(options, match):
    with pytest.raises(ValueError, match=match):
        AttentionSpec(**options)


def test_a_cpu_cache_refuses_a_guarded_threshold():
    """tau with eps is the GPU code cache's guarded threshold: a CPU cache names what it lacks."""
    rng = np.random.default_rng(5)
    k = rng.standard_normal((64, 16)).astype(np.float32)
    kv = hsr.KVIndex(k, k)
    spec = AttentionSpec(kind="softmax", tau=1.0, eps=0.1)
    assert {"tau", "tau_eps"} <= spec.features() and "eps" not in spec.features()
    assert spec.guard_eps == 0.1 and spec.softmax_eps is None
    assert AttentionSpec(kind="softmax", tau=1.0).guard_eps is None and AttentionSpec(kind="softmax", eps=0.1).guard_eps is None
    with pytest.raises(ValueError, match="does not support tau_eps"):
        hsr.hsr_attention(rng.standard_normal((2, 16)).astype(np.float32), kv, kind="softmax", tau=1.0, eps=0.1)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, float("nan"), float("inf"), True, "0.1", None])
def test_a_share_outside_the_open_unit_interval_is_refused_by_name(bad):
    from hsr._protocol import check_share

    with pytest.raises(ValueError, match="calibrate_at must be in"):
        check_share(bad, "calibrate_at")


def test_a_share_inside_is_a_float():
    from hsr._protocol import check_share

    assert check_share(np.float32(0.25), "eps") == 0.25 and type(check_share(1e-3, "eps")) is float
