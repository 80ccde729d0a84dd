"""PowerAttention patterns: rule vs predicate vs block builder, FlexAttention, CPU attention."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hsr.attention import (
    BlockLists,
    Pattern,
    dilated_pattern,
    full_pattern,
    kernel_block_lists,
    longnet_pattern,
    matched_baselines,
    power_attention,
    power_pattern,
    sliding_window_pattern,
    stride_slash_pattern,
    to_block_mask,
)


# ----------------------------------------------------------------------------------------
# Independent scalar definitions (plain Python ints, written from the paper's wording)
def ref_power(qb, kb, window, sink):
    d = qb - kb
    return d >= 0 and (d < window or (d >= 1 and bin(d).count("1") == 1) or kb < sink)


def ref_sliding(qb, kb, window, sink):
    d = qb - kb
    return d >= 0 and (d < window or kb < sink)


def ref_stride(qb, kb, window, sink, stride):
    d = qb - kb
    return d >= 0 and (d < window or kb < sink or d % stride == 0)


def ref_dilated(qb, kb, dilation, span, window, sink):
    d = qb - kb
    return d >= 0 and (d < window or kb < sink or (d % dilation == 0 and (span == 0 or d < span)))


def ref_longnet(qb, kb, segment, dilation, ratio, levels):
    if kb > qb:
        return False
    if kb == qb:
        return True
    for l in range(levels):
        w, r = segment * ratio**l, dilation * ratio**l
        start = (qb // w) * w
        if kb >= start and (kb - start) % r == 0:
            return True
    return False


def ref_of(p: Pattern):
    n = p.name
    if n == "power":
        return lambda a, b: ref_power(a, b, p.window, p.sink)
    if n == "sliding_window":
        return lambda a, b: ref_sliding(a, b, p.window, p.sink)
    if n == "stride_slash":
        return lambda a, b: ref_stride(a, b, p.window, p.sink, p.stride)
    if n == "dilated":
        return lambda a, b: ref_dilated(a, b, p.dilation, p.span, p.window, p.sink)
    if n == "longnet":
        return lambda a, b: ref_longnet(a, b, p.segment, p.dilation, p.ratio, p.levels)
    if n == "full":
        return lambda a, b: b <= a
    raise AssertionError(n)


def ref_token_mask(p: Pattern, seq_len, q_len=None):
    """Token mask from the scalar rule: row i = query at seq_len - q_len + i."""
    q_len = seq_len if q_len is None else q_len
    rule = ref_of(p)
    bs = p.block_size
    nb = -(-seq_len // bs)
    blk = np.array([[rule(a, b) for b in range(nb)] for a in range(nb)], dtype=bool)
    qpos = np.arange(seq_len - q_len, seq_len)
    kpos = np.arange(seq_len)
    return blk[qpos[:, None] // bs, kpos[None, :] // bs] & (kpos[None, :] <= qpos[:, None])


def densify(bl: BlockLists) -> np.ndarray:
    """Token mask (q_len, seq_len) from block lists alone: kept blocks, causal on the diagonal."""
    n, m, bs = bl.seq_len, bl.q_len, bl.block_size
    out = np.zeros((m, n), dtype=bool)
    q0 = n - m
    for r in range(bl.num_q_blocks):
        qb = bl.first_q_block + r
        for kb in bl.row(r):
            for qp in range(max(qb * bs, q0), min((qb + 1) * bs, n)):
                ks = np.arange(kb * bs, min((kb + 1) * bs, n))
                out[qp - q0, ks[ks <= qp]] = True
    return out


ALL_PATTERNS = [
    lambda bs: power_pattern(bs, 5, 1),
    lambda bs: power_pattern(bs, 1, 0),
    lambda bs: power_pattern(bs, 3, 2),
    lambda bs: sliding_window_pattern(bs, 3, 1),
    lambda bs: sliding_window_pattern(bs, 1, 0),
    lambda bs: stride_slash_pattern(bs, 2, 1, 3),
    lambda bs: dilated_pattern(bs, 2, 7, 1, 0),
    lambda bs: dilated_pattern(bs, 3, 0, 2, 1),
    lambda bs: longnet_pattern(bs, 2, 1, 2, 3),
    lambda bs: longnet_pattern(bs, 3, 2, 2, 2),
    lambda bs: full_pattern(bs),
]


# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", ALL_PATTERNS)
@pytest.mark.parametrize("bs,seq_len", [(4, 37), (8, 64), (5, 3), (16, 143)])
def test_rule_predicate_and_builder_agree(make, bs, seq_len):
    p = make(bs)
    ref = ref_token_mask(p, seq_len)
    # the token predicate (torch, as FlexAttention calls it)
    np.testing.assert_array_equal(p.dense_mask(seq_len), ref)
    # the numpy block rule
    nb = -(-seq_len // bs)
    a, b = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
    blk = np.array([[ref_of(p)(i, j) for j in range(nb)] for i in range(nb)])
    np.testing.assert_array_equal(p.block_rule(a, b), blk)
    # the fast builder, densified
    bl = p.block_lists(seq_len)
    np.testing.assert_array_equal(densify(bl), ref)
    np.testing.assert_array_equal(bl.to_dense_blocks(), blk)


@pytest.mark.parametrize("make", ALL_PATTERNS)
@pytest.mark.parametrize("seq_len,q_len", [(37, 1), (37, 5), (40, 9), (41, 41), (64, 8), (1, 1)])
def test_builder_decode_and_chunk_rows(make, seq_len, q_len):
    p = make(4)
    bl = p.block_lists(seq_len, q_len)
    assert bl.first_q_block == (seq_len - q_len) // 4
    np.testing.assert_array_equal(densify(bl), ref_token_mask(p, seq_len, q_len))
    np.testing.assert_array_equal(p.dense_mask(seq_len, q_len), ref_token_mask(p, seq_len, q_len))
    if q_len == 1:
        last = ref_token_mask(p, seq_len, 1)[0]
        expect = np.unique(np.nonzero(last)[0] // 4)
        np.testing.assert_array_equal(p.decode_blocks(seq_len), expect)


@pytest.mark.parametrize("make", ALL_PATTERNS)
def test_block_lists_layout(make):
    p = make(3)
    bl = p.block_lists(50)
    for arr in (bl.kv_num_blocks, bl.kv_indices, bl.full_kv_num_blocks, bl.full_kv_indices,
                bl.partial_kv_num_blocks, bl.partial_kv_indices):
        assert arr.dtype == np.int32
    assert bl.kv_indices.shape == (bl.num_q_blocks, bl.kv_num_blocks.max())
    for r in range(bl.num_q_blocks):
        qb = bl.first_q_block + r
        row = bl.row(r)
        assert np.all(np.diff(row) > 0), "ascending and unique"
        assert row[-1] == qb, "diagonal kept and last"
        full = bl.full_kv_indices[r, : bl.full_kv_num_blocks[r]]
        np.testing.assert_array_equal(full, row[:-1])
        assert bl.partial_kv_num_blocks[r] == 1 and bl.partial_kv_indices[r, 0] == qb


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["power", "sliding", "stride", "dilated", "longnet"]),
    a=st.integers(1, 9), b=st.integers(0, 4), c=st.integers(1, 12), levels=st.integers(1, 5),
    nb=st.integers(1, 300), q_frac=st.floats(0, 1),
)
def test_builder_matches_rule_property(kind, a, b, c, levels, nb, q_frac):
    """Block-level: builder == block rule == scalar reference, random parameters, up to 300 blocks."""
    if kind == "power":
        p = power_pattern(2, a, b)
    elif kind == "sliding":
        p = sliding_window_pattern(2, a, b)
    elif kind == "stride":
        p = stride_slash_pattern(2, a, b, c)
    elif kind == "dilated":
        p = dilated_pattern(2, a, c if b % 2 else 0, 1 + b, b)
    else:
        p = longnet_pattern(2, a, 1 + b, 2, levels)
    seq_len = 2 * nb - (nb % 2)  # last block partial half the time
    q_len = max(1, int(q_frac * seq_len))
    bl = p.block_lists(seq_len, q_len)
    qb = np.arange(bl.first_q_block, nb)[:, None]
    kb = np.arange(nb)[None, :]
    np.testing.assert_array_equal(bl.to_dense_blocks(), p.block_rule(qb, kb))
    rule = ref_of(p)
    for r in (0, bl.num_q_blocks - 1):
        q = bl.first_q_block + r
        assert bl.row(r).tolist() == [j for j in range(nb) if rule(q, j)]


def test_power_known_rows():
    p = power_pattern(256, 5, 1)
    # block 127 at 32K: window 127..123, powers 126,125,123,119,111,95,63, sink 0
    assert p.decode_blocks(32768).tolist() == [0, 63, 95, 111, 119, 123, 124, 125, 126, 127]
    assert p.decode_blocks(256).tolist() == [0]
    assert p.decode_blocks(257).tolist() == [0, 1]


def test_builder_is_linear_not_quadratic():
    # 4M tokens with 128-token blocks: 32768 blocks; a dense nb x nb would be 1 GiB of bools
    bl = power_pattern(128).block_lists(1 << 22)
    # window 0..4, powers 8..16384 (1, 2, 4 are inside the window), sink 0
    assert bl.kv_indices.shape == (32768, 5 + 12 + 1)
    assert bl.kv_num_blocks.max() == 18


def test_density_and_mask_mod_tracing():
    p = power_pattern(4, 2, 1)
    n = 33
    m = p.dense_mask(n)
    causal = n * (n + 1) / 2
    assert p.token_density(n) == pytest.approx(m.sum() / causal)
    blk = p.block_lists(n).to_dense_blocks()
    nb = blk.shape[0]
    assert p.density(n) == pytest.approx(blk.sum() / (nb * (nb + 1) / 2))
    assert full_pattern(4).density(n) == 1.0
    # mask_mod under vmap, as create_block_mask / flex_attention call it
    mm = p.mask_mod
    f = torch.vmap(torch.vmap(mm, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None))
    out = f(torch.tensor(0), torch.tensor(0), torch.arange(n), torch.arange(n))
    np.testing.assert_array_equal(out.numpy(), m)


def test_matched_baselines_equal_budget():
    n = 32768
    pats = matched_baselines(n)
    target = pats["power"].kept_blocks_per_row(n).mean()
    for name in ("sliding_window", "stride_slash", "dilated"):
        got = pats[name].kept_blocks_per_row(n).mean()
        assert abs(got - target) / target < 0.1, (name, got, target)
    # LongNet's budget moves in powers of two of its segment; it is the closest available
    assert abs(pats["longnet"].kept_blocks_per_row(n).mean() - target) / target < 0.3
    assert set(pats) == {"power", "sliding_window", "stride_slash", "dilated", "longnet", "full"}


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(window=0), dict(sink=-1), dict(block_size=2.5)])
def test_bad_pattern_params(bad):
    with pytest.raises((ValueError, TypeError)):
        power_pattern(**{"block_size": 4, **bad})
    with pytest.raises(ValueError):
        power_pattern(4).block_lists(10, 11)
    with pytest.raises(ValueError):
        power_pattern(4).block_lists(0)


# ------------------------------------------------------------------------ FlexAttention
def _dense_sdpa(q, k, v, mask, scale=None):
    g = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(g, 1)
    vv = v.float().repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(
        q.float(), kk, vv, attn_mask=torch.as_tensor(mask), scale=scale)


@pytest.mark.parametrize("make", [lambda: power_pattern(16, 2, 1), lambda: stride_slash_pattern(16, 2, 1, 3),
                                  lambda: longnet_pattern(16, 2, 1, 2, 3)])
def test_block_mask_contents_match_builder(make):
    p = make()
    n = 16 * 13 + 5
    bm = to_block_mask(p, n, batch=2, heads=3)
    assert bm.seq_lengths == (n, n)
    assert bm.kv_num_blocks.shape == (2, 3, 14)
    bl = p.block_lists(n)
    dense = bm.to_dense()[1, 2].numpy().astype(bool)
    np.testing.assert_array_equal(dense, bl.to_dense_blocks())
    # partial (mask_mod applied) = diagonal only; full = the rest
    assert (bm.kv_num_blocks == 1).all()
    np.testing.assert_array_equal(bm.kv_indices[0, 0, :, 0].numpy(), np.arange(14))
    np.testing.assert_array_equal(bm.full_kv_num_blocks[0, 0].numpy(), bl.full_kv_num_blocks)
    # FlexAttention's own builder, from the token predicate, finds the same tiles
    from torch.nn.attention.flex_attention import create_block_mask

    ref = create_block_mask(p.mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=16)
    np.testing.assert_array_equal(ref.to_dense()[0, 0].numpy().astype(bool), bl.to_dense_blocks())
    # create_block_mask calls every tile of a partial last query block "partial" (it evaluates
    # padded rows); ours are full there too, which the compiled test below shows is correct
    np.testing.assert_array_equal(ref.full_kv_num_blocks[0, 0, :-1].numpy(), bl.full_kv_num_blocks[:-1])


def test_flex_attention_eager_equals_dense_and_ignores_block_lists():
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    p = power_pattern(16, 2, 1)
    n = 16 * 9 + 3
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    ref = _dense_sdpa(q, k, v, p.dense_mask(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=to_block_mask(p, n))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # pitfall: block lists that say "diagonal only" with a causal mask_mod; the eager path
        # evaluates mask_mod densely and ignores the lists, so it returns full causal attention
        nb = -(-n // 16)
        kvn = torch.ones(1, 1, nb, dtype=torch.int32)
        kvi = torch.zeros(1, 1, nb, nb, dtype=torch.int32)
        kvi[0, 0, :, 0] = torch.arange(nb)
        bm = BlockMask.from_kv_blocks(kvn, kvi, BLOCK_SIZE=16, mask_mod=lambda b, h, qi, ki: qi >= ki,
                                      seq_lengths=(n, n))
        eager = flex_attention(q, k, v, block_mask=bm)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(eager, causal, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HSR_SLOW"), reason="torch.compile on CPU takes ~15-30 s; set HSR_SLOW=1")
def test_flex_attention_compiled_equals_dense_and_honours_block_lists():
    from torch.nn.attention.flex_attention import flex_attention

    p = power_pattern(128, 2, 1)
    n = 128 * 7 + 40
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    f = torch.compile(flex_attention)
    out = f(q, k, v, block_mask=to_block_mask(p, n))
    torch.testing.assert_close(out, _dense_sdpa(q, k, v, p.dense_mask(n)), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- power_attention
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("hkv,g", [(2, 1), (1, 4), (2, 7)])
@pytest.mark.parametrize("n,m", [(77, 77), (77, 1), (64, 1), (77, 20), (16, 16)])
def test_power_attention_matches_dense(dtype, tol, hkv, g, n, m):
    p = power_pattern(8, 2, 1)
    gen = torch.Generator().manual_seed(n * 131 + m + g)
    q = torch.randn(2, hkv * g, m, 16, generator=gen).to(dtype)
    k = torch.randn(2, hkv, n, 16, generator=gen).to(dtype)
    v = torch.randn(2, hkv, n, 12, generator=gen).to(dtype)
    out = power_attention(q, k, v, p)
    assert out.dtype == dtype and out.shape == (2, hkv * g, m, 12)
    ref = _dense_sdpa(q, k, v, p.dense_mask(n, m))
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("make", ALL_PATTERNS[3:])
def test_power_attention_other_patterns_and_scale(make):
    p = make(8)
    n, m = 61, 29
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, m, 8, generator=gen)
    k = torch.randn(1, 2, n, 8, generator=gen)
    v = torch.randn(1, 2, n, 8, generator=gen)
    out = power_attention(q, k, v, p, scale=0.3)
    torch.testing.assert_close(out, _dense_sdpa(q, k, v, p.dense_mask(n, m), scale=0.3), atol=1e-5, rtol=1e-5)


def test_power_attention_numpy_and_default_pattern():
    rng = np.random.default_rng(0)
    n = 700  # 256-token blocks, last one partial
    q = rng.standard_normal((1, 2, n, 8), dtype=np.float32)
    k = rng.standard_normal((1, 1, n, 8), dtype=np.float32)
    v = rng.standard_normal((1, 1, n, 8), dtype=np.float32)
    out = power_attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    ref = _dense_sdpa(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), power_pattern().dense_mask(n))
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=1e-5)


def _emulated_kernel(q, k, v, kv_num_blocks, kv_indices, block_size, causal, scale):
    """The documented contract of hsr.kernels.block_sparse_attention, written densely: query i
    sits at N - M + i and reads list row (N - M + i) // bs - off, off = 0 when the list has
    ceil(N / bs) rows and (N - M) // bs otherwise; keys of the listed blocks, causal."""
    B, H, M, D = q.shape
    N = k.shape[2]
    R = kv_num_blocks.shape[-1]
    off = 0 if R == -(-N // block_size) else (N - M) // block_size
    pos = torch.arange(N - M, N)
    mask = torch.zeros(M, N, dtype=torch.bool)
    for i in range(M):
        row = int(pos[i]) // block_size - off
        for kb in kv_indices[0, 0, row, : kv_num_blocks[0, 0, row]].tolist():
            mask[i, kb * block_size : (kb + 1) * block_size] = True
    mask &= torch.arange(N)[None, :] <= pos[:, None]
    return _dense_sdpa(q, k, v, mask, scale=scale)


@pytest.mark.parametrize("n,m", [(77, 77), (77, 1), (77, 30), (80, 16), (80, 13), (8, 3)])
def test_kernel_block_lists_contract(n, m):
    """What the CUDA branch hands the kernel, checked on CPU against the kernel's contract."""
    p = power_pattern(8, 2, 1)
    kvn, kvi = kernel_block_lists(p, n, m)
    assert kvn.dtype == np.int32 and kvi.dtype == np.int32
    assert kvn.shape == (1, 1, -(-n // 8) - (n - m) // 8) and kvi.shape[:3] == kvn.shape
    torch.manual_seed(1)
    q = torch.randn(1, 2, m, 8)
    k = torch.randn(1, 2, n, 8)
    v = torch.randn(1, 2, n, 8)
    out = _emulated_kernel(q, k, v, torch.from_numpy(kvn), torch.from_numpy(kvi), 8, True, None)
    torch.testing.assert_close(out, power_attention(q, k, v, p), atol=1e-5, rtol=1e-5)
    try:  # the kernel author's own dense reference of the list semantics, when present
        from hsr.testing.references import block_mask_dense
    except Exception:  # pragma: no cover - module owned by another component
        return
    dense = block_mask_dense(torch.from_numpy(kvn), torch.from_numpy(kvi), 1, 2, m, n, 8, causal=True)
    np.testing.assert_array_equal(dense[0, 0].numpy(), p.dense_mask(n, m))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,m", [(1000, 1000), (1000, 1), (1000, 300)])
def test_power_attention_cuda_matches_cpu(n, m):
    p = power_pattern(128, 2, 1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, m, 64, generator=gen)
    k = torch.randn(1, 2, n, 64, generator=gen)
    v = torch.randn(1, 2, n, 64, generator=gen)
    ref = power_attention(q, k, v, p)
    out = power_attention(q.cuda().half(), k.cuda().half(), v.cuda().half(), p)
    assert out.is_cuda and out.dtype == torch.float16
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-3, rtol=2e-3)


def test_power_attention_bad_inputs():
    p = power_pattern(8)
    q = torch.randn(1, 4, 10, 8)
    k = torch.randn(1, 2, 10, 8)
    v = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        power_attention(torch.randn(1, 3, 10, 8), k, v, p)
    with pytest.raises(ValueError, match="shape"):
        power_attention(q[0], k, v, p)
    with pytest.raises(ValueError, match="head dim"):
        power_attention(torch.randn(1, 4, 10, 4), k, v, p)
    with pytest.raises(ValueError, match="must be <= kv_len"):
        power_attention(torch.randn(1, 4, 11, 8), k, v, p)
    with pytest.raises(ValueError, match="does not match"):
        power_attention(q, k, torch.randn(1, 2, 9, 8), p)
    with pytest.raises(ValueError, match="batch"):
        power_attention(torch.randn(2, 4, 10, 8), k, v, p)
    bad = q.clone()
    bad[0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        power_attention(bad, k, v, p)
    with pytest.raises(ValueError, match="NaN or Inf"):
        power_attention(q, k, v.masked_fill(v > 2.5, float("inf")) if (v > 2.5).any() else v + float("inf"), p)
    with pytest.raises(TypeError, match="dtype"):
        power_attention(q.double(), k.double(), v.double(), p)
    with pytest.raises(TypeError, match="share a dtype"):
        power_attention(q.half(), k, v, p)
    with pytest.raises(TypeError, match="float32"):
        power_attention(q.numpy().astype(np.float64), k.numpy(), v.numpy(), p)
    with pytest.raises(TypeError, match="all numpy"):
        power_attention(q.numpy(), k, v, p)
    with pytest.raises(TypeError, match="Pattern"):
        power_attention(q, k, v, "power")
    with pytest.raises(TypeError):
        power_attention([1.0], k, v, p)


def test_check_finite_reads_only_kept_blocks():
    p = power_pattern(4, 1, 1)  # block 9 reads 9, 8, 7, 5, 1, 0: blocks 2, 3, 4, 6 are never read
    q = torch.randn(1, 1, 1, 4)
    k = torch.randn(1, 1, 40, 4)
    v = torch.randn(1, 1, 40, 4)
    k[0, 0, 13] = float("nan")  # block 3
    ref = power_attention(q, k.nan_to_num(), v, p)
    torch.testing.assert_close(power_attention(q, k, v, p), ref)
    k[0, 0, 21] = float("inf")  # block 5, read
    with pytest.raises(ValueError, match="NaN or Inf"):
        power_attention(q, k, v, p)
    out = power_attention(q, k, v, p, check_finite=False)
    assert not torch.isfinite(out).all()
