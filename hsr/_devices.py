"""Device implementations, registered by the room that provides them and looked up by the room
that moves to a device, so that a lower room never imports a higher one.

``hsr.kernels`` registers its Triton classes when it is imported (that imports neither torch nor
triton: a registration is a loader, run on the first lookup); ``import hsr`` imports
``hsr.kernels``, so they are registered before any index exists. ``HSRIndex.to("cuda")`` looks
up ``"code_index"``. A new device backend registers the same names.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["register", "lookup"]


#: implementation name -> loader returning the class (called on the first lookup, then cached)
_LOADERS: dict[str, Callable[[], Any]] = {}
_LOADED: dict[str, Any] = {}


def register(name: str, loader: Callable[[], Any]) -> None:
    """Register ``loader`` (no argument, returns the implementation) under ``name``."""
    _LOADERS[name] = loader
    _LOADED.pop(name, None)


def lookup(name: str) -> Any:
    """The implementation registered under ``name``; ``LookupError`` naming the fix when none is."""
    if name not in _LOADED:
        loader = _LOADERS.get(name)
        if loader is None:
            raise LookupError(f"no device implementation {name!r} is registered: import hsr.kernels "
                              "(the Triton implementations register themselves there)")
        _LOADED[name] = loader()
    return _LOADED[name]
