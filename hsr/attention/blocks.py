"""Block lists of static block-sparse patterns: the layout the kernels and FlexAttention read.

This module owns

* :class:`BlockLists` -- the kept key blocks of each query block, in FlexAttention's ordered
  layout, with the full/partial (diagonal) split;
* :func:`block_lists_from_candidates` -- the one builder of that layout from a pattern's
  constructive candidates (sort, drop invalid entries and repeats), ``O(rows * C)``.

It knows nothing about patterns (:mod:`hsr.attention.patterns` imports this module, never the
reverse): the lists of a pattern in the kernels' layout, :func:`kernel_block_lists`, live there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

__all__ = ["BlockLists", "block_lists_from_candidates"]


def _check_pos_int(name: str, value, minimum: int = 1) -> int:
    """``int(value)`` after checking it is an integer (not a bool) ``>= minimum``."""
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


def block_lists_from_candidates(candidates: Callable[[np.ndarray, int], np.ndarray], block_size: int,
                                seq_len: int, q_len: Optional[int] = None) -> BlockLists:
    """Build :class:`BlockLists` from constructive candidates.

    Parameters
    ----------
    candidates : callable
        ``candidates(qb, num_kv_blocks) -> int64 (len(qb), C)``: every kept key block of each
        query block ``qb`` (int64 ``(rows,)``), plus entries ``< 0`` or ``> qb`` and repeats,
        which are dropped here; nothing else. The diagonal ``qb`` must be among them.
    block_size : int
        Block size in tokens.
    seq_len : int
        Number of keys ``N`` (the last key block may be partial).
    q_len : int, optional
        Number of queries ``M <= N``, at absolute positions ``N - M .. N - 1`` (default ``N``).

    Returns
    -------
    BlockLists
        Rows for the absolute query blocks ``(N - M) // block_size .. ceil(N / block_size) - 1``,
        kept blocks ascending. ``O(rows * C)`` time and memory.
    """
    seq_len = _check_pos_int("seq_len", seq_len)
    q_len = seq_len if q_len is None else _check_pos_int("q_len", q_len)
    if q_len > seq_len:
        raise ValueError(f"q_len ({q_len}) must be <= seq_len ({seq_len})")
    bs = block_size
    nb = -(-seq_len // bs)
    first = (seq_len - q_len) // bs
    qb = np.arange(first, nb, dtype=np.int64)
    cand = np.asarray(candidates(qb, nb), dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != qb.shape[0]:
        # a bug in a pattern class, not bad user input
        raise AssertionError(f"_candidates must return (rows, C) = ({qb.shape[0]}, C), got {cand.shape}")
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

