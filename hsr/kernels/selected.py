"""Selected-entry attention over a CSR selection of keys per query row.

``_selected_kernel``: one program per (split of a row's selection, query row). It gathers
``BLOCK_N`` selected keys at a time by index (each key row is ``D`` contiguous elements, so a
gather of rows is still 2·D-byte coalesced segments), scores them against the row's query,
and accumulates either an online softmax or ReLU^alpha weights. Splits of one row are
combined by ``block_sparse.merge_partials`` (the ReLU partials carry ``log(sum of weights)``
in the lse slot, so the same log-sum-exp merge gives the weighted average).

Memory traffic: per selected entry one index (4-8 B), one K row and one V row (2·D·2 B in
16-bit); per row one q and one output. FLOPs: 4·D per selected entry.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._compat import interpreting, patch_interpreter
from ._softmax import LOG2E, _online_softmax_step_row, _relu_base, _relu_row_step, _weights_epilogue
from ._validate import check_alpha, check_attention_inputs, check_kind, check_tensor, check_triton_device
from .block_sparse import _num_sms, merge_partials

patch_interpreter()


@triton.jit
def _selected_kernel(
    Q, K, V, INDPTR, INDICES, OP, LSEP,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    Hq, M, GROUP, CHUNK, BHM, qk_scale, bias,
    KIND: tl.constexpr, ALPHA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # KIND 0: softmax(scale*<q,k>); KIND 1: relu(scale*<q,k> - bias)**ALPHA, normalised.
    pid_s = tl.program_id(0)
    row = tl.program_id(1)
    b = row // (Hq * M)
    h = (row // M) % Hq
    m = row % M
    hk = h // GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + m * sqm + offs_d).to(tl.float32)
    seg0 = tl.load(INDPTR + row).to(tl.int64)
    seg1 = tl.load(INDPTR + row + 1).to(tl.int64)
    lo = seg0 + pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, seg1)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    offs_n0 = tl.arange(0, BLOCK_N)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    if KIND == 0:
        m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    else:  # ReLU: the running maximum of the base starts at 0
        m_i = tl.max(tl.zeros([BLOCK_N], tl.float32), 0)
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    for start in range(lo, hi, BLOCK_N):
        offs = start + offs_n0
        ok = offs < hi
        idx = tl.load(INDICES + offs, mask=ok, other=0).to(tl.int64)
        kk = tl.load(k_base + idx[:, None] * skn + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.sum(kk.to(tl.float32) * q[None, :], 1)
        vv = tl.load(v_base + idx[:, None] * svn + offs_d[None, :], mask=ok[:, None], other=0.0)
        if KIND == 0:
            s = tl.where(ok, s * qk_scale, float("-inf"))
            m_i, l_i, acc = _online_softmax_step_row(s, vv, m_i, l_i, acc)
        else:
            m_i, l_i, acc = _relu_row_step(_relu_base(s, ok, qk_scale, bias), vv, m_i, l_i, acc, ALPHA)
    # relu: the lse slot carries log(sum of weights), so the split merge averages correctly
    l_safe, lse = _weights_epilogue(m_i, l_i, KIND, ALPHA)
    out = acc / l_safe
    tl.store(OP + (pid_s * BHM + row).to(tl.int64) * HEAD_DIM + offs_d, out)
    tl.store(LSEP + pid_s * BHM + row, lse)


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
                       *, kind: str, alpha: int = 2, bias: float = 0.0, scale: float | None = None,
                       return_lse: bool = False, max_row_len: int | None = None, block_n: int | None = None,
                       num_splits: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query row over its CSR-selected keys.

    Parameters
    ----------
    q : ``(B, Hq, M, D)`` float16/bfloat16/float32; k, v : ``(B, Hkv, N, D)``, ``Hq % Hkv == 0``.
    indptr : int32/int64 ``(B*Hq*M + 1,)``, one flat CSR over query rows in (b, h, m) order.
    indices : int32/int64 ``(nnz,)`` key positions in ``[0, N)`` of the row's kv head
        (duplicates count twice).
    kind : ``"softmax"`` or ``"relu"``, required. ``"softmax"``: softmax of ``scale*<q,k>`` over the selected keys;
        ``"relu"``: weights ``relu(scale*<q,k> - bias)**alpha`` normalised by their sum.
    alpha : int >= 1 (relu); bias : float (relu); scale : default ``1/sqrt(D)``.
    return_lse : also return float32 ``(B, Hq, M)``: softmax lse, or ``log(sum of weights)``
        for relu.

    Rows with no selected key, or (relu) whose weights are all zero: output zeros,
    lse ``-inf``. Under ``torch.compile`` the call goes through the custom op
    ``torch.ops.hsr.selected_attention`` (``hsr.kernels.ops``).

    Raises
    ------
    ValueError
        Bad shapes, head dim, strides, ``indptr`` length, ``kind`` or ``alpha`` (before any
        launch). q, k, v may differ in dtype: the kernel upcasts each to float32.
    """
    if torch.compiler.is_compiling():  # an opaque custom op (hsr.kernels.ops) for torch.compile
        from .ops import call_selected_attention
        return call_selected_attention(q, k, v, indptr, indices, kind=kind, alpha=alpha, bias=bias,
                                       scale=scale, return_lse=return_lse, max_row_len=max_row_len,
                                       block_n=block_n, num_splits=num_splits)
    # each of q, k, v is upcast to float32 in the kernel: their dtypes need not match
    B, Hq, M, D, Hkv, N = check_attention_inputs(q, k, v, check_dtypes=False)
    check_triton_device("selected_attention", q=q, k=k, v=v, indptr=indptr, indices=indices)
    check_tensor("indptr", indptr, 1, f"(B*Hq*M + 1,) = ({B * Hq * M + 1},)")
    if indptr.numel() != B * Hq * M + 1:
        raise ValueError(f"indptr must have B*Hq*M + 1 = {B * Hq * M + 1} entries, got {indptr.numel()}")
    check_tensor("indices", indices, 1, "(nnz,)")
    kind_id = check_kind(kind)
    alpha = check_alpha(alpha)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    BHM = B * Hq * M
    if max_row_len is None:
        max_row_len = int((indptr[1:] - indptr[:-1]).max().item()) if BHM else 0
    BLOCK_N = block_n or (32 if interpreting() else 64)
    n_tiles = max(1, -(-max_row_len // BLOCK_N))
    if num_splits is None:
        num_splits = max(1, min(n_tiles, -(-2 * _num_sms(q.device) // max(BHM, 1))))
    num_splits = max(1, min(num_splits, n_tiles))
    chunk = -(-n_tiles // num_splits) * BLOCK_N
    num_splits = max(1, -(-max(max_row_len, 1) // chunk))
    o_part = torch.empty(num_splits, BHM, D, device=q.device, dtype=torch.float32)
    l_part = torch.empty(num_splits, BHM, device=q.device, dtype=torch.float32)
    _selected_kernel[(num_splits, BHM)](
        q, k, v, indptr, indices, o_part, l_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        Hq, M, Hq // Hkv, chunk, BHM, scale * LOG2E if kind_id == 0 else scale, float(bias),
        KIND=kind_id, ALPHA=alpha, BLOCK_N=BLOCK_N, HEAD_DIM=D, num_warps=4)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)
    merge_partials(o_part, l_part, out, lse, M)
    return (out, lse) if return_lse else out
