"""HuggingFace transformers integration: sparse attention backends and an indexed KV cache.

Backends are registered with ``transformers.AttentionInterface`` (and the stock SDPA mask
builder with ``AttentionMaskInterface``, so padded batches reach the backend with a mask) and
selected with ``attn_implementation=<name>``::

    backend = register_hsr_attention("hsr_softmax", kind="softmax", eps=1e-3)
    model.set_attn_implementation("hsr_softmax")        # or from_pretrained(..., attn_implementation=)
    out = model.generate(ids, cache=HSRCache(), max_new_tokens=30, do_sample=False)
    print(backend.stats.table())

Settings travel with the registration (``generate()`` rejects unknown keyword arguments), so
registering the same function twice under two names with two settings gives two backends.

Backends (all causal; queries are the last ``q_len`` positions of the cache)

``register_hsr_attention(kind="softmax", eps=...)``
    :func:`hsr.hsr_attention` over a :class:`hsr.KVCacheIndex`: best-first search with a
    certified per-query bound ``eps_cert`` on the dropped softmax mass, hence
    ``|out - dense|_inf <= 2 eps_cert |V|_inf``. ``tau=`` / ``topk=`` select keys by raw score
    or rank instead (still certified after the fact).
``register_hsr_attention(kind="relu", alpha=, bias=)``
    ReLU^alpha attention, exact (no error) against dense ReLU^alpha. Meaningful only for models
    trained with it; on a softmax-trained model it is a demonstration.
``register_power_attention(pattern=)``
    :func:`hsr.attention.power.power_attention`: a static block-sparse pattern (PowerAttention
    or one of its baselines).
``register_hybrid_attention(pattern=, tau= | topk=)``
    Softmax over the union of the pattern's keys and the keys the index reports (score
    ``>= tau``, or the ``topk`` best). A CPU reference (:func:`hsr.attention.hybrid.hybrid_attention`,
    re-exported here): the union is materialised as a boolean mask per query chunk.

The cache: :class:`HSRCache` is a ``DynamicCache`` whose layers (:class:`HSRLayer`) keep a
:class:`hsr.KVCacheIndex` in step with the stored keys and values: the prefill builds it, every
decode step *appends* (no rebuild). ``reorder_cache`` (beam search), ``batch_select_indices``
and ``batch_repeat_interleave`` move the per-row indexes (a row used twice is deep-copied);
``crop`` rebuilds the index (lazily, at the next update), because ids are cache positions and
removed ids would leave holes that the next appended token cannot fill. A backend finds the
layer of the call by identity: ``HSRLayer.update`` records itself, and the backend uses it only
if the ``key`` tensor it receives *is* that layer's key tensor. Otherwise (no cache, a plain ``DynamicCache``) it
builds a ``KVCacheIndex`` on the fly from ``key``/``value``, every call.

Masks: the backends accept no mask (plain causal) or a boolean ``(batch, 1, q_len, kv_len)``
mask equal to ``causal & key_padding`` (left or right padding from ``attention_mask``). Pad keys
are removed from the index (ids stay positions). Any other mask (packed sequences, sliding
windows, bidirectional blocks) raises ``ValueError``.

Statistics: every backend owns an :class:`HSRStats`; after a forward pass it holds, per layer,
the calls, those that took the dense path below ``dense_below`` (``dense_calls``), the keys
scored and selected (as fractions of the causally visible keys), the largest certified
dropped mass, and the seconds spent maintaining the index, searching it, and attending;
``stats.decode`` holds the same for decode calls (one query position) only.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .._typing import lazy
from ..attention import batched
from ..attention import core as _core
from ..attention.core import hsr_attention
from ..attention.hybrid import hybrid_attention, remove_key_padding
from ..attention.kv import KVCacheIndex
from ..attention.patterns import Pattern

if TYPE_CHECKING:
    from transformers import PreTrainedConfig
else:  # transformers is optional here: the name resolves when annotations are read
    PreTrainedConfig = lazy("transformers", "PreTrainedConfig")

try:  # the module imports without transformers; registration then raises
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    _HAVE_TRANSFORMERS = True
except ImportError:  # pragma: no cover - depends on the environment
    _HAVE_TRANSFORMERS = False

    class DynamicLayer:  # type: ignore[no-redef]
        def __init__(self, *a, **k):
            raise ImportError("hsr.integrations.transformers needs transformers >= 5.24 "
                              "(pip install 'hsr-attention[transformers]')")

    class DynamicCache(DynamicLayer):  # type: ignore[no-redef]
        pass

    Cache = DynamicCache  # type: ignore[misc]

from . import _short  # noqa: E402
from ._short import dense_attention  # noqa: E402
from ._stats import HSRStats, LayerStats  # noqa: E402

__all__ = [
    "HSRStats",
    "LayerStats",
    "HSRLayer",
    "HSRCache",
    "HSRAttentionBackend",
    "register_hsr_attention",
    "register_power_attention",
    "register_hybrid_attention",
    "hybrid_attention",
    "registered_backends",
]


# --------------------------------------------------------------------------------------------
# the indexed cache
# --------------------------------------------------------------------------------------------
#: decode steps with at most this many query positions take the one-call-per-layer path
_BATCHED_MAX_Q = 16
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
        _remove_pad(self.index, key_padding, self)

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


def _remove_pad(index: KVCacheIndex, key_padding: np.ndarray, holder: Optional[HSRLayer] = None) -> None:
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
        if not _HAVE_TRANSFORMERS:  # pragma: no cover
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


def _cache_layer_for(module, key, kwargs) -> Optional[HSRLayer]:
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


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def _key_padding(attention_mask, B: int, M: int, N: int) -> Optional[np.ndarray]:
    """``None`` for plain causal, else ``(B, N)`` bool (True = real key); raises on other masks."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dtype != torch.bool:  # additive float mask: 0 where allowed
        m = m == 0
    if m.dim() != 4 or m.shape[-2:] != (M, N) or m.shape[1] != 1:
        raise ValueError(f"hsr backends accept a (batch, 1, q_len, kv_len) mask, got {tuple(m.shape)}")
    m = m[:, 0].expand(B, M, N).cpu()
    causal = torch.arange(N)[None, :] <= (torch.arange(M) + (N - M))[:, None]
    keypad = m[:, -1, :]  # the last query is causal over all N keys: its row is the padding
    if not torch.equal(m, causal[None] & keypad[:, None, :]):
        raise ValueError(
            "hsr backends support causal masks with key padding only (batch 1, or padded batches "
            "from attention_mask); this mask is something else (packed sequences, sliding window, "
            "or a custom pattern)")
    kp = keypad.numpy()
    return None if kp.all() else kp


def _visible_counts(B: int, M: int, N: int, key_padding: Optional[np.ndarray]) -> int:
    """Causally visible (query, key) pairs of the M last queries over the batch, pad keys excluded."""
    if key_padding is None:
        return B * int(M * (N - M) + M * (M + 1) // 2)
    c = np.cumsum(key_padding, axis=1)[:, N - M:]  # visible keys of each query
    return int(c.sum())


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
_REGISTERED: Dict[str, "HSRAttentionBackend"] = {}


class HSRAttentionBackend:
    """A registered attention function with its settings and statistics.

    Call signature (transformers' ``AttentionInterface``)::

        backend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)
            -> (attn_output (batch, q_len, heads, dim), None)

    with ``query (batch, heads, q_len, dim)``, ``key``/``value (batch, kv_heads, kv_len, dim)``
    post-RoPE and not repeated for grouped-query attention.

    Attributes
    ----------
    name : str
    mode : {"hsr", "power", "hybrid"}
    settings : dict
    stats : HSRStats
    """

    def __init__(self, name: str, mode: str, settings: dict, index_kwargs: Optional[dict] = None) -> None:
        self.name = name
        self.mode = mode
        self.settings = dict(settings)
        self.index_kwargs = dict(index_kwargs or {})
        self.stats = HSRStats()
        self.__name__ = f"hsr_{mode}_attention"

    def __repr__(self):
        s = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"HSRAttentionBackend({self.name!r}, {self.mode}: {s})"

    # ------------------------------------------------------------------ helpers
    def _index(self, module, key, value, kwargs, st: LayerStats, key_padding):
        layer = _cache_layer_for(module, key, kwargs)
        t0 = time.perf_counter()
        if layer is not None:
            index = layer.get_index()
            if key_padding is not None:
                layer.remove_padding(key_padding)
        else:
            index = KVCacheIndex(key.detach(), value.detach(), **self.index_kwargs)
            if key_padding is not None:
                _remove_pad(index, key_padding)
        st.index_s += time.perf_counter() - t0
        return index

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                 **kwargs: Any) -> Tuple[torch.Tensor, None]:
        if dropout and getattr(module, "training", False):
            raise NotImplementedError("hsr attention backends are inference-only (dropout > 0)")
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("hsr attention backends do not support softcap")
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError("hsr attention backends do not support sliding-window layers")
        if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
            raise NotImplementedError("hsr attention backends are causal only")
        B, Hq, M, D = query.shape
        N = key.shape[2]
        if M > N:
            raise ValueError(f"q_len {M} > kv_len {N}")
        key_padding = _key_padding(attention_mask, B, M, N)
        scale = float(scaling) if scaling is not None else D ** -0.5
        layer_idx = getattr(module, "layer_idx", None)
        layer_idx = -1 if layer_idx is None else layer_idx
        st = LayerStats(calls=1, queries=B * Hq * M, keys_visible=Hq * _visible_counts(B, M, N, key_padding))
        if self.mode == "hsr":
            out = self._hsr(module, query, key, value, attention_mask, kwargs, st, scale, key_padding)
        elif self.mode == "power":
            out = self._power(query, key, value, st, scale, key_padding)
        else:
            out = self._hybrid(module, query, key, value, kwargs, st, scale, key_padding)
        self.stats.add(layer_idx, st)
        if M == 1:
            self.stats.decode.add(layer_idx, st)
        return out.transpose(1, 2).contiguous(), None

    def _hsr(self, module, query, key, value, attention_mask, kwargs, st, scale, key_padding):
        s = self.settings
        if key.shape[2] < s["dense_below"] and not isinstance(s["bias"], str):
            # short context: dense is faster than any index; no index is built or updated
            t0 = time.perf_counter()
            st.dense_calls += 1
            if _short.uses_sdpa(s):  # every key kept, nothing dropped: exactly SDPA
                out = _short.sdpa_attention(query, key, value, attention_mask, scale)
                st.keys_scored += st.keys_visible
                st.keys_selected += st.keys_visible
            else:
                out, scored, selected = dense_attention(query, key, value, s, scale, key_padding)
                st.keys_scored += scored
                st.keys_selected += selected
            st.attend_s += time.perf_counter() - t0
            return out
        index = self._index(module, key, value, kwargs, st, key_padding)
        t0 = time.perf_counter()
        fast = self._hsr_batched(module, query, key, kwargs, index, scale)
        if fast is not None:
            out, scored, selected, dropped = fast
            st.search_s += time.perf_counter() - t0
            st.keys_scored += int(scored.sum())
            st.keys_selected += int(selected.sum())
            st.max_dropped = max(st.max_dropped, float(dropped.max()))
            return out
        out, info = hsr_attention(query.detach(), index, kind=s["kind"], alpha=s["alpha"], bias=s["bias"],
                                  scale=scale, eps=s["eps"], tau=s["tau"], topk=s["topk"], causal=True,
                                  return_info=True)
        st.search_s += time.perf_counter() - t0
        st.keys_scored += int(info.keys_scored.sum())
        st.keys_selected += int(info.keys_selected.sum())
        if info.dropped_bound.size:
            st.max_dropped = max(st.max_dropped, float(np.max(info.dropped_bound)))
        return out

    def _hsr_batched(self, module, query, key, kwargs, index, scale):
        """The decode step as one compiled call for the layer (:func:`hsr.attention.batched.layer_softmax`),
        where it applies: softmax, a few query positions, float32 CPU tensors, the cache's own
        buffers (keys and values read in place, no copy), the code filter, and a cache at
        least ``hsr.attention.core.DENSE_BELOW`` long (below it ``hsr_attention`` scores every
        key). The same keys, output and certificate as :func:`hsr.hsr_attention`; None
        elsewhere (the caller then takes that path)."""
        s = self.settings
        B, Hq, M, D = query.shape
        if s["kind"] != "softmax" or M > _BATCHED_MAX_Q or query.dtype != torch.float32 or query.device.type != "cpu":
            return None
        layer = _cache_layer_for(module, key, kwargs)
        bufs = layer.buffers() if layer is not None else None
        n = key.shape[2]
        if bufs is None or bufs[0].dtype != torch.float32 or bufs[1].dtype != torch.float32 or n < _core.DENSE_BELOW:
            return None
        ix = index.heads[0][0].index
        if ix.backend != "code" or ix.n_total != n or not (s["tau"] is None or np.ndim(s["tau"]) == 0):
            return None
        Q = query.detach().contiguous().numpy()
        if not np.isfinite(Q).all():
            raise ValueError("q contains NaN or Inf")
        kb, vb = bufs
        keys = kb.detach().numpy().reshape(-1, kb.shape[2], kb.shape[3])  # zero-copy views
        values = vb.detach().numpy().reshape(-1, vb.shape[2], vb.shape[3])
        out, scored, selected, dropped = batched.layer_softmax(Q, index, keys, values, n, scale, eps=s["eps"],
                                                               tau=s["tau"], topk=s["topk"], causal=True)
        return torch.from_numpy(out), scored, selected, dropped

    def _power(self, query, key, value, st, scale, key_padding):
        from ..attention.power import power_attention

        pattern = self.settings["pattern"]
        B, Hq, M, D = query.shape
        N = key.shape[2]
        t0 = time.perf_counter()
        if key_padding is None:
            out = power_attention(query, key, value, pattern, scale=scale)
            kept = _pattern_kept(pattern, N, M) * B
        else:
            # padded batch: the pattern (on cache positions) and the padding as one dense mask
            mask = torch.from_numpy(pattern.dense_mask(N, M))[None] & torch.from_numpy(key_padding)[:, None, :]
            out = _masked_sdpa(query, key, value, mask[:, None], scale)
            kept = int(mask.sum())
        st.attend_s += time.perf_counter() - t0
        st.keys_scored += Hq * kept
        st.keys_selected += Hq * kept
        return out

    def _hybrid(self, module, query, key, value, kwargs, st, scale, key_padding):
        index = self._index(module, key, value, kwargs, st, key_padding)
        s = self.settings
        out, info = hybrid_attention(query, key, value, index, s["pattern"], tau=s["tau"], topk=s["topk"],
                                     scale=scale, key_padding=key_padding, return_info=True)
        st.search_s += info["search_s"]
        st.attend_s += info["attend_s"]
        st.keys_scored += info["keys_scored"]
        st.keys_selected += info["keys_selected"]
        return out


def _masked_sdpa(query, key, value, mask, scale):
    """float32 SDPA with GQA and a boolean mask broadcastable to (B, Hq, M, N)."""
    Hq, Hkv = query.shape[1], key.shape[1]
    o = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    return torch.nan_to_num(o).to(query.dtype)  # fully masked (pad) rows give NaN: zeros instead


def _pattern_kept(pattern, N: int, M: int) -> int:
    """Tokens the pattern keeps for the last M queries of N (per head, batch 1), exactly."""
    bl = pattern.block_lists(N, M)
    bs = pattern.block_size
    size = np.minimum(bs, N - np.arange(bl.num_kv_blocks) * bs)
    q0 = N - M
    kept = 0
    for r in range(bl.num_q_blocks):
        qb = bl.first_q_block + r
        lo, hi = max(qb * bs, q0), min((qb + 1) * bs, N)
        full = bl.full_kv_indices[r, : bl.full_kv_num_blocks[r]]
        pos = np.arange(lo, hi) - qb * bs + 1  # keys of the diagonal block each query sees
        kept += (hi - lo) * int(size[full].sum()) + int(pos.sum())
    return kept


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
def _register(backend: HSRAttentionBackend) -> HSRAttentionBackend:
    if not _HAVE_TRANSFORMERS:  # pragma: no cover
        raise ImportError("registering attention backends needs transformers >= 5.24 "
                          "(pip install 'hsr-attention[transformers]')")
    from transformers import AttentionInterface

    AttentionInterface.register(backend.name, backend)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        # without a registered mask function transformers builds no mask at all for this name,
        # and padded batches would silently attend to padding
        AttentionMaskInterface.register(backend.name, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers
        pass
    _REGISTERED[backend.name] = backend
    return backend


def registered_backends() -> Dict[str, HSRAttentionBackend]:
    """The backends registered by this module in this process, by name."""
    return dict(_REGISTERED)


def register_hsr_attention(name: str = "hsr_softmax", *, kind: str = "softmax", eps: Optional[float] = None,
                           tau: Optional[float] = None, topk: Optional[int] = None, alpha: int = 2,
                           bias: Union[float, str] = 0.0, index_kwargs: Optional[dict] = None,
                           dense_below: Optional[int] = None) -> HSRAttentionBackend:
    """Register :func:`hsr.hsr_attention` as transformers attention ``name``.

    Parameters
    ----------
    name : str
        The ``attn_implementation`` to select it with. Registering a name again replaces it.
    kind : {"softmax", "relu"}
    eps, tau, topk : softmax only, at most one
        Certified dropped-mass target (default 1e-3), raw-score threshold, or rank.
    alpha, bias : relu only
        ``ReLU(scale <q,k> - bias) ** alpha``; ``bias="paper"`` for ``sigma sqrt(0.4 ln n)``.
    index_kwargs : dict, optional
        For indexes built on the fly (no :class:`HSRCache`).
    dense_below : int, default ``MODEL_DENSE_BELOW`` (16384)
        Below this many cached keys, build no index and attend densely: with ``eps`` (the
        default) through torch's ``scaled_dot_product_attention`` itself, so a short context
        costs what SDPA costs; with ``tau``, ``topk`` or ``kind="relu"`` with the same selection
        rule computed densely in torch. ``stats`` counts these calls (``dense_calls``). The
        default keeps SmolLM2-135M (8K context) dense on the CPU, where the index decoded
        slower than SDPA at every length measured (docs/transformers.md). 0: always use the
        index. ``bias="paper"`` always uses the index (its bias is computed per head from it).

    Returns
    -------
    HSRAttentionBackend
        Holds the settings and the :class:`HSRStats`.
    """
    dense_below = _short.MODEL_DENSE_BELOW if dense_below is None else dense_below
    if isinstance(dense_below, bool) or not isinstance(dense_below, int) or dense_below < 0:
        raise ValueError(f"dense_below must be a non-negative integer, got {dense_below!r}")
    if kind not in ("softmax", "relu"):
        raise ValueError(f"kind must be 'softmax' or 'relu', got {kind!r}")
    if kind == "softmax" and eps is None and tau is None and topk is None:
        eps = 1e-3
    if kind == "relu" and any(x is not None for x in (eps, tau, topk)):
        raise ValueError("eps, tau and topk apply to kind='softmax' only")
    if sum(x is not None for x in (eps, tau, topk)) > 1:
        raise ValueError("give at most one of eps, tau and topk")
    if eps is not None and not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    settings = dict(kind=kind, eps=eps, tau=tau, topk=topk, alpha=alpha, bias=bias, dense_below=dense_below)
    return _register(HSRAttentionBackend(name, "hsr", settings, index_kwargs))


def register_power_attention(name: str = "power", pattern: Optional[Pattern] = None, *, block_size: int = 64,
                             window: int = 4, sink: int = 1) -> HSRAttentionBackend:
    """Register a static block-sparse pattern (default PowerAttention) as attention ``name``.

    ``pattern`` is any :class:`hsr.attention.power.Pattern`; without one,
    ``power_pattern(block_size, window, sink)`` (defaults scaled to an 8K context: 64-token
    blocks, a 4-block window, one sink block; the paper uses 256 / 5 / 1 at 128K).
    """
    from ..attention.patterns import Pattern, power_pattern

    pattern = power_pattern(block_size=block_size, window=window, sink=sink) if pattern is None else pattern
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    return _register(HSRAttentionBackend(name, "power", {"pattern": pattern}))


def register_hybrid_attention(name: str = "hybrid", pattern: Optional[Pattern] = None, *,
                              tau: Union[float, str, None] = None, topk: Optional[int] = None,
                              block_size: int = 64, window: int = 4, sink: int = 1,
                              index_kwargs: Optional[dict] = None) -> HSRAttentionBackend:
    """Register the hybrid: softmax over ``pattern``'s keys united with the index's keys.

    The index reports keys with raw score ``>= tau`` (a number, or ``"paper"``) or the
    ``topk`` best; default ``tau="paper"``. See :func:`hybrid_attention`.
    """
    from ..attention.patterns import Pattern, power_pattern

    if tau is None and topk is None:
        tau = "paper"
    if tau is not None and topk is not None:
        raise ValueError("give at most one of tau and topk")
    pattern = power_pattern(block_size=block_size, window=window, sink=sink) if pattern is None else pattern
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    return _register(HSRAttentionBackend(name, "hybrid", {"pattern": pattern, "tau": tau, "topk": topk},
                                         index_kwargs))
