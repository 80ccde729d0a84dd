"""hsr.attention: attention built on an index (ReLU^alpha, certified softmax, KV caches),
dense references, PowerAttention patterns, and the hybrid of a pattern with an index."""

from .._protocol import AttentionCache, AttentionInfo, AttentionSpec
from .core import hsr_attention, paper_bias
from .dense import dense_relu_attention, dense_softmax_attention
from .kv import KVCacheIndex, KVIndex
from .baselines import matched_baselines
from .blocks import BlockLists
from .flex import to_block_mask
from .hybrid import hybrid_attention
from .patterns import (DilatedPattern, FullPattern, LongNetPattern, Pattern, PowerPattern,
                       SlidingWindowPattern, StrideSlashPattern, dilated_pattern, full_pattern,
                       kernel_block_lists, longnet_pattern, power_pattern, sliding_window_pattern,
                       stride_slash_pattern)
from .power import power_attention
from .receptive import (coverage_by_layer, hop_distances, hops_to_full_coverage, plot_receptive,
                        reach_bitsets, receptive_summary)

__all__ = ["hsr_attention", "AttentionSpec", "AttentionInfo", "AttentionCache", "paper_bias", "dense_relu_attention",
           "dense_softmax_attention", "KVIndex", "KVCacheIndex",
           "Pattern", "BlockLists", "PowerPattern", "SlidingWindowPattern", "StrideSlashPattern",
           "DilatedPattern", "LongNetPattern", "FullPattern", "power_pattern", "sliding_window_pattern",
           "stride_slash_pattern", "dilated_pattern", "longnet_pattern", "full_pattern",
           "matched_baselines", "to_block_mask", "kernel_block_lists", "power_attention",
           "hybrid_attention",
           "hop_distances", "coverage_by_layer", "hops_to_full_coverage", "reach_bitsets",
           "receptive_summary", "plot_receptive"]
