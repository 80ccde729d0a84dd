"""The default block-sparse prefill kernel (full/partial split, tile order, GQA packing) ==
the dense masked softmax reference (hsr.testing.references)."""

import zlib
import pytest
import torch

pytest.importorskip("triton")

from hsr.kernels import block_sparse as bsm  # noqa: E402
from hsr.kernels import block_sparse_attention  # noqa: E402
from hsr.testing.references import block_sparse_reference, rel_err  # noqa: E402

from ._util import rand_lists  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}


def _inputs(B, Hq, Hkv, M, N, D, dtype, device, gen):
    q = torch.randn(B, Hq, M, D, generator=gen).to(dtype).to(device)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dtype).to(device)
    return q, k, v


def _run(q, k, v, num, idx, bs, causal, **kw):
    """The v2 launcher directly (its private knobs: order, heads_per_tile)."""
    B, Hq, M, D = q.shape
    N = k.shape[2]
    Hl = num.shape[1]
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    lse = torch.full((B, Hq, M), float("nan"), device=q.device)
    R = num.shape[2]
    from hsr._shapes import list_row_offset
    off = list_row_offset(R, M, N, bs)
    upcast = q.device.type == "cpu" or q.dtype == torch.float32
    bsm._prefill_v2(q, k, v, out, lse, num, idx, block_size=bs, causal=causal, scale=D ** -0.5,
                    row_offset=off, list_group=Hq // Hl if Hl > 1 else Hq, upcast=upcast, **kw)
    return out, lse


def _check(out, lse, q, k, v, num, idx, bs, causal):
    ref, rlse = block_sparse_reference(q.cpu(), k.cpu(), v.cpu(), num.cpu(), idx.cpu(),
                                       block_size=bs, causal=causal)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out).all(), "NaN/inf (or an unwritten row) in the output"
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), "empty rows differ"
    assert (out[torch.isinf(rlse)] == 0).all(), "empty rows must be zero"
    fin = torch.isfinite(rlse)
    assert torch.allclose(lse[fin], rlse[fin], atol=2e-3, rtol=1e-3)
    assert rel_err(out, ref) < TOL[q.dtype]


# (B, Hq, Hkv, M, N, block_size, D, dtype, list heads, causal)
CASES = [
    (1, 6, 2, 77, 77, 32, 32, torch.bfloat16, 1, True),       # odd N, GQA 3, broadcast lists
    (2, 4, 1, 50, 83, 16, 64, torch.float16, "Hkv", True),    # M < N, unaligned first block
    (1, 4, 4, 45, 45, 32, 16, torch.float16, "Hq", False),    # non-causal, last block past N
    (1, 2, 1, 33, 33, 16, 32, torch.float32, "Hq", True),     # float32
]


@pytest.mark.parametrize("knobs", [{}, {"order": "lpt"}, {"order": "natural"},
                                   {"heads_per_tile": 2}])
@pytest.mark.parametrize("case", CASES)
def test_prefill_v2_random_lists(case, knobs, device):
    B, Hq, Hkv, M, N, bs, D, dt, hl, causal = case
    if knobs.get("heads_per_tile", 1) > 1 and hl == "Hq":
        pytest.skip("GQA packing needs lists shared by a kv head's query heads")
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, knobs)).encode()))
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, dt, device, gen)
    Hl = {"Hq": Hq, "Hkv": Hkv, 1: 1}[hl]
    R = -(-N // bs) if M == N else ((N - 1) // bs - (N - M) // bs + 1)
    # lists may hold blocks above the diagonal and duplicates-free shuffled ids
    num, idx = rand_lists(1, Hl, R, -(-N // bs), 4, gen)
    num, idx = num.to(device), idx.to(device)
    out, lse = _run(q, k, v, num, idx, bs, causal, **knobs)
    _check(out, lse, q, k, v, num, idx, bs, causal)


def test_default_path_is_v2_and_matches_v1(device):
    gen = torch.Generator().manual_seed(11)
    q, k, v = _inputs(1, 4, 2, 70, 70, 32, torch.bfloat16, device, gen)
    num, idx = rand_lists(1, 2, 3, 3, 3, gen)
    num, idx = num.to(device), idx.to(device)
    new = block_sparse_attention(q, k, v, num, idx, block_size=32)
    bsm._FORCE_V1 = True
    try:
        old = block_sparse_attention(q, k, v, num, idx, block_size=32)
    finally:
        bsm._FORCE_V1 = False
    assert rel_err(new.cpu().float(), old.cpu().float()) < 1e-2


def test_split_lists_full_then_partial(device):
    # row r of a causal list: blocks < r are full, r partial, > r dropped; a last block past
    # N is partial also without causality
    N, bs = 70, 16  # 5 blocks, the last one partial (6 keys)
    idx = torch.tensor([[[[4, 0, 2, 3, 1]] * 5]], dtype=torch.int32)
    num = torch.tensor([[[5, 3, 2, 5, 5]]], dtype=torch.int32)
    fn, pn, out = bsm.split_block_lists(num.to(device), idx.to(device), block_size=bs, n_keys=N,
                                        row_offset=0, causal=True)
    fn, pn, out = fn.cpu(), pn.cpu(), out.cpu()
    assert fn.tolist() == [0, 1, 1, 3, 4] and pn.tolist() == [1, 0, 0, 1, 1]
    assert out[3, :4].tolist() == [0, 2, 1, 3]  # full in list order, then the diagonal
    assert out[4, :5].tolist() == [0, 2, 3, 1, 4]
    fn, pn, out = bsm.split_block_lists(num.to(device), idx.to(device), block_size=bs, n_keys=N,
                                        row_offset=0, causal=False)
    assert fn.cpu().tolist() == [4, 2, 1, 4, 4] and pn.cpu().tolist() == [1, 1, 1, 1, 1]


def test_empty_and_all_masked_rows(device):
    # rows whose only block lies above the diagonal (dropped) and rows with no block
    gen = torch.Generator().manual_seed(12)
    q, k, v = _inputs(1, 2, 1, 48, 48, 16, torch.float16, device, gen)
    num = torch.tensor([[[1, 0, 1]]], dtype=torch.int32, device=device)
    idx = torch.tensor([[[[2], [0], [1]]]], dtype=torch.int32, device=device)
    out, lse = block_sparse_attention(q, k, v, num, idx, block_size=16, return_lse=True)
    assert torch.isneginf(lse[:, :, :32]).all() and (out[:, :, :32] == 0).all()
    assert torch.isfinite(lse[:, :, 32:]).all()
    _check(out, lse, q, k, v, num, idx, 16, True)


def test_bad_knobs_rejected(device):
    gen = torch.Generator().manual_seed(13)
    q, k, v = _inputs(1, 4, 1, 32, 32, 16, torch.float16, device, gen)
    num, idx = rand_lists(1, 4, 2, 2, 2, gen)
    with pytest.raises(ValueError, match="heads_per_tile"):
        _run(q, k, v, num.to(device), idx.to(device), 16, True, heads_per_tile=3)
    with pytest.raises(ValueError, match="shared by the query heads"):
        _run(q, k, v, num.to(device), idx.to(device), 16, True, heads_per_tile=2)
    with pytest.raises(ValueError, match="order"):
        _run(q, k, v, num.to(device), idx.to(device), 16, True, order="random")
