"""Settings of the regression micro-benchmarks (pytest-benchmark; docs/benchmarks.md).

Runs are saved under ``bench/micro/.benchmarks`` (git-ignored) instead of the plugin's
``./.benchmarks`` in the working directory, unless ``--benchmark-storage`` is given. The
Triton kernels run under the CPU interpreter when there is no CUDA GPU: ``TRITON_INTERPRET``
must be set before anything imports triton, hence here, at conftest import time.
"""
import os
import pathlib

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the index and CPU attention benchmarks need no torch
    HAS_CUDA = False
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

STORAGE = pathlib.Path(__file__).resolve().parent / ".benchmarks"
_PLUGIN_DEFAULT = "file://./.benchmarks"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # before pytest-benchmark's own pytest_configure (trylast), which opens the storage
    if getattr(config.option, "benchmark_storage", None) == _PLUGIN_DEFAULT:
        config.option.benchmark_storage = f"file://{STORAGE}"
