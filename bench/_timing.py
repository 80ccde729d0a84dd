"""The one wall-clock timer of the CPU benchmarks.

The machine the CPU numbers come from is shared: the least disturbed of several runs (the
minimum) is the honest estimate of a time, and a median where a typical run is wanted. Each
call runs ``fn`` once first (compilation, caches) unless ``warmup=False``. GPU benchmarks
time with device events instead (``triton.testing.do_bench``).
"""
from __future__ import annotations

import statistics
import time


def _runs(fn, repeat: int, warmup: bool) -> list[float]:
    if warmup:
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def best_of(fn, repeat: int = 5, warmup: bool = True) -> float:
    """Seconds of the fastest of ``repeat`` runs of ``fn()``."""
    return min(_runs(fn, repeat, warmup))


def median_of(fn, repeat: int = 5, warmup: bool = True) -> float:
    """Median seconds of ``repeat`` runs of ``fn()``."""
    return statistics.median(_runs(fn, repeat, warmup))
