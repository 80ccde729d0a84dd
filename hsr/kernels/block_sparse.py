"""Block-sparse attention over a BSR block list (FlexAttention ``BlockMask`` convention).

Kernels and a merge:

- prefill (kernels in ``_prefill.py``): ``_bsa_prefill_v2_kernel`` (the default) with ``_split_lists_kernel``: each
  list row split into full blocks (no mask) and partial ones (the diagonal, a last block
  past N), query tiles launched last-first, optional GQA packing; see the comment block
  above the kernel in ``_prefill.py`` and docs/kernels.md ("Prefill on the GPU").
- ``_bsa_prefill_kernel`` (kept for the layout knobs ``block_ptr``, ``flat=False``,
  ``k_rowmajor=False``): one program per (query tile of ``BLOCK_M`` rows, batch*query head);
  FlashAttention-style online softmax over the key blocks listed for the tile's query block,
  each block walked in ``BLOCK_N``-key sub-tiles. Memory traffic: Q and O once, and per
  (query tile, listed block) one read of the block's K and V (GQA heads of a group re-read
  the same K/V, mostly from L2). FLOPs: ``4 * D * (#allowed query-key pairs, tile-rounded)``.
- ``_bsa_decode_kernel``: split-KV for few queries. One program per (split of the block
  list, batch, group of query heads): the ``HPP * M`` query rows of all query heads that share
  a kv head (and a block list) are stacked into one tile so that each K/V tile is read once
  for the whole group. Each program writes a partial output (normalised) and its lse;
  ``_merge_kernel`` combines the splits. The tile gathers ``BLOCK_N`` keys from
  ``BLOCK_N // UNIT`` contiguous runs of ``UNIT`` keys, so small blocks (16/32/64 keys, as
  the HSR index uses) still feed a wide tile.
- ``_merge_kernel``: ``out = sum_s exp(lse_s - lse) * out_s``, ``lse = logsumexp_s lse_s``.

Conventions (queries are the last ``M`` of ``N`` positions; list rows; GQA) are those of
``hsr.testing.references`` and docs/kernels.md.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .._typing import lazy
from . import _blockmask
from ._compat import interpreting as _interpreting
from ._compat import patch_interpreter
from .._shapes import list_row_offset
from ._softmax import LN2, LOG2E, _dot, _online_softmax_step, _softmax_epilogue  # noqa: F401  (LN2, _dot: re-exported)
from ._softmax import _pdl_enter
from ._validate import check_merge_inputs, check_triton_device
from ._validate import (MAX_STACKED_ROWS, MIN_TILE, check_attention_inputs, check_block_lists,
                        check_int32_offsets, check_positions, check_tile)
from ._prefill import _bsa_prefill_kernel, _prefill_v2, split_block_lists  # noqa: F401  (split_block_lists re-exported)

patch_interpreter()

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask
else:  # flex_attention is imported only by who makes a BlockMask (see _blockmask.is_block_mask)
    BlockMask = lazy("torch.nn.attention.flex_attention", "BlockMask")


@triton.jit
def _bsa_decode_kernel(
    Q, K, V, POS, OP, LSEP, KVN, KVI,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, spb, sph,
    snb, snh, snr, sib, sih, sir, sic,
    Hq, M, N, NVALID, GROUP, HPP, LIST_GROUP, LROW, NUM_SPLITS, BH_ROWS, qk_scale,
    BLOCK_SIZE: tl.constexpr, UNIT: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_POS: tl.constexpr, UPCAST: tl.constexpr,
):
    tl.static_assert(BLOCK_N % UNIT == 0)
    tl.static_assert(BLOCK_SIZE % UNIT == 0)
    UPB: tl.constexpr = BLOCK_SIZE // UNIT
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
    n_groups = Hq // HPP
    b = pid_g // n_groups
    h0 = (pid_g % n_groups) * HPP
    hk = h0 // GROUP
    lh = h0 // LIST_GROUP
    # ---- stacked query rows: row r is head h0 + r // M, query m = r % M
    offs_r = tl.arange(0, ROWS)
    r_ok = offs_r < HPP * M
    head = h0 + offs_r // M
    mrow = offs_r % M
    qpos = NVALID - M + mrow
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * sqb + head[:, None] * sqh + mrow[:, None] * sqm
                + offs_d[None, :], mask=r_ok[:, None], other=0.0)
    nblk = tl.load(KVN + b * snb + lh * snh + LROW * snr)
    kvi_base = KVI + b * sib + lh * sih + LROW * sir
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    # split the ACTUAL list (not its allocated length) evenly over the NUM_SPLITS programs
    TU: tl.constexpr = BLOCK_N // UNIT
    n_units = nblk * UPB
    tiles_per = tl.cdiv(tl.cdiv(n_units, TU), NUM_SPLITS)
    u_lo = pid_s * tiles_per * TU
    u_hi = tl.minimum(u_lo + tiles_per * TU, n_units)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for u0 in range(u_lo, u_hi, BLOCK_N // UNIT):
        u = u0 + offs_n0 // UNIT
        u_ok = u < u_hi
        blk = tl.load(kvi_base + (u // UPB) * sic, mask=u_ok, other=0)
        key = blk * BLOCK_SIZE + (u % UPB) * UNIT + offs_n0 % UNIT
        kmask = u_ok & (key < N)
        if HAS_POS:
            # pad rows (pos >= NVALID) are masked out of the loads: their bytes are not read
            pos = tl.load(POS + b.to(tl.int64) * spb + hk * sph + key, mask=kmask, other=0)
            kmask = kmask & (pos < NVALID)
        else:
            pos = key
        kt = tl.load(k_base + key[None, :] * skn + offs_d[:, None],
                     mask=kmask[None, :], other=0.0)
        keep = kmask & (pos < NVALID)
        keep2 = keep[None, :]
        if CAUSAL:
            keep2 = keep2 & (pos[None, :] <= qpos[:, None])
        s = _dot(q, kt, UPCAST) * qk_scale
        s = tl.where(keep2, s, float("-inf"))
        vt = tl.load(v_base + key[:, None] * svn + offs_d[None, :],
                     mask=kmask[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, vt, m_i, l_i, acc, UPCAST)
    l_safe, lse = _softmax_epilogue(m_i, l_i)
    out = acc / l_safe[:, None]
    # partials laid out (split, B*Hq*M, D) / (split, B*Hq*M), row = (b*Hq + head)*M + m
    prow = (b * Hq + head) * M + mrow
    tl.store(OP + (pid_s * BH_ROWS + prow[:, None]).to(tl.int64) * HEAD_DIM + offs_d[None, :],
             out, mask=r_ok[:, None])
    tl.store(LSEP + pid_s * BH_ROWS + prow, lse, mask=r_ok)


@triton.jit
def _merge_kernel(OP, LSEP, O, LSE, S, BH_ROWS, M,
                  sob, soh, som, HqM, LENS, T, CAP, G,
                  BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr, ADVANCE: tl.constexpr):
    # ADVANCE: the program of row (b, the group's first head, m 0) also advances the group's
    # length LENS[b * Hkv + head // G] by T (not past CAP), for a launch before that added T
    # tokens while its other programs still read the old length
    if PDL:  # launched before the kernel that wrote the partials ended: wait for it
        _pdl_enter()
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < S
    lse_s = tl.load(LSEP + offs_s * BH_ROWS + row, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse_s, 0)
    mx_use = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse_s - mx_use)
    tot = tl.sum(w, 0)
    o_s = tl.load(OP + (offs_s[:, None] * BH_ROWS + row).to(tl.int64) * HEAD_DIM
                  + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    tot_safe = tl.where(tot > 0.0, tot, 1.0)
    out = tl.sum(o_s * w[:, None], 0) / tot_safe
    lse = tl.where(tot > 0.0, mx_use + tl.log(tot_safe), float("-inf"))
    b = row // HqM
    rem = row % HqM
    h = rem // M
    m = rem % M
    tl.store(O + b.to(tl.int64) * sob + h * soh + m * som + offs_d, out.to(O.dtype.element_ty))
    tl.store(LSE + row, lse)
    if ADVANCE:
        if (h % G == 0) & (m == 0):
            bh = b * (HqM // M // G) + h // G
            n = tl.load(LENS + bh)
            tl.store(LENS + bh, tl.where(n + T > CAP, n, n + T))


# ----------------------------------------------------------------------------- wrappers

def _num_sms(device) -> int:
    """Multiprocessors of a CUDA device; 4 elsewhere (the interpreter: keeps grids small)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _list_strides(kv_num_blocks, kv_indices):
    Bl, Hl = kv_num_blocks.shape[:2]
    sn = list(kv_num_blocks.stride())
    si = list(kv_indices.stride())
    if Bl == 1:
        sn[0] = si[0] = 0
    if Hl == 1:
        sn[1] = si[1] = 0
    return sn, si


def merge_partials(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, M: int,
                   *, pdl: bool = False, advance: tuple | None = None) -> None:
    """Combine split partials ``(S, B*Hq*M, D)`` / ``(S, B*Hq*M)`` into ``out`` ``(B,Hq,M,D)``
    and ``lse`` ``(B,Hq,M)`` (contiguous float32). ``pdl``: launch it as a programmatic
    dependent launch (:func:`~hsr.kernels._compat.pdl_supported` devices only).
    ``advance=(lengths, t, capacity, G)``: also add ``t`` to each of the int32 ``(B*Hkv,)``
    ``lengths`` (``G`` query heads a kv head), leaving a length that would pass ``capacity``."""
    check_triton_device("merge_partials", o_part=o_part, lse_part=lse_part, out=out, lse=lse)
    check_merge_inputs(o_part, lse_part, out, lse, M, advance)
    S, BHM, D = o_part.shape
    Hq = out.shape[1]
    lens, t, cap, G = advance if advance is not None else (lse, 0, 0, 1)  # without: unread
    _merge_kernel[(BHM,)](
        o_part, lse_part, out, lse, S, BHM, M,
        out.stride(0), out.stride(1), out.stride(2), Hq * M, lens, t, cap, G,
        BLOCK_S=max(triton.next_power_of_2(S), 2), HEAD_DIM=D, PDL=bool(pdl), launch_pdl=bool(pdl),
        ADVANCE=advance is not None)


#: benchmarks set this to time the first prefill kernel with its default knobs
_FORCE_V1 = False


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           kv_num_blocks: torch.Tensor | BlockMask | None = None,
                           kv_indices: torch.Tensor | None = None, *, block_mask: BlockMask | None = None,
                           block_size: int | None = None, causal: bool | None = None, scale: float | None = None,
                           return_lse: bool = False, block_m: int | None = None, block_n: int | None = None,
                           num_splits: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                           k_rowmajor: bool = True, block_ptr: bool = False, flat: bool = True,
                           positions: torch.Tensor | None = None, n_valid: int | None = None, check_values: bool = True
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention over a BSR block list or a FlexAttention ``BlockMask``.

    ``block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size=128)`` takes
    block lists; ``block_sparse_attention(q, k, v, block_mask=bm)`` (or ``bm`` in the
    ``kv_num_blocks`` position) takes a ``BlockMask`` from
    ``torch.nn.attention.flex_attention.create_block_mask`` and computes what
    ``flex_attention(q, k, v, block_mask=bm)`` computes: partial and full blocks, the mask's
    ``BLOCK_SIZE``, its ``mask_mod`` on the partial blocks when that is the causal rule or
    keeps everything; any other ``mask_mod`` raises ``ValueError`` (see
    ``hsr.kernels._blockmask``). Under ``torch.compile`` the call goes through the custom op
    ``torch.ops.hsr.block_sparse_attention`` (``hsr.kernels.ops``).

    Parameters
    ----------
    q : Tensor ``(B, Hq, M, D)`` float16/bfloat16/float32, last dim contiguous.
    k, v : Tensor ``(B, Hkv, N, D)``, same dtype, ``Hq % Hkv == 0``, last dim contiguous.
    kv_num_blocks : int32 ``(Bl, Hl, R)``; ``Bl in {1, B}``, ``Hl in {1, Hkv, Hq}``; each
        count in ``[0, max_blocks]``. Or a ``BlockMask`` (then no ``kv_indices``).
    kv_indices : int32 ``(Bl, Hl, R, max_blocks)``; key-block ids in
        ``[0, ceil(N / block_size))`` at granularity ``block_size``; the first
        ``kv_num_blocks`` entries of a row are used (any order; duplicates would be counted
        twice). The ``kv_num_blocks/kv_indices`` of a ``BlockMask`` are only its *partial*
        blocks: pass the ``BlockMask`` itself, not them.
    block_mask : ``torch.nn.attention.flex_attention.BlockMask``, optional
        Made for ``seq_lengths == (M, N)``; batch dim 1 or ``B``, head dim 1 or ``Hq``.
        ``block_size`` and ``causal`` then come from the mask and must be left unset.
    block_size : int, default 128; query- and key-block granularity; multiple of the kernel
        tiles.
    causal : bool, default True; mask key position > query position (query ``i`` sits at
        ``N - M + i``: bottom-right aligned, FlashAttention's convention).
    scale : float, default ``1/sqrt(D)``.
    return_lse : bool, also return the natural-log lse ``(B, Hq, M)`` float32.
    block_m, block_n, num_splits, num_warps, num_stages : tuning knobs (tiles must divide
        ``block_size``); defaults 128x128 prefill tiles (smaller when ``block_size`` is),
        64-key decode tiles, about four programs per multiprocessor for decode.
    k_rowmajor, block_ptr, flat : layout knobs of the first prefill kernel; any non-default
        value (``False``, ``True``, ``False``) selects it instead of the default prefill
        kernel (full/partial block split, longest-work-first order; docs/kernels.md).
    check_values : bool, default True
        Check the lists' values (counts and ids in range) before the launch: one small
        reduction and one host synchronisation, 0.1-0.4 ms per call on an H200. ``False``
        for lists you built and trust (``power_attention`` passes False); an out-of-range id
        then reads out of bounds.
    positions, n_valid : internal (HSR index): int32 ``(B, Hkv, N)`` absolute position of each
        stored key (keys may be permuted) and the number of real positions; only the
        decode path accepts them.

    Returns
    -------
    out ``(B, Hq, M, D)`` in q's dtype (and lse). Rows with no allowed key: zeros, lse -inf.

    Raises
    ------
    ValueError
        Bad shapes, head dim, strides, block lists (counts outside ``[0, max_blocks]``, ids
        outside the key blocks), tile sizes or positions (checked before any launch; see
        ``hsr.kernels._validate``); a ``BlockMask`` for other lengths or whose ``mask_mod``
        the kernel cannot compute.
    TypeError
        Non-tensor inputs, q/k/v dtypes that differ or are not 16/32-bit floats, lists not int32,
        a ``BlockMask`` together with lists, ``block_size`` or ``causal``.

    The list row of query ``i`` is ``(N - M + i) // block_size - off`` with ``off = 0`` when
    ``R == ceil(N / block_size)`` and ``off = (N - M) // block_size`` otherwise.
    """
    kv_num_blocks, kv_indices, block_size, causal = _blockmask.block_sparse_intake(
        q, k, v, kv_num_blocks, kv_indices, block_mask, block_size, causal, positions, n_valid, check_values)
    if torch.compiler.is_compiling():  # an opaque custom op: the compiler does not trace the launch
        from .ops import call_block_sparse_attention
        return call_block_sparse_attention(
            q, k, v, kv_num_blocks, kv_indices, block_size=block_size, causal=causal, scale=scale,
            return_lse=return_lse, block_m=block_m, block_n=block_n, num_splits=num_splits,
            num_warps=num_warps, num_stages=num_stages, k_rowmajor=k_rowmajor,
            block_ptr=block_ptr, flat=flat, positions=positions, n_valid=n_valid)
    B, Hq, M, D, Hkv, N = check_attention_inputs(q, k, v)
    check_triton_device("block_sparse_attention", q=q, k=k, v=v)
    check_tile("block_m", block_m)
    check_tile("block_n", block_n)
    check_int32_offsets(N, k, v)
    Bl, Hl, R, list_group = check_block_lists(kv_num_blocks, kv_indices, B, Hq, Hkv, q.device)
    nvalid = N if n_valid is None else int(n_valid)
    # the block list is at absolute positions of the real sequence (n_valid when padded)
    off = 0 if positions is not None else list_row_offset(R, M, nvalid, block_size)
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    upcast = _interpreting() or q.dtype == torch.float32
    sn, si = _list_strides(kv_num_blocks, kv_indices)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)

    one_qblock = (nvalid - M) // block_size == (nvalid - 1) // block_size
    hpp = group if Hl in (1, Hkv) else 1  # query heads stacked per decode program
    rows = hpp * M
    if positions is not None:
        # permuted keys (HSR index): one list row for all queries; decode path only
        check_positions(positions, B, Hkv, N, R, rows)
        one_qblock = True
    if one_qblock and rows <= MAX_STACKED_ROWS:
        # ---- decode path: split-KV, grouped heads
        ROWS = max(MIN_TILE, triton.next_power_of_2(rows))
        UNIT = min(block_size, 64) if block_n is None else min(block_size, block_n)
        BLOCK_N = 64 if block_n is None else block_n
        BLOCK_N = max(BLOCK_N, UNIT)
        if block_size % UNIT != 0 or BLOCK_N % UNIT != 0:
            raise ValueError(f"block_size ({block_size}) and the decode tile ({BLOCK_N} keys) must be "
                             f"multiples of the gather unit ({UNIT} keys): pick block_n dividing block_size")
        max_units = kv_indices.shape[-1] * (block_size // UNIT)
        tile_units = BLOCK_N // UNIT
        n_tiles = max(1, -(-max_units // tile_units))
        n_prog = B * (Hq // hpp)
        if num_splits is None:
            num_splits = max(1, min(n_tiles, -(-4 * _num_sms(q.device) // n_prog)))
        num_splits = max(1, min(num_splits, n_tiles))
        BHM = B * Hq * M
        o_part = torch.empty(num_splits, BHM, D, device=q.device, dtype=torch.float32)
        l_part = torch.empty(num_splits, BHM, device=q.device, dtype=torch.float32)
        if positions is not None:
            pos_t, spb, sph = positions, positions.stride(0), positions.stride(1)
        else:
            pos_t, spb, sph = kv_num_blocks, 0, 0
        lrow = 0 if positions is not None else (nvalid - 1) // block_size - off
        _bsa_decode_kernel[(num_splits, n_prog)](
            q, k, v, pos_t, o_part, l_part, kv_num_blocks, kv_indices,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), spb, sph,
            sn[0], sn[1], sn[2], si[0], si[1], si[2], si[3],
            Hq, M, N, nvalid, group, hpp, list_group, lrow, num_splits, BHM,
            scale * LOG2E,
            BLOCK_SIZE=block_size, UNIT=UNIT, BLOCK_N=BLOCK_N, ROWS=ROWS, HEAD_DIM=D,
            CAUSAL=causal, HAS_POS=positions is not None, UPCAST=upcast,
            num_warps=num_warps or 4, num_stages=num_stages or 3)
        merge_partials(o_part, l_part, out, lse, M)
    elif k_rowmajor and not block_ptr and flat and not _FORCE_V1:
        # ---- prefill (default): full/partial split, longest-work-first tile order
        _prefill_v2(q, k, v, out, lse, kv_num_blocks, kv_indices, block_size=block_size,
                    causal=causal, scale=scale, row_offset=off, list_group=list_group,
                    upcast=upcast, block_m=block_m, block_n=block_n, num_warps=num_warps,
                    num_stages=num_stages)
    else:
        # ---- prefill, first kernel (kept for its layout knobs; see _bsa_prefill_kernel)
        BLOCK_M = block_m or min(128, block_size)
        BLOCK_N = block_n or min(64, block_size)
        if upcast:
            BLOCK_M, BLOCK_N = min(BLOCK_M, 32), min(BLOCK_N, 32)
            BLOCK_M, BLOCK_N = min(BLOCK_M, block_size), min(BLOCK_N, block_size)
        if block_size % BLOCK_M != 0 or block_size % BLOCK_N != 0:
            raise ValueError(f"block_size ({block_size}) must be a multiple of the kernel tiles "
                             f"(block_m={BLOCK_M}, block_n={BLOCK_N})")
        n_mt = (N - 1) // BLOCK_M - (N - M) // BLOCK_M + 1
        nw = num_warps or (8 if (BLOCK_M >= 128 and D >= 128) else 4)
        _bsa_prefill_kernel[(n_mt, B * Hq)](
            q, k, v, out, lse, kv_num_blocks, kv_indices,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            sn[0], sn[1], sn[2], si[0], si[1], si[2], si[3],
            Hq, M, N, group, list_group, off, scale * LOG2E,
            BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=D,
            CAUSAL=causal, UPCAST=upcast, K_ROWMAJOR=bool(k_rowmajor),
            BLOCK_PTR=bool(block_ptr), FLAT=bool(flat), num_warps=nw,
            num_stages=num_stages or 3)
    return (out, lse) if return_lse else out
