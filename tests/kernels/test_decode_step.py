"""The GPU decode loop: add on the device, one step for every length, checks that never stall.

Under the Triton interpreter on the CPU in CI (a DecodeStep then runs eagerly, with the same
kernels), on the GPU (with a CUDA graph) where there is one.
"""
import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsr import AttentionSpec
from hsr.kernels._code_kernels import _hadamard_rows
from hsr.kernels.codes import CodeKVCache

from .test_codes import _inputs, _reference

# the fused step's three launches (rotation and add, filter, merge), named where a test
# compares forms: at d <= 64 the default is two (CodeKVCache.step_form)
THREE = dict(rotate_inside=False, add_in_filter=False)


def _row_thresholds(kind, shape, scale, seed, device):
    """Per-row ``(tau, bias)`` of ``shape`` (B, Hq, M): softmax a random tau in [0, 2) and no
    bias; ReLU a random bias in [0, 0.5) and the exact tau ``bias / scale``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "softmax":
        return (torch.rand(shape, generator=g) * 2).to(device), 0.0
    bias = (torch.rand(shape, generator=g) * 0.5).to(device)
    return bias / scale, bias


def _dense(q, k, v, kind, tau, bias, scale):
    t = torch.as_tensor(tau, dtype=torch.float64, device=q.device).expand(q.shape[:3])
    return _reference(q, k, v, t, kind, 2, bias, scale)[0]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_decode_loop_matches_dense_at_every_length(device, kind, dense):
    B, Hkv, G, D, n0, steps = 2, 2, 3, 32, 52, 12  # 64 keys: the smallest capacity
    q, k, v = _inputs(B, Hkv, G, 1, n0 + steps, D, torch.float32, device, True, seed=11)
    scale = D ** -0.5
    bias = 0.5 if kind == "relu" else 0.0
    tau = 2.0 if kind == "softmax" else bias / scale
    cache = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + steps)
    step = cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind=kind, tau=tau, bias=bias, dense=dense)
    for i in range(steps):
        n = n0 + i + 1
        qi = q.roll(i, dims=-1).contiguous()  # a new query every step
        out = step(qi, k[:, :, n - 1:n], v[:, :, n - 1:n])
        ref = _dense(qi, k[:, :, :n], v[:, :, :n], kind, tau, bias, scale)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        assert len(cache) == n
    assert cache.lengths.tolist() == [n0 + steps] * (B * Hkv)
    cache.check()
    # past the capacity: the one point that needs a new step
    with pytest.raises(ValueError, match="full"):
        step(q, k[:, :, :1], v[:, :, :1])
    cache.reserve(2 * cache.capacity)
    with pytest.raises(ValueError, match="reallocated"):
        step(q, k[:, :, :1], v[:, :, :1])
    step2 = cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind=kind, tau=tau, bias=bias)
    out = step2(q, k[:, :, :1], v[:, :, :1])
    kk = torch.cat([k, k[:, :, :1]], 2)
    vv = torch.cat([v, v[:, :, :1]], 2)
    torch.testing.assert_close(out.double(), _dense(q, kk, vv, kind, tau, bias, scale), atol=1e-5, rtol=1e-5)


def test_step_thresholds_are_a_buffer(device):
    q, k, v = _inputs(1, 1, 2, 1, 30, 16, torch.float32, device, True, seed=2)
    cache = CodeKVCache(k[:, :, :20], v[:, :, :20], capacity=32)
    step = cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="softmax", tau=torch.zeros(2, device=device))
    out = step(q, k[:, :, 20:21], v[:, :, 20:21])
    torch.testing.assert_close(out.double(), _dense(q, k[:, :, :21], v[:, :, :21], "softmax", 0.0, 0, 0.25),
                               atol=1e-5, rtol=1e-5)
    step.tau.fill_(3.0)  # new thresholds, in place: the next replay reads them
    out = step(q, k[:, :, 21:22], v[:, :, 21:22])
    torch.testing.assert_close(out.double(), _dense(q, k[:, :, :22], v[:, :, :22], "softmax", 3.0, 0, 0.25),
                               atol=1e-5, rtol=1e-5)


def test_filter_rotating_inside_keeps_the_same_survivors(device):
    q, k, v = _inputs(1, 2, 3, 1, 150, 64, torch.float32, device, False, seed=12)
    cache = CodeKVCache(k, v)
    a = cache._plan(q, 0.3)
    b = cache._plan(q, 0.3, rotate_inside=True)
    for bh in range(2):
        assert a.survivors(bh).tolist() == b.survivors(bh).tolist()


def test_stale_plan_is_refused(device):
    q, k, v = _inputs(1, 2, 2, 1, 90, 32, torch.float32, device, False, seed=5)
    cache = CodeKVCache(k[:, :, :40], v[:, :, :40])
    plan = cache.plan(q, 0.5)
    cache.add(k[:, :, 40:90], v[:, :, 40:90])
    with pytest.raises(ValueError, match="plan again"):
        cache.run(q, plan, kind="softmax")
    out, _ = cache.run(q, cache.plan(q, 0.5), kind="softmax")
    torch.testing.assert_close(out.double(), _dense(q, k, v, "softmax", 0.5, 0, 32 ** -0.5), atol=1e-5, rtol=1e-5)


def test_unchecked_bad_values_give_nan_and_are_raised_later(device):
    q, k, v = _inputs(1, 2, 2, 1, 60, 32, torch.float32, device, False, seed=6)
    cache = CodeKVCache(k, v)
    bad = q.clone()
    bad[0, 1, 0, 3] = math.inf
    out, _ = cache.attend(bad, AttentionSpec(kind="relu", bias=0.1), check=False)  # no synchronisation, no error
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2, 3]]).all()
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        cache.check()
    cache.check()  # raised once, cleared
    tau = torch.zeros(4, device=device)
    tau[3] = math.nan
    out, _ = cache.attend(q, AttentionSpec(kind="softmax", tau=tau), check=False)
    assert torch.isnan(out[0, 3]).all() and torch.isfinite(out[0, :3]).all()
    with pytest.raises(ValueError, match="tau contains NaN"):
        cache.check()
    # a NaN key added without a check poisons the cache: every answer NaN, and it stays said
    kk = k[:, :, :1].clone()
    kk[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        cache.add(kk, v[:, :, :1])  # checked: refused before anything is written
    assert len(cache) == 60
    cache.add(kk, v[:, :, :1], check=False)
    assert torch.isnan(cache.attend(q, AttentionSpec(kind="relu"), check=False)[0]).all()
    for _ in range(2):
        with pytest.raises(ValueError, match="poisoned"):
            cache.check()


def test_tau_of_another_dtype_or_device_keeps_the_same_keys(device):
    # lattice scores are integers: a float64 tau just above one of them must not round down onto it
    q, k, v = _inputs(1, 1, 2, 1, 50, 16, torch.float32, device, True, seed=9)
    cache = CodeKVCache(k, v)
    s = (q.double() @ k.double().transpose(-1, -2))[0, :, 0]
    tau64 = s[:, 7] + 1e-9  # no float32 lies between the score and tau: rounding down would keep it
    out, _ = cache.attend(q, AttentionSpec(kind="softmax", tau=tau64.cpu()))
    ref = _dense(q, k, v, "softmax", tau64[None, :, None], 0, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(D=st.sampled_from([16, 32, 64]), t=st.integers(1, 40), log_mag=st.integers(-30, 30),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 10 ** 6))
def test_add_kernel_bound_is_sound_against_float64(device, D, t, log_mag, dtype, seed):
    """The fp32 add kernel's err covers (1 + defect) ||R k - s c|| + defect ||k|| in float64
    (R = the stored fp32 rotation, exactly), for keys of every magnitude, zeros and duplicates."""
    if dtype == torch.float16:
        log_mag = max(-4, min(log_mag, 3))  # fp16's range
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, t, D, generator=g, dtype=torch.float64) * 10.0 ** log_mag
    k[:, :, 0] = 0
    if t > 2:
        k[:, :, 2] = k[:, :, 1]
    if t > 3:
        k[:, :, 3] = torch.randint(-3, 4, (D,), generator=g).double()  # a lattice key
    k = k.to(dtype).to(device)
    cache = CodeKVCache(k, None, seed=seed % 7)
    r64 = cache.rot32.double()
    k64 = k.double()
    x = k64 @ r64.T
    c = cache.codes[:, :, :t, :D].double()
    s = cache.scale[:, :, :t].double()
    need = (1 + cache.defect) * torch.linalg.vector_norm(x - s[..., None] * c, dim=-1) \
        + cache.defect * torch.linalg.vector_norm(k64, dim=-1)
    err = cache.err[:, :, :t].double()
    assert (err >= need).all()
    assert (cache.max_norm.double() >= torch.linalg.vector_norm(k64, dim=-1).amax(-1).flatten()).all()
    assert (cache.max_err.double() >= err.amax(-1).flatten()).all()
    # and the bound is tight enough to be useful: err is within 1% of the need plus rounding
    assert (err <= 1.01 * need + 1e-3 * torch.linalg.vector_norm(k64, dim=-1) + 2e-36).all()


def test_memory_bytes_over_kv(device):
    k = torch.randn(1, 4, 256, 128, device=device)
    cache = CodeKVCache(k.bfloat16(), k.bfloat16())
    mem = cache.memory_bytes()
    # codes: D + 8 bytes per key against 2 * 2D of bf16 K+V: (128 + 8) / 512 = 27%
    assert 0.26 < mem["index_over_kv"] < 0.28


def test_empty_cache_grows_from_nothing(device):
    q, k, v = _inputs(1, 2, 2, 1, 20, 16, torch.float32, device, True, seed=13)
    cache = CodeKVCache(k[:, :, :0], v[:, :, :0])
    assert len(cache) == 0 and cache.lengths.tolist() == [0, 0]
    with pytest.raises(ValueError, match="only 0 keys"):
        cache.attend(q, AttentionSpec(kind="relu"))
    step = cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="softmax", tau=-math.inf)
    for i in range(20):
        out = step(q, k[:, :, i:i + 1], v[:, :, i:i + 1])
    torch.testing.assert_close(out.double(), _dense(q, k, v, "softmax", -math.inf, 0, 0.25), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="this step takes"):
        step(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="crop keeps"):
        cache.crop(21)


@pytest.mark.parametrize("dense", [False, True])
def test_softmax_dropped_mass_bound_is_certified(device, dense):
    # per row: the true share of the softmax mass (float64, every key) below tau is at most the
    # bound, which is tight enough to be useful; tau = +inf keeps nothing (bound 1), -inf all (0)
    B, Hkv, G, M, N, D = 1, 2, 3, 2, 300, 32
    q, k, v = _inputs(B, Hkv, G, M, N, D, torch.float32, device, False, seed=21)
    cache = CodeKVCache(k, v)
    s = D ** -0.5
    scores = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)  # (B, Hq, M, N)
    lim = N - M + torch.arange(M, device=q.device)
    visible = torch.arange(N, device=q.device)[None, :] <= lim[:, None]
    tau = scores.masked_fill(~visible, -math.inf).quantile(0.9, dim=-1).float()  # (B, Hq, M)
    plan = (cache._dense_plan(q, tau, certify=True) if dense else cache.plan(q, tau, certify=True))
    out, lse, bound = cache.run(q, plan, kind="softmax", return_bound=True)
    w = torch.exp(s * scores.masked_fill(~visible, -math.inf) - (s * scores).amax(-1, keepdim=True))
    true = (w * (scores < tau.double()[..., None])).sum(-1) / w.sum(-1)
    assert (bound.double() >= true).all()
    assert (bound.double() <= 1.5 * true + 1e-3).all()  # not vacuous
    torch.testing.assert_close(out.double(), _reference(q, k, v, tau.double(), "softmax", 2, 0, s)[0],
                               atol=1e-5, rtol=1e-5)
    for t, want in ((math.inf, 1.0), (-math.inf, 0.0)):
        _, info = cache.attend(q, AttentionSpec(kind="softmax", tau=t, causal=True), with_info=True)
        b = info.dropped_bound
        assert torch.allclose(b, torch.full_like(b, want), atol=1e-3)
    with pytest.raises(ValueError, match="certify=True"):
        cache.run(q, cache.plan(q, tau), kind="softmax", return_bound=True)


def test_decode_step_certifies_every_step(device):
    q, k, v = _inputs(1, 2, 2, 1, 80, 16, torch.float32, device, False, seed=22)
    cache = CodeKVCache(k[:, :, :70], v[:, :, :70], capacity=80)
    step = cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="softmax", tau=1.0, certify=True)
    for i in range(70, 80):
        step(q, k[:, :, i:i + 1], v[:, :, i:i + 1])
        sc = (q.double() @ k[:, :, :i + 1].double().repeat_interleave(2, 1).transpose(-1, -2))[:, :, 0]
        w = torch.exp(0.25 * (sc - sc.amax(-1, keepdim=True)))
        true = (w * (sc < 1.0)).sum(-1) / w.sum(-1)
        bound = step.bound[:, :, 0].double()
        assert (bound >= true).all() and (bound <= 1.5 * true + 1e-3).all()
    with pytest.raises(ValueError, match="kind='softmax'"):
        cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="relu", certify=True)


@pytest.mark.parametrize("kind, rotation", [("softmax", "haar"), ("relu", "haar"), ("softmax", "hadamard")])
def test_fused_step_equals_the_unfused_step(device, kind, rotation):
    # filter + attend in one launch (each filter program attends its own survivors) against
    # the filter's lists then the attention: the same kept keys, outputs within fp32
    # summation order, the same certificate (the Haar rotation: the fused step's three
    # launches), or one never looser (the Hadamard rotation at d 32: two launches, the new
    # tokens' dropped mass exact); per-row tau and bias tensors, M = 2 causal rows
    B, Hkv, G, M, D, n0 = 2, 2, 3, 2, 32, 150
    q, k, v = _inputs(B, Hkv, G, M, n0 + 6, D, torch.float32, device, False, seed=31)
    scale = D ** -0.5
    tau, bias = _row_thresholds(kind, (B, Hkv * G, M), scale, 3, device)
    caches = [CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + 8, rotation=rotation) for _ in range(2)]
    steps = [c.decode_step(q, k[:, :, :M], v[:, :, :M], kind=kind, tau=tau, bias=bias, fuse=f,
                           certify=kind == "softmax") for c, f in zip(caches, (True, False))]
    for i in range(3):
        kk, vv = k[:, :, n0 + 2 * i:n0 + 2 * i + 2], v[:, :, n0 + 2 * i:n0 + 2 * i + 2]
        qi = q.roll(i, dims=-1).contiguous()
        a, b = (s(qi, kk, vv).clone() for s in steps)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(steps[0].lse, steps[1].lse, atol=1e-6, rtol=1e-6)
        n = n0 + 2 * i + 2
        bias_r = bias if kind == "softmax" else bias.double()[..., None]
        ref = _reference(qi, k[:, :, :n], v[:, :, :n], torch.as_tensor(tau).double(), kind, 2, bias_r, scale)[0]
        torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-5)
        if kind == "softmax" and rotation == "haar":
            for name in ("bound", "log_dropped", "lse_low"):
                torch.testing.assert_close(getattr(steps[0], name), getattr(steps[1], name), atol=1e-6, rtol=1e-5)
        elif kind == "softmax":
            for name in ("bound", "log_dropped"):
                a, b = getattr(steps[0], name), getattr(steps[1], name)
                assert (a <= b + 1e-6 + 1e-5 * b.abs()).all(), name
            torch.testing.assert_close(steps[0].lse_low, steps[1].lse_low, atol=1e-6, rtol=1e-5)


def test_certificate_kernel_is_the_documented_formula(device):
    # the one-launch certificate against dropped_terms + certified_share in torch: never
    # smaller, and equal within the kernel's extra 1e-5 of log slack; +inf tau keeps nothing
    from hsr.kernels import certified_share, dropped_terms

    B, Hkv, G, M, D = 2, 2, 2, 3, 16
    q, k, v = _inputs(B, Hkv, G, M, 40, D, torch.float32, device, False, seed=5)
    cache = CodeKVCache(k, v)
    g = torch.Generator(device="cpu").manual_seed(1)
    rem = (torch.rand(B, Hkv * G, M, generator=g) * 3).to(device)
    lse = (torch.randn(B, Hkv * G, M, generator=g) * 4).to(device)
    lse[0, 0, 0] = -math.inf
    tau = torch.randn(B, Hkv * G, M, generator=g).to(device)
    tau[1, 1, 1] = math.inf
    s = 0.3
    bound, log_d, low = cache._certificate(q, rem, lse, (tau, 0.0), s)
    qn = torch.linalg.vector_norm(q.float(), dim=-1)
    per_head = cache.max_norm.view(B, Hkv, 1, 1).expand(B, Hkv, G, 1).reshape(B, Hkv * G, 1)
    lens = cache.lengths.view(B, Hkv, 1, 1).expand(B, Hkv, G, 1).reshape(B, Hkv * G, 1)
    ref_d, ref_low = dropped_terms(rem, lse, tau, s, 4.0 * D * 2.0 ** -24 * qn * per_head, lens)
    ref = certified_share(ref_d, ref_low)
    assert (bound >= ref - 1e-7).all()
    torch.testing.assert_close(bound, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(low, ref_low, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(ref_d)
    torch.testing.assert_close(log_d[finite], ref_d[finite], atol=2e-5, rtol=1e-5)
    assert bound[0, 0, 0] == 1.0 and bound[1, 1, 1] == 1.0


def test_an_add_past_the_capacity_writes_nothing_and_poisons(device):
    """The add kernel refuses tokens past the capacity on the device (a replayed graph the host
    did not stop): nothing written, the length kept, every answer NaN, check() says why."""
    q, k, v = _inputs(1, 2, 2, 1, 70, 16, torch.float32, device, True, seed=4)
    cache = CodeKVCache(k[:, :, :64], v[:, :, :64], capacity=64)
    before = cache.k.clone()
    cache._launch_add(k[:, :, 64:65], v[:, :, 64:65], 1)  # what a replay would launch
    assert cache.lengths.tolist() == [64, 64] and torch.equal(cache.k, before)
    out, _ = cache.attend(q, AttentionSpec(kind="softmax", tau=0.0, causal=True), check=False)
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match="past the capacity"):
        cache.check()
    with pytest.raises(ValueError, match="past the capacity"):  # sticky
        cache.check()


def _union_reference(q, k, v, tau, scale):
    """Dense float64 softmax where each row keeps the union of its GQA group's kept sets (every
    head and position of the group), within its own causal limit; and the kept mask."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)  # (B, Hq, M, N)
    visible = torch.arange(N, device=q.device)[None, :] <= (N - M + torch.arange(M, device=q.device))[:, None]
    hit = (s >= tau[..., None]) & visible
    union = hit.view(B, Hkv, G * M, N).any(2)  # (B, Hkv, N)
    keep = union.repeat_interleave(G, 1)[:, :, None, :] & visible
    z = torch.where(keep, s * scale, -math.inf)
    w = torch.where(keep, torch.exp(z - z.amax(-1, keepdim=True).clamp_min(-1e300)), 0.0)
    den = w.sum(-1, keepdim=True)
    out = torch.where(den > 0, (w @ v.double().repeat_interleave(G, 1)) / torch.where(den > 0, den, 1.0), 0.0)
    return out, s, keep, visible


@pytest.mark.parametrize("path", ["fused", "split", "dense", "step"])
def test_group_union_keeps_the_groups_union(device, path):
    # group_union=True: every row attends the keys that any row of its group keeps; against
    # float64 on every path; the certificate still bounds each row's (smaller) dropped share;
    # with one query head per kv head and M = 1 it is the plain kept set
    B, Hkv, G, M, N, D = 2, 2, 3, 2, 140, 32
    q, k, v = _inputs(B, Hkv, G, M, N, D, torch.float32, device, False, seed=41)
    s = D ** -0.5
    cache = CodeKVCache(k[:, :, :N - 1], v[:, :, :N - 1], capacity=N + 4)
    scores = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)
    # (B, Hq, M): every row its own top 10%, off any score (the kernels keep fp32 scores >= tau:
    # a tie would be decided by rounding, which float64 cannot judge)
    tau = (scores.quantile(0.9, dim=-1) + 0.01).float()
    assert (scores - tau.double()[..., None]).abs().min() > 1e-4
    ref, _, keep, visible = _union_reference(q, k, v, tau.double(), s)
    spec = AttentionSpec(kind="softmax", tau=tau, causal=True, group_union=True)
    if path == "step":
        step = cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="softmax", tau=tau, certify=True,
                                 group_union=True)
        out, bound = step(q, k[:, :, N - 1:N], v[:, :, N - 1:N]), step.bound
    else:
        cache.add(k[:, :, N - 1:N], v[:, :, N - 1:N])
        if path == "fused":
            out, info = cache.attend(q, spec, with_info=True)
            bound = info.dropped_bound
        else:
            plan = cache._dense_plan(q, tau, certify=True) if path == "dense" else cache.plan(q, tau, certify=True)
            out, _, bound = cache.run(q, plan, kind="softmax", return_bound=True, group_union=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.exp(s * scores.masked_fill(~visible, -math.inf) - (s * scores).amax(-1, keepdim=True))
    true = (w * ~keep).sum(-1) / w.sum(-1)
    own = (w * (scores < tau.double()[..., None])).sum(-1) / w.sum(-1)
    assert (bound.double() >= true).all()
    assert (true <= own + 1e-12).all() and (true < own).any()  # the union drops less
    plain = _reference(q, k, v, tau.double(), "softmax", 2, 0, s)[0]
    assert not torch.allclose(out.double(), plain, atol=1e-4)  # and it is not the plain kept set


def test_group_union_is_softmax_only_and_gpu_only(device):
    q, k, v = _inputs(1, 1, 1, 1, 70, 16, torch.float32, device, True, seed=2)
    cache = CodeKVCache(k, v)
    spec = AttentionSpec(kind="softmax", tau=1.0, causal=True, group_union=True)
    one, _ = cache.attend(q, spec)  # one query head per kv head, one position: the plain kept set
    plain, _ = cache.attend(q, AttentionSpec(kind="softmax", tau=1.0, causal=True))
    torch.testing.assert_close(one, plain, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="softmax"):
        AttentionSpec(kind="relu", group_union=True)
    with pytest.raises(ValueError, match="group_union"):
        AttentionSpec(kind="softmax", tau=1.0, group_union=1)
    with pytest.raises(ValueError, match="kind='softmax'"):
        cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="relu", group_union=True)
    from hsr import KVIndex, hsr_attention

    cpu = KVIndex(k[0, 0].float().cpu().numpy(), v[0, 0].float().cpu().numpy())
    with pytest.raises(ValueError, match="group_union"):
        hsr_attention(q[0, 0].float().cpu().numpy(), cpu, kind="softmax", tau=1.0, group_union=True)


@pytest.mark.parametrize("path", ["step", "step_unfused", "attend", "info", "splits", "union"])
def test_eps_guard_keeps_every_row_within_eps(device, path):
    """tau with eps: a row whose certified bound under tau is at most eps keeps the tau step's
    answer (the same numbers); a row past it attends every visible key (full softmax, bound 0).
    Thresholds spread so that both kinds of row occur; M = 2 causal rows."""
    B, Hkv, G, M, D, n = 2, 2, 2, M_ROWS, 32, 180
    q, k, v = _inputs(B, Hkv, G, M, n + M, D, torch.float32, device, False, seed=41)
    scale = D ** -0.5
    g = torch.Generator(device="cpu").manual_seed(4)
    tau = (torch.rand(B, Hkv * G, M, generator=g) * 6 - 1).to(device)
    eps = 0.05
    kk, vv = k[:, :, n:n + M], v[:, :, n:n + M]
    plain = CodeKVCache(k[:, :, :n], v[:, :, :n], capacity=n + 8)
    guarded = CodeKVCache(k[:, :, :n], v[:, :, :n], capacity=n + 8)
    union = path == "union"  # the group's union under the guard: its own certified answer or full softmax
    ref_step = plain.decode_step(q, kk, vv, kind="softmax", tau=tau, certify=True, group_union=union)
    ref_out = ref_step(q, kk, vv).clone()
    ref_bound = ref_step.bound.clone()
    if union:  # the union drops less: guard at its median bound, so that both kinds of row occur
        eps = min(max(float(ref_bound.flatten().sort().values[ref_bound.numel() // 2]), 1e-6), 0.5)
    need = ref_bound > eps
    assert need.any() and (~need).any(), "the thresholds must give both kinds of row"
    spec = AttentionSpec(kind="softmax", tau=tau, eps=eps, causal=True, group_union=union)
    bound = None
    counts = guarded.count_guard()
    if path in ("step", "step_unfused", "union"):
        step = guarded.decode_step(q, kk, vv, kind="softmax", tau=tau, eps=eps, fuse=path != "step_unfused",
                                   group_union=union)
        out = step(q, kk, vv)
        bound = step.bound
    elif path == "attend":
        out, _ = guarded.attend(q, spec, add=(kk, vv))
    else:
        out, info = guarded.attend(q, spec, add=(kk, vv), with_info=True,
                                   num_splits=3 if path == "splits" else None)
        bound = info.dropped_bound
    full = _dense(q, k[:, :, :n + M], v[:, :, :n + M], "softmax", -math.inf, 0.0, scale)
    torch.testing.assert_close(out[~need], ref_out[~need], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[need].double(), full[need], atol=1e-5, rtol=1e-5)
    if bound is not None:
        assert (bound <= eps).all()
        assert (bound[need] == 0).all()
        torch.testing.assert_close(bound[~need], ref_bound[~need])
    assert counts.tolist() == [int(need.sum()), need.numel()]  # rows sent to every key, rows guarded


def test_count_guard_adds_at_every_guarded_call(device):
    """count_guard(): one tensor, zero until a guarded call, then each guarded call adds its
    rows past eps and its rows; unguarded calls add nothing."""
    B, Hkv, G, M, D, n = 1, 2, 2, 1, 32, 150
    q, k, v = _inputs(B, Hkv, G, M, n, D, torch.float32, device, False, seed=43)
    cache = CodeKVCache(k, v)
    counts = cache.count_guard()
    assert cache.count_guard() is counts and counts.tolist() == [0, 0]
    tau = torch.full((B, Hkv * G, M), 1e9, device=device)  # keeps nothing: every row is past eps
    cache.attend(q, AttentionSpec(kind="softmax", tau=tau, causal=True))
    assert counts.tolist() == [0, 0]
    for i in range(1, 3):
        cache.attend(q, AttentionSpec(kind="softmax", tau=tau, eps=1e-3, causal=True))
        assert counts.tolist() == [i * B * Hkv * G * M] * 2
    counts.zero_()
    cache.attend(q, AttentionSpec(kind="softmax", tau=torch.full_like(tau, -1e9), eps=1e-3, causal=True))
    assert counts.tolist() == [0, B * Hkv * G * M]  # keeps every key: nothing dropped, no row past eps


M_ROWS = 2


def test_eps_guard_options_are_checked(device):
    q, k, v = _inputs(1, 1, 2, 1, 40, 16, torch.float32, device, False, seed=2)
    cache = CodeKVCache(k, v)
    with pytest.raises(ValueError, match="eps must be in"):
        cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="softmax", tau=0.0, eps=1.5)
    with pytest.raises(ValueError, match="kind='softmax'"):
        cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="relu", eps=0.1)
    # a tiny eps sends every row whose tau drops anything to full softmax
    out, info = cache.attend(q, AttentionSpec(kind="softmax", tau=1e30, eps=1e-6, causal=True), with_info=True)
    full = _dense(q, k, v, "softmax", -math.inf, 0.0, 16 ** -0.5)
    torch.testing.assert_close(out.double(), full, atol=1e-5, rtol=1e-5)
    assert (info.dropped_bound == 0).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(D=st.sampled_from([16, 32]), n=st.integers(3, 150), G=st.integers(1, 3), M=st.integers(1, 2),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       eps=st.sampled_from([1e-3, 0.05, 0.5]), seed=st.integers(0, 10 ** 6))
def test_eps_guard_property(device, D, n, G, M, dtype, eps, seed):
    """On integer-valued keys (exact scores, ties exactly at integer thresholds), duplicates and
    a zero key: every row's answer is either ``{score >= tau}``'s or full softmax's, the
    reported bound is at most eps, and a row that kept tau's answer really dropped at most
    eps of its mass (float64)."""
    B, Hkv = 1, 2
    q, k, v = _inputs(B, Hkv, G, M, n, D, dtype, device, True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tau = torch.randint(-4, 12, (B, Hkv * G, M), generator=g).float().to(device)
    scale = D ** -0.5
    cache = CodeKVCache(k, v, seed=seed % 5)
    out, info = cache.attend(q, AttentionSpec(kind="softmax", tau=tau, eps=eps, causal=True), with_info=True)
    kept, s, keep = _reference(q, k, v, tau.double(), "softmax", 2, 0.0, scale)
    full, _, visible = _reference(q, k, v, torch.full_like(tau, -math.inf).double(), "softmax", 2, 0.0, scale)
    z = torch.where(visible, s * scale, -math.inf)
    w = torch.exp(z - z.amax(-1, keepdim=True))
    dropped = torch.where(visible & ~keep, w, 0.0).sum(-1) / w.sum(-1)  # (B, Hq, M), exact scores
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    o = out.double()
    as_kept = ((o - kept).abs() <= tol + tol * kept.abs()).all(-1)
    as_full = ((o - full).abs() <= tol + tol * full.abs()).all(-1)
    assert (as_kept | as_full).all()
    assert (dropped[as_kept & ~as_full] <= eps + 1e-9).all()
    assert (info.dropped_bound <= eps).all()


@pytest.mark.parametrize("launch", [dict(block_n=64, programs_per_sm=1), dict(block_n=128, programs_per_sm=8),
                                    dict(block_n=64, num_warps=8, programs_per_sm=4),
                                    dict(prepare=dict(block_r=16, block_j=16)),
                                    dict(prepare=dict(block_r=64, num_warps=2)),
                                    dict(prepare=dict(block_r=16, apart=False)), dict(block_a=16),
                                    dict(pdl=False), dict(num_stages=2)])
def test_fused_launch_parameters_keep_the_answer(device, launch):
    # the tuning bench's launches (bench/diag_step_kernels.py --sweep): other tiles and
    # program counts split the keys differently, never the kept set or the answer
    B, Hkv, G, D, n = 1, 2, 3, 32, 300
    q, k, v = _inputs(B, Hkv, G, 1, n, D, torch.float32, device, True, seed=5)
    # the last token is added by the step itself (prepare's add), to both caches
    caches = [CodeKVCache(k[:, :, :-1], v[:, :, :-1], capacity=n + 40) for _ in range(2)]
    add = (k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous())
    base = caches[0]._fused(q, 1.0, bias=0.0, kind="softmax", alpha=2, scale=None, certify=True, return_terms=True,
                            add=add, launch=THREE)
    other = caches[1]._fused(q, 1.0, bias=0.0, kind="softmax", alpha=2, scale=None, certify=True,
                             return_terms=True, add=add, launch={**THREE, **launch})
    if "prepare" not in launch:  # same codes and query parts: the same survivors, split otherwise
        assert other[0].n_survivors().tolist() == base[0].n_survivors().tolist()
    for a, b in zip(base[1], other[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # another tiling of the rotation may round a sum otherwise: a code within one step, the
    # bounds within fp32 rounding (each sound for its own codes)
    assert (caches[1].codes.int() - caches[0].codes.int()).abs().max().item() <= 1
    for name in ("scale", "err", "max_norm", "max_err"):
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name), atol=0, rtol=1e-5)
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [n] * (B * Hkv)
    ref = _dense(q, k, v, "softmax", 1.0, 0.0, D ** -0.5)
    torch.testing.assert_close(other[1][0].double(), ref, atol=1e-5, rtol=1e-5)


def test_dependent_launches_only_where_the_device_has_them(device):
    from hsr.kernels._compat import pdl_supported

    q, k, v = _inputs(1, 1, 2, 1, 20, 16, torch.float32, device, True, seed=4)
    cache = CodeKVCache(k, v)
    assert cache.pdl == pdl_supported(torch.device(device))
    assert not pdl_supported(torch.device("cpu"))
    if device == "cpu":  # the interpreter has no griddepcontrol: plain launches
        assert not cache.pdl
    k256 = torch.zeros(1, 1, 4, 256, device=device)
    assert not CodeKVCache(k256, k256).pdl  # d 256: plain launches measured faster


@pytest.mark.gpu
def test_dependent_launches_give_the_plain_launches_answer(device):
    # programmatic dependent launches change when a kernel's programs are scheduled, never what
    # they read: each waits for the kernel before it. A captured loop, one cache launched each
    # way: every step's outputs identical (the same kernels, the same order); the certificate
    # within fp32 rounding (its sum is accumulated with atomics, in no fixed order)
    B, Hkv, G, D, n0, steps = 2, 2, 4, 64, 4000, 24
    q, k, v = _inputs(B, Hkv, G, 1, n0 + steps, D, torch.bfloat16, device, True, seed=21)
    caches = [CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + steps) for _ in range(2)]
    caches[0].pdl = False
    caches[1].pdl = torch.cuda.get_device_capability()[0] >= 9
    runs = [c.decode_step(q, k[:, :, :1], v[:, :, :1], kind="softmax", tau=0.5, certify=True) for c in caches]
    for i in range(steps):
        kk, vv = k[:, :, n0 + i:n0 + i + 1], v[:, :, n0 + i:n0 + i + 1]
        qi = q.roll(i, dims=-1).contiguous()
        a, b = (r(qi, kk, vv).clone() for r in runs)
        assert torch.equal(a, b)
        torch.testing.assert_close(runs[0].bound, runs[1].bound, atol=0, rtol=1e-5)
    ref = _dense(qi, k, v, "softmax", 0.5, 0.0, D ** -0.5)
    torch.testing.assert_close(b.double(), ref, atol=2e-2, rtol=2e-2)



@pytest.mark.parametrize("kind", ["softmax", "relu", "union"])
def test_the_add_riding_in_the_filter_launch_keeps_the_answer(device, kind):
    # _plan(add_in_filter=True): a program of the filter's launch adds the step's tokens and
    # attends them from their exact scores while the filter programs scan the keys below the
    # old length. Against the add in the rotating launch, step after step (M = 2 causal rows,
    # 2 tokens a step, per-row tau and bias): the same cache contents and lengths, outputs
    # within fp32 summation order, the dense answer, and a certificate never looser
    B, Hkv, G, M, D, n0, steps = 2, 2, 3, 2, 32, 150, 3
    q, k, v = _inputs(B, Hkv, G, M, n0 + 2 * steps, D, torch.float32, device, False, seed=33)
    scale = D ** -0.5
    union = kind == "union"  # softmax, each row keeping its group's union
    kind = "softmax" if union else kind
    tau, bias = _row_thresholds(kind, (B, Hkv * G, M), scale, 4, device)
    caches = [CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + 8) for _ in range(2)]
    certify = kind == "softmax"
    for i in range(steps):
        kk, vv = k[:, :, n0 + 2 * i:n0 + 2 * i + 2].contiguous(), v[:, :, n0 + 2 * i:n0 + 2 * i + 2].contiguous()
        qi = q.roll(i, dims=-1).contiguous()
        res = []
        for c, ride in zip(caches, (True, False)):
            res.append(c._fused(qi, tau, bias=bias, kind=kind, alpha=2, scale=scale, certify=certify,
                                return_terms=certify, add=(kk, vv), group_union=union,
                                launch=dict(add_in_filter=ride, rotate_inside=False))[1])
            c.advanced(2)
        (a, lse_a, *cert_a), (b, lse_b, *cert_b) = res
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse_a, lse_b, atol=1e-6, rtol=1e-6)
        n = n0 + 2 * i + 2
        bias_r = bias if kind == "softmax" else bias.double()[..., None]
        if union:
            ref = _union_reference(qi, k[:, :, :n], v[:, :, :n], tau, scale)[0]
        else:
            ref = _reference(qi, k[:, :, :n], v[:, :, :n], torch.as_tensor(tau).double(), kind, 2, bias_r, scale)[0]
        torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-5)
        if certify:  # (bound, log_dropped, lse_low)
            assert (cert_a[0] <= cert_b[0] + 1e-6 + 1e-5 * cert_b[0]).all()
            assert (cert_a[1] <= cert_b[1] + 1e-6 + 1e-5 * cert_b[1].abs()).all()
            torch.testing.assert_close(cert_a[2], cert_b[2], atol=1e-6, rtol=1e-5)
    for name in ("k", "v", "lengths"):
        assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), name
    assert (caches[0].codes.int() - caches[1].codes.int()).abs().max().item() <= 1  # as in the test below
    for name in ("scale", "err", "max_norm", "max_err"):
        torch.testing.assert_close(getattr(caches[0], name), getattr(caches[1], name), atol=0, rtol=1e-5)
    assert caches[0].lengths.tolist() == [n0 + 2 * steps] * (B * Hkv)
    for c in caches:
        c.check()


def test_the_add_riding_in_the_filter_launch_keeps_a_new_token_tied_at_tau(device):
    # integer-valued scores: each row's tau is exactly its score with the token the step adds
    # (kept: score >= tau), the keys before it kept or not by the same rule
    B, Hkv, G, D, n0 = 1, 2, 3, 16, 90
    q, k, v = _inputs(B, Hkv, G, 1, n0 + 1, D, torch.float32, device, True, seed=13)
    new = k[:, :, n0:n0 + 1]
    tau = (q.double() @ new.double().repeat_interleave(G, 1).transpose(-1, -2))[..., 0].float()  # (B, Hq, 1)
    outs = []
    for ride in (True, False):
        cache = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + 8)
        outs.append(cache._fused(q, tau, bias=0.0, kind="softmax", alpha=2, scale=None, certify=False,
                                 add=(new.contiguous(), v[:, :, n0:n0 + 1].contiguous()),
                                 launch=dict(add_in_filter=ride, rotate_inside=False))[1][0])
    ref = _reference(q, k, v, tau.double(), "softmax", 2, 0.0, D ** -0.5)[0]
    torch.testing.assert_close(outs[0].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)


def test_the_add_riding_in_the_filter_launch_flags_bad_tokens_and_a_full_cache(device):
    # the add's program sees its own status bits: NaN rows for its head in the same step
    # (the others from the next, via the poisoned cache), nothing written past the capacity
    B, Hkv, G, D, n0 = 1, 2, 2, 16, 62
    q, k, v = _inputs(B, Hkv, G, 1, n0 + 3, D, torch.float32, device, True, seed=8)
    spec = dict(bias=0.0, kind="softmax", alpha=2, scale=None, certify=False, launch=dict(add_in_filter=True))
    cache = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=64)
    kk = k[:, :, n0:n0 + 1].clone()
    kk[0, 1, 0, 3] = math.nan
    out = cache._fused(q, 0.0, add=(kk, v[:, :, n0:n0 + 1].contiguous()), **spec)[1][0]
    cache.advanced(1)
    assert torch.isnan(out[0, G:]).all()  # the rows of kv head 1
    assert torch.isnan(cache._fused(q, 0.0, **spec)[1][0]).all()
    with pytest.raises(ValueError, match="poisoned"):
        cache.check()
    # past the capacity (a graph replayed once too often): nothing written, the length kept
    cache = CodeKVCache(k[:, :, :64], v[:, :, :64], capacity=64)
    before = (cache.k.clone(), cache.codes.clone())
    out = cache._fused(q, 0.0, add=(k[:, :, 64:65].contiguous(), v[:, :, 64:65].contiguous()), **spec)[1][0]
    assert torch.isnan(out).all()
    assert cache.lengths.tolist() == [64, 64]
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.codes, before[1])
    with pytest.raises(ValueError, match="past the capacity"):
        cache.check()


def test_hadamard_rotation_is_a_signed_scaled_hadamard(device):
    from hsr.kernels._code_plan import hadamard_rotation

    for d in (16, 64, 128):
        r = hadamard_rotation(d, 5, "cpu")
        torch.testing.assert_close(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
        r32 = r.float()
        assert (r32.abs() == r32[0, 0].abs()).all()  # one magnitude c: exactly c H diag(signs)
        i = torch.arange(d)
        bits = torch.tensor([bin(x).count("1") for x in (i[:, None] & i[None, :]).flatten().tolist()]).view(d, d)
        sylvester = 1.0 - 2.0 * (bits % 2)  # H[i, j] = (-1)^popcount(i & j)
        assert torch.equal(torch.sign(r32) * torch.sign(r32[0])[None, :], sylvester)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_rotation(96, 0, "cpu")
    k = torch.randn(1, 1, 8, 32, device=device)
    with pytest.raises(ValueError, match="rotation must be"):
        CodeKVCache(k, k, rotation="random")


def test_step_form_is_two_launches_only_where_measured_faster(device):
    # two launches: a step that adds, the Hadamard rotation, no padded columns (d >= 32),
    # fewer than 16 (batch, kv head) pairs, and d <= 64 or a capacity of at most 32K keys
    def form(D, rotation="hadamard", adding=True, B=1, Hkv=1, capacity=None):
        k = torch.randn(B, Hkv, 8, D, device=device)
        return CodeKVCache(k, k, rotation=rotation, capacity=capacity).step_form(adding)

    two, three = dict(rotate_inside=True, add_in_filter=True), THREE
    assert form(64) == form(32) == form(64, B=3, Hkv=5) == form(64, capacity=1 << 17) == two
    assert form(128) == form(128, capacity=1 << 15) == two
    assert form(128, capacity=(1 << 15) + 1) == form(256) == form(16) == three
    assert form(64, "haar") == form(64, adding=False) == form(64, B=8, Hkv=2) == form(32, B=16) == three


@triton.jit
def _hadamard_rows_kernel(Q, S, R, O, ROWS: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr):
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    q = tl.load(Q + r[:, None] * D + d[None, :])
    tl.store(O + r[:, None] * D + d[None, :], _hadamard_rows(q, S, R, ROWS, D, LOG_D))


@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_the_filters_hadamard_transform_is_the_stored_rotation(device, D):
    # the butterflies against q @ ROT^T in float64: within (log2 D + 1) u |q| per row, the
    # bound docs/codes.md gives (far below the dense product's, which the slack allows for)
    k = torch.randn(1, 1, 8, D, device=device)
    cache = CodeKVCache(k, k, rotation="hadamard", seed=3)
    q = torch.randn(16, D, device=device) * torch.logspace(-20, 20, 16, device=device)[:, None]
    q[3] = 0.0
    out = torch.empty_like(q)
    _hadamard_rows_kernel[(1,)](q, cache.signs, cache.rot32, out, ROWS=16, D=D, LOG_D=D.bit_length() - 1)
    ref = q.double() @ cache.rot32.double().T
    err = (out.double() - ref).norm(dim=1)
    assert (err <= (D.bit_length() + 0.01) * 2.0 ** -24 * q.double().norm(dim=1)).all()


@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_a_two_launch_step_rotating_by_hadamard_in_the_filter(device, kind):
    # rotation="hadamard" with the query rotated inside the filter (the transform) and the add
    # riding in its launch: a step is the filter's launch and the merge. Every length against
    # the dense answer, and against the same cache's default three-launch step
    B, Hkv, G, D, n0, steps = 2, 2, 3, 64, 100, 6
    q, k, v = _inputs(B, Hkv, G, 1, n0 + steps, D, torch.float32, device, False, seed=17)
    scale = D ** -0.5
    bias = 0.2 if kind == "relu" else 0.0
    tau = 0.5 if kind == "softmax" else bias / scale
    caches = [CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + steps, rotation="hadamard") for _ in range(2)]
    launches = (dict(rotate_inside=True, add_in_filter=True), THREE)
    for i in range(steps):
        n = n0 + i + 1
        qi = q.roll(i, dims=-1).contiguous()
        kk, vv = k[:, :, n - 1:n].contiguous(), v[:, :, n - 1:n].contiguous()
        outs = []
        for c, launch in zip(caches, launches):
            outs.append(c._fused(qi, tau, bias=bias, kind=kind, alpha=2, scale=scale, certify=False, add=(kk, vv),
                                 launch=launch)[1][0])
            c.advanced(1)
        ref = _dense(qi, k[:, :, :n], v[:, :, :n], kind, tau, bias, scale)
        torch.testing.assert_close(outs[0].double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [n0 + steps] * (B * Hkv)
    # the riding add rotates 32 columns at a time, the default all at once: a sum may round
    # otherwise (a code within one step, the bounds within fp32 rounding, each sound)
    assert (caches[0].codes.int() - caches[1].codes.int()).abs().max().item() <= 1
    for name in ("scale", "err", "max_norm", "max_err"):
        torch.testing.assert_close(getattr(caches[0], name), getattr(caches[1], name), atol=0, rtol=1e-5)
    caches[0].check()
