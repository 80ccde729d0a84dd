"""The GPU code cache's top-k mode (``AttentionSpec(topk=k)``, ``decode_step(topk=k)``) against
float64 dense references.

Under the Triton interpreter on the CPU in CI, on the GPU where there is one. The mode keeps,
per row, every visible key scoring at least the row's k-th best score (ties at the k-th all
kept). Integer-valued keys and queries make every score exact in fp32, so ties are tested
exactly; with real-valued inputs, rows whose k-th and (k+1)-th best scores lie within fp32
rounding of each other are left out of the comparison.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsr import AttentionSpec, hsr_attention
from hsr.kernels.codes import CodeKVCache

from ._util import code_inputs


def _inputs(B, Hkv, G, N, D, dtype, device, lattice, seed, M=1):
    return code_inputs(B, Hkv, G, M, N, D, dtype, device, lattice, seed)


def _topk_reference(q, k, v, topk, scale):
    """``(out, dropped, clear)``: float64 softmax over each row's visible keys scoring at
    least its k-th best (all of them where fewer than k are visible), the share of the
    visible mass it drops, and the rows whose k-th and (k+1)-th scores are apart (or tie
    exactly) so that fp32 rounding cannot change the kept set."""
    B, Hq, M, D = q.shape
    G = Hq // k.shape[1]
    N = k.shape[2]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)
    pos = torch.arange(N, device=q.device)
    seen = pos[None, :] <= (N - M + torch.arange(M, device=q.device))[:, None]  # (M, N)
    masked = torch.where(seen, s, -math.inf)
    kk = min(topk, N)
    best = masked.topk(kk, dim=-1).values
    kth = best[..., -1:]
    keep = seen & (s >= kth)
    nxt = masked.topk(min(kk + 1, N), dim=-1).values[..., -1:]
    gap = (kth - nxt).abs()[..., 0]
    clear = (gap == 0) | (gap > 1e-4 * (1 + kth.abs()[..., 0])) | torch.isinf(kth[..., 0]) | (kk == N)
    z = torch.where(keep, s * scale, -math.inf)
    zall = torch.where(seen, s * scale, -math.inf)
    top = zall.amax(-1, keepdim=True)
    w = torch.where(keep, torch.exp(z - top), 0.0)
    wall = torch.where(seen, torch.exp(zall - top), 0.0)
    vv = v.double().repeat_interleave(G, 1)
    out = (w @ vv) / w.sum(-1, keepdim=True)
    dropped = 1 - w.sum(-1) / wall.sum(-1)
    return out, dropped, clear


@pytest.mark.parametrize("lattice", [True, False])
@pytest.mark.parametrize("B,Hkv,G,M,N,D,topk", [(1, 1, 1, 1, 70, 32, 1), (2, 2, 3, 1, 200, 64, 7),
                                                 (1, 2, 2, 3, 129, 32, 16), (1, 1, 2, 1, 40, 32, 100)])
def test_topk_matches_dense_and_certifies(device, lattice, B, Hkv, G, M, N, D, topk):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _inputs(B, Hkv, G, N, D, dtype, device, lattice, seed=N + D + topk, M=M)
    cache = CodeKVCache(k, v, seed=2)
    scale = D ** -0.5
    ref, dropped, clear = _topk_reference(q, k, v, topk, scale)
    spec = AttentionSpec(kind="softmax", topk=topk, causal=True)
    out, info = cache.attend(q, spec, with_info=True)
    again, none = cache.attend(q, spec)  # replayed, uncertified: the gather's softmax
    assert none is None
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: P is rounded for the PV product
    torch.testing.assert_close(again, out, atol=tol, rtol=tol)
    for res in (out, again, cache._topk(q, topk, scale=scale)[0]):
        torch.testing.assert_close(res.double()[clear], ref[clear], atol=tol, rtol=tol)
    # the certificate holds (the exact dropped terms, widened by the fp32 score's gap)
    bound = info.dropped_bound.double()
    assert (bound[clear] >= dropped[clear] - 1e-6).all()
    assert (bound <= 1).all() and (bound[clear] <= 2 * dropped[clear] + 1e-4).all()
    assert info.keys_scored.shape == (B, Hkv * G, M)
    assert (info.keys_scored[..., -1] == N).all()


def test_topk_ties_at_the_kth_score_are_all_kept(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    B, Hkv, N, D = 1, 1, 96, 32
    k = torch.zeros(B, Hkv, N, D, dtype=torch.float64)
    k[..., 0] = torch.arange(N, dtype=torch.float64) % 8  # scores 0..7, twelve keys each
    q = torch.zeros(B, Hkv, 1, D, dtype=torch.float64)
    q[..., 0] = 1
    v = torch.randn(B, Hkv, N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, k, v = (x.to(dtype).to(device) for x in (q, k, v))
    cache = CodeKVCache(k, v)
    out, _ = cache.attend(q, AttentionSpec(kind="softmax", topk=13))  # the 13th best is a 6: 24 keys kept
    ref, *_ = _topk_reference(q, k, v, 24, D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_topk_decode_step_over_a_growing_cache(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    B, Hkv, G, D, n0, steps, topk = 1, 2, 2, 32, 60, 6, 9
    q, k, v = _inputs(B, Hkv, G, n0 + steps, D, dtype, device, True, seed=5, M=steps)
    cache = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + steps)
    step = cache.decode_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], kind="softmax", topk=topk, certify=True)
    for i in range(steps):
        n = n0 + i + 1
        qi = q[:, :, i:i + 1].contiguous()
        out = step(qi, k[:, :, n - 1:n].contiguous(), v[:, :, n - 1:n].contiguous())
        ref, dropped, _ = _topk_reference(qi, k[:, :, :n], v[:, :, :n], topk, D ** -0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        assert (step.bound.double() >= dropped - 1e-6).all()
    assert len(cache) == n0 + steps
    cache.check()


def test_topk_through_hsr_attention_and_add(device):
    dtype = torch.float32
    q, k, v = _inputs(1, 2, 2, 81, 32, dtype, device, False, seed=7)
    cache = CodeKVCache(k[:, :, :80], v[:, :, :80], capacity=128)
    out = hsr_attention(q, cache, kind="softmax", topk=5)
    ref, _, clear = _topk_reference(q, k[:, :, :80], v[:, :, :80], 5, 32 ** -0.5)
    torch.testing.assert_close(out.double()[clear], ref[clear], atol=1e-5, rtol=1e-5)
    out, _ = cache.attend(q, AttentionSpec(kind="softmax", topk=5), add=(k[:, :, 80:], v[:, :, 80:]))
    assert len(cache) == 81
    ref, _, clear = _topk_reference(q, k, v, 5, 32 ** -0.5)
    torch.testing.assert_close(out.double()[clear], ref[clear], atol=1e-5, rtol=1e-5)


def test_topk_refusals_and_bad_values(device):
    q, k, v = _inputs(1, 2, 2, 40, 32, torch.float32, device, False, seed=8)
    cache = CodeKVCache(k, v)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="topk must be a positive integer"):
            cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="softmax", topk=bad)
    with pytest.raises(ValueError, match="kind='softmax'"):
        cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="relu", topk=3)
    with pytest.raises(ValueError, match="not both"):
        cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="softmax", topk=3, tau=0.0)
    with pytest.raises(ValueError, match="group_union"):
        cache.attend(q, AttentionSpec(kind="softmax", topk=3, group_union=True))
    n = len(cache)
    with pytest.raises(ValueError, match="group_union"):  # refused before anything is added
        cache.attend(q, AttentionSpec(kind="softmax", topk=3, group_union=True), add=(k[:, :, :1], v[:, :, :1]))
    assert len(cache) == n
    bad_q = q.clone()
    bad_q[0, 1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN") as err:
        cache.attend(bad_q, AttentionSpec(kind="softmax", topk=3))
    assert "tau" not in str(err.value)
    out, _ = cache.attend(bad_q, AttentionSpec(kind="softmax", topk=3), check=False)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()  # the bad row only, never finite
    with pytest.raises(ValueError, match="q contains NaN"):
        cache.check()


@pytest.mark.parametrize("topk,kept", [(3, 3), (4, 6), (5, 6), (6, 6), (7, 7), (9, 9)])
def test_topk_ties_in_both_forms(device, topk, kept):
    # scores 10, 9, 8, 7, 7, 7, 1, 0, 0: k = 4, 5, 6 end on the three-way tie at 7 (6 kept);
    # k = 9 is the whole row. Both softmax forms (the gather over the selection's list, and the
    # certified scan of every score) against float64
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    scores = torch.tensor([7, 0, 10, 7, 1, 9, 0, 8, 7], dtype=torch.float64)
    N, D = scores.numel(), 32
    k = torch.zeros(1, 1, N, D, dtype=torch.float64)
    k[..., 0] = scores
    q = torch.zeros(1, 1, 1, D, dtype=torch.float64)
    q[..., 0] = 1
    v = torch.randn(1, 1, N, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q, k, v = (x.to(dtype).to(device) for x in (q, k, v))
    cache = CodeKVCache(k, v)
    ref, *_ = _topk_reference(q, k, v, kept, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for certify in (False, True):
        out, _ = cache._topk(q, topk, scale=0.3, certify=certify)[:2]
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 150), spare=st.integers(0, 40), G=st.integers(1, 3), M=st.integers(1, 3),
       topk=st.integers(1, 160), seed=st.integers(0, 2 ** 16))
def test_topk_property(device, n, spare, G, M, topk, seed):
    # keys and queries in {-1, 0, 1}: exact scores with many ties, so ties at the k-th, rows
    # that see fewer than k keys (causal, M > 1), k past the capacity, widths that are not whole
    # tiles, rows that see no key (M > n: an empty row, 0); both softmax forms against float64
    g = torch.Generator().manual_seed(seed)
    D = 16
    k = torch.randint(-1, 2, (1, 2, n, D), generator=g).double()
    q = torch.randint(-1, 2, (1, 2 * G, M, D), generator=g).double()
    v = torch.randn(1, 2, n, D, generator=g, dtype=torch.float64)
    q, k, v = (x.float().to(device) for x in (q, k, v))
    cache = CodeKVCache(k, v, capacity=n + spare)
    ref = _topk_reference(q, k, v, topk, 0.25)[0].nan_to_num(0.0)
    for certify in (False, True):
        out = cache._topk(q, topk, scale=0.25, certify=certify)[0]
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
