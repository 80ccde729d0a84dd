"""hsr.kernels: Triton GPU kernels and their thin launch wrappers.

Importing this package does not import triton (CPU-only users have none); the kernels'
modules are loaded on first attribute access:

- ``block_sparse_attention`` (``hsr.kernels.block_sparse``): FlashAttention-style attention
  over a BSR block list (FlexAttention ``BlockMask`` convention), prefill and split-KV decode.
- ``selected_attention`` (``hsr.kernels.selected``): softmax / ReLU^alpha attention over a
  CSR list of selected keys per query row.
- ``relu_prefill`` (``hsr.kernels.relu_prefill``): exact ReLU^alpha prefill that skips the
  (query tile, key block) pairs whose score bound stays below the threshold.
- ``CodeKVCache``, ``CodePlan`` (``hsr.kernels.codes``): the code filter on the GPU: a KV
  cache with per-key int8 codes, filter (plan) -> compacted survivors -> attention (run);
  ``DecodeStep`` (``hsr.kernels.decode``): add + attend replayed from one CUDA graph at every length.
- ``GPUBlockIndex``, ``hsr_decode`` (``hsr.kernels.search``): the exact block filter on the
  GPU (ball + per-subspace bounds), its plan (filter) and run (attention) halves, and the
  fused filter + attention decode.
- ``block_lists_from_block_mask`` (``hsr.kernels._blockmask``, torch only): a FlexAttention
  ``BlockMask`` as the block lists, block size and causal flag of ``block_sparse_attention``
  (which also takes the ``BlockMask`` itself).
- ``hsr.kernels.ops`` (torch only, imported on first compiled call or explicitly): the
  kernels as ``torch.library`` custom ops ``torch.ops.hsr.*`` for ``torch.compile``.
- the dense references the kernels are tested against are in ``hsr.testing.references``.

See docs/kernels.md.
"""
from __future__ import annotations

import importlib

from .. import _devices

_LAZY = {
    "CodeKVCache": "codes",
    "CodePlan": "codes",
    "certified_share": "_code_plan",
    "dropped_terms": "_code_plan",
    "DecodeStep": "decode",
    "GPUCodeIndex": "code_index",
    "block_sparse_attention": "block_sparse",
    "block_lists_from_block_mask": "_blockmask",
    "merge_partials": "block_sparse",
    "selected_attention": "selected",
    "relu_prefill": "relu_prefill",
    "GPUBlockIndex": "search",
    "SearchPlan": "search",
    "build_index": "_block_order",
    "hsr_decode": "search",
}

__all__ = sorted(_LAZY)

# HSRIndex.to(device) finds the GPU code index here (hsr.index never imports this package)
_devices.register("code_index", lambda: __getattr__("GPUCodeIndex"))


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'hsr.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
