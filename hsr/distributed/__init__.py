"""hsr.distributed: an index and a KV cache sharded by sequence position over ``torch.distributed``.

Every rank holds one contiguous run of positions with its own index; searches and attention
broadcast rank 0's queries, run on every shard, and merge exactly in one collective
(``docs/distributed.md``). Needs ``torch.distributed`` initialised (gloo on CPUs, NCCL on GPUs,
with a ``timeout``); ``import hsr`` does not import this package (nor torch).

>>> import hsr.distributed as hd                                        # doctest: +SKIP
>>> cache = hd.ShardedKVCache.from_full(keys, values)   # every rank       # doctest: +SKIP
>>> out = hsr.hsr_attention(q, cache, kind="softmax", tau=2.0, causal=True)  # doctest: +SKIP
"""

from ._comm import ShardError
from ._files import load_shard
from .index import ShardedIndex
from .kv import ShardedKVCache
from .step import StripedDecodeStep, stripe
from .merge import (dropped_fraction, dropped_log_mass, kth_best, merge_attention, merge_range, merge_topk,
                    shard_range)
from .partial import cpu_partial

__all__ = ["ShardedKVCache", "ShardedIndex", "StripedDecodeStep", "stripe", "ShardError", "shard_range", "merge_attention", "merge_range",
           "merge_topk", "kth_best", "dropped_log_mass", "dropped_fraction", "cpu_partial", "load_shard"]
