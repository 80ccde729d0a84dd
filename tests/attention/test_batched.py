"""The one-call-per-layer decode kernels (hsr.attention.batched) against the per-head path:
the same kept keys, the same output and the same certificate, bit for bit."""

import numpy as np
import pytest

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
