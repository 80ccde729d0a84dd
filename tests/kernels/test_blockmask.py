"""block_sparse_attention on a FlexAttention BlockMask == flex_attention itself.

Eager ``flex_attention`` evaluates the mask_mod densely (it is the oracle of what a BlockMask
means); our kernel reads the partial + full block lists and its causal rule, so a list or
rule that differs from the mask_mod shows up as a difference here. Malformed block lists
raise before any launch.
"""
import warnings

import pytest
import torch

pytest.importorskip("triton")
flex = pytest.importorskip("torch.nn.attention.flex_attention")

from hsr.kernels import block_lists_from_block_mask, block_sparse_attention  # noqa: E402
from hsr.testing.references import rel_err  # noqa: E402
from ._util import qkv  # noqa: E402

create_block_mask, flex_attention, BlockMask = flex.create_block_mask, flex.flex_attention, flex.BlockMask

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}


def _flex(q, k, v, bm):
    """Eager flex_attention in float32 on the same (rounded) inputs: (out, lse)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out, lse = flex_attention(q.float(), k.float(), v.float(), block_mask=bm, return_lse=True,
                                  enable_gqa=q.shape[1] != k.shape[1])
    return out, lse


def _check(q, k, v, bm, positional=False):
    if positional:
        out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    else:
        out, lse = block_sparse_attention(q, k, v, block_mask=bm, return_lse=True)
    ref, rlse = _flex(q, k, v, bm)
    out, lse, ref, rlse = out.cpu(), lse.cpu(), ref.cpu(), rlse.cpu()
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    empty = torch.isinf(rlse)
    assert torch.equal(torch.isinf(lse), empty), "fully masked rows differ"
    assert (out[empty] == 0).all()
    assert torch.allclose(lse[~empty], rlse[~empty], atol=2e-3, rtol=1e-3)
    assert rel_err(out, ref) < TOL[q.dtype]


def causal(b, h, q, kv):
    return q >= kv


def block_window(w, bs):
    """Causal sliding window of ``w`` whole blocks: full blocks below the diagonal, partial
    (causal) ones on it."""
    def mod(b, h, q, kv):
        return (q >= kv) & (q // bs - kv // bs < w)
    return mod


# (mask_mod factory, B, Hq, Hkv, M, N, D, BLOCK_SIZE, dtype)
CASES = [
    ("causal", 1, 2, 2, 100, 100, 16, 32, torch.float32),            # 100 % 32 != 0
    ("causal", 2, 4, 1, 70, 70, 32, 16, torch.float16),              # GQA 4, ragged last block
    ("causal", 1, 2, 1, 96, 96, 64, (32, 64), torch.bfloat16),       # rectangular blocks
    ("window", 1, 2, 2, 100, 100, 16, 16, torch.float32),            # full + partial blocks
    ("window", 2, 2, 1, 130, 130, 32, (32, 16), torch.float16),      # window in key blocks
    ("none", 1, 2, 2, 50, 50, 16, 16, torch.bfloat16),               # all full, one partial edge
    ("offset", 1, 2, 2, 36, 100, 16, 16, torch.float32),             # M < N, bottom-right causal
    ("decode", 1, 4, 2, 1, 77, 32, 16, torch.float16),               # one query row
]


def _mask_mod(kind, M, N, bs):
    if kind == "causal":
        return causal
    if kind == "window":
        return block_window(3, bs if isinstance(bs, int) else max(bs))
    if kind == "none":
        return lambda b, h, q, kv: kv >= 0
    if kind in ("offset", "decode"):
        return lambda b, h, q, kv: q + (N - M) >= kv
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,B,Hq,Hkv,M,N,D,bs,dtype", CASES)
def test_matches_flex(kind, B, Hq, Hkv, M, N, D, bs, dtype, device):
    q, k, v = qkv(B, Hq, Hkv, M, N, D, dtype, device)
    bm = create_block_mask(_mask_mod(kind, M, N, bs), None, None, M, N, device=device, BLOCK_SIZE=bs)
    if kind == "window":
        assert int(bm.full_kv_num_blocks.sum()) > 0 and int(bm.kv_num_blocks.sum()) > 0
    _check(q, k, v, bm)


def test_positional_block_mask_and_partial_lists_alone_differ(device):
    """The issue's case: the BlockMask's own kv_num_blocks/kv_indices are only its partial
    blocks (wrong alone); the BlockMask itself (positional) is right."""
    q, k, v = qkv(1, 2, 2, 128, 128, 32, torch.float32, device, seed=1)
    bm = create_block_mask(causal, None, None, 128, 128, device=device, BLOCK_SIZE=32)
    _check(q, k, v, bm, positional=True)
    partial_only = block_sparse_attention(q, k, v, bm.kv_num_blocks, bm.kv_indices, block_size=32)
    ref, _ = _flex(q, k, v, bm)
    assert rel_err(partial_only.cpu(), ref.cpu()) > 0.1


@pytest.mark.parametrize("seed", range(4))
def test_random_block_pattern_per_batch_and_head(seed, device):
    """A random block table per (batch, head) with causal, and fully masked query blocks:
    BlockMask with B and H dims, full and partial blocks, empty rows."""
    gen = torch.Generator().manual_seed(100 + seed)
    B, Hq, Hkv, D, bs = 2, 4, 2, 16, 16
    M = N = int(torch.randint(33, 120, (1,), generator=gen))
    nb = -(-N // bs)
    table = torch.rand(B, Hq, nb, nb, generator=gen) < 0.5
    table[:, :, 0] = False  # the first query block attends nothing
    table = table.to(device)

    def mod(b, h, q, kv):
        return (q >= kv) & table[b, h, q // bs, kv // bs]

    q, k, v = qkv(B, Hq, Hkv, M, N, D, torch.float16, device, seed=seed)
    bm = create_block_mask(mod, B, Hq, M, N, device=device, BLOCK_SIZE=bs)
    _check(q, k, v, bm)


def test_lists_helper_roundtrip(device):
    q, k, v = qkv(1, 2, 2, 64, 64, 16, torch.float32, device)
    bm = create_block_mask(block_window(2, 32), None, None, 64, 64, device=device, BLOCK_SIZE=32)
    kvn, kvi, bs, is_causal = block_lists_from_block_mask(bm, q, k)
    assert bs == 32 and is_causal is True
    assert kvn.dtype == kvi.dtype == torch.int32
    assert kvn.tolist() == [[[1, 2]]]  # union of full and partial, each once
    out = block_sparse_attention(q, k, v, kvn, kvi, block_size=bs, causal=is_causal)
    ref, _ = _flex(q, k, v, bm)
    assert rel_err(out.cpu(), ref.cpu()) < 1e-5


# ---------------------------------------------------------------- masks the kernel cannot do

def test_token_sliding_window_raises(device):
    q, k, v = qkv(1, 1, 1, 64, 64, 16, torch.float32, device)
    bm = create_block_mask(lambda b, h, qi, kv: (qi >= kv) & (qi - kv < 20), None, None, 64, 64,
                           device=device, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="cannot compute this BlockMask's mask_mod"):
        block_sparse_attention(q, k, v, block_mask=bm)


def test_top_left_causal_with_fewer_queries_raises(device):
    """SDPA's top-left causal (q_idx >= kv_idx) with M < N is not the kernel's rule."""
    q, k, v = qkv(1, 1, 1, 32, 64, 16, torch.float32, device)
    bm = create_block_mask(causal, None, None, 32, 64, device=device, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="bottom-right"):
        block_sparse_attention(q, k, v, block_mask=bm)


def test_unaligned_query_offset_raises(device):
    q, k, v = qkv(1, 1, 1, 40, 100, 16, torch.float32, device)
    bm = create_block_mask(lambda b, h, qi, kv: qi + 60 >= kv, None, None, 40, 100, device=device,
                           BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="kv_len - q_len = 60"):
        block_sparse_attention(q, k, v, block_mask=bm)


def test_mask_mod_depending_on_broadcast_batch_raises(device):
    q, k, v = qkv(2, 1, 1, 64, 64, 16, torch.float32, device)
    bm = create_block_mask(lambda b, h, qi, kv: (qi >= kv) & (kv >= 16 * b), None, None, 64, 64,
                           device=device, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="broadcasts over batch"):
        block_sparse_attention(q, k, v, block_mask=bm)


def test_block_mask_argument_errors(device):
    q, k, v = qkv(1, 1, 1, 64, 64, 16, torch.float32, device)
    bm = create_block_mask(causal, None, None, 64, 64, device=device, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="made for"):
        block_sparse_attention(q[:, :, :32], k, v, block_mask=bm)
    with pytest.raises(TypeError, match="leave them unset"):
        block_sparse_attention(q, k, v, block_mask=bm, block_size=16)
    with pytest.raises(TypeError, match="leave them unset"):
        block_sparse_attention(q, k, v, block_mask=bm, causal=True)
    with pytest.raises(TypeError, match="not both"):
        block_sparse_attention(q, k, v, bm.kv_num_blocks, bm.kv_indices, block_mask=bm)
    with pytest.raises(TypeError, match="needs kv_num_blocks and kv_indices"):
        block_sparse_attention(q, k, v)
    with pytest.raises(TypeError, match="BlockMask"):
        block_lists_from_block_mask("causal", q, k)
    with pytest.raises(ValueError, match="head dim 2"):
        bm2 = create_block_mask(causal, 1, 2, 64, 64, device=device, BLOCK_SIZE=16)
        block_sparse_attention(q, k, v, block_mask=bm2)


def test_block_mask_with_bad_lists_raises(device):
    q, k, v = qkv(1, 1, 1, 64, 64, 16, torch.float32, device)
    num = torch.tensor([[[1, 1, 1, 1]]], dtype=torch.int32, device=device)
    idx = torch.zeros(1, 1, 4, 4, dtype=torch.int32, device=device)
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16, seq_lengths=(64, 64))
    bm.kv_indices[0, 0, 2, 0] = 7  # only 4 key blocks (from_kv_blocks itself would refuse it)
    with pytest.raises(ValueError, match=r"block_mask.kv_indices\[0, 0, 2, 0\] = 7"):
        block_sparse_attention(q, k, v, block_mask=bm)


# ---------------------------------------------------------------- malformed plain lists

def _lists(device):
    num = torch.tensor([[[1, 2, 3, 4]]], dtype=torch.int32, device=device)
    idx = torch.arange(4, dtype=torch.int32, device=device).expand(1, 1, 4, 4).contiguous()
    return num, idx


@pytest.mark.parametrize("what,match", [
    ("negative count", r"kv_num_blocks\[0, 0, 1\] = -1 must lie in \[0, 4\]"),
    ("count over width", r"kv_num_blocks\[0, 0, 1\] = 5 must lie in \[0, 4\]"),
    ("id too large", r"kv_indices\[0, 0, 3, 2\] = 4 is not a key-block id in \[0, 4\)"),
    ("negative id", r"kv_indices\[0, 0, 3, 2\] = -3 is not a key-block id"),
])
def test_malformed_lists_raise(what, match, device):
    q, k, v = qkv(1, 2, 1, 64, 64, 16, torch.float16, device)
    num, idx = _lists(device)
    if what == "negative count":
        num[0, 0, 1] = -1
    elif what == "count over width":
        num[0, 0, 1] = 5
    elif what == "id too large":
        idx[0, 0, 3, 2] = 4
    else:
        idx[0, 0, 3, 2] = -3
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, num, idx, block_size=16)


def test_ids_past_the_count_are_not_read(device):
    q, k, v = qkv(1, 2, 1, 64, 64, 16, torch.float16, device)
    num, idx = _lists(device)
    idx[0, 0, 0, 1:] = 99  # row 0 uses only its first entry
    ref = block_sparse_attention(q, k, v, *_lists(device), block_size=16)
    out = block_sparse_attention(q, k, v, num, idx, block_size=16)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(block_size=0), ValueError, "block_size must be a positive int"),
    (dict(block_size=16.0), TypeError, "block_size must be an int"),
    (dict(block_size=True), TypeError, "block_size must be an int"),
])
def test_bad_block_size(bad, exc, match, device):
    q, k, v = qkv(1, 1, 1, 64, 64, 16, torch.float16, device)
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, *_lists(device), **bad)


def test_wrong_list_dtype_and_shape(device):
    q, k, v = qkv(1, 1, 1, 64, 64, 16, torch.float16, device)
    num, idx = _lists(device)
    with pytest.raises(TypeError, match="int32"):
        block_sparse_attention(q, k, v, num.long(), idx, block_size=16)
    with pytest.raises(ValueError, match="must start with the shape"):
        block_sparse_attention(q, k, v, num, idx[:, :, :3], block_size=16)
    with pytest.raises(ValueError, match="kv_num_blocks must have shape"):
        block_sparse_attention(q, k, v, num[0], idx, block_size=16)
