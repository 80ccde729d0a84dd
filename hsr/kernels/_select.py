"""Each row's k-th largest score, and the positions of the keys at or above it, on the device.

The top-k mode (:meth:`hsr.kernels.CodeKVCache._topk`) scores every visible key into a
``(rows, width)`` fp32 buffer and must find, per query row, the k-th best score and the keys
that reach it. ``torch.topk`` of a decode step's few long rows (28 rows of 128K) took ~90 µs on
an H100 whatever the length, more than scoring the keys; this module does it in four launches
and no host synchronisation (a CUDA graph captures it):

1. **Two counting rounds** (grid: programs per row x rows). Each float maps to a uint32 *key*
   with the same order (negative floats' bits flipped, positive ones' sign bit set). In round r
   each program counts, in a 64-bin histogram of its own, the next 6 bits of every key of its
   columns whose higher bits equal the digits found so far. The next launch sums a row's
   histograms, walks the sum from the top bin down and finds the digit of the bin that holds
   the k-th key.
2. **The collection** (same grid): each program writes the positions of its keys at or
   above the lowest key of the bucket found (12 bits: a sign, the exponent and 3 mantissa
   bits, an eighth of an octave) into the row's list, at the offset its predecessors' counts
   give (read from the histograms: no atomics, the list ascending and the same every run).
   That is every key above the k-th (fewer than k) plus the bucket's keys: on the benchmarks'
   real keys k + 8% at 128K (1419 entries for k = 1311).
3. **The finish** (one program per row) finds the key's 20 remaining bits by counting over the
   list alone (held in registers where it fits one block). The k-th largest is that key's
   float, bit for bit one of the row's own scores.

Why 6-bit digits: ``tl.histogram`` counts with one warp ballot per bit of the bin index and,
per bin a thread owns, a popcount; 64 bins cost each thread two bins, where the 2048 bins of
11-bit digits cost it 64 (a first radix select with those measured 5x slower than
``torch.topk``; ``bench/results/topk_diag_h100_2026-12-06.json``, "radix").

Ties: every key scoring exactly the k-th is in the list (the finish keeps the whole bucket),
so a caller that keeps ``score >= threshold`` keeps them all, as the CPU index does. ``-0.0``
counts as ``0.0``. A row that sees fewer than k keys (its length below k) gets the threshold
``-inf`` and every position below its length; one that sees fewer than k finite scores gets
``-inf`` from the count itself. NaN scores order above every number (a NaN query row: its
caller flags it and returns NaN).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._compat import patch_interpreter

patch_interpreter()

__all__ = ["KthSelection", "select_kth"]

#: bits of a key found per counting round (64 bins: see the module docstring)
DIGIT_BITS = 6
#: counting rounds over every score before the collection (the rest run over the list)
FULL_ROUNDS = 2
#: the finish holds a list of up to this many entries in registers (longer ones: read every round)
FINISH_BLOCK = 2048


class KthSelection(NamedTuple):
    """:func:`select_kth`'s answer, on the device.

    Attributes
    ----------
    threshold : Tensor, (R,) float32
        Each row's k-th largest score (``-inf`` where the row sees fewer than k keys).
    positions : Tensor, (R, W') int32, W' >= W
        Row r's first ``count[r]`` entries: ascending positions of every key scoring at least
        ``threshold[r]`` and of some scoring just below it (the rest of its bucket), so a reader
        keeps ``score >= threshold``. The entries past ``count[r]`` are stale.
    count : Tensor, (R,) int32
    """
    threshold: torch.Tensor
    positions: torch.Tensor
    count: torch.Tensor


@triton.jit
def _row_length(LENS, row, Hq, M, G, Hkv):
    # rows are ordered (b, hq, m); a row sees the keys below its kv head's length
    b = row // (Hq * M)
    hq = (row // M) % Hq
    return tl.load(LENS + b * Hkv + hq // G)


@triton.jit
def _ordered(x):
    # fp32 -> uint32 keys in the same order (-0.0 as 0.0, so equal scores share a key)
    u = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return u ^ tl.where((u >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)


@triton.jit
def _from_ordered(key):
    u = key ^ tl.where((key >> 31) != 0, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _pick(h, want, NB: tl.constexpr):
    # the digit whose bin holds the want-th largest key of h (bins counted from the top) and
    # the key's rank within that bin
    bins = tl.arange(0, NB)
    at_or_above = tl.cumsum(h, 0, reverse=True)
    d = tl.max(tl.where(at_or_above >= want, bins, 0), 0)
    return d, want - tl.sum(tl.where(bins > d, h, 0), 0)


@triton.jit
def _descend(HIST, row, R, P, KK, ROUNDS: tl.constexpr, NB: tl.constexpr, PB: tl.constexpr):
    # HIST (rounds, R, P, NB): each program's counts. Returns the digits the first ROUNDS
    # rounds found (as one int64), the k-th's rank among the keys that share them, and per
    # program (PB: P as a power of two) its keys at or above the bucket they define
    prefix = tl.zeros([], tl.int64)
    want = KK + tl.zeros([], tl.int32)
    bins = tl.arange(0, NB)
    progs = tl.arange(0, PB)
    mine = tl.zeros([PB], tl.int32)
    for r in tl.static_range(ROUNDS):
        h = tl.load(HIST + ((r * R + row) * P + progs[:, None]) * NB + bins[None, :],
                    mask=progs[:, None] < P, other=0)
        d, want = _pick(tl.sum(h, 0), want, NB)
        prefix = prefix * NB + d
        mine += tl.sum(tl.where(bins[None, :] > d, h, 0), 1)
        if r == ROUNDS - 1:
            mine += tl.sum(tl.where(bins[None, :] == d, h, 0), 1)
    return prefix, want, mine


@triton.jit
def _count_round(key, ok, prefix, r: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr):
    # round r's counts: the next digit of each key (where ok) that shares the digits found
    # (prefix; round 0 has none)
    SH: tl.constexpr = 32 - BITS * (r + 1) if 32 - BITS * (r + 1) > 0 else 0
    if r > 0:
        ok = ok & ((key >> (32 - BITS * r)).to(tl.int64) == prefix)
    return tl.histogram(((key >> SH) & ((1 << (32 - BITS * r - SH)) - 1)).to(tl.int32), NB, mask=ok)


@triton.jit
def _append(prefix, d, r: tl.constexpr, BITS: tl.constexpr):
    # the found digits with round r's digit d after them (the last round's may be narrower)
    SH: tl.constexpr = 32 - BITS * (r + 1) if 32 - BITS * (r + 1) > 0 else 0
    return (prefix << (32 - BITS * r - SH)) | d


@triton.jit
def _select_pass_kernel(SC, HIST, LIST, LENS, s_sr, s_lr, KK, CHUNK, P, R, Hq, M, G, Hkv,
                        ROUND: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, COLLECT: tl.constexpr,
                        PB: tl.constexpr):
    # grid (P, R): program p reads columns [p*CHUNK, (p+1)*CHUNK) of row r below its length.
    # Counting (not COLLECT): the digit below the ROUND found ones of each of its keys that
    # shares them, its counts into HIST[ROUND, r, p]. COLLECT: the positions of its keys at or
    # above the found bucket's lowest key (every position where the row sees fewer than k
    # keys) into LIST[r], after its predecessors' (the histograms give their numbers).
    NB: tl.constexpr = 1 << BITS
    p = tl.program_id(0)
    row = tl.program_id(1)
    N = _row_length(LENS, row, Hq, M, G, Hkv)
    short = N < KK
    lo = p * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    base = SC + row.to(tl.int64) * s_sr
    offs = tl.arange(0, BLOCK)
    prefix, want, mine = _descend(HIST, row, R, P, KK, ROUND, NB, PB)
    if COLLECT:
        kmin = tl.where(short, 0, prefix << (32 - BITS * ROUND))
        before = tl.sum(tl.where(tl.arange(0, PB) < p, mine, 0), 0)
        out = LIST + row.to(tl.int64) * s_lr + tl.where(short, lo, before)
        found = 0
        for off in range(lo, hi, BLOCK):
            j = off + offs
            ok = j < hi
            key = _ordered(tl.load(base + j, mask=ok, other=0.0))
            keep = ok & (key.to(tl.int64) >= kmin)
            keep_i = keep.to(tl.int32)
            tl.store(out + found + tl.cumsum(keep_i, 0) - 1, j, mask=keep)
            found += tl.sum(keep_i, 0)
    else:
        hist = tl.zeros([NB], tl.int32)
        for off in range(lo, tl.where(short, lo, hi), BLOCK):  # a short row keeps every key: no count
            j = off + offs
            ok = j < hi
            hist += _count_round(_ordered(tl.load(base + j, mask=ok, other=0.0)), ok, prefix, ROUND, BITS, NB)
        tl.store(HIST + ((ROUND * R + row) * P + p) * NB + tl.arange(0, NB), hist)


@triton.jit
def _select_finish_kernel(SC, HIST, LIST, THR, COUNT, LENS, s_sr, s_lr, KK, P, R, Hq, M, G, Hkv,
                          FULL: tl.constexpr, ROUNDS: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
                          PB: tl.constexpr):
    # one program per row: the key's remaining digits counted over the row's list alone, rounds
    # FULL .. ROUNDS - 1 (the last one narrower where BITS does not divide 32); THR: the k-th
    # largest score; COUNT: the list's length
    NB: tl.constexpr = 1 << BITS
    row = tl.program_id(0)
    N = _row_length(LENS, row, Hq, M, G, Hkv)
    short = N < KK
    prefix, want, mine = _descend(HIST, row, R, P, KK, FULL, NB, PB)
    total = tl.where(short, N, tl.sum(mine, 0))
    lbase = LIST + row.to(tl.int64) * s_lr
    base = SC + row.to(tl.int64) * s_sr
    offs = tl.arange(0, BLOCK)
    n_list = tl.where(short, 0, total)  # a short row's threshold is -inf: nothing to count
    if n_list <= BLOCK:  # the list in registers once, every round over it
        i_ok = offs < n_list
        key = _ordered(tl.load(base + tl.load(lbase + offs, mask=i_ok, other=0), mask=i_ok, other=0.0))
        for r in tl.static_range(FULL, ROUNDS):
            d, want = _pick(_count_round(key, i_ok, prefix, r, BITS, NB), want, NB)
            prefix = _append(prefix, d, r, BITS)
    else:  # a long list (a wide tie, or crowded scores): read again every round
        for r in tl.static_range(FULL, ROUNDS):
            h = tl.zeros([NB], tl.int32)
            for off in range(0, n_list, BLOCK):
                i_ok = off + offs < n_list
                key = _ordered(tl.load(base + tl.load(lbase + off + offs, mask=i_ok, other=0), mask=i_ok,
                                       other=0.0))
                h += _count_round(key, i_ok, prefix, r, BITS, NB)
            d, want = _pick(h, want, NB)
            prefix = _append(prefix, d, r, BITS)
    thr = _from_ordered(prefix.to(tl.uint32))
    tl.store(THR + row, tl.where(short, float("-inf"), thr))
    tl.store(COUNT + row, total)


def select_kth(sc: torch.Tensor, k: int, lengths: torch.Tensor, layout: tuple, *, programs: int | None = None,
               block: int = 2048, finish_warps: int = 8) -> KthSelection:
    """Each row's k-th largest score and the positions that reach it (see the module docstring).

    Parameters
    ----------
    sc : Tensor, (R, W) float32, rows contiguous
        Scores, rows ordered ``(b, hq, m)``; a row's entries at or past its length are not read.
    k : int in [1, W]
    lengths : Tensor, (B * Hkv,) int32
        Each (batch, kv head)'s length, read on the device.
    layout : (Hq, M, G, Hkv)
        Query heads, query rows per head, query heads per kv head, kv heads.
    programs : int, optional
        Programs per row of the counting launches (default: about four per multiprocessor in
        all, and at least 8).
    block : int, power of two
        Scores a program reads at a time.
    finish_warps : int
        Warps of the finish's program (one a row). H100, the selection alone: 8 took 60.5 against
        64.0 us with 4 at 128K B 1, 20.4 against 23.1 at d 64 16K B 1, 304 against 312 at 128K
        B 8; 16 no faster, 1 and 2 slower (bench/results/select_finish_warps_h100_2026-12-06.txt).

    Returns
    -------
    KthSelection
    """
    if sc.dim() != 2 or sc.dtype != torch.float32 or sc.stride(1) != 1:
        raise ValueError(f"sc must be a (R, W) float32 tensor with contiguous rows, got {tuple(sc.shape)} {sc.dtype}")
    R, W = sc.shape
    if isinstance(k, bool) or not 1 <= int(k) <= W:
        raise ValueError(f"k must be an integer in [1, {W}], got {k!r}")
    Hq, M, G, Hkv = (int(x) for x in layout)
    if min(Hq, M, G, Hkv) < 1 or Hq != G * Hkv or R % (Hq * M):
        raise ValueError(f"layout (Hq, M, G, Hkv) = {tuple(layout)} does not describe {R} rows ordered (b, hq, m)")
    dev = sc.device
    if (not torch.is_tensor(lengths) or lengths.dtype != torch.int32 or lengths.device != dev
            or lengths.shape != (R // (Hq * M) * Hkv,)):
        raise ValueError(f"lengths must be a ({R // (Hq * M) * Hkv},) int32 tensor on {dev}, got "
                         f"{tuple(lengths.shape) if torch.is_tensor(lengths) else type(lengths).__name__}")
    if programs is None:
        # at least 8 a row: 128K, B 8 (224 rows), H100: 315 against 385 us with 2 (the counting
        # rounds' programs are short, more of them hide more of the memory's latency)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        programs = max(8, 4 * sms // max(R, 1))
    P = max(1, min(int(programs), triton.cdiv(W, block)))
    chunk = triton.cdiv(triton.cdiv(W, P), block) * block
    P = triton.cdiv(W, chunk)
    nb = 1 << DIGIT_BITS
    pb = triton.next_power_of_2(P)
    hist = torch.empty(FULL_ROUNDS * R * P * nb, dtype=torch.int32, device=dev)  # every program writes its own
    positions = torch.empty(R, P * chunk, dtype=torch.int32, device=dev)
    thr = torch.empty(R, dtype=torch.float32, device=dev)
    count = torch.empty(R, dtype=torch.int32, device=dev)
    args = (sc, hist, positions, lengths, sc.stride(0), positions.stride(0), int(k), chunk, P, R, Hq, M, G, Hkv)
    for rnd in range(FULL_ROUNDS + 1):
        _select_pass_kernel[(P, R)](*args, ROUND=rnd, BITS=DIGIT_BITS, BLOCK=block, COLLECT=rnd == FULL_ROUNDS,
                                    PB=pb, num_warps=4)
    _select_finish_kernel[(R,)](sc, hist, positions, thr, count, lengths, sc.stride(0), positions.stride(0),
                                int(k), P, R, Hq, M, G, Hkv, FULL=FULL_ROUNDS, ROUNDS=triton.cdiv(32, DIGIT_BITS),
                                BITS=DIGIT_BITS, BLOCK=FINISH_BLOCK, PB=pb, num_warps=int(finish_warps))
    return KthSelection(thr, positions, count)
