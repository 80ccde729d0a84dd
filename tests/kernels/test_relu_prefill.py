"""relu_prefill == dense_relu_attention (hsr.attention.dense), with and without skipping."""

import zlib
import pytest
import torch

pytest.importorskip("triton")

from hsr.attention.dense import dense_relu_attention  # noqa: E402
from hsr.kernels import relu_prefill  # noqa: E402
from hsr.testing.references import rel_err  # noqa: E402
from hsr.kernels.relu_prefill import key_block_boxes  # noqa: E402

TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}


def _ref(q, k, v, alpha, bias, causal, scale=None):
    g = q.shape[1] // k.shape[1]
    kr = k.float().repeat_interleave(g, 1)
    vr = v.float().repeat_interleave(g, 1)
    b = bias
    if isinstance(bias, torch.Tensor):
        b = bias.float().view(1, -1, 1, 1)
    return dense_relu_attention(q.float().cpu(), kr.cpu(), vr.cpu(), alpha=alpha,
                                bias=b.cpu() if isinstance(b, torch.Tensor) else b,
                                scale=scale, causal=causal)


# (B, Hq, Hkv, M, N, D, dtype, alpha, bias, causal)
CASES = [
    (1, 4, 2, 70, 70, 32, torch.bfloat16, 2, 0.5, True),
    (2, 3, 1, 45, 101, 64, torch.float16, 3, 1.0, True),    # M < N, fp16, GQA 3
    (1, 2, 2, 50, 50, 16, torch.float32, 1, 0.0, False),    # non-causal
    (1, 2, 1, 33, 33, 32, torch.float16, 16, 0.25, True),   # alpha 16: fp16 p@v needs scaling
]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_relu_prefill_equals_dense(case, skip, device):
    B, Hq, Hkv, M, N, D, dt, alpha, bias, causal = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q = torch.randn(B, Hq, M, D, generator=gen).to(dt).to(device)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dt).to(device)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dt).to(device)
    out, lse, st = relu_prefill(q, k, v, alpha=alpha, bias=bias, causal=causal, skip=skip,
                                return_lse=True, return_stats=True)
    ref = _ref(q, k, v, alpha, bias, causal)
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu().float(), ref) < TOL[dt]
    assert st["kept"] <= st["tiles"]


def test_skipping_is_exact_and_skips_on_clustered_keys(device):
    # keys in two far-apart clusters; queries aligned with one: tiles of the other cluster
    # are provably empty and must be skipped, and the output must not change
    # (runs of 128 keys per cluster: a key tile of any size the kernel uses holds one cluster)
    gen = torch.Generator().manual_seed(3)
    N, D = 512, 32
    c = torch.randn(2, D, generator=gen)
    c = c / c.norm(dim=1, keepdim=True) * 6
    c[1] = -c[0]
    lab = (torch.arange(N) // 128) % 2
    k = (c[lab] + 0.1 * torch.randn(N, D, generator=gen))[None, None].half().to(device)
    q = (c[0] + 0.1 * torch.randn(N, D, generator=gen))[None, None].half().to(device)
    v = torch.randn(1, 1, N, D, generator=gen).half().to(device)
    out, st = relu_prefill(q, k, v, alpha=2, bias=1.0, return_stats=True)
    out_ns = relu_prefill(q, k, v, alpha=2, bias=1.0, skip=False)
    assert st["kept"] < st["tiles"]
    # skipped tiles hold only zero weights; the sums may still round differently in the last
    # fp16 place (measured: 2 of 16K outputs, 7.6e-6 apart under the interpreter)
    torch.testing.assert_close(out.cpu(), out_ns.cpu(), rtol=1e-3, atol=1e-5)
    assert rel_err(out.cpu().float(), _ref(q, k, v, 2, 1.0, True)) < 3e-3


def test_nothing_fires_gives_zeros_and_all_tiles_skipped(device):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 40, 16, generator=gen).to(torch.bfloat16).to(device)
    k = torch.randn(1, 1, 40, 16, generator=gen).to(torch.bfloat16).to(device)
    v = torch.randn(1, 1, 40, 16, generator=gen).to(torch.bfloat16).to(device)
    out, lse, st = relu_prefill(q, k, v, bias=1e4, return_lse=True, return_stats=True)
    assert (out == 0).all() and torch.isneginf(lse).all() and st["kept"] == 0


def test_per_head_bias_and_lse(device):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 37, 32, generator=gen).half().to(device)
    k = torch.randn(1, 2, 37, 32, generator=gen).half().to(device)
    v = torch.randn(1, 2, 37, 32, generator=gen).half().to(device)
    bias = torch.tensor([0.0, 0.5, 1.0, 50.0])
    out, lse = relu_prefill(q, k, v, alpha=2, bias=bias.to(device), return_lse=True)
    ref = _ref(q, k, v, 2, bias, True)
    assert rel_err(out.cpu().float(), ref) < 3e-3
    # lse = log(sum of weights), head 3 fires nowhere
    s = (q.float().cpu() @ k.float().cpu().repeat_interleave(2, 1).transpose(-1, -2)) * 32 ** -0.5
    w = torch.relu(s - bias.view(1, 4, 1, 1)) ** 2
    w = w * torch.ones(37, 37).tril()
    tot = w.sum(-1)
    fin = tot > 0
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    assert torch.allclose(lse.cpu()[fin], tot[fin].log(), atol=2e-3, rtol=1e-3)


def test_boxes_bound_every_key(device):
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(1, 2, 75, 16, generator=gen).to(torch.bfloat16).to(device)
    kmax, kmin, kabs = key_block_boxes(k, 32)
    assert kmax.shape == (1, 2, 3, 16)
    kk = k.float().cpu()
    for b in range(3):
        blk = kk[:, :, b * 32:(b + 1) * 32]
        assert torch.equal(blk.amax(2), kmax[:, :, b].float().cpu())
        assert torch.equal(blk.amin(2), kmin[:, :, b].float().cpu())
        assert (blk.norm(dim=-1) <= kabs[:, :, b, None].cpu() + 1e-4).all()


def test_bad_inputs(device):
    q = torch.randn(1, 2, 8, 16).half().to(device)
    k = torch.randn(1, 1, 8, 16).half().to(device)
    with pytest.raises(ValueError, match="alpha"):
        relu_prefill(q, k, k, alpha=0)
    with pytest.raises(ValueError, match="bias"):
        relu_prefill(q, k, k, bias=torch.zeros(3))
    with pytest.raises(TypeError, match="bias"):
        relu_prefill(q, k, k, bias="x")
    with pytest.raises(ValueError, match="scale"):
        relu_prefill(q, k, k, scale=-1.0)
    with pytest.raises(ValueError, match="M=16"):
        relu_prefill(torch.randn(1, 2, 16, 16).half().to(device), k, k)
    with pytest.raises(TypeError):
        relu_prefill(q, k.float(), k)
