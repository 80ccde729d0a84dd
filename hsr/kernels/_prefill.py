"""The block-sparse prefill kernels and their launch (used by ``block_sparse.py``).

- ``_bsa_prefill_kernel`` (v1): one program per (query tile of ``BLOCK_M`` rows, batch*query
  head); FlashAttention-style online softmax over the key blocks listed for the tile's query
  block, each block walked in ``BLOCK_N``-key sub-tiles. Kept for its layout knobs
  (``block_ptr``, ``flat=False``, ``k_rowmajor=False``).
- ``_split_lists_kernel`` + ``_bsa_prefill_v2_kernel`` (the default): each list row split once
  per call into the blocks that need no mask (wholly below the diagonal, wholly inside
  ``[0, N)``) and the ones that do; one unmasked pipelined loop, then a short masked one;
  query tiles launched last-first (the heaviest rows of a causal pattern). See
  docs/kernels.md, "Prefill on the GPU".

Conventions (queries are the last ``M`` of ``N`` positions; list rows; GQA) are those of
``hsr.testing.references`` and docs/kernels.md.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._compat import patch_interpreter
from ._softmax import (LOG2E, _dot, _online_softmax_step, _query_tile, _rescale, _softmax_epilogue,  # noqa: F401
                       _store_rows)

patch_interpreter()


@triton.jit
def _prefill_tile(q, m_i, l_i, acc, k_base, v_base, start, k_hi, N, t_abs, offs_m, offs_d,
                  offs_n0, skn, svn, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  CAUSAL: tl.constexpr, UPCAST: tl.constexpr, K_ROWMAJOR: tl.constexpr,
                  BLOCK_PTR: tl.constexpr):
    # one BLOCK_N-key sub-tile [start, start + BLOCK_N) of a listed block ending at k_hi
    offs_n = start + offs_n0
    kmask = offs_n < k_hi
    if BLOCK_PTR:
        # rows in [k_hi, N) are real memory; they are masked out of the scores below
        kp_ = tl.make_block_ptr(k_base, (N, HEAD_DIM), (skn, 1), (start, 0),
                                (BLOCK_N, HEAD_DIM), (1, 0))
        kr = tl.load(kp_, boundary_check=(0,), padding_option="zero")
        s = _dot(q, tl.trans(kr), UPCAST) * qk_scale
    elif K_ROWMAJOR:
        kr = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :],
                     mask=kmask[:, None], other=0.0)
        s = _dot(q, tl.trans(kr), UPCAST) * qk_scale
    else:
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None],
                     mask=kmask[None, :], other=0.0)
        s = _dot(q, kt, UPCAST) * qk_scale
    need_mask = start + BLOCK_N > k_hi
    if CAUSAL:
        need_mask = need_mask | (start + BLOCK_N - 1 > t_abs)
    if need_mask:
        keep = kmask[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
    if BLOCK_PTR:
        vp_ = tl.make_block_ptr(v_base, (N, HEAD_DIM), (svn, 1), (start, 0),
                                (BLOCK_N, HEAD_DIM), (1, 0))
        vt = tl.load(vp_, boundary_check=(0,), padding_option="zero")
    else:
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :],
                     mask=kmask[:, None], other=0.0)
    return _online_softmax_step(s, vt, m_i, l_i, acc, UPCAST)


@triton.jit
def _bsa_prefill_kernel(
    Q, K, V, O, LSE, KVN, KVI,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    snb, snh, snr, sib, sih, sir, sic,
    Hq, M, N, GROUP, LIST_GROUP, ROW_OFF, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    K_ROWMAJOR: tl.constexpr, BLOCK_PTR: tl.constexpr, FLAT: tl.constexpr,
):
    tl.static_assert(BLOCK_SIZE % BLOCK_M == 0)
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    lh = h // LIST_GROUP
    q, t_abs, offs_m, rows, row_ok, offs_d = _query_tile(Q, b, h, sqb, sqh, sqm, pid_m, M, N,
                                                         BLOCK_M, HEAD_DIM)
    lrow = t_abs // BLOCK_SIZE - ROW_OFF
    nblk = tl.load(KVN + b * snb + lh * snh + lrow * snr)
    kvi_base = KVI + b * sib + lh * sih + lrow * sir
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    q_hi = tl.minimum(t_abs + BLOCK_M, N)  # one past the last query position of the tile

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    if FLAT:
        # one flat loop over (listed block, sub-tile) pairs, so that the software pipeline
        # runs across block boundaries (a block of 128 keys is only 1-4 sub-tiles); the
        # sub-tiles wholly above the diagonal are fully masked (wasted only there)
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
        for t in range(0, nblk * SUB):
            kb = tl.load(kvi_base + (t // SUB) * sic)
            k_lo = kb * BLOCK_SIZE
            k_hi = tl.minimum(k_lo + BLOCK_SIZE, N)
            if CAUSAL:
                k_hi = tl.minimum(k_hi, q_hi)
            start = k_lo + (t % SUB) * BLOCK_N
            m_i, l_i, acc = _prefill_tile(q, m_i, l_i, acc, k_base, v_base, start, k_hi, N,
                                          t_abs, offs_m, offs_d, offs_n0, skn, svn, qk_scale,
                                          BLOCK_N, HEAD_DIM, CAUSAL, UPCAST, K_ROWMAJOR,
                                          BLOCK_PTR)
    else:
        for j in range(0, nblk):
            kb = tl.load(kvi_base + j * sic)
            k_lo = kb * BLOCK_SIZE
            k_hi = tl.minimum(k_lo + BLOCK_SIZE, N)
            if CAUSAL:
                k_hi = tl.minimum(k_hi, q_hi)
            for start in range(k_lo, k_hi, BLOCK_N):
                m_i, l_i, acc = _prefill_tile(q, m_i, l_i, acc, k_base, v_base, start, k_hi,
                                              N, t_abs, offs_m, offs_d, offs_n0, skn, svn,
                                              qk_scale, BLOCK_N, HEAD_DIM, CAUSAL, UPCAST,
                                              K_ROWMAJOR, BLOCK_PTR)
    # ---- epilogue: empty rows give 0 and lse = -inf
    l_safe, lse = _softmax_epilogue(m_i, l_i)
    _store_rows(O, LSE, acc / l_safe[:, None], lse, b, h, rows, row_ok, offs_d, sob, soh, som, slb, slh)


# ----------------------------------------------------------------------------- prefill v2
#
# The default prefill path. Against ``_bsa_prefill_kernel`` (kept for its legacy knobs
# ``block_ptr``, ``flat=False``, ``k_rowmajor=False``) it
#
# * splits each list row, on the device and once per call (``_split_lists_kernel``), into
#   the key blocks that need no mask at all ("full": wholly below the query block under
#   causality and wholly inside ``[0, N)``) followed by the ones that do ("partial": the
#   diagonal block, a last block past ``N``); blocks wholly above the diagonal are dropped.
#   The kernel then runs one flat, software-pipelined loop over the full blocks with no mask
#   and no branch in its body, and a short masked loop over the partial ones (FlexAttention's
#   full/partial split, computed from the positions instead of stored in the mask);
# * launches the query tiles longest-work-first: the heaviest list rows of a causal pattern
#   are the last ones, so by default the grid walks query tiles from the end (or in the
#   order of an explicit ``order`` tensor, e.g. rows sorted by their count of blocks); the
#   query heads of a tile run next to each other in the grid, so the K/V blocks they share
#   are read from L2 by all of them within a short window;
# * optionally packs ``HPP`` query heads of one kv head into one tile (GQA packing:
#   ``BLOCK_M // HPP`` positions of each of ``HPP`` heads, so one K/V tile load feeds all
#   of them; heads past the group are padding rows).

@triton.jit
def _split_lists_kernel(KVN, KVI, FN, PN, OUT, snb, snh, snr, sib, sih, sir, sic,
                        Hl, R, ROW_OFF, N, MAXB,
                        BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_L: tl.constexpr):
    # one program per list row (bl, hl, r): OUT[bl, hl, r] = full blocks, then partial ones
    pid = tl.program_id(0)
    bl = pid // (Hl * R)
    hl = (pid // R) % Hl
    r = pid % R
    num = tl.load(KVN + bl * snb + hl * snh + r * snr)
    j = tl.arange(0, BLOCK_L)
    valid = j < num
    kb = tl.load(KVI + bl * sib + hl * sih + r * sir + j * sic, mask=valid, other=0)
    full = valid & ((kb + 1) * BLOCK_SIZE <= N)
    part = valid & (kb * BLOCK_SIZE < N)
    if CAUSAL:
        qb = r + ROW_OFF  # absolute query block of the row
        full = full & (kb < qb)
        part = part & (kb <= qb)
    part = part & (~full)
    fi = full.to(tl.int32)
    pi = part.to(tl.int32)
    nf = tl.sum(fi, 0)
    fpos = tl.cumsum(fi, 0) - 1
    ppos = nf + tl.cumsum(pi, 0) - 1
    base = OUT + pid.to(tl.int64) * MAXB
    tl.store(base + fpos, kb, mask=full)
    tl.store(base + ppos, kb, mask=part)
    tl.store(FN + pid, nf)
    tl.store(PN + pid, tl.sum(pi, 0))


@triton.jit
def _step_fused(s_raw, v, m_i, l_i, acc, qk_scale):
    # the FlashAttention tutorial's form of _online_softmax_step (GPU, 16-bit only): the scale
    # folded into one FMA per score and P @ V accumulated into acc by the dot itself; an
    # experiment (bench/bench_prefill_gpu.py), same arithmetic up to rounding
    m_new, m_use = _rescale(m_i, tl.max(s_raw, 1) * qk_scale)
    p = tl.math.exp2(s_raw * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _bsa_prefill_v2_kernel(
    Q, K, V, O, LSE, FN, PN, IDX, ORDER, KD, VD,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    Hl, R, MAXB, LBS, LHS,
    Hq, Hkv, M, N, GROUP, LIST_GROUP, ROW_OFF, N_MT, N_HT, HT_PER_KV, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HPP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    ORDER_MODE: tl.constexpr, TMA: tl.constexpr, FUSED: tl.constexpr,
):
    RPH: tl.constexpr = BLOCK_M // HPP  # query positions per head in the tile
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    tl.static_assert(BLOCK_SIZE % RPH == 0)
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    pid = tl.program_id(0)
    # the head tiles of one query tile are adjacent in the grid (shared K/V stays in L2)
    slot = pid // N_HT
    ht = pid % N_HT
    if ORDER_MODE == 0:
        mt = slot
    elif ORDER_MODE == 1:
        mt = N_MT - 1 - slot  # last query tiles (most keys under causality) first
    else:
        mt = tl.load(ORDER + slot)
    b = ht // (Hkv * HT_PER_KV)
    hk = (ht // HT_PER_KV) % Hkv
    hj = ht % HT_PER_KV
    h0 = hk * GROUP + hj * HPP  # first query head of the tile
    lh = h0 // LIST_GROUP  # packed heads share one list (checked by the wrapper)
    q0 = N - M
    t_abs = (q0 // RPH) * RPH + mt * RPH  # first query position of the tile
    offs_r = tl.arange(0, BLOCK_M)
    hr = offs_r // RPH  # head of each stacked row, relative to h0
    pos = t_abs + offs_r % RPH
    row_ok = (pos >= q0) & (pos < N) & (hj * HPP + hr < GROUP)
    head = h0 + hr
    rows = pos - q0
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * sqb + head[:, None].to(tl.int64) * sqh
                + rows[:, None].to(tl.int64) * sqm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    lrow = t_abs // BLOCK_SIZE - ROW_OFF
    lidx = (b * LBS + lh * LHS) * R + lrow  # row of the split lists (Bl, Hl, R) flattened
    nfull = tl.load(FN + lidx)
    npart = tl.load(PN + lidx)
    ibase = IDX + lidx.to(tl.int64) * MAXB
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    q_hi = tl.minimum(t_abs + RPH, N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    # ---- full blocks: every key of the block is allowed for every row of the tile
    kv_row0 = (b * Hkv + hk) * N  # row of this kv head in the (B*Hkv*N, D) view (TMA)
    for t in range(0, nfull * SUB):
        kb = tl.load(ibase + t // SUB)
        start = kb * BLOCK_SIZE + (t % SUB) * BLOCK_N
        if TMA:
            kr = KD.load([kv_row0 + start, 0])
        else:
            offs_n = start + offs_n0
            kr = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :])
        if FUSED:
            s_raw = tl.dot(q, tl.trans(kr))
        else:
            s = _dot(q, tl.trans(kr), UPCAST) * qk_scale
        if TMA:
            vt = VD.load([kv_row0 + start, 0])
        else:
            vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :])
        if FUSED:
            m_i, l_i, acc = _step_fused(s_raw, vt, m_i, l_i, acc, qk_scale)
        else:
            m_i, l_i, acc = _online_softmax_step(s, vt, m_i, l_i, acc, UPCAST)
    # ---- partial blocks (the diagonal one, a last block past N): masked, and only the
    # sub-tiles below the tile's last query position are visited
    for j in range(nfull, nfull + npart):
        kb = tl.load(ibase + j)
        k_lo = kb * BLOCK_SIZE
        k_hi = tl.minimum(k_lo + BLOCK_SIZE, N)
        if CAUSAL:
            k_hi = tl.minimum(k_hi, q_hi)
        for start in range(k_lo, k_hi, BLOCK_N):
            offs_n = start + offs_n0
            kmask = offs_n < k_hi
            kr = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :],
                         mask=kmask[:, None], other=0.0)
            s = _dot(q, tl.trans(kr), UPCAST) * qk_scale
            keep = kmask[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= pos[:, None])
            s = tl.where(keep, s, float("-inf"))
            vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :],
                         mask=kmask[:, None], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, vt, m_i, l_i, acc, UPCAST)
    l_safe, lse = _softmax_epilogue(m_i, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b.to(tl.int64) * sob + head[:, None].to(tl.int64) * soh
             + rows[:, None].to(tl.int64) * som + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * slb + head * slh + rows, lse, mask=row_ok)


def split_block_lists(kv_num_blocks, kv_indices, *, block_size, n_keys, row_offset, causal):
    """Reorder each list row into full blocks then partial blocks (see ``_split_lists_kernel``).

    Parameters
    ----------
    kv_num_blocks : int32 ``(Bl, Hl, R)``; kv_indices : int32 ``(Bl, Hl, R, max_blocks)``.
    block_size : int; n_keys : int, ``N``; row_offset : int, absolute query block of row 0.
    causal : bool, drop blocks above the diagonal and mark the diagonal one partial.

    Returns
    -------
    full_num, part_num : int32 ``(Bl * Hl * R,)``
    idx : int32 ``(Bl * Hl * R, max_blocks)``: the first ``full_num`` entries of a row are
        its full blocks, the next ``part_num`` its partial ones (list order kept in each).
    """
    Bl, Hl, R, maxb = kv_indices.shape
    rows = Bl * Hl * R
    dev = kv_indices.device
    fn = torch.empty(rows, device=dev, dtype=torch.int32)
    pn = torch.empty(rows, device=dev, dtype=torch.int32)
    idx = torch.empty(rows, max(maxb, 1), device=dev, dtype=torch.int32)
    if rows == 0:
        return fn, pn, idx
    sn = kv_num_blocks.stride()
    si = kv_indices.stride()
    _split_lists_kernel[(rows,)](
        kv_num_blocks, kv_indices, fn, pn, idx, sn[0], sn[1], sn[2], si[0], si[1], si[2], si[3],
        Hl, R, row_offset, n_keys, idx.shape[1],
        BLOCK_SIZE=block_size, CAUSAL=bool(causal),
        BLOCK_L=max(16, triton.next_power_of_2(max(maxb, 1))), num_warps=4)
    return fn, pn, idx


def _prefill_v2(q, k, v, out, lse, kv_num_blocks, kv_indices, *, block_size, causal, scale,
                row_offset, list_group, upcast, block_m=None, block_n=None, heads_per_tile=1,
                order=None, num_warps=None, num_stages=None, split=None, tma=False,
                fused=False):
    """Launch ``_bsa_prefill_v2_kernel`` (the default prefill path of
    :func:`block_sparse_attention`); arguments as there, already checked.

    heads_per_tile : query heads of one kv head stacked in a tile (GQA packing; a power of
        two; lists must then be shared by the kv head's query heads, ``Hl in {1, Hkv}``).
    order : None (causal: last query tiles first, else in order), ``"lpt"`` (query tiles
        sorted by their count of listed blocks, most first) or ``"natural"``.
    split : the output of :func:`split_block_lists` when the caller already has it.
    tma, fused : GPU experiments: K/V of the full blocks through tensor descriptors (TMA;
        k, v contiguous), and the fused softmax step ``_step_fused``. Ignored when upcasting.
    """
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    group = Hq // Hkv
    Bl, Hl, R, maxb = kv_indices.shape
    hpp = int(heads_per_tile)
    if hpp < 1 or hpp & (hpp - 1):
        raise ValueError(f"heads_per_tile must be a power of two >= 1, got {heads_per_tile!r}")
    if hpp > 1 and Hl not in (1, Hkv):
        raise ValueError("heads_per_tile > 1 needs block lists shared by the query heads of a kv "
                         f"head (list heads 1 or {Hkv}), got {Hl}")
    # 128x128 tiles, 8 warps, 3 stages: the fastest of the measured configs on an H200 at
    # 32K and 128K (bench/results/prefill_h200_2026-11-30.json, "sweep")
    BLOCK_M = block_m or min(128, block_size * hpp)
    BLOCK_N = block_n or min(128, block_size)
    if upcast:
        BLOCK_M, BLOCK_N = min(BLOCK_M, 32 * hpp), min(BLOCK_N, 32)
    rph = BLOCK_M // hpp
    if rph < 1 or block_size % rph != 0 or block_size % BLOCK_N != 0:
        raise ValueError(f"block_size ({block_size}) must be a multiple of the kernel tiles "
                         f"(block_m={BLOCK_M} / heads_per_tile={hpp}, block_n={BLOCK_N})")
    fn, pn, idx = split if split is not None else split_block_lists(
        kv_num_blocks, kv_indices, block_size=block_size, n_keys=N, row_offset=row_offset,
        causal=causal)
    n_mt = (N - 1) // rph - (N - M) // rph + 1
    ht_per_kv = -(-group // hpp)
    n_ht = B * Hkv * ht_per_kv
    if order is None:
        mode, order_t = (1 if causal else 0), fn
    elif order == "natural":
        mode, order_t = 0, fn
    elif order == "lpt":
        # work of a query tile = blocks listed for its row, summed over list heads/batches
        work = (fn + pn).view(Bl * Hl, R).sum(0)
        t_abs = ((N - M) // rph) * rph + torch.arange(n_mt, device=q.device) * rph
        wt = work[t_abs // block_size - row_offset]
        mode, order_t = 2, torch.argsort(wt, descending=True, stable=True).to(torch.int32)
    else:
        raise ValueError(f"order must be None, 'natural' or 'lpt', got {order!r}")
    nw = num_warps or (8 if (BLOCK_M >= 128 and D >= 128) else 4)
    tma = bool(tma) and not upcast and k.is_contiguous() and v.is_contiguous()
    kd, vd = k, v
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        kd = TensorDescriptor.from_tensor(k.view(-1, D), [BLOCK_N, D])
        vd = TensorDescriptor.from_tensor(v.view(-1, D), [BLOCK_N, D])
    _bsa_prefill_v2_kernel[(n_mt * n_ht,)](
        q, k, v, out, lse, fn, pn, idx, order_t, kd, vd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        Hl, R, idx.shape[1], Hl if Bl > 1 else 0, 1 if Hl > 1 else 0,
        Hq, Hkv, M, N, group, list_group, row_offset, n_mt, n_ht, ht_per_kv,
        scale * LOG2E,
        BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HPP=hpp, HEAD_DIM=D,
        CAUSAL=bool(causal), UPCAST=upcast, ORDER_MODE=mode, TMA=tma,
        FUSED=bool(fused) and not upcast, num_warps=nw,
        num_stages=num_stages or 3)
    return out, lse
