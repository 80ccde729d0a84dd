"""block_sparse_attention == dense masked softmax (hsr.testing.references)."""

import zlib
import pytest
import torch

pytest.importorskip("triton")

from hsr.kernels import block_sparse_attention  # noqa: E402
from hsr.testing.references import block_sparse_reference, masked_attention, rel_err  # noqa: E402

from ._util import full_lists, rand_lists  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}


def _inputs(B, Hq, Hkv, M, N, D, dtype, device, gen):
    q = torch.randn(B, Hq, M, D, generator=gen).to(dtype).to(device)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dtype).to(device)
    return q, k, v


def _check(q, k, v, num, idx, bs, causal, **kw):
    dev = q.device
    out, lse = block_sparse_attention(q, k, v, num.to(dev), idx.to(dev), block_size=bs,
                                      causal=causal, return_lse=True, **kw)
    ref, rlse = block_sparse_reference(q.cpu(), k.cpu(), v.cpu(), num, idx, block_size=bs,
                                       causal=causal)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out).all(), "NaN/inf in output"
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), "empty rows differ"
    assert (out[torch.isinf(rlse)] == 0).all(), "empty rows must be zero"
    fin = torch.isfinite(rlse)
    assert torch.allclose(lse[fin], rlse[fin], atol=2e-3, rtol=1e-3)
    assert rel_err(out, ref) < TOL[q.dtype]


# (B, Hq, Hkv, M, N, block_size, D, dtype, list heads, list batch, causal)
PREFILL = [
    (1, 4, 4, 96, 96, 32, 64, torch.float16, "Hq", 1, True),      # GQA 1
    (2, 4, 1, 70, 70, 32, 64, torch.bfloat16, "Hq", 2, True),     # GQA 4, N % tile != 0
    (1, 7, 1, 50, 50, 16, 32, torch.float16, 1, 1, True),         # GQA 7, broadcast lists
    (1, 4, 2, 40, 100, 32, 64, torch.float16, "Hkv", 1, True),    # M < N, unaligned start
    (1, 2, 1, 64, 64, 32, 128, torch.float16, "Hq", 1, False),    # non-causal, D=128
    (1, 2, 2, 33, 33, 16, 16, torch.float32, "Hq", 1, True),      # float32
    (1, 4, 1, 3, 130, 32, 64, torch.float16, "Hq", 1, True),      # 3 queries over 2 q-blocks
]


@pytest.mark.parametrize("block_ptr,flat", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("case", PREFILL)
def test_prefill_random_lists(case, block_ptr, flat, device):
    B, Hq, Hkv, M, N, bs, D, dt, hl, bl, causal = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, dt, device, gen)
    Hl = {"Hq": Hq, "Hkv": Hkv, 1: 1}[hl]
    R = -(-N // bs) if M == N else ((N - 1) // bs - (N - M) // bs + 1)
    num, idx = rand_lists(bl, Hl, R, -(-N // bs), 3, gen)
    _check(q, k, v, num, idx, bs, causal, block_ptr=block_ptr, flat=flat)


@pytest.mark.parametrize("k_rowmajor,block_ptr", [(True, False), (False, False), (True, True)])
def test_prefill_full_lists_equal_dense_causal(k_rowmajor, block_ptr, device):
    gen = torch.Generator().manual_seed(1)
    B, Hq, Hkv, N, D, bs = 1, 4, 1, 80, 64, 32
    q, k, v = _inputs(B, Hq, Hkv, N, N, D, torch.float16, device, gen)
    nkb = -(-N // bs)
    num, idx = full_lists(1, 1, nkb, nkb)
    out = block_sparse_attention(q, k, v, num.to(device), idx.to(device), block_size=bs,
                                 k_rowmajor=k_rowmajor, block_ptr=block_ptr)
    mask = torch.ones(N, N, dtype=torch.bool).tril()[None, None]
    ref, _ = masked_attention(q.cpu(), k.cpu(), v.cpu(), mask)
    assert rel_err(out.cpu(), ref) < 2e-3


def test_absolute_and_relative_rows_agree(device):
    # M < N with aligned start: rows relative (ceil(M/bs)) vs absolute (ceil(N/bs)).
    gen = torch.Generator().manual_seed(2)
    B, Hq, Hkv, M, N, D, bs = 1, 2, 1, 32, 96, 32, 16
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, torch.float16, device, gen)
    num_a, idx_a = rand_lists(1, Hq, N // bs, N // bs, 4, gen, empty_rows=False)
    off = (N - M) // bs
    num_r, idx_r = num_a[:, :, off:].contiguous(), idx_a[:, :, off:].contiguous()
    oa = block_sparse_attention(q, k, v, num_a.to(device), idx_a.to(device), block_size=bs)
    orr = block_sparse_attention(q, k, v, num_r.to(device), idx_r.to(device), block_size=bs)
    assert torch.equal(oa.cpu(), orr.cpu())
    _check(q, k, v, num_r, idx_r, bs, True)


# (B, Hq, Hkv, M, N, block_size, D, dtype, list heads)
DECODE = [
    (1, 4, 1, 1, 200, 32, 64, torch.float16, "Hq"),
    (2, 7, 1, 1, 150, 16, 32, torch.bfloat16, "Hkv"),   # GQA 7, grouped heads share lists
    (1, 8, 2, 3, 140, 32, 64, torch.float16, 1),        # M=3 in one query block
    (1, 4, 4, 1, 77, 16, 128, torch.float16, "Hq"),
]


@pytest.mark.parametrize("case", DECODE)
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode_split_kv(case, splits, device):
    B, Hq, Hkv, M, N, bs, D, dt, hl = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) + (splits or 0))
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, dt, device, gen)
    Hl = {"Hq": Hq, "Hkv": Hkv, 1: 1}[hl]
    nkb = -(-N // bs)
    num, idx = rand_lists(B, Hl, 1, nkb, nkb, gen)
    _check(q, k, v, num, idx, bs, True, num_splits=splits)


def test_decode_small_units_wide_tile(device):
    # block_size 16 fed into a 64-key tile (4 gathered runs)
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, M, N, D, bs = 1, 4, 1, 1, 260, 64, 16
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, torch.float16, device, gen)
    nkb = -(-N // bs)
    num, idx = rand_lists(1, 1, 1, nkb, nkb, gen, empty_rows=False)
    _check(q, k, v, num, idx, bs, True, block_n=64)


def test_all_rows_empty_no_nan(device):
    gen = torch.Generator().manual_seed(6)
    q, k, v = _inputs(1, 2, 1, 40, 40, 32, torch.bfloat16, device, gen)
    num = torch.zeros(1, 1, 3, dtype=torch.int32)
    idx = torch.zeros(1, 1, 3, 2, dtype=torch.int32)
    out, lse = block_sparse_attention(q, k, v, num.to(device), idx.to(device), block_size=16,
                                      return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = block_sparse_attention(q[:, :, -1:], k, v, num[:, :, :1].to(device),
                                      idx[:, :, :1].to(device), block_size=16, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_block_size_not_multiple_of_tile_rejected(device):
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(1, 1, 1, 48, 48, 32, torch.float16, device, gen)
    num, idx = full_lists(1, 1, 2, 2)
    with pytest.raises(ValueError, match="multiple of the kernel tiles"):
        block_sparse_attention(q, k, v, num.to(device), idx.to(device), block_size=24,
                               block_m=16, block_n=16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4096])
def test_gpu_real_sizes(M):
    gen = torch.Generator().manual_seed(8)
    B, Hq, Hkv, N, D, bs = 1, 28, 4, 4096, 128, 128
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, torch.bfloat16, "cuda", gen)
    nkb = N // bs
    R = nkb if M == N else 1
    num, idx = rand_lists(1, Hq, R, nkb, nkb // 3, gen)
    _check(q, k, v, num, idx, bs, True)
