"""Compatibility shims for running the kernels under the Triton CPU interpreter.

Triton 3.6's interpreter converts a scalar tensor to a Python int with ``int(array)``, which
numpy >= 2.4 refuses for the 1-element arrays the interpreter uses for scalars ("only
0-dimensional arrays can be converted to Python scalars"); every loop whose bound is a
loaded or computed scalar then fails. ``patch_interpreter()`` replaces that one conversion
with ``int(array.reshape(-1)[0])``. It only runs when ``TRITON_INTERPRET=1`` and never
touches the compiled (GPU) path.
"""
from __future__ import annotations

import os

_PATCHED = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def patch_interpreter() -> None:
    """Apply the scalar-conversion fix to Triton's interpreter, once, when it is in use.

    Nothing is patched without the interpreter, or where the interpreter has no
    ``_patch_lang_tensor`` to wrap (another Triton layout: the conversion it fixes is then not
    that one's to fix).
    """
    global _PATCHED
    if _PATCHED or not interpreting():
        return
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover - a Triton without this module has nothing to patch
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None:  # pragma: no cover
        return

    def _patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patched
    _PATCHED = True


def pdl_supported(device) -> bool:
    """True where a kernel may be launched as a programmatic dependent launch: a CUDA device
    of compute capability 9 or more (Hopper on), compiled (the interpreter has no
    ``griddepcontrol``). Such a launch lets the next kernel's programs start while this one
    finishes; each of ours waits (``gdc_wait``) before it touches memory."""
    import torch

    return (not interpreting() and getattr(device, "type", None) == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)
