"""Exact ReLU^alpha prefill on the GPU that skips (query tile, key block) pairs proven empty.

``out_i = sum_j w_ij v_j / sum_j w_ij`` with ``w_ij = relu(scale * <q_i, k_j> - bias) ** alpha``
(``hsr.attention.dense.dense_relu_attention``); causal: query ``i`` sits at position
``N - M + i`` and sees keys ``j <= N - M + i``. Rows where nothing fires are zeros.

A tile whose every score is below ``bias`` contributes exactly nothing, so skipping it is
exact. Three launches:

1. *Summaries* (torch): per key block of ``BLOCK_N`` keys, the coordinate-wise box
   ``[kmin, kmax]`` (its corners are key coordinates, so they are exact in the keys' dtype)
   and the norm of ``max(|kmin|, |kmax|)``, an upper bound of every key norm in the block.
2. *Plan* (``_relu_plan_kernel``): for each query tile and each key block at or below its
   diagonal, an upper bound of every score of the pair, per query row against the key box
   (``max_{k in box} <q, k> = <q+, kmax> + <q-, kmin>``, two tensor-core products whose
   elementwise products are exact), maximised over the tile's rows. Float rounding: the
   bound is raised by ``slack * |q|_max * |kbox|`` (accumulation errors of both the bound
   and the attention kernel's own scores are below ``D * 2**-22`` of ``|q| |k|``; the
   default slack 1e-3 is ~10x that), so no pair with a computed score >= ``bias`` is ever
   dropped. Kept blocks are compacted into a list per (head, query tile), blocks that need
   no mask first.
3. *Attention* (``_relu_prefill_kernel``): a FlashAttention-style loop over the kept
   blocks. Weights are accumulated scaled by the running row maximum ``m`` of
   ``relu(s - bias)`` (``p = (x / m) ** alpha`` in [0, 1], the sums rescaled by
   ``(m_old / m_new) ** alpha`` when it grows) so that 16-bit ``p @ v`` cannot overflow
   for any alpha; the result is normalised at the end.

Per-row bounds against a key box were measured tighter than box-vs-box or ball bounds on
real keys (bench/bench_prefill_gpu.py reports all of them); see docs/kernels.md.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._compat import interpreting as _interpreting
from ._compat import patch_interpreter
from ._softmax import _dot, _query_tile, _relu_rows_step, _store_rows
from ._validate import check_alpha, check_attention_inputs, check_int32_offsets, check_tile, check_triton_device

patch_interpreter()

#: relative slack of the skip test (see the module docstring)
DEFAULT_SLACK = 1e-3


@triton.jit
def _relu_plan_kernel(
    Q, KMAX, KMIN, KABS, BIAS, FN, PN, IDX,
    sqb, sqh, sqm, sxb, sxh, sxn, sab, sah,
    Hq, M, N, GROUP, NKB, N_MT, MAXB, scale, slack,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, SKIP: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    q0 = N - M
    q, t_abs, offs_m, rows, row_ok, offs_d = _query_tile(Q, b, h, sqb, sqh, sqm, pid_m, M, N,
                                                         BLOCK_M, HEAD_DIM)
    # q = q+ + q-, both exact in q's dtype; <q+, kmax> + <q-, kmin> = max over the key box
    zero = tl.zeros_like(q)
    qp = tl.where(q > 0, q, zero)
    qn = tl.where(q < 0, q, zero)
    qf = q.to(tl.float32)
    qnorm = tl.max(tl.sqrt(tl.sum(qf * qf, 1)), 0)
    bias = tl.load(BIAS + h)
    t_first = tl.maximum(t_abs, q0)  # first real query position of the tile
    t_last = tl.minimum(t_abs + BLOCK_M, N) - 1
    n_blk = NKB
    if CAUSAL:
        n_blk = tl.minimum(NKB, t_last // BLOCK_N + 1)
    lrow = pid_bh * N_MT + pid_m
    base = IDX + lrow.to(tl.int64) * MAXB
    offs_b0 = tl.arange(0, NB)
    x_base = b.to(tl.int64) * sxb + hk * sxh
    nfull = 0
    cnt = 0
    for c in range(0, n_blk, NB):
        offs_b = c + offs_b0
        b_ok = offs_b < n_blk
        fire = b_ok
        if SKIP:
            kmx = tl.load(KMAX + x_base + offs_b[:, None] * sxn + offs_d[None, :],
                          mask=b_ok[:, None], other=0.0)
            kmn = tl.load(KMIN + x_base + offs_b[:, None] * sxn + offs_d[None, :],
                          mask=b_ok[:, None], other=0.0)
            ub = _dot(qp, tl.trans(kmx), UPCAST) + _dot(qn, tl.trans(kmn), UPCAST)
            ub = tl.where(row_ok[:, None], ub, float("-inf"))
            kab = tl.load(KABS + b * sab + hk * sah + offs_b, mask=b_ok, other=0.0)
            tile_ub = tl.max(ub, 0) + slack * qnorm * kab
            fire = fire & (tile_ub * scale >= bias)
        # full: no key of the block is past N or past the tile's first query
        full = fire & ((offs_b + 1) * BLOCK_N <= N)
        if CAUSAL:
            full = full & ((offs_b + 1) * BLOCK_N - 1 <= t_first)
        fi = fire.to(tl.int32)
        pos = cnt + tl.cumsum(fi, 0) - 1
        tl.store(base + pos, offs_b, mask=fire)
        cnt += tl.sum(fi, 0)
        nfull += tl.sum(full.to(tl.int32), 0)
    # blocks are visited in ascending order and full ones precede the diagonal: the first
    # nfull kept blocks are the full ones
    tl.store(FN + lrow, nfull)
    tl.store(PN + lrow, cnt - nfull)


@triton.jit
def _relu_step(s, keep, v, m_i, l_i, acc, ALPHA: tl.constexpr, MASKED: tl.constexpr,
               UPCAST: tl.constexpr):
    # s: (ROWS, N) scale * <q, k> - bias; keep (ROWS, N): allowed pairs, read when MASKED
    x = tl.maximum(s, 0.0)
    if MASKED:
        x = tl.where(keep, x, 0.0)
    return _relu_rows_step(x, v, m_i, l_i, acc, ALPHA, UPCAST)


@triton.jit
def _relu_prefill_kernel(
    Q, K, V, O, LSE, BIAS, FN, PN, IDX,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    Hq, M, N, GROUP, N_MT, MAXB, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ALPHA: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    # query tiles from the last (most keys under causality) to the first; heads adjacent
    pid = tl.program_id(0)
    n_bh = tl.num_programs(0) // N_MT
    pid_m = N_MT - 1 - pid // n_bh
    pid_bh = pid % n_bh
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    q, t_abs, offs_m, rows, row_ok, offs_d = _query_tile(Q, b, h, sqb, sqh, sqm, pid_m, M, N,
                                                         BLOCK_M, HEAD_DIM)
    bias = tl.load(BIAS + h)
    lrow = pid_bh * N_MT + pid_m
    nfull = tl.load(FN + lrow)
    npart = tl.load(PN + lrow)
    ibase = IDX + lrow.to(tl.int64) * MAXB
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    m_i = tl.zeros([BLOCK_M], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for j in range(0, nfull):
        kb = tl.load(ibase + j)
        offs_n = kb * BLOCK_N + offs_n0
        kr = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :])
        s = _dot(q, tl.trans(kr), UPCAST) * scale - bias
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :])
        m_i, l_i, acc = _relu_step(s, s, vt, m_i, l_i, acc, ALPHA, False, UPCAST)
    for j in range(nfull, nfull + npart):
        kb = tl.load(ibase + j)
        offs_n = kb * BLOCK_N + offs_n0
        kmask = offs_n < N
        kr = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kmask[:, None],
                     other=0.0)
        s = _dot(q, tl.trans(kr), UPCAST) * scale - bias
        keep = kmask[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kmask[:, None],
                     other=0.0)
        m_i, l_i, acc = _relu_step(s, keep, vt, m_i, l_i, acc, ALPHA, True, UPCAST)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    # natural log of the row's sum of weights: log(l) + alpha * log(m)
    lse = tl.where(l_i > 0.0, tl.log(l_safe) + ALPHA * tl.log(tl.where(m_i > 0, m_i, 1.0)),
                   float("-inf"))
    _store_rows(O, LSE, out, lse, b, h, rows, row_ok, offs_d, sob, soh, som, slb, slh)


# ----------------------------------------------------------------------------- wrappers

def key_block_boxes(k, block_n):
    """Per key block of ``block_n`` keys: ``kmax``, ``kmin`` ``(B, Hkv, nkb, D)`` in k's dtype
    and ``kabs`` float32 ``(B, Hkv, nkb)``, the norm of ``max(|kmin|, |kmax|)`` (>= the norm
    of every key of the block). A last partial block is padded with copies of the last key,
    which change neither its min nor its max."""
    B, Hkv, N, D = k.shape
    nkb = -(-N // block_n)
    pad = nkb * block_n - N
    kk = k if pad == 0 else torch.cat([k, k[:, :, -1:].expand(B, Hkv, pad, D)], 2)
    kk = kk.reshape(B, Hkv, nkb, block_n, D)
    kmax = kk.amax(3).contiguous()
    kmin = kk.amin(3).contiguous()
    kabs = torch.maximum(kmax.abs(), kmin.abs()).float().norm(dim=-1).contiguous()
    return kmax, kmin, kabs


def _bias_tensor(bias, Hq, device):
    if isinstance(bias, torch.Tensor):
        if bias.dim() != 1 or bias.shape[0] != Hq:
            raise ValueError(f"bias must be a float or a tensor of {Hq} values (one per query head), "
                             f"got shape {tuple(bias.shape)}")
        b = bias.to(device=device, dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(b).all()):
            raise ValueError("bias must be finite")
        return b
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
        raise TypeError(f"bias must be a float or a torch.Tensor, got {type(bias).__name__}")
    if not math.isfinite(float(bias)):
        raise ValueError(f"bias must be finite, got {bias!r}")
    return torch.full((Hq,), float(bias), device=device, dtype=torch.float32)


def relu_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alpha: int = 2,
                 bias: float | torch.Tensor = 0.0, scale: float | None = None, causal: bool = True, skip: bool = True,
                 slack: float = DEFAULT_SLACK, return_lse: bool = False, return_stats: bool = False,
                 block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> torch.Tensor | tuple[torch.Tensor | dict[str, int], ...]:
    """Exact ReLU^alpha attention (prefill) that skips tiles whose scores all stay below ``bias``.

    Parameters
    ----------
    q : Tensor ``(B, Hq, M, D)`` float16/bfloat16/float32, last dim contiguous.
    k, v : Tensor ``(B, Hkv, N, D)``, same dtype, ``Hq % Hkv == 0``, ``M <= N``.
    alpha : int in ``[1, 16]``, the ReLU power.
    bias : float, or a tensor of ``Hq`` floats (one per query head): the threshold ``tau``.
    scale : float, default ``1/sqrt(D)``, must be > 0 (the skip test assumes it).
    causal : bool, query ``i`` (position ``N - M + i``) sees keys ``<= N - M + i``.
    skip : bool, test the bounds (False: every causal tile is computed, the dense baseline).
    slack : float >= 0, relative slack of the skip test (see the module docstring).
    return_lse : also return ``log(sum of weights)`` float32 ``(B, Hq, M)`` (-inf: empty).
    return_stats : also return a dict ``{"tiles": pairs under the causal mask,
        "kept": pairs computed}`` (python ints; one device synchronisation).
    block_m, block_n : query tile and key block (powers of two >= 16; default 128 and 64,
        32 and 32 under the interpreter). num_warps, num_stages : launch knobs.

    Returns
    -------
    out ``(B, Hq, M, D)`` in q's dtype (then lse, then stats when asked). Rows where no
    weight is positive: zeros (lse -inf).

    Raises
    ------
    ValueError
        Bad shapes, head dim, ``M > N``, alpha, bias shape or value, scale, slack, tiles.
    TypeError
        Non-tensor inputs, mismatched or unsupported dtypes, a bias of another type.
    """
    if torch.compiler.is_compiling():  # an opaque custom op: the compiler does not trace the launch
        if return_stats:
            raise ValueError("return_stats is not available under torch.compile (host integers)")
        from .ops import call_relu_prefill
        return call_relu_prefill(q, k, v, alpha=alpha, bias=bias, scale=scale, causal=causal, skip=skip,
                                 slack=slack, return_lse=return_lse, block_m=block_m, block_n=block_n,
                                 num_warps=num_warps, num_stages=num_stages)
    B, Hq, M, D, Hkv, N = check_attention_inputs(q, k, v)
    check_triton_device("relu_prefill", q=q, k=k, v=v)
    if M > N:
        raise ValueError(f"q_len M={M} must be <= kv_len N={N} (queries are the last M positions)")
    if M == 0 or N == 0:
        raise ValueError(f"empty input: M={M}, N={N}")
    alpha = check_alpha(alpha)
    check_tile("block_m", block_m)
    check_tile("block_n", block_n)
    check_int32_offsets(N, k, v)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    slack = float(slack)
    if not (math.isfinite(slack) and slack >= 0):
        raise ValueError(f"slack must be finite and >= 0, got {slack!r}")
    bias_t = _bias_tensor(bias, Hq, q.device)
    upcast = _interpreting() or q.dtype == torch.float32
    BLOCK_M = block_m or (32 if upcast else 128)
    BLOCK_N = block_n or (32 if upcast else 64)
    group = Hq // Hkv
    nkb = -(-N // BLOCK_N)
    q0 = N - M
    n_mt = (N - 1) // BLOCK_M - q0 // BLOCK_M + 1
    kmax, kmin, kabs = key_block_boxes(k, BLOCK_N)
    rows = B * Hq * n_mt
    fn = torch.empty(rows, device=q.device, dtype=torch.int32)
    pn = torch.empty(rows, device=q.device, dtype=torch.int32)
    idx = torch.empty(rows, nkb, device=q.device, dtype=torch.int32)
    NB = 16 if upcast else 64
    _relu_plan_kernel[(n_mt, B * Hq)](
        q, kmax, kmin, kabs, bias_t, fn, pn, idx,
        q.stride(0), q.stride(1), q.stride(2), kmax.stride(0), kmax.stride(1), kmax.stride(2),
        kabs.stride(0), kabs.stride(1),
        Hq, M, N, group, nkb, n_mt, nkb, scale, slack,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NB=NB, HEAD_DIM=D, CAUSAL=bool(causal),
        SKIP=bool(skip), UPCAST=upcast, num_warps=4 if BLOCK_M <= 64 else 8)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)
    nw = num_warps or (8 if (BLOCK_M >= 128 and D >= 128) else 4)
    _relu_prefill_kernel[(n_mt * B * Hq,)](
        q, k, v, out, lse, bias_t, fn, pn, idx,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        Hq, M, N, group, n_mt, nkb, scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=D, ALPHA=alpha, CAUSAL=bool(causal),
        UPCAST=upcast, num_warps=nw, num_stages=num_stages or 3)
    res = [out]
    if return_lse:
        res.append(lse)
    if return_stats:
        res.append(dict(tiles=_causal_pairs(M, N, BLOCK_M, BLOCK_N, causal) * B * Hq,
                        kept=int((fn + pn).sum().item())))
    return res[0] if len(res) == 1 else tuple(res)


def _causal_pairs(M, N, block_m, block_n, causal):
    """(query tile, key block) pairs a causal (or full) pass visits, per (batch, head)."""
    q0 = N - M
    nkb = -(-N // block_n)
    tot = 0
    for t in range(q0 // block_m, (N - 1) // block_m + 1):
        last = min((t + 1) * block_m, N) - 1
        tot += min(nkb, last // block_n + 1) if causal else nkb
    return tot
