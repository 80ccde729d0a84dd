"""hsr: exact half-space reporting indexes for sparse long-context attention."""

from ._protocol import AttentionCache, AttentionSpec, SearchIndex
from .attention import (AttentionInfo, KVCacheIndex, KVIndex, dense_relu_attention,
                        dense_softmax_attention, hsr_attention, paper_bias, power_attention,
                        power_pattern)
from .index import BruteForceIndex, HSRIndex, RangeResult, SearchResult, SearchStats, canonical_scores
from . import kernels as _kernels  # noqa: F401  (registers the device implementations; loads no triton)

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)

__all__ = ["HSRIndex", "BruteForceIndex", "SearchStats", "RangeResult", "SearchResult", "canonical_scores", "KVIndex",
           "KVCacheIndex", "hsr_attention", "AttentionSpec", "AttentionInfo", "AttentionCache", "SearchIndex", "paper_bias", "dense_relu_attention",
           "dense_softmax_attention", "power_attention", "power_pattern", "__version__"]
