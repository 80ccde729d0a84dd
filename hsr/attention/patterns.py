"""Static causal block-sparse patterns: PowerAttention and its baselines.

This module owns the pattern classes, their factories and their mask predicates. A *pattern*
is a causal rule on (query block, key block) pairs, with block size ``block_size`` tokens (the
paper uses 256). Every pattern here is a tiny named factory with three faces that must agree
(``tests/attention/test_power.py`` checks that they do):

* ``block_rule(qb, kb)`` -- the exact rule on block indices, elementwise on numpy arrays or
  torch tensors;
* ``mask_mod(b, h, q_idx, kv_idx)`` -- the same rule at token level, plus causality inside the
  diagonal block, usable as a FlexAttention ``mask_mod``;
* ``block_lists(seq_len)`` -- a fast builder of the kept key blocks of every query block,
  ``O(num_q_blocks * blocks_per_row)`` time and memory, never ``N x N`` nor ``nb x nb``
  (the layout and its builder live in :mod:`hsr.attention.blocks`).

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

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .._typing import Array
from .blocks import BlockLists, _check_pos_int, block_lists_from_candidates

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
    "kernel_block_lists",
]


def _is_pow2(x):
    """``x >= 1 and x & (x - 1) == 0`` elementwise, for numpy or torch integer arrays."""
    return (x >= 1) & ((x & (x - 1)) == 0)


@dataclass(frozen=True)
class Pattern:
    """Base class of a static causal block-sparse pattern.

    Subclasses define ``block_rule`` (the definition) and ``_candidates`` (the kept key blocks
    of each query block written constructively, in a small fixed width, possibly with
    out-of-range entries and repeats, which the builder drops before sorting). The two are
    written independently and tested equal. ``block_size`` is in tokens. Every parameter is
    an int ``>= 1`` unless ``_minimum`` names a smaller bound for it.
    """

    block_size: int = 256

    name = "pattern"
    _minimum = {}  # class attributes without annotation: not dataclass fields

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_pos_int(f.name, getattr(self, f.name), self._minimum.get(f.name, 1))

    # ----------------------------------------------------------------- definition
    def block_rule(self, qb: Array, kb: Array) -> Array:
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
        import torch  # lazily: importing hsr does not import torch
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
        import torch  # lazily: importing hsr does not import torch
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
        return block_lists_from_candidates(self._candidates, self.block_size, seq_len, q_len)

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


class _WindowSinkPattern(Pattern):
    """A window and sinks plus a family of block distances: keep ``delta < window``,
    ``kb < sink``, or what ``_extra_rule`` keeps.

    Subclasses are frozen dataclasses declaring ``window`` and ``sink`` (their defaults
    differ) and their own parameters; ``_extra_rule`` is the extra family as a rule on
    ``delta`` (None: none), ``_extra_deltas`` the same family written constructively.
    """

    window: int
    sink: int
    _minimum = {"sink": 0}

    def _extra_rule(self, d):
        return None

    def _extra_deltas(self, nb: int) -> np.ndarray:
        return np.zeros(0, np.int64)

    def block_rule(self, qb: Array, kb: Array) -> Array:
        d = qb - kb
        keep = (d < self.window) | (kb < self.sink)
        extra = self._extra_rule(d)
        if extra is not None:
            keep = keep | extra
        return (d >= 0) & keep

    def _candidates(self, qb, nb):
        """``qb - delta`` for ``delta < window`` and the extra distances, plus ``0..sink-1``."""
        deltas = np.concatenate([np.arange(self.window, dtype=np.int64), self._extra_deltas(nb).astype(np.int64)])
        parts = [qb[:, None] - deltas[None, :]]
        if self.sink > 0:
            parts.append(np.broadcast_to(np.arange(self.sink, dtype=np.int64), (qb.shape[0], self.sink)))
        return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class PowerPattern(_WindowSinkPattern):
    """PowerAttention: keep ``delta < window``, ``delta`` a power of two, or ``kb < sink``.

    ``window`` and ``sink`` are in blocks (paper: 5 and 1 with 256-token blocks).
    ``window=1, sink=0`` is the pure power-of-two DAG of the paper's theorem.
    """

    window: int = 5
    sink: int = 1
    name = "power"

    def _extra_rule(self, d):
        return _is_pow2(d)

    def _extra_deltas(self, nb):
        return 1 << np.arange(max(int(nb - 1).bit_length(), 1), dtype=np.int64)


@dataclass(frozen=True)
class SlidingWindowPattern(_WindowSinkPattern):
    """Sliding window + attention sink (StreamingLLM-like): ``delta < window`` or ``kb < sink``."""

    window: int = 8
    sink: int = 1
    name = "sliding_window"


@dataclass(frozen=True)
class StrideSlashPattern(_WindowSinkPattern):
    """Window + sink + slash lines: ``delta < window``, ``kb < sink`` or ``delta % stride == 0``."""

    window: int = 5
    sink: int = 1
    stride: int = 16
    name = "stride_slash"

    def _extra_rule(self, d):
        return d % self.stride == 0

    def _extra_deltas(self, nb):
        return np.arange(0, nb, self.stride, dtype=np.int64)


@dataclass(frozen=True)
class DilatedPattern(_WindowSinkPattern):
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
    _minimum = {"span": 0, "sink": 0}

    def _extra_rule(self, d):
        dil = (d % self.dilation == 0)
        return dil & (d < self.span) if self.span > 0 else dil

    def _extra_deltas(self, nb):
        top = nb if self.span == 0 else min(self.span, nb)
        return np.arange(0, top, self.dilation, dtype=np.int64)


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
    _minimum = {"ratio": 2}

    def _levels(self):
        return [(self.segment * self.ratio**l, self.dilation * self.ratio**l) for l in range(self.levels)]

    def block_rule(self, qb: Array, kb: Array) -> Array:
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

    def block_rule(self, qb: Array, kb: Array) -> Array:
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
    import torch  # lazily: importing hsr does not import torch
    kvn, kvi = kernel_block_lists(pattern, seq_len, q_len)
    return torch.from_numpy(kvn).to(device), torch.from_numpy(kvi).to(device)
