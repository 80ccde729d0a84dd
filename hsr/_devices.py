"""Device implementations, registered by the room that provides them and looked up by the room
that moves to a device, so that a lower room never imports a higher one.

``hsr.kernels`` registers its Triton classes when it is imported (that imports neither torch nor
triton: a registration is a loader, run on the first lookup); ``import hsr`` imports
``hsr.kernels``, so they are registered before any index exists. ``HSRIndex.to("cuda")`` looks
up ``"code_index"``. A new device backend registers the same names.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

__all__ = ["register", "lookup", "DeviceIndex"]


class DeviceIndex(Protocol):
    """What ``HSRIndex.to(device)`` returns for a device other than the CPU (``"code_index"``:
    ``hsr.kernels.GPUCodeIndex``): the index's search side, taking and returning tensors."""

    @property
    def ntotal(self) -> int: ...

    @property
    def d(self) -> int: ...

    def __len__(self) -> int: ...

    def add(self, keys: Any) -> Any: ...

    def range_search(self, queries: Any, tau: Any) -> Any: ...

    def count(self, queries: Any, tau: Any) -> Any: ...

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
