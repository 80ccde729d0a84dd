"""One helper for renamed public names: they keep working for one release, with a warning."""
from __future__ import annotations

import warnings


def renamed(old: str, new: str) -> None:
    """Warn that ``old`` was renamed ``new`` and goes away in the next release."""
    warnings.warn(f"{old} is deprecated and goes away in the next release: use {new}",
                  DeprecationWarning, stacklevel=3)
