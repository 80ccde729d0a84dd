"""Dense torch references for the Triton kernels (float32 math, explicit masks).

Test oracles, so they live in ``hsr.testing``; the dense softmax itself is the library's one
dense reference, :func:`hsr.attention.dense.dense_softmax_attention` (here with a mask).

These are the oracles of tests/kernels and bench/bench_gpu.py: every kernel must equal
the dense masked computation here. They materialise an (M, N) mask per (batch, head), so
use them at test sizes (or one head at a time at bench sizes).

Conventions shared with the kernels (see docs/kernels.md):

- q ``(B, Hq, M, D)``, k/v ``(B, Hkv, N, D)``, ``Hq % Hkv == 0``; query head ``h`` reads
  kv head ``h // (Hq // Hkv)``.
- Queries are the LAST ``M`` of the ``N`` key positions: query row ``i`` has absolute
  position ``p_i = N - M + i``.
- Block lists (FlexAttention ``BlockMask`` convention, one granularity ``block_size`` for
  queries and keys): ``kv_num_blocks (Bl, Hl, R)``, ``kv_indices (Bl, Hl, R, max_blocks)``,
  ``Bl in {1, B}``, ``Hl in {1, Hkv, Hq}`` (``Hkv``: one list per kv head shared by its
  query heads). The list row used by query row ``i`` is ``p_i // block_size - row_offset``
  where ``row_offset = 0`` when ``R == ceil(N / block_size)`` (rows indexed by absolute
  query block) and ``row_offset = (N - M) // block_size`` otherwise (rows relative to the
  block of the first query; for ``M == N`` both agree, for decode ``M == 1`` one row).
- Rows with no allowed key: output 0, lse ``-inf``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..attention.dense import dense_softmax_attention
from .._shapes import list_row_offset




def block_mask_dense(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, B: int, Hq: int, M: int, N: int,
                     block_size: int, causal: bool = True) -> torch.Tensor:
    """Dense boolean mask ``(B, Hq, M, N)`` of a block list (True = attend)."""
    Bl, Hl, R, _ = kv_indices.shape
    off = list_row_offset(R, M, N, block_size)
    nkb = -(-N // block_size)
    pos_q = torch.arange(N - M, N)
    rows = pos_q // block_size - off  # (M,)
    mask = torch.zeros(B, Hq, M, N, dtype=torch.bool)
    kpos = torch.arange(N)
    for b in range(B):
        for h in range(Hq):
            bl = b if Bl > 1 else 0
            hl = (h // (Hq // Hl)) if Hl > 1 else 0
            blocks_per_row = torch.zeros(R, nkb, dtype=torch.bool)
            for r in range(R):
                n = int(kv_num_blocks[bl, hl, r])
                idx = kv_indices[bl, hl, r, :n].long()
                blocks_per_row[r, idx] = True
            allowed_blocks = blocks_per_row[rows]  # (M, nkb)
            mask[b, h] = allowed_blocks[:, kpos // block_size]
    if causal:
        mask &= (kpos[None, :] <= pos_q[:, None])[None, None]
    return mask


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under a dense mask, float32 math. Returns ``(out, lse)``.

    ``out`` float32 ``(B, Hq, M, D)``; ``lse`` float32 ``(B, Hq, M)`` (natural log of the
    row's sum of ``exp(scale * <q, k>)``), ``-inf`` and zero output for empty rows. The
    library's dense softmax with ``attn_mask`` (GQA: kv head ``h // (Hq // Hkv)``).
    """
    out, lse = dense_softmax_attention(q.float(), k.float(), v.float(), scale=scale, attn_mask=mask,
                                       enable_gqa=True, return_lse=True)
    return out, lse.float()


def block_sparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, *, block_size: int = 128, causal: bool = True,
                           scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    B, Hq, M, _ = q.shape
    N = k.shape[2]
    mask = block_mask_dense(kv_num_blocks.cpu(), kv_indices.cpu(), B, Hq, M, N, block_size,
                            causal).to(q.device)
    return masked_attention(q, k, v, mask, scale)


def selected_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indptr: torch.Tensor,
                       indices: torch.Tensor, *, kind: str = "softmax", alpha: int = 2, bias: float = 0.0,
                       scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """CSR selected-entry attention, float32. Duplicated indices count twice (as in the
    kernel). Returns ``(out, lse)``; for ``kind="relu"`` lse is ``log(sum of weights)``."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, M, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, M), float("-inf"), dtype=torch.float32, device=q.device)
    indptr = indptr.cpu().long()
    for row in range(B * Hq * M):
        b, rem = divmod(row, Hq * M)
        h, m = divmod(rem, M)
        s0, s1 = int(indptr[row]), int(indptr[row + 1])
        if s1 == s0:
            continue
        idx = indices[s0:s1].long().to(k.device)
        kk = k[b, h // g, idx].float()
        vv = v[b, h // g, idx].float()
        s = kk @ q[b, h, m].float() * scale
        if kind == "softmax":
            mx = s.max()
            w = torch.exp(s - mx)
            out[b, h, m] = (w @ vv) / w.sum()
            lse[b, h, m] = mx + torch.log(w.sum())
        else:
            z = torch.relu(s - bias)
            zmax = z.max()
            if zmax > 0:
                # powers of z / max(z): z ** 16 underflows float32 for z below 4e-3
                w = (z / zmax) ** alpha
                tot = w.sum()
                out[b, h, m] = (w @ vv) / tot
                lse[b, h, m] = torch.log(tot) + alpha * torch.log(zmax)
    return out, lse


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN anywhere gives inf)."""
    out = out.double()
    ref = ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    return (out - ref).norm().item() / max(den, 1e-30)
