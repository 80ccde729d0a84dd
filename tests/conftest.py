"""Suite-wide settings.

``hsr_attention`` scores every key densely below ``DENSE_BELOW`` keys, and the transformers
backends attend densely below ``MODEL_DENSE_BELOW`` (short contexts never cost more than dense). The tests' caches are small, so without this fixture they would all take
the dense path and the index paths would go untested: the suite turns the switch off (session
scope, so that hypothesis tests see it too), and ``tests/attention/test_dense_path.py`` tests
the dense path and the default on purpose.
"""
import os

import pytest

# The Triton kernels are tested under the CPU interpreter when there is no GPU. TRITON_INTERPRET
# must be set before anything imports triton, and test modules outside tests/kernels (the
# attention and docs tests, torch.compile's inductor) import it during collection, before
# tests/kernels/conftest.py runs: set it here, first. (Set there only, the interpreter's
# patching of triton.language broke after those imports: every interpreted kernel using
# tl.sum failed with "Cannot call @triton.jit'd outside of the scope of a kernel".)
try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _index_paths_at_any_size():
    import hsr.attention.core as core

    default = core.DENSE_BELOW
    core.DENSE_BELOW = 0
    try:  # the transformers backends' own short-context switch (torch is there in the tests)
        import hsr.integrations._short as short
    except ImportError:  # pragma: no cover
        short = None
    model_default = short.MODEL_DENSE_BELOW if short else None
    if short:
        short.MODEL_DENSE_BELOW = 0
        import hsr.integrations.transformers as ht  # the per-layer guard off: the tests time nothing

        guard_default, ht.GUARD = ht.GUARD, False
        import hsr.integrations._device_cache as device_cache  # the GPU cache's filter at any size

        filter_default, device_cache.FILTER_FROM = device_cache.FILTER_FROM, 0
        above_default, device_cache.DENSE_ABOVE = device_cache.DENSE_ABOVE, 1.0  # and whatever it keeps
    yield
    core.DENSE_BELOW = default
    if short:
        short.MODEL_DENSE_BELOW = model_default
        ht.GUARD = guard_default
        device_cache.FILTER_FROM = filter_default
        device_cache.DENSE_ABOVE = above_default
