"""The dense references follow SDPA's conventions: ``is_causal`` (top-left), ``enable_gqa``;
``causal`` is FlashAttention's bottom-right alignment (``causal_lower_right``)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from hsr.attention.dense import dense_relu_attention, dense_softmax_attention  # noqa: E402


def _qkv(B, Hq, Hkv, M, N, D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


SHAPES = [(1, 4, 4, 7, 13), (2, 6, 2, 13, 13), (1, 8, 1, 1, 9), (2, 4, 2, 5, 31)]  # M < N and M == N


@pytest.mark.parametrize("B,Hq,Hkv,M,N", SHAPES)
@pytest.mark.parametrize("mode", ["is_causal", "causal", "none"])
def test_softmax_equals_sdpa(B, Hq, Hkv, M, N, mode):
    q, k, v = _qkv(B, Hq, Hkv, M, N, 16, torch.float64, seed=M * N)
    gqa = Hq != Hkv
    if mode == "is_causal":
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif mode == "causal":
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(M, N), enable_gqa=gqa)
    else:
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    out = dense_softmax_attention(q, k, v, enable_gqa=gqa, **({mode: True} if mode != "none" else {}))
    assert out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_half_precision_equals_sdpa(dtype):
    q, k, v = _qkv(1, 4, 2, 6, 20, 32, dtype, seed=3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    out = dense_softmax_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def test_alignments_differ_when_fewer_queries():
    """M < N: top-left and bottom-right are different masks (the issue's 2.58 apart)."""
    q, k, v = _qkv(1, 2, 2, 4, 12, 16, torch.float64)
    a = dense_softmax_attention(q, k, v, causal=True)
    b = dense_softmax_attention(q, k, v, is_causal=True)
    assert (a - b).abs().max() > 0.1
    # M == N: the same mask
    q, k, v = _qkv(1, 2, 2, 12, 12, 16, torch.float64)
    torch.testing.assert_close(dense_softmax_attention(q, k, v, causal=True),
                               dense_softmax_attention(q, k, v, is_causal=True))


def test_softmax_lse_and_empty_rows():
    """causal with M > N: the first M - N rows see no key (0, lse -inf, no NaN)."""
    q, k, v = _qkv(1, 1, 1, 6, 4, 8, torch.float64)
    out, lse = dense_softmax_attention(q, k, v, causal=True, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[..., :2, :] == 0).all() and torch.isneginf(lse[..., :2]).all()
    z = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    torch.testing.assert_close(lse[..., 5], torch.logsumexp(z[..., 5, :], -1))


@pytest.mark.parametrize("B,Hq,Hkv,M,N", SHAPES)
@pytest.mark.parametrize("mode", ["is_causal", "causal", "none"])
def test_relu_gqa_equals_repeated_heads(B, Hq, Hkv, M, N, mode):
    """ReLU^alpha on GQA shapes == the same call on explicitly repeated kv heads, with the
    masks of causal_lower_right (causal) and SDPA is_causal (tril)."""
    q, k, v = _qkv(B, Hq, Hkv, M, N, 16, torch.float64, seed=7)
    kw = {mode: True} if mode != "none" else {}
    out = dense_relu_attention(q, k, v, alpha=2, bias=0.1, enable_gqa=Hq != Hkv, **kw)
    g = Hq // Hkv
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kr.transpose(-1, -2)) * 16 ** -0.5
    a = torch.relu(s - 0.1) ** 2
    if mode == "causal":
        a = a * torch.ones(M, N, dtype=torch.bool).tril(N - M)  # causal_lower_right
    elif mode == "is_causal":
        a = a * torch.ones(M, N, dtype=torch.bool).tril()
    den = a.sum(-1, keepdim=True)
    ref = (a @ vr) / torch.where(den > 0, den, torch.ones_like(den))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_relu_numpy_gqa_and_is_causal_match_torch():
    q, k, v = _qkv(2, 4, 2, 5, 11, 16, torch.float64, seed=11)
    for kw in (dict(is_causal=True), dict(causal=True), {}):
        t = dense_relu_attention(q, k, v, alpha=3, bias=0.05, enable_gqa=True, **kw)
        n = dense_relu_attention(q.numpy(), k.numpy(), v.numpy(), alpha=3, bias=0.05, enable_gqa=True, **kw)
        np.testing.assert_allclose(n, t.numpy(), atol=1e-12)
        ts = dense_softmax_attention(q, k, v, enable_gqa=True, **kw)
        ns = dense_softmax_attention(q.numpy(), k.numpy(), v.numpy(), enable_gqa=True, **kw)
        np.testing.assert_allclose(ns, ts.numpy(), atol=1e-12)


@pytest.mark.parametrize("fn", [dense_relu_attention, dense_softmax_attention])
def test_errors(fn):
    q, k, v = _qkv(1, 4, 2, 3, 5, 8)
    with pytest.raises(ValueError, match="not both"):
        fn(q, k, v, causal=True, is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fn(q, k, v)
    q3, k3, v3 = _qkv(1, 3, 2, 3, 5, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        fn(q3, k3, v3, enable_gqa=True)
    with pytest.raises(ValueError, match="not both"):
        fn(q.numpy(), k.numpy(), v.numpy(), causal=True, is_causal=True)


def test_single_kv_head_broadcasts_without_flag():
    """Hkv == 1 broadcasts as before (no enable_gqa needed), and equals enable_gqa."""
    q, k, v = _qkv(1, 4, 1, 3, 5, 8, torch.float64)
    torch.testing.assert_close(dense_softmax_attention(q, k, v), dense_softmax_attention(q, k, v, enable_gqa=True))
    torch.testing.assert_close(dense_relu_attention(q, k, v), dense_relu_attention(q, k, v, enable_gqa=True))


def test_attn_mask_is_sdpa_boolean_mask():
    q, k, v = _qkv(2, 4, 2, 5, 9, 16, torch.float64, seed=11)
    mask = torch.rand(2, 4, 5, 9, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[0, 0, 0] = False  # an emptied row: zeros, lse -inf
    out, lse = dense_softmax_attention(q, k, v, attn_mask=mask, enable_gqa=True, return_lse=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    keep = mask.any(-1)
    torch.testing.assert_close(out[keep], ref[keep])
    assert (out[0, 0, 0] == 0).all() and torch.isneginf(lse[0, 0, 0])
    both = dense_softmax_attention(q, k, v, attn_mask=mask, causal=True, enable_gqa=True)
    causal = torch.arange(9)[None, :] <= (torch.arange(5) + 4)[:, None]
    torch.testing.assert_close(both, dense_softmax_attention(q, k, v, attn_mask=mask & causal, enable_gqa=True))
    onp = dense_softmax_attention(q.numpy(), k.numpy(), v.numpy(), attn_mask=mask.numpy(), enable_gqa=True)
    torch.testing.assert_close(torch.from_numpy(onp), out)
    with pytest.raises(TypeError, match="boolean"):
        dense_softmax_attention(q, k, v, attn_mask=mask.float(), enable_gqa=True)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_relu_high_power_does_not_underflow(framework):
    # the row's only firing key scores 1e-3 above the bias: 1e-3 ** 16 = 1e-48 is below
    # float32's smallest subnormal, yet the normalised output is exactly that key's value
    d = 4
    q = np.zeros((1, 1, d))
    q[0, 0, 0] = 1.0
    k = np.zeros((1, 3, d))
    k[0, :, 0] = [0.5 + 1e-3, 0.1, -1.0]
    v = np.arange(12, dtype=np.float64).reshape(1, 3, d)
    if framework == "torch":
        torch = pytest.importorskip("torch")
        q, k, v = (torch.tensor(x, dtype=torch.float32) for x in (q, k, v))
    out = dense_relu_attention(q, k, v, alpha=16, bias=0.5, scale=1.0)
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64)[0, 0], [0.0, 1.0, 2.0, 3.0],
                               rtol=1e-6)
