"""The k-th largest value of each row on the device: a radix select over the float bits.

``torch.topk`` of a few long rows (a decode step's 28 query rows over 128K scores) runs one
block per row and measured 52–96 µs on an H100 whatever the length (bench/results/
topk_step_h100_2026-12-06.json): more than the scores cost to compute. The k-th largest needs
no sort: map each float to an unsigned key with the same order, then find the key's digits
from the top, 11, 11 and 10 bits at a time. Each round, programs spread over every row's
columns count the digits of the keys that share the digits found so far (a histogram per
program, added into the row's), and one program per row walks the row's histogram from the
top to the bin holding the k-th. Three rounds read the row three times; nothing waits on the
host, so a CUDA graph captures it. Exact: the answer is one of the row's own values (``-inf``
included, NaN ordered above every number as ``torch.topk`` orders it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compat import patch_interpreter

patch_interpreter()

__all__ = ["kth_largest"]

#: digits found per round, from the top bit down (32 bits in all)
ROUNDS = ((21, 11), (10, 11), (0, 10))


@triton.jit
def _ordered_keys(x):
    # fp32 -> uint32 with the same order: negative floats flipped, positive ones above them
    u = x.to(tl.uint32, bitcast=True)
    return u ^ tl.where((u >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)


@triton.jit
def _count_kernel(X, HIST, PREFIX, s_x, W, CHUNK, SHIFT: tl.constexpr, BITS: tl.constexpr,
                  FIRST: tl.constexpr, BLOCK: tl.constexpr):
    # grid (programs per row, rows): this program's columns [p*CHUNK, (p+1)*CHUNK) of row r; the
    # digit (key >> SHIFT) of each key whose higher digits equal PREFIX[r], counted into HIST[r]
    p = tl.program_id(0)
    r = tl.program_id(1)
    NB: tl.constexpr = 1 << BITS
    prefix = tl.load(PREFIX + r)
    hist = tl.zeros([NB], tl.int32)
    lo = p * CHUNK
    hi = tl.minimum(lo + CHUNK, W)
    base = X + r.to(tl.int64) * s_x
    for off in range(lo, hi, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        ok = offs < hi
        key = _ordered_keys(tl.load(base + offs, mask=ok, other=0.0))
        if not FIRST:
            ok = ok & ((key >> (SHIFT + BITS)).to(tl.int64) == prefix)
        digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
        hist += tl.histogram(digit, NB, mask=ok)
    tl.atomic_add(HIST + r * NB + tl.arange(0, NB), hist)


@triton.jit
def _find_kernel(HIST, PREFIX, KREM, BITS: tl.constexpr):
    # one program per row: the digit whose bin holds the KREM[r]-th largest (counting from the
    # top bin down), appended to PREFIX[r]; KREM[r] becomes its rank within that bin
    r = tl.program_id(0)
    NB: tl.constexpr = 1 << BITS
    idx = tl.arange(0, NB)
    h = tl.load(HIST + r * NB + (NB - 1 - idx))  # from the top digit down
    cum = tl.cumsum(h, 0)
    kr = tl.load(KREM + r)
    i = tl.sum(tl.where(cum < kr, 1, 0), 0)  # bins entirely above the k-th
    above = tl.sum(tl.where(idx < i, h, 0), 0)
    digit = (NB - 1 - i).to(tl.int64)
    tl.store(PREFIX + r, (tl.load(PREFIX + r) << BITS) | digit)
    tl.store(KREM + r, kr - above)


@triton.jit
def _to_float_kernel(PREFIX, OUT, R, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < R
    key = tl.load(PREFIX + offs, mask=ok, other=0).to(tl.uint32)
    u = key ^ tl.where((key >> 31) != 0, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    tl.store(OUT + offs, u.to(tl.float32, bitcast=True), mask=ok)


def kth_largest(x: torch.Tensor, k: int, *, programs: int | None = None, block: int = 1024) -> torch.Tensor:
    """The ``k``-th largest value of each row of ``x``.

    Parameters
    ----------
    x : Tensor, (R, W) float32, last dimension contiguous
    k : int in [1, W]
    programs : int, optional
        Programs per row (default: enough for about four per multiprocessor in all).
    block : int
        Columns a program reads at a time.

    Returns
    -------
    Tensor, (R,) float32
        ``torch.topk(x, k).values[:, -1]``, the same value bit for bit (``-inf`` where the row's
        k-th is ``-inf``). No host synchronisation: capturable in a CUDA graph.
    """
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(f"x must be a (R, W) float32 tensor with contiguous rows, got {tuple(x.shape)} {x.dtype}")
    R, W = x.shape
    if isinstance(k, bool) or not 1 <= int(k) <= W:
        raise ValueError(f"k must be an integer in [1, {W}], got {k!r}")
    dev = x.device
    if programs is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        programs = max(1, 4 * sms // max(R, 1))
    P = max(1, min(int(programs), triton.cdiv(W, block)))
    chunk = triton.cdiv(triton.cdiv(W, P), block) * block
    P = triton.cdiv(W, chunk)
    hist = torch.zeros(R * sum(1 << bits for _, bits in ROUNDS), dtype=torch.int32, device=dev)
    prefix = torch.zeros(R, dtype=torch.int64, device=dev)  # the key's digits found so far
    krem = torch.full((R,), int(k), dtype=torch.int32, device=dev)
    start = 0
    for i, (shift, bits) in enumerate(ROUNDS):
        h = hist[start:start + R * (1 << bits)]
        _count_kernel[(P, R)](x, h, prefix, x.stride(0), W, chunk, SHIFT=shift, BITS=bits, FIRST=i == 0,
                              BLOCK=block, num_warps=4)
        _find_kernel[(R,)](h, prefix, krem, BITS=bits, num_warps=4)
        start += R * (1 << bits)
    out = torch.empty(R, dtype=torch.float32, device=dev)
    _to_float_kernel[(triton.cdiv(R, 128),)](prefix, out, R, BLOCK=128, num_warps=4)
    return out
