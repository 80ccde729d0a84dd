"""PowerAttention: causal attention restricted to a static block-sparse pattern.

This module owns the entry point :func:`power_attention` (a block-wise CPU reference, the
Triton kernel on CUDA). The rest lives by concern, every public name also in
:mod:`hsr.attention`:

* :mod:`hsr.attention.patterns` -- the pattern classes, factories, mask predicates and
  :func:`kernel_block_lists`;
* :mod:`hsr.attention.baselines` -- :func:`matched_baselines` (baselines at equal budget);
* :mod:`hsr.attention.blocks` -- :class:`BlockLists` and its builder;
* :mod:`hsr.attention.flex` -- :func:`to_block_mask` (FlexAttention ``BlockMask`` export).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .._shapes import attention_shapes
from .._typing import Array, Tensor
from .patterns import Pattern, _device_block_lists, power_pattern

__all__ = ["power_attention"]


# ------------------------------------------------------------- attention (CPU ref)
_FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # torch dtype names


def _as_tensor(name: str, x):
    """``(tensor, was_numpy)``: numpy float32 arrays are wrapped without a copy."""
    import torch  # lazily: importing hsr does not import torch
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32:
            raise TypeError(f"{name}: numpy input must be float32, got {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x)), True
    if isinstance(x, torch.Tensor):
        if str(x.dtype).removeprefix("torch.") not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype must be float16, bfloat16 or float32, got {x.dtype}")
        return x, False
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def power_attention(q: Array, k: Array, v: Array, pattern: Optional[Pattern] = None, *, scale: Optional[float] = None,
                    check_finite: bool = True) -> Array:
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
    >>> from hsr.attention import power_attention, power_pattern
    >>> q = torch.randn(1, 4, 100, 16); k = torch.randn(1, 2, 100, 16); v = torch.randn(1, 2, 100, 16)
    >>> p = power_pattern(block_size=16, window=2, sink=1)
    >>> out = power_attention(q, k, v, p)
    >>> m = torch.from_numpy(p.dense_mask(100))
    >>> ref = torch.nn.functional.scaled_dot_product_attention(
    ...     q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m)
    >>> bool(torch.allclose(out, ref, atol=1e-5))
    True
    """
    import torch  # lazily: importing hsr does not import torch
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
    if vt.shape[:3] != kt.shape[:3]:
        raise ValueError(f"v shape {tuple(vt.shape)} does not match k shape {tuple(kt.shape)} in (B, Hkv, N)")
    B, Hq, M, D, Hkv, N = attention_shapes(qt.shape, kt.shape)
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
        # the pattern's own lists are in range by construction: no value check (a host sync)
        return block_sparse_attention(qt, kt, vt, kvn, kvi, block_size=pattern.block_size,
                                      causal=True, scale=scale, check_values=False)

    out = _power_attention_cpu(qt, kt, vt, pattern, scale, check_finite)
    return out.numpy() if q_np else out


def _power_attention_cpu(q, k, v, pattern: Pattern, scale: float, check_finite: bool) -> Tensor:
    import torch  # lazily: importing hsr does not import torch
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
