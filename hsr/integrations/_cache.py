"""The indexed cache of the transformers integration: :class:`HSRCache` and its layers.

:class:`HSRLayer` is a ``DynamicLayer`` that keeps a :class:`hsr.KVCacheIndex` in step with its
keys and values (built at prefill, appended per decode step, rows moved by beam search);
:func:`cache_layer_for` is how a backend finds the layer of its call. The public names are
re-exported by :mod:`hsr.integrations.transformers`, whose docstring describes the cache.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np
import torch

from .._typing import lazy
from ..attention.hybrid import remove_key_padding
from ..attention.kv import KVCacheIndex
from . import _short

if TYPE_CHECKING:
    from transformers import PreTrainedConfig
else:  # transformers is optional here: the name resolves when annotations are read
    PreTrainedConfig = lazy("transformers", "PreTrainedConfig")

try:  # the module imports without transformers; registration then raises
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    HAVE_TRANSFORMERS = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TRANSFORMERS = False

    class DynamicLayer:  # type: ignore[no-redef]
        def __init__(self, *a, **k):
            raise ImportError("hsr.integrations.transformers needs transformers >= 5.24 "
                              "(pip install 'hsr-attention[transformers]')")

    class DynamicCache(DynamicLayer):  # type: ignore[no-redef]
        pass

    Cache = DynamicCache  # type: ignore[misc]

__all__ = ["HSRLayer", "HSRCache", "cache_layer_for", "remove_pad", "HAVE_TRANSFORMERS"]

_TLS = threading.local()  # .last: weakref to the HSRLayer updated last on this thread


class HSRLayer(DynamicLayer):
    """A ``DynamicLayer`` that keeps a :class:`hsr.KVCacheIndex` over its keys and values.

    Parameters
    ----------
    index_kwargs : dict, optional
        Passed to every head's :class:`hsr.HSRIndex` (``leaf_size``, ``buffer_size``, ...).
    eager : bool, default True
        Bring the index up to date in every ``update`` (build at prefill, append per decode
        step) once the layer holds ``index_from`` keys. With False it is synced when a backend
        asks for it (:meth:`get_index`), so a backend that never reads it costs nothing.
    index_from : int, default ``MODEL_DENSE_BELOW`` (16384)
        Shorter caches are not indexed eagerly: the backends attend densely below that
        length (their ``dense_below``), and an index asked for earlier is built on demand.

    Attributes
    ----------
    index : KVCacheIndex or None
        Covers ``keys[..., :n_indexed, :]``.
    n_builds, n_appends, n_reorders : int
        How often the index was built from scratch / appended to / had its batch rows
        reordered.
    index_s : float
        Seconds spent building and appending.
    """

    def __init__(self, index_kwargs: Optional[dict] = None, eager: bool = True,
                 index_from: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index_kwargs = dict(index_kwargs or {})
        self.eager = bool(eager)
        self.index_from = _short.MODEL_DENSE_BELOW if index_from is None else int(index_from)
        self.index: Optional[KVCacheIndex] = None
        self.n_indexed = 0
        self.n_builds = 0
        self.n_appends = 0
        self.n_reorders = 0
        self.index_s = 0.0
        self._removed: Optional[np.ndarray] = None  # (B, n) bool: pad ids removed from the index
        # keys/values are views of the first n rows of these (room to grow: no torch.cat per step)
        self._kbuf = self._vbuf = self._kview = self._vview = None

    # ---------------------------------------------------------------- index upkeep
    def _invalidate(self) -> None:
        self.index = None
        self.n_indexed = 0
        self._removed = None

    def get_index(self) -> KVCacheIndex:
        """The index, brought up to date with the stored keys (append, or build if none)."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            raise RuntimeError("the cache layer is empty")
        n = self.keys.shape[-2]
        t0 = time.perf_counter()
        if self.index is None or self.index.batch != self.keys.shape[0] or n < self.n_indexed:
            self.index = KVCacheIndex(self.keys.detach(), self.values.detach(), **self.index_kwargs)
            self._removed = None
            self.n_builds += 1
        elif n > self.n_indexed:
            s = self.n_indexed
            self.index.add(self.keys[:, :, s:].detach(), self.values[:, :, s:].detach())
            self.n_appends += 1
        self.n_indexed = n
        self.index_s += time.perf_counter() - t0
        return self.index

    def remove_padding(self, key_padding: np.ndarray) -> None:
        """Remove from the index the ids where ``key_padding`` (``(B, n)`` bool, True = real
        token) is False; ids already removed are skipped."""
        remove_pad(self.index, key_padding, self)

    # ---------------------------------------------------------------- DynamicLayer API
    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Append into the layer's own buffers (room to grow) instead of ``torch.cat`` (which
        copies the whole cache every step: 28-66 ms per SmolLM2 decode step at 8K, on a par
        with the attention itself). ``keys``/``values`` are then views of the first ``n`` rows.
        A layer whose tensors were replaced from outside (``crop``, ``reorder_cache``, ...)
        adopts them by copy. Returns False where the buffers do not apply (gradients)."""
        if key_states.requires_grad or value_states.requires_grad:
            return False
        kb, vb = self._kbuf, self._vbuf
        k, v = self.keys, self.values
        n = k.shape[-2] if (k is not None and k.dim() == 4) else 0
        t = key_states.shape[-2]
        fits = (kb is not None and k is self._kview and v is self._vview and n + t <= kb.shape[2]
                and key_states.shape[:2] == kb.shape[:2] and key_states.shape[3] == kb.shape[3]
                and value_states.shape[3] == vb.shape[3] and key_states.dtype == kb.dtype
                and value_states.dtype == vb.dtype and key_states.device == kb.device
                and (torch.is_inference_mode_enabled() or not kb.is_inference()))
        if not fits:
            B, H, _, D = key_states.shape
            cap = max(n + t + 256, (n + t) * 5 // 4)
            kb = key_states.new_empty((B, H, cap, D))
            vb = value_states.new_empty((B, H, cap, value_states.shape[3]))
            if n:
                kb[:, :, :n] = k
                vb[:, :, :n] = v
            self._kbuf, self._vbuf = kb, vb
        kb[:, :, n:n + t] = key_states
        vb[:, :, n:n + t] = value_states
        self.keys = self._kview = kb[:, :, :n + t]
        self.values = self._vview = vb[:, :, :n + t]
        return True

    def buffers(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The contiguous ``(B, H, capacity, D)`` key and value buffers whose first ``n`` rows
        are ``keys``/``values`` (None when the layer's tensors are not views of them)."""
        if self._kbuf is not None and self.keys is self._kview and self.values is self._vview:
            return self._kbuf, self._vbuf
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._store(key_states, value_states):
            keys, values = self.keys, self.values
        else:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.eager and keys.shape[-2] >= self.index_from:
            self.get_index()
        _TLS.last = weakref.ref(self)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._kbuf = self._vbuf = self._kview = self._vview = None
        self._invalidate()

    def crop(self, tokens_to_remove: int) -> None:
        before = self.get_seq_length()
        super().crop(tokens_to_remove)
        if self.get_seq_length() != before:
            self._invalidate()

    def _select_rows(self, rows) -> None:
        """Reorder the index's batch rows like the cache's (beam search): rows are moved, a row
        used twice is deep-copied (each copy is appended to separately). Rebuilds lazily when
        the index is stale."""
        n = self.get_seq_length()
        if self.index is None or self.n_indexed != n:
            self._invalidate()
            return
        rows = [int(r) for r in np.asarray(rows).ravel()]
        if rows == list(range(self.index.batch)):
            return
        seen = set()
        heads = []
        for r in rows:
            heads.append(copy.deepcopy(self.index.heads[r]) if r in seen else self.index.heads[r])
            seen.add(r)
        self.index.heads = heads
        self.index.batch = len(rows)
        if self._removed is not None:
            self._removed = self._removed[rows]
        self.n_reorders += 1

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(torch.as_tensor(beam_idx).cpu().numpy())

    def batch_repeat_interleave(self, repeats: int) -> None:
        b = self.index.batch if self.index is not None else 0
        super().batch_repeat_interleave(repeats)
        self._select_rows(np.repeat(np.arange(b), repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        b = self.index.batch if self.index is not None else 0
        super().batch_select_indices(indices)
        sel = np.arange(b)[torch.as_tensor(indices).cpu().numpy()] if b else []
        self._select_rows(sel)

    def __repr__(self):
        return f"HSRLayer(n={self.get_seq_length()}, indexed={self.n_indexed}, builds={self.n_builds})"


def remove_pad(index: KVCacheIndex, key_padding: np.ndarray, holder: Optional[HSRLayer] = None) -> None:
    """Remove pad keys from ``index``; with a ``holder`` layer, skip the ids it removed before
    and remember the new pad mask there (an id cannot be removed twice)."""
    removed = remove_key_padding(index, key_padding, getattr(holder, "_removed", None))
    if holder is not None:
        holder._removed = removed


class HSRCache(DynamicCache):
    """A ``DynamicCache`` whose layers keep an :class:`hsr.KVCacheIndex` (see :class:`HSRLayer`).

    Parameters
    ----------
    config : PretrainedConfig, optional
        With a config, one :class:`HSRLayer` per decoder layer is created up front (sliding
        window or linear-attention layer types are refused); without, layers are created
        lazily.
    index_kwargs : dict, optional
        Passed to each head's :class:`hsr.HSRIndex`.
    eager : bool, default True
        See :class:`HSRLayer`.
    index_from : int, default ``MODEL_DENSE_BELOW`` (16384)
        See :class:`HSRLayer`; pass 0 to index from the first token.

    Examples
    --------
    >>> cache = HSRCache()                                              # doctest: +SKIP
    >>> model.generate(ids, cache=cache, max_new_tokens=8)   # doctest: +SKIP
    >>> cache.layers[0].index                                          # doctest: +SKIP
    KVCacheIndex(batch=1, kv_heads=3, seq=..., dim=64)
    """

    def __init__(self, config: Optional[PreTrainedConfig] = None, *, index_kwargs: Optional[dict] = None,
                 eager: bool = True, index_from: Optional[int] = None) -> None:
        if not HAVE_TRANSFORMERS:  # pragma: no cover
            raise ImportError("HSRCache needs transformers >= 5.24 (pip install 'hsr-attention[transformers]')")
        index_from = _short.MODEL_DENSE_BELOW if index_from is None else index_from
        if isinstance(index_from, bool) or not isinstance(index_from, int) or index_from < 0:
            raise ValueError(f"index_from must be a non-negative integer, got {index_from!r}")
        self.index_kwargs = dict(index_kwargs or {})
        self.eager = bool(eager)
        self.index_from = index_from
        make = functools.partial(HSRLayer, index_kwargs=self.index_kwargs, eager=self.eager,
                                 index_from=index_from)
        if config is not None:
            cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
            bad = sorted({t for t in types if t != "full_attention"})
            if bad:
                raise NotImplementedError(f"HSRCache supports full-attention layers only, config has {bad}")
            Cache.__init__(self, layers=[make() for _ in types])
        else:
            Cache.__init__(self, layer_class_to_replicate=make)

    def index(self, layer_idx: int) -> KVCacheIndex:
        """The up-to-date index of layer ``layer_idx``."""
        return self.layers[layer_idx].get_index()

    @property
    def index_s(self) -> float:
        """Seconds spent building and appending to the indexes, all layers."""
        return float(sum(getattr(l, "index_s", 0.0) for l in self.layers))


def cache_layer_for(module: torch.nn.Module, key: torch.Tensor, kwargs: dict) -> Optional[HSRLayer]:
    """The HSRLayer whose key tensor *is* ``key`` (so the index matches what we attend)."""
    pkv = kwargs.get("cache")  # transformers 5.24 passes the cache as ``cache``; older as ``past_key_values``
    if not isinstance(pkv, HSRCache):
        pkv = kwargs.get("past_key_values")
    idx = getattr(module, "layer_idx", None)
    if isinstance(pkv, HSRCache) and idx is not None and idx < len(pkv.layers):
        layer = pkv.layers[idx]
        if isinstance(layer, HSRLayer) and layer.keys is key:
            return layer
    ref = getattr(_TLS, "last", None)
    layer = ref() if ref is not None else None
    if layer is not None and layer.keys is key:
        return layer
    return None
