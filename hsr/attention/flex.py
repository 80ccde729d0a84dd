"""FlexAttention export of static block-sparse patterns.

This module owns :func:`to_block_mask`: a pattern's block lists (:mod:`hsr.attention.blocks`)
handed to ``torch.nn.attention.flex_attention.BlockMask`` without materialising any token-level
mask, with the pattern's ``mask_mod`` applied on the diagonal tiles only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from .._typing import Device, lazy
from .blocks import _check_pos_int

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from torch.nn.attention.flex_attention import BlockMask

    from .patterns import Pattern
else:  # torch loads on the first call; Pattern resolves in its module when annotations are read
    BlockMask = lazy("torch.nn.attention.flex_attention", "BlockMask")
    Pattern = lazy("hsr.attention.patterns", "Pattern")

__all__ = ["to_block_mask"]


def to_block_mask(pattern: Pattern, seq_len: int, *, batch: Optional[int] = None, heads: Optional[int] = None,
                  device: Device = "cpu") -> BlockMask:
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
    import torch  # lazily: importing hsr does not import torch
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
