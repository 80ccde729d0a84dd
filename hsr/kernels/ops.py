"""The public Triton kernels as ``torch.library`` custom ops, for ``torch.compile``.

Registered (namespace ``hsr``; each returns fresh tensors and mutates nothing):

- ``torch.ops.hsr.block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size,
  causal, scale, positions, n_valid, block_m, block_n, num_splits, num_warps, num_stages,
  k_rowmajor, block_ptr, flat) -> (out, lse)``
- ``torch.ops.hsr.selected_attention(q, k, v, indptr, indices, kind, alpha, bias, scale,
  max_row_len, block_n, num_splits) -> (out, lse)``
- ``torch.ops.hsr.hsr_decode(q, kp, vp, pos, centre, radius, sub_radius, kmax, rot, block,
  n_sub, n_valid, tau_tensor, tau, top_fraction, kind, alpha, bias, scale, exact_set,
  num_splits, count_visited, mode) -> (out, lse, visited)`` (the ``GPUBlockIndex`` passed
  as its tensors; ``visited`` is ``(B, Hkv)`` int32, zeros unless ``count_visited``)
- ``torch.ops.hsr.relu_prefill(q, k, v, alpha, bias, bias_heads, scale, causal, skip, slack,
  block_m, block_n, num_warps, num_stages) -> (out, lse)``

Each op's real implementation calls the eager public function (which validates its input
and launches the kernels); its fake implementation checks the shapes and returns empty
tensors of the output shapes, so ``torch.compile(fullgraph=True)`` traces *around* the
kernel instead of into its Triton launch code. The public functions
(``hsr.kernels.block_sparse_attention``, ``selected_attention``, ``hsr_decode``,
``relu_prefill``) route
through these ops only while ``torch.compiler.is_compiling()``: eager calls pay no
dispatcher overhead. The ops have no autograd formula (the kernels are forward-only).

Importing this module imports torch but not triton; ``import hsr`` does not import it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._validate import check_attention_inputs, check_block_lists

__all__ = ["block_sparse_attention_op", "selected_attention_op", "hsr_decode_op", "relu_prefill_op",
           "call_block_sparse_attention", "call_selected_attention", "call_hsr_decode", "call_relu_prefill"]


def _like(x: Tensor, ref: Tensor) -> Tensor:
    """``x`` with the strides of ``torch.empty_like(ref)`` (what the fake implementations
    promise), copied only if the launcher laid it out otherwise."""
    want = torch.empty_like(ref, device="meta").stride()
    if x.stride() == want:
        return x
    out = torch.empty_like(ref)
    out.copy_(x)
    return out


def _lse(q: Tensor) -> Tensor:
    B, Hq, M = q.shape[:3]
    return q.new_empty((B, Hq, M), dtype=torch.float32)


# ----------------------------------------------------------------------------- block sparse

@torch.library.custom_op("hsr::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
        q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
        block_size: int, causal: bool, scale: Optional[float], positions: Optional[Tensor],
        n_valid: Optional[int], block_m: Optional[int], block_n: Optional[int],
        num_splits: Optional[int], num_warps: Optional[int], num_stages: Optional[int],
        k_rowmajor: bool, block_ptr: bool, flat: bool) -> Tuple[Tensor, Tensor]:
    from .block_sparse import block_sparse_attention

    out, lse = block_sparse_attention(
        q, k, v, kv_num_blocks, kv_indices, block_size=block_size, causal=causal, scale=scale,
        return_lse=True, block_m=block_m, block_n=block_n, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages, k_rowmajor=k_rowmajor, block_ptr=block_ptr,
        flat=flat, positions=positions, n_valid=n_valid)
    return _like(out, q), lse.contiguous()


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_size, causal, scale, positions, n_valid,
      block_m, block_n, num_splits, num_warps, num_stages, k_rowmajor, block_ptr, flat):
    B, Hq, M, D, Hkv, N = check_attention_inputs(q, k, v)
    check_block_lists(kv_num_blocks, kv_indices, B, Hq, Hkv, q.device)
    return torch.empty_like(q), _lse(q)


def call_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, *, block_size, causal, scale=None,
                                return_lse=False, block_m=None, block_n=None, num_splits=None,
                                num_warps=None, num_stages=None, k_rowmajor=True, block_ptr=False,
                                flat=True, positions=None, n_valid=None):
    """``block_sparse_attention`` through ``torch.ops.hsr.block_sparse_attention``."""
    out, lse = torch.ops.hsr.block_sparse_attention(
        q, k, v, kv_num_blocks, kv_indices, int(block_size), bool(causal),
        None if scale is None else float(scale), positions,
        None if n_valid is None else int(n_valid), block_m, block_n, num_splits, num_warps,
        num_stages, bool(k_rowmajor), bool(block_ptr), bool(flat))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- selected

@torch.library.custom_op("hsr::selected_attention", mutates_args=())
def selected_attention_op(
        q: Tensor, k: Tensor, v: Tensor, indptr: Tensor, indices: Tensor, kind: str,
        alpha: int, bias: float, scale: Optional[float], max_row_len: Optional[int],
        block_n: Optional[int], num_splits: Optional[int]) -> Tuple[Tensor, Tensor]:
    from .selected import selected_attention

    out, lse = selected_attention(q, k, v, indptr, indices, kind=kind, alpha=alpha, bias=bias,
                                  scale=scale, return_lse=True, max_row_len=max_row_len,
                                  block_n=block_n, num_splits=num_splits)
    return _like(out, q), lse.contiguous()


@selected_attention_op.register_fake
def _(q, k, v, indptr, indices, kind, alpha, bias, scale, max_row_len, block_n, num_splits):
    check_attention_inputs(q, k, v, check_dtypes=False)
    return torch.empty_like(q), _lse(q)


def call_selected_attention(q, k, v, indptr, indices, *, kind, alpha=2, bias=0.0,
                            scale=None, return_lse=False, max_row_len=None, block_n=None,
                            num_splits=None):
    """``selected_attention`` through ``torch.ops.hsr.selected_attention``."""
    out, lse = torch.ops.hsr.selected_attention(
        q, k, v, indptr, indices, str(kind), int(alpha), float(bias),
        None if scale is None else float(scale), max_row_len, block_n, num_splits)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- hsr_decode

@torch.library.custom_op("hsr::hsr_decode", mutates_args=())
def hsr_decode_op(
        q: Tensor, kp: Tensor, vp: Tensor, pos: Tensor, centre: Tensor, radius: Tensor,
        sub_radius: Tensor, kmax: Tensor, rot: Optional[Tensor], block: int, n_sub: int,
        n_valid: int, tau_tensor: Optional[Tensor], tau: Optional[float],
        top_fraction: Optional[float], kind: str, alpha: int, bias: float,
        scale: Optional[float], exact_set: bool, num_splits: Optional[int],
        count_visited: bool, mode: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    from .search import GPUBlockIndex, hsr_decode

    index = GPUBlockIndex(kp=kp, vp=vp, pos=pos, centre=centre, radius=radius,
                          sub_radius=sub_radius, block=block, n_sub=n_sub, n_valid=n_valid,
                          kmax=kmax, rot=rot)
    res = hsr_decode(q, index, tau=tau_tensor if tau_tensor is not None else tau,
                     top_fraction=top_fraction, kind=kind, alpha=alpha, bias=bias, scale=scale,
                     exact_set=exact_set, return_lse=True, num_splits=num_splits,
                     count_visited=count_visited, mode=mode)
    out, lse = res[0], res[1]
    B, Hkv = kp.shape[:2]
    visited = (res[2].contiguous() if count_visited
               else torch.zeros(B, Hkv, dtype=torch.int32, device=q.device))
    return _like(out, q), lse.contiguous(), visited


@hsr_decode_op.register_fake
def _(q, kp, vp, pos, centre, radius, sub_radius, kmax, rot, block, n_sub, n_valid, tau_tensor,
      tau, top_fraction, kind, alpha, bias, scale, exact_set, num_splits, count_visited, mode):
    check_attention_inputs(q, kp, vp)
    B, Hkv = kp.shape[:2]
    return torch.empty_like(q), _lse(q), q.new_empty((B, Hkv), dtype=torch.int32)


def call_hsr_decode(q, index, *, kind, tau=None, top_fraction=None, alpha=2, bias=0.0,
                    scale=None, exact_set=False, return_lse=False, num_splits=None,
                    count_visited=False, mode=None):
    """``hsr_decode`` through ``torch.ops.hsr.hsr_decode`` (same returns)."""
    tau_t = tau if isinstance(tau, torch.Tensor) else None
    tau_f = None if (tau is None or tau_t is not None) else float(tau)
    out, lse, visited = torch.ops.hsr.hsr_decode(
        q, index.kp, index.vp, index.pos, index.centre, index.radius, index.sub_radius,
        index.kmax, index.rot, int(index.block), int(index.n_sub), int(index.n_valid), tau_t,
        tau_f, None if top_fraction is None else float(top_fraction), str(kind), int(alpha),
        float(bias), None if scale is None else float(scale), bool(exact_set), num_splits,
        bool(count_visited), mode)
    res = (out, lse) if return_lse else (out,)
    if count_visited:
        res = res + (visited,)
    return res if len(res) > 1 else res[0]


# ----------------------------------------------------------------------------- relu_prefill

@torch.library.custom_op("hsr::relu_prefill", mutates_args=())
def relu_prefill_op(
        q: Tensor, k: Tensor, v: Tensor, alpha: int, bias: float, bias_heads: Optional[Tensor],
        scale: Optional[float], causal: bool, skip: bool, slack: float, block_m: Optional[int],
        block_n: Optional[int], num_warps: Optional[int], num_stages: Optional[int]) -> Tuple[Tensor, Tensor]:
    from .relu_prefill import relu_prefill

    out, lse = relu_prefill(q, k, v, alpha=alpha, bias=bias_heads if bias_heads is not None else bias,
                            scale=scale, causal=causal, skip=skip, slack=slack, return_lse=True,
                            block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    return _like(out, q), lse.contiguous()


@relu_prefill_op.register_fake
def _(q, k, v, alpha, bias, bias_heads, scale, causal, skip, slack, block_m, block_n, num_warps,
      num_stages):
    check_attention_inputs(q, k, v)
    return torch.empty_like(q), _lse(q)


def call_relu_prefill(q, k, v, *, alpha=2, bias=0.0, scale=None, causal=True, skip=True, slack=None,
                      return_lse=False, block_m=None, block_n=None, num_warps=None, num_stages=None):
    """``relu_prefill`` through ``torch.ops.hsr.relu_prefill`` (no ``return_stats``: the
    statistics are host integers, which a compiled graph cannot return)."""
    from .relu_prefill import DEFAULT_SLACK

    bias_t = bias if isinstance(bias, torch.Tensor) else None
    out, lse = torch.ops.hsr.relu_prefill(
        q, k, v, int(alpha), 0.0 if bias_t is not None else float(bias), bias_t,
        None if scale is None else float(scale), bool(causal), bool(skip),
        float(DEFAULT_SLACK if slack is None else slack), block_m, block_n, num_warps, num_stages)
    return (out, lse) if return_lse else out
