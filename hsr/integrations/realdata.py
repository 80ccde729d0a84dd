"""Moved: real-model data capture is :mod:`hsr.testing.realdata` (it serves the tests and
benchmarks, not the library's users). This name keeps working for one release, with a
``DeprecationWarning``."""
import warnings

from ..testing import realdata as _realdata

warnings.warn("hsr.integrations.realdata moved to hsr.testing.realdata", DeprecationWarning, stacklevel=2)


def __getattr__(name):
    return getattr(_realdata, name)


def __dir__():
    return dir(_realdata)
