"""hsr: exact half-space reporting indexes for sparse long-context attention."""

from .index import BruteForceIndex, HSRIndex, SearchStats, canonical_scores

__version__ = "0.1.0"

__all__ = ["HSRIndex", "BruteForceIndex", "SearchStats", "canonical_scores", "__version__"]
