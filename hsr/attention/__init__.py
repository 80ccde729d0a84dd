"""hsr.attention: attention built on an index (ReLU^alpha, certified softmax, KV caches),
dense references, and PowerAttention patterns."""

from .core import AttentionInfo, hsr_attention, paper_bias
from .dense import dense_relu_attention, dense_softmax_attention
from .kv import KVCacheIndex, KVIndex

__all__ = ["hsr_attention", "AttentionInfo", "paper_bias", "dense_relu_attention",
           "dense_softmax_attention", "KVIndex", "KVCacheIndex"]
