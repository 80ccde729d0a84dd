"""selected_attention == dense CSR reference (softmax and ReLU^alpha)."""
import zlib
import pytest
import torch

pytest.importorskip("triton")

from hsr.kernels import selected_attention  # noqa: E402
from hsr.testing.references import rel_err, selected_reference  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}


def _csr(rows, N, max_len, gen, idx_dtype=torch.int32, ptr_dtype=torch.int64, dup=False):
    lens = torch.randint(0, max_len + 1, (rows,), generator=gen)
    lens[0] = 0                      # empty row
    if rows > 2:
        lens[1] = N                  # full row
    parts = []
    for n in lens.tolist():
        if dup:
            parts.append(torch.randint(0, N, (n,), generator=gen))
        else:
            parts.append(torch.randperm(N, generator=gen)[:n])
    indptr = torch.zeros(rows + 1, dtype=ptr_dtype)
    indptr[1:] = lens.cumsum(0)
    return indptr, torch.cat(parts).to(idx_dtype)


# (B, Hq, Hkv, M, N, D, dtype, kind, alpha, bias, dup, splits)
CASES = [
    (1, 4, 4, 2, 70, 64, torch.float16, "softmax", 2, 0.0, False, None),
    (2, 4, 1, 1, 100, 64, torch.bfloat16, "softmax", 2, 0.0, True, 3),
    (1, 7, 1, 3, 90, 32, torch.float16, "relu", 2, 0.3, False, None),
    (1, 4, 2, 2, 65, 128, torch.bfloat16, "relu", 3, 0.0, True, 2),
    (1, 2, 1, 1, 50, 16, torch.float32, "relu", 1, 0.1, False, None),
]


@pytest.mark.parametrize("case", CASES)
def test_selected_matches_reference(case, device):
    B, Hq, Hkv, M, N, D, dt, kind, alpha, bias, dup, splits = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q = torch.randn(B, Hq, M, D, generator=gen).to(dt)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dt)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dt)
    indptr, indices = _csr(B * Hq * M, N, N, gen, dup=dup,
                           idx_dtype=torch.int64 if dup else torch.int32,
                           ptr_dtype=torch.int32 if dup else torch.int64)
    out, lse = selected_attention(q.to(device), k.to(device), v.to(device), indptr.to(device),
                                  indices.to(device), kind=kind, alpha=alpha, bias=bias,
                                  return_lse=True, num_splits=splits)
    ref, rlse = selected_reference(q, k, v, indptr, indices, kind=kind, alpha=alpha, bias=bias)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    fin = torch.isfinite(rlse)
    assert torch.allclose(lse[fin], rlse[fin], atol=2e-3, rtol=1e-3)
    assert rel_err(out, ref) < TOL[dt]


def test_relu_all_zero_rows_give_zeros(device):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 1, 32, generator=gen).half()
    k = torch.randn(1, 1, 40, 32, generator=gen).half()
    v = torch.randn(1, 1, 40, 32, generator=gen).half()
    indptr = torch.tensor([0, 40, 80])
    indices = torch.cat([torch.arange(40), torch.arange(40)]).int()
    out, lse = selected_attention(q.to(device), k.to(device), v.to(device), indptr.to(device),
                                  indices.to(device), kind="relu", bias=1e4, return_lse=True)
    assert (out.cpu() == 0).all() and torch.isneginf(lse.cpu()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_gpu_selected_real_sizes(kind):
    gen = torch.Generator().manual_seed(4)
    B, Hq, Hkv, M, N, D = 1, 28, 4, 1, 32768, 128
    q = torch.randn(B, Hq, M, D, generator=gen).bfloat16()
    k = torch.randn(B, Hkv, N, D, generator=gen).bfloat16()
    v = torch.randn(B, Hkv, N, D, generator=gen).bfloat16()
    indptr, indices = _csr(B * Hq * M, N, 3000, gen)
    out = selected_attention(q.cuda(), k.cuda(), v.cuda(), indptr.cuda(), indices.cuda(),
                             kind=kind)
    ref, _ = selected_reference(q, k, v, indptr, indices, kind=kind)
    assert rel_err(out.cpu(), ref) < 1e-2
