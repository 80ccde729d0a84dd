"""Kernel tests run on the GPU when there is one, else under the Triton CPU interpreter.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at
conftest import time, whenever CUDA is unavailable. Without triton the kernel tests are
not collected at all.

``HSR_RECORD_SPECIALIZATIONS=<file>`` (under the interpreter only) records every kernel launch's
specialization into ``<file>``: see ``tests/kernels/_record_specializations.py``, which
regenerates ``tests/kernels/sm90_specializations.json`` that way.
"""
import importlib.util
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]

# opt-in, and only where the launches are interpreted (a compiled launch does not go through
# the interpreter's run, and the GPU's specializations are not the interpreter's)
_RECORD = bool(os.environ.get("HSR_RECORD_SPECIALIZATIONS")) and os.environ.get("TRITON_INTERPRET") == "1"
if _RECORD:
    from . import _record_specializations

    _record_specializations.install()


def pytest_sessionfinish(session):
    if _RECORD:
        _record_specializations.write()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"
