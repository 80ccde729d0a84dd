"""The GPU code filter (``hsr.kernels.CodeKVCache``) against float64 dense references.

Under the Triton interpreter on the CPU in CI, on the GPU where there is one. Integer-valued
keys and queries make every score exact in fp32, so ties at tau are tested exactly; for
real-valued inputs keys within fp32 rounding of tau are left out of the comparison.
"""
import math

import pytest
import torch

from hsr import AttentionSpec
from hsr.kernels.codes import CodeKVCache

from ._util import code_inputs as _inputs


def _reference(q, k, v, tau, kind, alpha, bias, scale):
    """Dense float64 attention over keys with score >= tau (causal: last M positions)."""
    B, Hq, M, D = q.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    s = q.double() @ kk.transpose(-1, -2)
    N = k.shape[2]
    pos = torch.arange(N, device=q.device)
    lim = N - M + torch.arange(M, device=q.device)
    keep = (s >= tau[..., None]) & (pos[None, :] <= lim[:, None])
    if kind == "softmax":
        z = torch.where(keep, s * scale, -math.inf)
        w = torch.exp(z - z.amax(-1, keepdim=True).clamp_min(-1e300))
        w = torch.where(keep, w, 0.0)
    else:
        w = torch.where(keep, torch.clamp(s * scale - bias, min=0) ** alpha, 0.0)
    den = w.sum(-1, keepdim=True)
    out = torch.where(den > 0, (w @ vv) / torch.where(den > 0, den, 1.0), 0.0)
    return out, s, keep


@pytest.mark.parametrize("lattice", [True, False])
@pytest.mark.parametrize("B,Hkv,G,M,N,D", [(1, 1, 1, 1, 70, 32), (2, 2, 3, 1, 200, 64), (1, 2, 2, 3, 129, 32)])
def test_filter_keeps_every_key_and_attention_matches(device, lattice, B, Hkv, G, M, N, D):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _inputs(B, Hkv, G, M, N, D, dtype, device, lattice, seed=N + D)
    cache = CodeKVCache(k, v, seed=1)
    scale = D ** -0.5
    s_all = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)
    srt = s_all.sort(-1).values
    if lattice:  # per-row thresholds that tie existing scores exactly (fp32 sums are exact)
        tau = srt[..., 2 * N // 3].clone()
    else:  # halfway between two scores: no key within fp32 rounding of tau
        tau = (srt[..., 2 * N // 3] + srt[..., 2 * N // 3 + 1]) / 2
    tau = tau.float()  # GPU thresholds are float32 (lattice ties and midpoints are exact in it)
    plan = cache.plan(q, tau)
    surv = [plan.survivors(i).cpu() for i in range(B * Hkv)]
    assert all((x[1:] > x[:-1]).all() for x in surv)  # ascending, no duplicates
    surv = [set(x.tolist()) for x in surv]
    for b in range(B):
        for hq in range(Hkv * G):
            need = set(torch.nonzero(s_all[b, hq, -1] >= tau[b, hq, -1].double()).flatten().cpu().tolist())
            assert need <= surv[b * Hkv + hq // G]  # no false negative
    for kind in ("softmax", "relu"):
        bias = 0.3 if kind == "relu" else 0.0
        t = torch.full_like(tau, bias / scale) if kind == "relu" else tau
        plan = cache.plan(q, t, bias=bias)
        out, lse = cache.run(q, plan, kind=kind, alpha=2, scale=scale)
        ref, s, keep = _reference(q, k, v, t.double(), kind, 2, bias, scale)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: P is rounded for the PV product
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        empty = ~keep.any(-1)
        assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()


def test_append_codes_new_keys(device):
    dtype = torch.float32
    q, k, v = _inputs(1, 2, 2, 1, 300, 32, dtype, device, False, seed=3)
    cache = CodeKVCache(k[:, :, :100], v[:, :, :100], capacity=64)
    for s in range(100, 300, 37):
        cache.add(k[:, :, s:s + 37], v[:, :, s:s + 37])
    assert len(cache) == 300
    full = CodeKVCache(k, v)
    torch.testing.assert_close(cache.codes[:, :, :300], full.codes[:, :, :300])
    torch.testing.assert_close(cache.err[:, :, :300], full.err[:, :, :300])
    out, _ = cache.attend(q, AttentionSpec(kind="relu", bias=0.2))
    ref, *_ = _reference(q, k, v, torch.full(q.shape[:3], 0.2 / 32 ** -0.5, dtype=torch.float64, device=q.device),
                         "relu", 2, 0.2, 32 ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_bad_inputs(device):
    q, k, v = _inputs(1, 2, 2, 1, 40, 32, torch.float32, device, False, seed=4)
    with pytest.raises(ValueError, match="head dim"):
        CodeKVCache(k[..., :24], v[..., :24])
    with pytest.raises(ValueError, match="NaN"):
        CodeKVCache(k.clone().fill_(math.nan), v)
    with pytest.raises(TypeError, match="dtype"):
        CodeKVCache(k.int(), v.int())
    cache = CodeKVCache(k, v)
    with pytest.raises(ValueError, match="does not fit"):
        cache.plan(q[:, :, :, :16], 0.0)
    with pytest.raises(ValueError, match="tau="):
        cache.attend(q, AttentionSpec(kind="softmax"))
    with pytest.raises(ValueError, match="kind"):
        cache.attend(q, AttentionSpec(tau=0.0, kind="linear"))
    with pytest.raises(ValueError, match="alpha must be at most"):
        cache.attend(q, AttentionSpec(kind="relu", alpha=5000))
    with pytest.raises(ValueError, match="tau must"):
        cache.plan(q, torch.zeros(5, device=q.device))
    with pytest.raises(ValueError, match="floating-point"):
        cache.plan(q, torch.zeros(4, dtype=torch.int32, device=q.device))
    with pytest.raises(ValueError, match="alpha must be an integer"):
        cache.attend(q, AttentionSpec(kind="relu", alpha=2.5))
    with pytest.raises(ValueError, match="one device"):
        CodeKVCache(k, v.to("meta"))
    # a NaN query is refused by each checked entry (attend checks once for plan and run)
    bad = q.clone()
    bad[0, 1, 0, 3] = math.nan
    plan = cache.plan(q, 0.0)
    for call in (lambda: cache.plan(bad, 0.0), lambda: cache.run(bad, plan, kind="relu"),
                 lambda: cache.attend(bad, AttentionSpec(kind="relu"))):
        with pytest.raises(ValueError, match="NaN"):
            call()
    # a NaN threshold tensor would keep no key, a NaN/Inf bias poison the weights: refused
    nan_tau = torch.zeros(4, device=q.device)
    nan_tau[2] = math.nan
    inf_bias = torch.zeros(4, device=q.device)
    inf_bias[1] = math.inf
    for call, what in ((lambda: cache.plan(q, nan_tau), "tau contains NaN"),
                       (lambda: cache.attend(q, AttentionSpec(tau=nan_tau, kind="softmax")), "tau contains NaN"),
                       (lambda: cache.attend(q, AttentionSpec(kind="relu", bias=inf_bias)), "NaN or Inf")):
        with pytest.raises(ValueError, match=what):
            call()
    cache.plan(q, torch.full((4,), -math.inf, device=q.device))  # -inf: keep every key, allowed
    # |q| |k| past the filter's fp32 bounds would drop keys: refused (finite q, squares overflowing)
    for big in (1e19, 1e36):
        with pytest.raises(ValueError, match="fp32 bounds"):
            cache.plan(q * big, 0.0)
    cache.check()  # every problem above was raised once and cleared


def test_kvcacheindex_to_device_and_hsr_attention(device):
    import numpy as np

    import hsr

    rng = np.random.default_rng(5)
    k = rng.standard_normal((1, 2, 150, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 150, 32)).astype(np.float32)
    q = rng.standard_normal((1, 4, 1, 32)).astype(np.float32)
    cpu = hsr.KVCacheIndex(k, v)
    gpu = cpu.to(device, dtype=torch.float32)
    assert len(gpu) == 150
    out_gpu = hsr.hsr_attention(torch.from_numpy(q).to(device), gpu, kind="relu", alpha=2, bias=0.4)
    out_cpu = hsr.hsr_attention(q, cpu, kind="relu", alpha=2, bias=0.4)
    np.testing.assert_allclose(out_gpu.cpu().numpy(), out_cpu, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="CodeKVCache does not support eps"):
        hsr.hsr_attention(torch.from_numpy(q).to(device), gpu, kind="softmax", eps=1e-3)
    # top-k: the same keys on both devices (real-valued scores: no ties within fp32 rounding)
    out_gpu = hsr.hsr_attention(torch.from_numpy(q).to(device), gpu, kind="softmax", topk=4)
    out_cpu = hsr.hsr_attention(q, cpu, kind="softmax", topk=4)
    np.testing.assert_allclose(out_gpu.cpu().numpy(), out_cpu, rtol=1e-4, atol=1e-5)
    # the protocol: the same spec, the same answer on both devices; info counts on the GPU too
    spec = hsr.AttentionSpec(kind="softmax", tau=0.5)
    out_c, info_c = cpu.attend(q, spec, with_info=True)
    out_g, info_g = gpu.attend(torch.from_numpy(q).to(device), spec, with_info=True)
    np.testing.assert_allclose(out_g.cpu().numpy(), out_c, rtol=1e-4, atol=1e-5)
    assert info_g.keys_selected is None and (info_g.keys_scored.cpu().numpy() >= info_c.keys_selected).all()
    np.testing.assert_allclose(info_g.lse.cpu().numpy(), info_c.lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lattice", [True, False])
def test_hsrindex_to_device_range_search_matches_cpu(device, lattice):
    import numpy as np

    import hsr

    rng = np.random.default_rng(7)
    if lattice:  # integer-valued: fp32 sums are exact, so ties at tau must agree exactly
        K = rng.integers(-3, 4, (300, 32)).astype(np.float32)
        Q = rng.integers(-3, 4, (70, 32)).astype(np.float32)
    else:
        K = rng.standard_normal((300, 32)).astype(np.float32)
        Q = rng.standard_normal((70, 32)).astype(np.float32)
    K[5] = 0
    K[7] = K[8]
    cpu = hsr.HSRIndex(K)
    S = hsr.canonical_scores(Q, K).astype(np.float64)
    srt = np.sort(S, axis=1)
    tau = srt[:, 250] if lattice else (srt[:, 250] + srt[:, 251]) / 2
    from hsr.kernels.code_index import GPUCodeIndex

    # on a CPU-only machine "cpu" means the index itself: build the Triton index directly there
    gpu = cpu.to(device) if device != "cpu" else GPUCodeIndex(torch.from_numpy(K))
    assert isinstance(gpu, GPUCodeIndex) and len(gpu) == 300
    lims, scores, ids = gpu.range_search(torch.from_numpy(Q).to(device), torch.from_numpy(tau).float().to(device))
    cl, cs, ci = cpu.range_search(Q, tau.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(lims.cpu().numpy(), cl)
    np.testing.assert_array_equal(ids.cpu().numpy(), ci)
    np.testing.assert_allclose(scores.cpu().numpy(), cs, rtol=1e-5, atol=1e-5)
    assert gpu.count(torch.from_numpy(Q[:3]).to(device), 1e9).tolist() == [0, 0, 0]
    new = gpu.add(torch.from_numpy(K[:4]).to(device))
    assert new.tolist() == [300, 301, 302, 303] and len(gpu) == 304
    assert cpu.to("cpu") is cpu
    # removals travel both ways (the same ids): the device index comes back to the CPU
    gpu.remove(torch.tensor([1, 302], device=gpu.device))
    cpu.add(K[:4])
    cpu.remove([1, 302])
    back = gpu.to("cpu")
    assert len(back) == len(cpu) == 302 and back.n_total == 304
    bl, _, bi = back.range_search(Q, tau.astype(np.float32).astype(np.float64))
    cl, _, ci = cpu.range_search(Q, tau.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(bl, cl)
    np.testing.assert_array_equal(bi, ci)


def test_concurrent_add_and_attend_see_one_state(device):
    # a writer thread grows the cache while a reader attends: every result is the attention over
    # one of the cache's serial states (100, 120, ..., 300 keys), never a half-grown cache
    import threading

    q, k, v = _inputs(1, 2, 2, 1, 300, 32, torch.float32, device, False, seed=8)
    cache = CodeKVCache(k[:, :, :100], v[:, :, :100], capacity=64)
    states = {}
    for n in range(100, 301, 20):
        tau = torch.full(q.shape[:3], 0.2 / 32 ** -0.5, dtype=torch.float64, device=q.device)
        states[n] = _reference(q, k[:, :, :n], v[:, :, :n], tau, "relu", 2, 0.2, 32 ** -0.5)[0]
    seen, errors = [], []

    def writer():
        try:
            for s in range(100, 300, 20):
                cache.add(k[:, :, s:s + 20], v[:, :, s:s + 20])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive() or len(seen) < 3:
        seen.append(cache.attend(q, AttentionSpec(kind="relu", bias=0.2))[0].double())
    t.join()
    assert not errors
    for out in seen:
        assert any(torch.allclose(out, ref, atol=1e-5, rtol=1e-5) for ref in states.values())
    assert torch.allclose(seen[-1], states[300], atol=1e-5, rtol=1e-5)
