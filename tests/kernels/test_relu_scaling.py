"""ReLU^alpha in every GPU kernel is accumulated scaled by the row's running maximum: a row whose
keys fire only weakly (relu(z) ** 16 below float32's smallest subnormal) still gives the
weighted mean of its values, not zeros, and the lse slot is still log(sum of weights)."""
import math

import pytest
import torch

pytest.importorskip("triton")

from hsr import AttentionSpec  # noqa: E402
from hsr.attention.dense import dense_relu_attention  # noqa: E402
from hsr.kernels import CodeKVCache, build_index, hsr_decode, selected_attention  # noqa: E402

ALPHA = 16
D = 16


def _weak(device, n=48, seed=0):
    """q (1, 2, 1, D), k, v (1, 1, n, D) float32 and a bias such that the keys that fire sit
    1e-3 .. 1.45e-3 above it (in scaled-score units): every raw weight ``z ** 16`` is below
    float32's smallest subnormal (1.4e-45)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(1, 2, 1, D)
    q[0, :, 0, 0] = 1.0
    k = torch.randn(1, 1, n, D, generator=g) * 0.1
    k[0, 0, :, 0] = -1.0
    fire = torch.arange(3, n, 7)
    k[0, 0, fire, 0] = 0.5 + 1e-3 * (1 + 0.15 * (torch.arange(len(fire)) % 4))  # 0.5010 .. 0.50145
    v = torch.randn(1, 1, n, D, generator=g)
    return q.to(device), k.to(device), v.to(device), 0.5, fire


def _want(q, k, v, bias):
    return dense_relu_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), alpha=ALPHA, bias=bias,
                                scale=1.0, enable_gqa=True)


def test_selected_attention_keeps_weak_rows(device):
    q, k, v, bias, fire = _weak(device)
    n = k.shape[2]
    indptr = torch.tensor([0, n, 2 * n], dtype=torch.int64, device=device)
    indices = torch.arange(n, device=device).repeat(2).to(torch.int32)
    out, lse = selected_attention(q, k, v, indptr, indices, kind="relu", alpha=ALPHA, bias=bias, scale=1.0,
                                  return_lse=True)
    want = _want(q, k, v, bias)
    assert out.abs().sum() > 0
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-4, atol=1e-5)
    z = (k[0, 0, fire, 0].double() - bias).cpu()
    assert math.isclose(float(lse[0, 0, 0]), float(torch.logsumexp(ALPHA * torch.log(z), 0)), rel_tol=1e-4)


def test_block_decode_keeps_weak_rows(device):
    q, k, v, bias, _ = _weak(device, n=64)
    idx = build_index(k, v, block_size=16, n_sub=4, method="none")
    out = hsr_decode(q, idx, kind="relu", alpha=ALPHA, bias=bias, scale=1.0)
    torch.testing.assert_close(out.double().cpu(), _want(q, k, v, bias), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense", [False, True])
def test_code_cache_keeps_weak_rows(device, dense):
    q, k, v, bias, _ = _weak(device)
    cache = CodeKVCache(k, v)
    spec = AttentionSpec(kind="relu", alpha=ALPHA, bias=bias, scale=1.0, causal=True)
    if dense:
        step = cache.decode_step(q, k[:, :, :1], v[:, :, :1], kind="relu", alpha=ALPHA, bias=bias, scale=1.0,
                                 dense=True)
        out = step(q, k[:, :, :1] * 0 - 1, v[:, :, :1]).clone()  # a new key that never fires
    else:
        out, _ = cache.attend(q, spec)
    torch.testing.assert_close(out.double().cpu(), _want(q, k, v, bias), rtol=1e-4, atol=1e-5)
