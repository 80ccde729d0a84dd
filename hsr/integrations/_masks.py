"""The masks the transformers backends accept, and the counts they report.

A backend takes no mask (plain causal) or ``causal & key_padding``; :func:`key_padding_of`
reduces the mask transformers passes to that padding (and refuses any other mask),
:func:`visible_counts` and :func:`pattern_kept` count the (query, key) pairs a mask or a
block-sparse pattern allows, and :func:`masked_sdpa` attends under an arbitrary boolean mask
(the PowerAttention backend's dense fallback on padded batches).
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

import numpy as np
import torch

from .._arrays import tensor_version
from ..attention.patterns import Pattern

__all__ = ["key_padding_of", "visible_counts", "masked_sdpa", "pattern_kept"]


#: the mask checked last on this thread and its answer: transformers passes one mask object
#: to every layer of a forward, so each forward checks it once, not once per layer
_CHECKED = threading.local()


def key_padding_of(attention_mask: Optional[torch.Tensor], B: int, M: int, N: int) -> Optional[np.ndarray]:
    """``None`` for plain causal, else ``(B, N)`` bool (True = real key); raises on other masks.

    The check runs where the mask lives, one batch row at a time (a GPU prefill chunk's mask
    is ``B x M x N`` bools, gigabytes at 32K: it was copied to the host for every layer and
    made a chunked 8B prefill 7x slower), and once per mask object and version.
    """
    if attention_mask is None:
        return None
    version = tensor_version(attention_mask)
    seen = getattr(_CHECKED, "last", None)
    if (version is not None and seen is not None and seen[0]() is attention_mask and seen[1] == version
            and seen[2] == (B, M, N)):
        return seen[3]
    m = attention_mask
    if m.dtype != torch.bool:  # additive float mask: 0 where allowed
        m = m == 0
    if m.dim() != 4 or m.shape[-2:] != (M, N) or m.shape[1] != 1:
        raise ValueError(f"hsr backends accept a (batch, 1, q_len, kv_len) mask, got {tuple(m.shape)}")
    m = m[:, 0].expand(B, M, N)
    dev = m.device
    causal = torch.arange(N, device=dev)[None, :] <= (torch.arange(M, device=dev) + (N - M))[:, None]
    keypad = m[:, -1, :]  # the last query is causal over all N keys: its row is the padding
    for b in range(B):
        if not torch.equal(m[b], causal & keypad[b][None, :]):
            raise ValueError(
                "hsr backends support causal masks with key padding only (batch 1, or padded batches "
                "from attention_mask); this mask is something else (packed sequences, sliding window, "
                "or a custom pattern)")
    kp = keypad.cpu().numpy()
    result = None if kp.all() else kp
    if version is not None:
        _CHECKED.last = (weakref.ref(attention_mask), version, (B, M, N), result)
    return result


def visible_counts(B: int, M: int, N: int, key_padding: Optional[np.ndarray]) -> int:
    """Causally visible (query, key) pairs of the M last queries over the batch, pad keys excluded."""
    if key_padding is None:
        return B * int(M * (N - M) + M * (M + 1) // 2)
    c = np.cumsum(key_padding, axis=1)[:, N - M:]  # visible keys of each query
    return int(c.sum())


def masked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
    """float32 SDPA with GQA and a boolean mask broadcastable to (B, Hq, M, N)."""
    Hq, Hkv = query.shape[1], key.shape[1]
    o = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    return torch.nan_to_num(o).to(query.dtype)  # fully masked (pad) rows give NaN: zeros instead


def pattern_kept(pattern: Pattern, N: int, M: int) -> int:
    """Tokens the pattern keeps for the last M queries of N (per head, batch 1), exactly."""
    bl = pattern.block_lists(N, M)
    bs = pattern.block_size
    size = np.minimum(bs, N - np.arange(bl.num_kv_blocks) * bs)
    q0 = N - M
    kept = 0
    for r in range(bl.num_q_blocks):
        qb = bl.first_q_block + r
        lo, hi = max(qb * bs, q0), min((qb + 1) * bs, N)
        full = bl.full_kv_indices[r, : bl.full_kv_num_blocks[r]]
        pos = np.arange(lo, hi) - qb * bs + 1  # keys of the diagonal block each query sees
        kept += (hi - lo) * int(size[full].sum()) + int(pos.sum())
    return kept
