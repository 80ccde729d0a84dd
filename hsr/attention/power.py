"""PowerAttention and its static block-sparse baselines.

A *pattern* is a causal rule on (query block, key block) pairs, with block size ``block_size``
tokens (the paper uses 256). Every pattern here is a tiny named factory with three faces that
must agree (``tests/attention/test_power.py`` checks that they do):

* ``block_rule(qb, kb)`` -- the exact rule on block indices, elementwise on numpy arrays or
  torch tensors;
* ``mask_mod(b, h, q_idx, kv_idx)`` -- the same rule at token level, plus causality inside the
  diagonal block, usable as a FlexAttention ``mask_mod``;
* ``block_lists(seq_len)`` -- a fast builder of the kept key blocks of every query block,
  ``O(num_q_blocks * blocks_per_row)`` time and memory, never ``N x N`` nor ``nb x nb``.

Block distance is ``delta = qb - kb``; a tile is causal when ``delta >= 0``. Every rule keeps the
diagonal (``delta == 0``) so that each query sees at least itself. The diagonal tile is the only
*partial* tile (causal inside); every other kept tile is *full*, because the rule is constant on a
tile and all its keys precede all its queries.

PowerAttention (arXiv 2503.03588) keeps ``delta < window`` or ``delta`` a power of two or
``kb < sink``. In the DAG with edges ``i -> i - 2**k`` every earlier block ``j`` is reached in
exactly ``popcount(i - j)`` hops, so ``L`` layers see ``2**L`` blocks back with ``O(log n)``
kept blocks per row (see :mod:`hsr.attention.receptive`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "Pattern",
    "PowerPattern",
    "SlidingWindowPattern",
    "StrideSlashPattern",
    "DilatedPattern",
    "LongNetPattern",
    "FullPattern",
    "power_pattern",
    "sliding_window_pattern",
    "stride_slash_pattern",
    "dilated_pattern",
    "longnet_pattern",
    "full_pattern",
    "matched_baselines",
    "BlockLists",
    "to_block_mask",
    "kernel_block_lists",
    "power_attention",
]

def _is_pow2(x):
    """``x >= 1 and x & (x - 1) == 0`` elementwise, for numpy or torch integer arrays."""
    return (x >= 1) & ((x & (x - 1)) == 0)


def _check_pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class BlockLists:
    """Kept key blocks of each query block, in FlexAttention's ordered layout.

    Rows are the absolute query blocks ``first_q_block .. num_kv_blocks - 1``.

    Attributes
    ----------
    kv_num_blocks : np.ndarray, int32, shape (num_q_blocks,)
        Number of kept key blocks of each query block (full and partial together).
    kv_indices : np.ndarray, int32, shape (num_q_blocks, max_blocks)
        Kept key block indices, ascending in the first ``kv_num_blocks[r]`` entries of row ``r``;
        the rest of the row is padding (zero), never read.
    full_kv_num_blocks, full_kv_indices : np.ndarray, int32
        The same for the *full* tiles only (every kept tile except the diagonal).
    partial_kv_num_blocks, partial_kv_indices : np.ndarray, int32, shapes (num_q_blocks,), (num_q_blocks, 1)
        The partial tiles: exactly the diagonal block ``qb`` of each row (causal inside).
    first_q_block : int
        Absolute index of the query block of row 0 (``(seq_len - q_len) // block_size``).
    seq_len, q_len, block_size : int
    """

    kv_num_blocks: np.ndarray
    kv_indices: np.ndarray
    full_kv_num_blocks: np.ndarray
    full_kv_indices: np.ndarray
    partial_kv_num_blocks: np.ndarray
    partial_kv_indices: np.ndarray
    first_q_block: int
    seq_len: int
    q_len: int
    block_size: int

    @property
    def num_q_blocks(self) -> int:
        return int(self.kv_num_blocks.shape[0])

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    def row(self, r: int) -> np.ndarray:
        """Kept key blocks of row ``r`` (absolute query block ``first_q_block + r``), ascending."""
        return self.kv_indices[r, : self.kv_num_blocks[r]]

    def to_dense_blocks(self) -> np.ndarray:
        """Bool ``(num_q_blocks, num_kv_blocks)`` block mask. For tests and small sizes only."""
        out = np.zeros((self.num_q_blocks, self.num_kv_blocks), dtype=bool)
        for r in range(self.num_q_blocks):
            out[r, self.row(r)] = True
        return out


@dataclass(frozen=True)
class Pattern:
    """Base class of a static causal block-sparse pattern.

    Subclasses define ``block_rule`` (the definition) and ``_candidates`` (the kept key blocks
    of each query block written constructively, in a small fixed width, possibly with
    out-of-range entries and repeats, which the builder drops before sorting). The two are
    written independently and tested equal. ``block_size`` is in tokens.
    """

    block_size: int = 256

    name = "pattern"

    def __post_init__(self):
        _check_pos_int("block_size", self.block_size)

    # ----------------------------------------------------------------- definition
    def block_rule(self, qb, kb):
        """Whether tile ``(qb, kb)`` is kept; elementwise, numpy or torch integer arrays.

        Includes causality at block level (``kb <= qb``).
        """
        raise NotImplementedError

    def _candidates(self, qb: np.ndarray, num_kv_blocks: int) -> np.ndarray:
        """int64 ``(len(qb), C)``: every kept key block of each row, plus entries ``< 0`` or
        ``> qb`` (dropped) and repeats (dropped); nothing else."""
        raise NotImplementedError

    def params(self) -> Dict[str, int]:
        """The pattern's parameters (block counts), for reports."""
        d = dict(self.__dict__)
        return d

    # ------------------------------------------------------------ token predicate
    def make_mask_mod(self, q_offset: int = 0) -> Callable:
        """FlexAttention ``mask_mod`` for queries at absolute positions ``q_offset + q_idx``.

        Parameters
        ----------
        q_offset : int
            Absolute position of query 0: ``kv_len - q_len`` when the queries are the last
            ``q_len`` positions (decode, chunked prefill); 0 for prefill.

        Returns
        -------
        callable
            ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, elementwise torch ops only, so it
            traces under ``torch.compile`` and ``torch.vmap``.
        """
        bs = int(self.block_size)
        off = int(q_offset)
        rule = self.block_rule

        def mask_mod(b, h, q_idx, kv_idx):
            q_abs = q_idx + off
            # token-level causality matters only on the diagonal tile; elsewhere the block rule
            # (which is causal at block level) decides alone
            return (kv_idx <= q_abs) & rule(q_abs // bs, kv_idx // bs)

        mask_mod.__name__ = f"{self.name}_mask_mod"
        return mask_mod

    @property
    def mask_mod(self) -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for prefill (queries from position 0)."""
        return self.make_mask_mod(0)

    def dense_mask(self, seq_len: int, q_len: Optional[int] = None) -> np.ndarray:
        """Token-level bool mask ``(q_len, seq_len)``; for tests and small sizes only.

        Row ``i`` is the query at absolute position ``seq_len - q_len + i``.
        """
        seq_len = _check_pos_int("seq_len", seq_len)
        q_len = seq_len if q_len is None else _check_pos_int("q_len", q_len)
        if q_len > seq_len:
            raise ValueError(f"q_len ({q_len}) must be <= seq_len ({seq_len})")
        qi = torch.arange(q_len)[:, None]
        ki = torch.arange(seq_len)[None, :]
        m = self.make_mask_mod(seq_len - q_len)(0, 0, qi, ki)
        return m.numpy()

    # -------------------------------------------------------------- block builder
    def block_lists(self, seq_len: int, q_len: Optional[int] = None) -> BlockLists:
        """Kept key blocks of each query block, sorted ascending.

        Parameters
        ----------
        seq_len : int
            Number of keys ``N`` (the last key block may be partial).
        q_len : int, optional
            Number of queries ``M <= N``, at absolute positions ``N - M .. N - 1``
            (default ``N``). Rows cover the absolute query blocks ``(N - M) // block_size ..
            ceil(N / block_size) - 1``; a row whose block starts before ``N - M`` is used only
            for its queries at ``>= N - M``.

        Returns
        -------
        BlockLists
            ``kv_num_blocks`` int32 ``(rows,)``, ``kv_indices`` int32 ``(rows, max_blocks)``,
            and the full/partial split. ``O(rows * C)`` time and memory, ``C`` the candidate
            width (``window + sink + log2(nb) + 1`` for PowerAttention).
        """
        seq_len = _check_pos_int("seq_len", seq_len)
        q_len = seq_len if q_len is None else _check_pos_int("q_len", q_len)
        if q_len > seq_len:
            raise ValueError(f"q_len ({q_len}) must be <= seq_len ({seq_len})")
        bs = self.block_size
        nb = -(-seq_len // bs)
        first = (seq_len - q_len) // bs
        qb = np.arange(first, nb, dtype=np.int64)
        cand = np.asarray(self._candidates(qb, nb), dtype=np.int64)
        if cand.ndim != 2 or cand.shape[0] != qb.shape[0]:
            raise AssertionError("_candidates must return (rows, C)")
        # invalid candidates become a sentinel that sorts last; then drop adjacent repeats
        sentinel = np.int64(nb)
        q2 = qb[:, None]
        valid = (cand >= 0) & (cand <= q2)
        cand = np.where(valid, cand, sentinel)
        cand.sort(axis=1)
        dup = np.zeros_like(valid)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        cand = np.where(dup, sentinel, cand)
        cand.sort(axis=1)
        counts = (cand < sentinel).sum(axis=1)
        width = max(int(counts.max()) if counts.size else 0, 1)
        kv_idx = cand[:, :width]
        kv_idx = np.where(kv_idx < sentinel, kv_idx, 0).astype(np.int32)
        counts = counts.astype(np.int32)
        # the diagonal is the last kept entry of every row (the largest kb <= qb, and kept);
        # the full tiles are the ones before it
        full_counts = (counts - 1).astype(np.int32)
        full_width = max(width - 1, 1)
        full_idx = kv_idx[:, :full_width].copy()
        col = np.arange(full_width)[None, :]
        full_idx[col >= full_counts[:, None]] = 0
        part_counts = np.ones_like(counts)
        part_idx = qb.astype(np.int32)[:, None].copy()
        return BlockLists(
            kv_num_blocks=np.ascontiguousarray(counts),
            kv_indices=np.ascontiguousarray(kv_idx),
            full_kv_num_blocks=np.ascontiguousarray(full_counts),
            full_kv_indices=np.ascontiguousarray(full_idx),
            partial_kv_num_blocks=part_counts,
            partial_kv_indices=part_idx,
            first_q_block=int(first),
            seq_len=seq_len,
            q_len=q_len,
            block_size=bs,
        )

    def decode_blocks(self, seq_len: int) -> np.ndarray:
        """Kept key blocks (int32, ascending) of one query at position ``seq_len - 1``.

        Depends only on that query's block index; the last entry is its own (partial) block.
        """
        bl = self.block_lists(seq_len, q_len=1)
        return bl.row(0).copy()

    # ------------------------------------------------------------------ summaries
    def kept_blocks_per_row(self, seq_len: int) -> np.ndarray:
        """int32 ``(nb,)``: kept key blocks of each query block for a prefill of ``seq_len``."""
        return self.block_lists(seq_len).kv_num_blocks

    def density(self, seq_len: int) -> float:
        """Fraction of causal tiles kept: ``sum(kept) / (nb (nb + 1) / 2)``."""
        nb = -(-int(seq_len) // self.block_size)
        return float(self.kept_blocks_per_row(seq_len).sum()) / (nb * (nb + 1) / 2)

    def token_density(self, seq_len: int) -> float:
        """Fraction of causal (query, key) token pairs kept, exact, ``O(nb * C)``."""
        bl = self.block_lists(seq_len)
        bs, n = self.block_size, bl.seq_len
        nb = bl.num_kv_blocks
        size = np.minimum(bs, n - np.arange(nb) * bs).astype(np.float64)  # tokens per block
        kept = 0.0
        for r in range(bl.num_q_blocks):
            qb = bl.first_q_block + r
            full = bl.full_kv_indices[r, : bl.full_kv_num_blocks[r]]
            kept += size[qb] * size[full].sum() + size[qb] * (size[qb] + 1) / 2
        return kept / (n * (n + 1) / 2)

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({p})"


def _window_sink_candidates(qb: np.ndarray, window: int, sink: int, extra_delta: np.ndarray):
    """Candidates ``qb - delta`` for ``delta < window`` and ``extra_delta``, plus ``0..sink-1``."""
    deltas = np.concatenate([np.arange(window, dtype=np.int64), extra_delta.astype(np.int64)])
    parts = [qb[:, None] - deltas[None, :]]
    if sink > 0:
        parts.append(np.broadcast_to(np.arange(sink, dtype=np.int64), (qb.shape[0], sink)))
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class PowerPattern(Pattern):
    """PowerAttention: keep ``delta < window``, ``delta`` a power of two, or ``kb < sink``.

    ``window`` and ``sink`` are in blocks (paper: 5 and 1 with 256-token blocks).
    ``window=1, sink=0`` is the pure power-of-two DAG of the paper's theorem.
    """

    window: int = 5
    sink: int = 1
    name = "power"

    def __post_init__(self):
        super().__post_init__()
        _check_pos_int("window", self.window)
        _check_pos_int("sink", self.sink, 0)

    def block_rule(self, qb, kb):
        d = qb - kb
        return (d >= 0) & ((d < self.window) | _is_pow2(d) | (kb < self.sink))

    def _candidates(self, qb, nb):
        pows = 1 << np.arange(max(int(nb - 1).bit_length(), 1), dtype=np.int64)
        return _window_sink_candidates(qb, self.window, self.sink, pows)


@dataclass(frozen=True)
class SlidingWindowPattern(Pattern):
    """Sliding window + attention sink (StreamingLLM-like): ``delta < window`` or ``kb < sink``."""

    window: int = 8
    sink: int = 1
    name = "sliding_window"

    def __post_init__(self):
        super().__post_init__()
        _check_pos_int("window", self.window)
        _check_pos_int("sink", self.sink, 0)

    def block_rule(self, qb, kb):
        d = qb - kb
        return (d >= 0) & ((d < self.window) | (kb < self.sink))

    def _candidates(self, qb, nb):
        return _window_sink_candidates(qb, self.window, self.sink, np.zeros(0, np.int64))


@dataclass(frozen=True)
class StrideSlashPattern(Pattern):
    """Window + sink + slash lines: ``delta < window``, ``kb < sink`` or ``delta % stride == 0``."""

    window: int = 5
    sink: int = 1
    stride: int = 16
    name = "stride_slash"

    def __post_init__(self):
        super().__post_init__()
        _check_pos_int("window", self.window)
        _check_pos_int("sink", self.sink, 0)
        _check_pos_int("stride", self.stride)

    def block_rule(self, qb, kb):
        d = qb - kb
        return (d >= 0) & ((d < self.window) | (kb < self.sink) | (d % self.stride == 0))

    def _candidates(self, qb, nb):
        slash = np.arange(0, nb, self.stride, dtype=np.int64)
        return _window_sink_candidates(qb, self.window, self.sink, slash)


@dataclass(frozen=True)
class DilatedPattern(Pattern):
    """Dilated sliding window: ``delta < window``, ``kb < sink``, or
    ``delta % dilation == 0 and delta < span`` (``span=0``: unbounded).

    With the defaults (``window=1, sink=0``) a block only ever reaches blocks congruent to it
    modulo ``dilation``: the receptive field is never complete, as the paper says.
    """

    dilation: int = 2
    span: int = 16
    window: int = 1
    sink: int = 0
    name = "dilated"

    def __post_init__(self):
        super().__post_init__()
        _check_pos_int("dilation", self.dilation)
        _check_pos_int("span", self.span, 0)
        _check_pos_int("window", self.window)
        _check_pos_int("sink", self.sink, 0)

    def block_rule(self, qb, kb):
        d = qb - kb
        dil = (d % self.dilation == 0)
        if self.span > 0:
            dil = dil & (d < self.span)
        return (d >= 0) & ((d < self.window) | (kb < self.sink) | dil)

    def _candidates(self, qb, nb):
        top = nb if self.span == 0 else min(self.span, nb)
        dil = np.arange(0, top, self.dilation, dtype=np.int64)
        return _window_sink_candidates(qb, self.window, self.sink, dil)


@dataclass(frozen=True)
class LongNetPattern(Pattern):
    """LongNet-style dilated segments, causal, at block level.

    Level ``l = 0 .. levels-1`` has segment length ``w_l = segment * ratio**l`` and dilation
    ``r_l = dilation * ratio**l`` blocks. A key block is kept when, at some level, it lies in the
    query block's segment (``qb // w_l == kb // w_l``) at a dilated offset
    (``(kb - seg_start) % r_l == 0``). Queries are not sparsified (the static mask is the union
    over levels, as a mask-based implementation would use), and the head-dependent offsets of the
    original are left out. The diagonal is always kept.
    """

    segment: int = 4
    dilation: int = 1
    ratio: int = 2
    levels: int = 8
    name = "longnet"

    def __post_init__(self):
        super().__post_init__()
        _check_pos_int("segment", self.segment)
        _check_pos_int("dilation", self.dilation)
        _check_pos_int("ratio", self.ratio, 2)
        _check_pos_int("levels", self.levels)

    def _levels(self):
        return [(self.segment * self.ratio**l, self.dilation * self.ratio**l) for l in range(self.levels)]

    def block_rule(self, qb, kb):
        d = qb - kb
        keep = d == 0
        for w, r in self._levels():
            keep = keep | ((qb // w == kb // w) & ((kb % w) % r == 0))
        return (d >= 0) & keep

    def _candidates(self, qb, nb):
        parts = [qb[:, None]]
        for w, r in self._levels():
            start = (qb // w) * w
            steps = np.arange(0, min(w, nb), r, dtype=np.int64)  # kb - start < nb always
            parts.append(start[:, None] + steps[None, :])
        return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class FullPattern(Pattern):
    """Full causal attention (every causal tile)."""

    name = "full"

    def block_rule(self, qb, kb):
        return qb - kb >= 0

    def _candidates(self, qb, nb):
        return np.broadcast_to(np.arange(nb, dtype=np.int64), (qb.shape[0], nb))


# ---------------------------------------------------------------------- factories
def power_pattern(block_size: int = 256, window: int = 5, sink: int = 1) -> PowerPattern:
    """PowerAttention pattern (paper defaults: 256-token blocks, window 5 blocks, 1 sink block).

    Examples
    --------
    >>> p = power_pattern(block_size=4, window=2, sink=1)
    >>> p.decode_blocks(40).tolist()   # query at position 39, block 9: 9,8 window; 7,5,1 powers; 0 sink
    [0, 1, 5, 7, 8, 9]
    """
    return PowerPattern(block_size=block_size, window=window, sink=sink)


def sliding_window_pattern(block_size: int = 256, window: int = 8, sink: int = 1) -> SlidingWindowPattern:
    """Sliding window of ``window`` blocks (including the diagonal) plus ``sink`` blocks."""
    return SlidingWindowPattern(block_size=block_size, window=window, sink=sink)


def stride_slash_pattern(block_size: int = 256, window: int = 5, sink: int = 1, stride: int = 16) -> StrideSlashPattern:
    """Window + sink + every ``stride``-th block distance."""
    return StrideSlashPattern(block_size=block_size, window=window, sink=sink, stride=stride)


def dilated_pattern(block_size: int = 256, dilation: int = 2, span: int = 16, window: int = 1, sink: int = 0) -> DilatedPattern:
    """Dilated window: every ``dilation``-th block distance below ``span``, plus window/sink."""
    return DilatedPattern(block_size=block_size, dilation=dilation, span=span, window=window, sink=sink)


def longnet_pattern(block_size: int = 256, segment: int = 4, dilation: int = 1, ratio: int = 2, levels: int = 8) -> LongNetPattern:
    """LongNet geometric (segment, dilation) pairs ``(segment * ratio**l, dilation * ratio**l)``."""
    return LongNetPattern(block_size=block_size, segment=segment, dilation=dilation, ratio=ratio, levels=levels)


def full_pattern(block_size: int = 256) -> FullPattern:
    """Full causal attention."""
    return FullPattern(block_size=block_size)


def _mean_kept(p: Pattern, seq_len: int) -> float:
    return float(p.kept_blocks_per_row(seq_len).mean())


def matched_baselines(
    seq_len: int,
    block_size: int = 256,
    window: int = 5,
    sink: int = 1,
    *,
    dilation: int = 2,
    longnet_levels: Optional[int] = None,
) -> Dict[str, Pattern]:
    """Baselines at the token budget of PowerAttention at ``seq_len``.

    Each baseline has one free integer parameter, chosen so that its mean number of kept key
    blocks per query block (prefill of ``seq_len``) is closest to PowerAttention's:
    sliding window: ``window``; stride slash: ``stride`` (same window and sink as power);
    dilated: ``span`` (``dilation`` fixed, window 1, no sink); LongNet: the first segment length
    (dilation 1, ratio 2, enough levels to cover the sequence).

    Returns
    -------
    dict
        ``{"power", "sliding_window", "stride_slash", "dilated", "longnet", "full"}`` to patterns.
    """
    bs = block_size
    nb = -(-seq_len // bs)
    pw = power_pattern(bs, window, sink)
    target = _mean_kept(pw, seq_len)

    def closest(make, lo, hi):
        # mean kept blocks is monotone in the free parameter (up or down): bisect for the
        # crossing of the target, then take the closer neighbour
        f = lambda v: _mean_kept(make(v), seq_len) - target
        up = f(hi) >= f(lo)
        a, b = lo, hi
        while b - a > 1:
            mid = (a + b) // 2
            if (f(mid) < 0) == up:
                a = mid
            else:
                b = mid
        return make(min((abs(f(v)), v) for v in {a, b})[1])

    out: Dict[str, Pattern] = {"power": pw}
    out["sliding_window"] = closest(lambda w: sliding_window_pattern(bs, w, sink), 1, max(nb, 1))
    out["stride_slash"] = closest(lambda s: stride_slash_pattern(bs, window, sink, s), 1, max(nb, 1))
    out["dilated"] = closest(lambda s: dilated_pattern(bs, dilation, s, 1, 0), 1, max(dilation * nb, 1))
    levels = longnet_levels

    def ln(seg):
        lv = levels if levels is not None else max(1, math.ceil(math.log2(max(nb / seg, 1))) + 1)
        return longnet_pattern(bs, seg, 1, 2, lv)

    segs = [1 << k for k in range(0, max(nb, 1).bit_length() + 1)]
    out["longnet"] = ln(min((abs(_mean_kept(ln(s), seq_len) - target), s) for s in segs)[1])
    out["full"] = full_pattern(bs)
    return out


# ------------------------------------------------------------------ FlexAttention
def to_block_mask(pattern: Pattern, seq_len: int, *, batch: Optional[int] = None, heads: Optional[int] = None, device="cpu"):
    """FlexAttention ``BlockMask`` for a prefill of ``seq_len`` tokens, built from block lists.

    No token-level mask is materialised, so 128K+ contexts are cheap. FlexAttention's own
    layout needs ``kv_indices`` as wide as the number of key blocks (its transposition and
    ``to_dense`` read the width as the block count), so the compact rows are padded to
    ``(nb, nb)`` int32: 16 MiB at 512K tokens with 256-token blocks.

    The diagonal tiles go to ``kv_num_blocks/kv_indices`` (the ``mask_mod`` is applied there);
    all other kept tiles to ``full_kv_num_blocks/full_kv_indices`` (no ``mask_mod``).

    Parameters
    ----------
    pattern : Pattern
    seq_len : int
        Query and key length.
    batch, heads : int, optional
        Leading sizes of the block tensors (1 when None; FlexAttention broadcasts them).
    device : str or torch.device

    Returns
    -------
    torch.nn.attention.flex_attention.BlockMask

    Notes
    -----
    Only the compiled ``torch.compile(flex_attention)`` skips the tiles that are not listed;
    eager ``flex_attention`` materialises the full score matrix and applies ``mask_mod``
    densely, so the block lists then change nothing (see docs/power.md).
    """
    from torch.nn.attention.flex_attention import BlockMask

    bl = pattern.block_lists(seq_len)
    nb = bl.num_kv_blocks
    B = 1 if batch is None else _check_pos_int("batch", batch)
    H = 1 if heads is None else _check_pos_int("heads", heads)

    def widen(counts, idx):
        out = np.zeros((idx.shape[0], nb), dtype=np.int32)
        w = min(idx.shape[1], nb)
        out[:, :w] = idx[:, :w]
        t = torch.from_numpy(out).to(device)
        c = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int32)).to(device)
        return (c.expand(B, H, -1).contiguous(), t.expand(B, H, -1, -1).contiguous())

    kvn, kvi = widen(bl.partial_kv_num_blocks, bl.partial_kv_indices)
    fkn, fki = widen(bl.full_kv_num_blocks, bl.full_kv_indices)
    return BlockMask.from_kv_blocks(
        kvn, kvi, fkn, fki, BLOCK_SIZE=pattern.block_size, mask_mod=pattern.mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


# ------------------------------------------------------------- attention (CPU ref)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _as_tensor(name: str, x):
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32:
            raise TypeError(f"{name}: numpy input must be float32, got {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x)), True
    if isinstance(x, torch.Tensor):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype must be float16, bfloat16 or float32, got {x.dtype}")
        return x, False
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def kernel_block_lists(pattern: Pattern, seq_len: int, q_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Block lists in the layout of ``hsr.kernels.block_sparse_attention``.

    That kernel puts query ``i`` of ``M`` at absolute position ``N - M + i`` and reads the list
    row ``(N - M + i) // block_size - (N - M) // block_size``: rows are absolute query blocks
    starting at the block of the first query, exactly ``pattern.block_lists(N, M)``. Rows are
    therefore aligned with the pattern's blocks whatever ``N - M`` is; a tile that straddles two
    blocks cannot arise.

    Returns
    -------
    kv_num_blocks : np.ndarray, int32, shape (1, 1, R)
    kv_indices : np.ndarray, int32, shape (1, 1, R, max_blocks)
        ``R = ceil(N / block_size) - (N - M) // block_size``; ascending kept key blocks.
    """
    bl = pattern.block_lists(seq_len, q_len)
    return bl.kv_num_blocks[None, None], bl.kv_indices[None, None]


@functools.lru_cache(maxsize=64)
def _device_block_lists(pattern: Pattern, seq_len: int, q_len: int, device: str):
    """``kernel_block_lists`` as device tensors, cached: a decode step reuses them until the
    cache crosses a block boundary (building and copying them cost ~0.3 ms per call, 100x the
    kernel's own time at 128K, measured on an H100)."""
    kvn, kvi = kernel_block_lists(pattern, seq_len, q_len)
    return torch.from_numpy(kvn).to(device), torch.from_numpy(kvi).to(device)


def power_attention(q, k, v, pattern: Optional[Pattern] = None, *, scale: Optional[float] = None,
                    check_finite: bool = True):
    """Causal attention restricted to a static block-sparse pattern.

    Parameters
    ----------
    q : torch.Tensor or np.ndarray, shape (B, Hq, M, D)
        Queries; query ``i`` sits at absolute position ``N - M + i`` (``M == N`` prefill,
        ``M == 1`` decode).
    k : shape (B, Hkv, N, D)
    v : shape (B, Hkv, N, Dv)
        ``Hq % Hkv == 0`` (grouped-query attention: query head ``h`` uses KV head
        ``h // (Hq // Hkv)``).
    pattern : Pattern, optional
        Default ``power_pattern()`` (256-token blocks, window 5, sink 1).
    scale : float, optional
        Score scale, default ``1 / sqrt(D)``.
    check_finite : bool
        Raise ``ValueError`` on NaN/Inf in ``q`` and in the key/value blocks the pattern reads.
        Blocks outside the pattern are never read, so never checked: a decode step stays
        ``O(kept)``, not ``O(N)``. On CUDA the whole ``k``/``v`` is checked.

    Returns
    -------
    torch.Tensor or np.ndarray, shape (B, Hq, M, Dv), dtype of the input

    Notes
    -----
    On CPU: a block-wise reference path. For each query block it gathers only the kept key
    blocks, computes scores and softmax in float32, so memory is
    ``O(B * Hq * block_size * kept * block_size)``, never ``N x N``. It is a correctness path,
    not a fast one. On CUDA it calls ``hsr.kernels.block_sparse_attention``.

    Examples
    --------
    >>> import torch
    >>> from hsr.attention.power import power_attention, power_pattern
    >>> q = torch.randn(1, 4, 100, 16); k = torch.randn(1, 2, 100, 16); v = torch.randn(1, 2, 100, 16)
    >>> p = power_pattern(block_size=16, window=2, sink=1)
    >>> out = power_attention(q, k, v, p)
    >>> m = torch.from_numpy(p.dense_mask(100))
    >>> ref = torch.nn.functional.scaled_dot_product_attention(
    ...     q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m)
    >>> bool(torch.allclose(out, ref, atol=1e-5))
    True
    """
    pattern = power_pattern() if pattern is None else pattern
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    qt, q_np = _as_tensor("q", q)
    kt, k_np = _as_tensor("k", k)
    vt, v_np = _as_tensor("v", v)
    if not (q_np == k_np == v_np):
        raise TypeError("q, k, v must be all numpy arrays or all torch tensors")
    if not (qt.dtype == kt.dtype == vt.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {qt.dtype}, {kt.dtype}, {vt.dtype}")
    if not (qt.device == kt.device == vt.device):
        raise ValueError(f"q, k, v must be on one device, got {qt.device}, {kt.device}, {vt.device}")
    for name, t in (("q", qt), ("k", kt), ("v", vt)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, seq, D), got {tuple(t.shape)}")
    B, Hq, M, D = qt.shape
    Bk, Hkv, N, Dk = kt.shape
    if vt.shape[:3] != kt.shape[:3]:
        raise ValueError(f"v shape {tuple(vt.shape)} does not match k shape {tuple(kt.shape)} in (B, Hkv, N)")
    if Bk != B:
        raise ValueError(f"batch mismatch: q has {B}, k has {Bk}")
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has {D}, k has {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if N == 0 or M == 0 or D == 0:
        raise ValueError(f"empty input: M={M}, N={N}, D={D}")
    if M > N:
        raise ValueError(f"q_len M={M} must be <= kv_len N={N} (queries are the last M positions)")
    if check_finite and not bool(torch.isfinite(qt).all()):
        raise ValueError("q contains NaN or Inf")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if qt.is_cuda:
        from hsr.kernels import block_sparse_attention  # lazy: triton only on the GPU path

        if check_finite:
            for name, t in (("k", kt), ("v", vt)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name} contains NaN or Inf")
        kvn, kvi = _device_block_lists(pattern, N, M, str(qt.device))
        return block_sparse_attention(qt, kt, vt, kvn, kvi, block_size=pattern.block_size,
                                      causal=True, scale=scale)

    out = _power_attention_cpu(qt, kt, vt, pattern, scale, check_finite)
    return out.numpy() if q_np else out


def _power_attention_cpu(q, k, v, pattern: Pattern, scale: float, check_finite: bool) -> torch.Tensor:
    B, Hq, M, D = q.shape
    _, Hkv, N, Dv = v.shape
    g = Hq // Hkv
    bs = pattern.block_size
    bl = pattern.block_lists(N, M)
    q0 = N - M  # absolute position of query 0
    out = torch.empty(B, Hq, M, Dv, dtype=q.dtype)
    ar = torch.arange(bs)
    for r in range(bl.num_q_blocks):
        qb = bl.first_q_block + r
        lo, hi = max(qb * bs, q0), min((qb + 1) * bs, N)
        m = hi - lo
        blocks = torch.from_numpy(bl.row(r).astype(np.int64))
        # key token ids of the kept blocks, ascending; the diagonal block is last and may be
        # the partial last block of the sequence
        tok = (blocks[:, None] * bs + ar[None, :]).reshape(-1)
        if qb * bs + bs > N:
            tok = tok[: tok.shape[0] - (qb * bs + bs - N)]
        kk = k.index_select(2, tok).float()  # (B, Hkv, T, D)
        vv = v.index_select(2, tok).float()
        if check_finite:
            # only what is read: a non-finite key outside the pattern cannot reach the output
            for name, t in (("k", kk), ("v", vv)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name} contains NaN or Inf in a block the pattern reads (query block {qb})")
        qq = q[:, :, lo - q0 : hi - q0].float()  # (B, Hq, m, D)
        # causality matters only in the diagonal block (the last nd columns); the block rule
        # already holds for every kept tile
        nd = min(bs, N - qb * bs)
        keep = torch.ones(m, tok.shape[0], dtype=torch.bool)
        qpos = torch.arange(lo, hi)
        kpos = torch.arange(qb * bs, qb * bs + nd)
        keep[:, tok.shape[0] - nd :] = kpos[None, :] <= qpos[:, None]
        # float32 fused SDPA on the gathered blocks: scores never leave the kernel's tiles
        o = torch.nn.functional.scaled_dot_product_attention(
            qq, kk, vv, attn_mask=keep, scale=scale, enable_gqa=g > 1)
        out[:, :, lo - q0 : hi - q0] = o.to(q.dtype)
    return out
