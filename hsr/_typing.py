"""Type aliases of the public API's annotations.

Importing this module imports neither torch nor numba. Types from modules that ``import hsr``
must not load (torch, the Triton kernels, transformers, scipy.sparse) or cannot import yet (an
import cycle) are forward references at run time, made by :func:`lazy`: ``typing.get_type_hints``
imports their module and resolves them. Type checkers read the ``TYPE_CHECKING`` imports instead.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ForwardRef, Sequence, Union

import numpy as np

__all__ = ["ArrayLike", "Array", "Tensor", "Device", "TorchDType", "ProcessGroup", "DTypeLike", "StrPath", "lazy"]


def lazy(module: str, name: str) -> ForwardRef:
    """``module.name`` as a forward reference that imports ``module`` when it is resolved (not now).

    The reference names the module in full, so a module-level name of the annotated module
    (an alias of the same name, say) cannot shadow it.
    """
    return ForwardRef(f"__import__('importlib').import_module({module!r}).{name}")


if TYPE_CHECKING:
    from torch import Tensor
    from torch import device as _TorchDevice
    from torch import dtype as TorchDType
    from torch.distributed import ProcessGroup
else:
    Tensor = lazy("torch", "Tensor")
    _TorchDevice = lazy("torch", "device")
    TorchDType = lazy("torch", "dtype")
    ProcessGroup = lazy("torch.distributed", "ProcessGroup")

#: An array input: a numpy array, a torch tensor (any device) or (nested) lists of numbers.
ArrayLike = Union[np.ndarray, Tensor, Sequence[Any]]
#: A numpy array or a torch tensor (as an output: in the framework of the input).
Array = Union[np.ndarray, Tensor]
#: A torch device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
Device = Union[str, _TorchDevice]
#: A numpy dtype or its name (``"float32"``, ``np.float64``); None for the default.
DTypeLike = Union[str, np.dtype, type, None]
#: A file or folder path.
StrPath = Union[str, os.PathLike]
