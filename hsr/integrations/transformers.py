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

import threading
import time
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .._protocol import DEFAULT_EPS, check_share
from ..attention import batched
from ..attention import core as _core
from ..attention.core import hsr_attention
from ..attention.hybrid import hybrid_attention
from ..attention.kv import KVCacheIndex
from ..attention.patterns import Pattern
from . import _short
from ._cache import HAVE_TRANSFORMERS, HSRCache, HSRLayer, cache_layer_for, remove_pad
from ._device_cache import (CodeAttention, CodeCache, CodeLayer, calibrate_tau, generate_greedy, kept_share,
                            register_code_attention)
from ._masks import key_padding_of, masked_sdpa, pattern_kept, visible_counts
from ._short import dense_attention
from ._stats import HSRStats, LayerStats

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
    "CodeCache",
    "CodeLayer",
    "CodeAttention",
    "register_code_attention",
    "calibrate_tau",
    "kept_share",
    "generate_greedy",
]


#: decode steps with at most this many query positions take the one-call-per-layer path
_BATCHED_MAX_Q = 16


def _float32_views(bufs):
    """Zero-copy ``(B * H, cap, D)`` numpy views of float32 ``(B, H, cap, D)`` key and value
    tensors (the compiled layer kernels' layout), or None (no tensors, or not float32)."""
    if bufs is None or not bufs[0].dtype == bufs[1].dtype == torch.float32:
        return None
    return tuple(x.detach().numpy().reshape(-1, x.shape[2], x.shape[3]) for x in bufs)


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
_REGISTERED: Dict[str, "HSRAttentionBackend"] = {}

#: whether backends time each layer's two ways at decode and take the faster (the default of
#: ``register_hsr_attention(guard=)``; the test suite turns it off to exercise the index)
GUARD = True
#: the per-layer guard re-times a layer's slower way every this many decode steps
GUARD_PROBE = 32


def _new_guard() -> dict:
    """A layer's guard state: each way's seconds per decode step (None until timed), how
    many steps each has taken, and the calls since the choice was made."""
    return {"index_s": None, "dense_s": None, "index_n": 0, "dense_n": 0, "calls": 0}


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
        self._guard: Dict[int, dict] = {}  # layer -> _new_guard()
        self._guard_lock = threading.Lock()

    def __repr__(self):
        s = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"HSRAttentionBackend({self.name!r}, {self.mode}: {s})"

    # ------------------------------------------------------------------ helpers
    def _index(self, module, key, value, kwargs, st: LayerStats, key_padding):
        layer = cache_layer_for(module, key, kwargs)
        t0 = time.perf_counter()
        if layer is not None:
            index = layer.get_index()
            if key_padding is not None:
                layer.remove_padding(key_padding)
        else:
            index = KVCacheIndex(key.detach(), value.detach(), **self.index_kwargs)
            if key_padding is not None:
                remove_pad(index, key_padding)
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
        key_padding = key_padding_of(attention_mask, B, M, N)
        scale = float(scaling) if scaling is not None else D ** -0.5
        layer_idx = getattr(module, "layer_idx", None)
        layer_idx = -1 if layer_idx is None else layer_idx
        st = LayerStats(calls=1, queries=B * Hq * M, keys_visible=Hq * visible_counts(B, M, N, key_padding))
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

    def _dense(self, module, query, key, value, attention_mask, kwargs, st, scale, key_padding):
        """The backend's rule computed densely: full softmax for softmax with eps (every key
        kept, nothing dropped) — our CPU decode kernel where it applies
        (:meth:`_dense_decode`), else torch's SDPA — or the same selection in torch."""
        s = self.settings
        t0 = time.perf_counter()
        if _short.uses_sdpa(s):
            out = self._dense_decode(module, query, key, value, kwargs, scale, key_padding)
            if out is None:  # without key padding the mask is the causal rule: SDPA's unmasked kernels
                mask = attention_mask if key_padding is not None else None
                out = _short.sdpa_attention(query, key, value, mask, scale)
            st.keys_scored += st.keys_visible
            st.keys_selected += st.keys_visible
        else:
            out, scored, selected = dense_attention(query, key, value, s, scale, key_padding)
            st.keys_scored += scored
            st.keys_selected += selected
        st.attend_s += time.perf_counter() - t0
        return out

    def _dense_decode(self, module, query, key, value, kwargs, scale, key_padding):
        """Full softmax of a CPU decode step through :func:`hsr.attention.batched.layer_dense_softmax`
        (each key and value row read once for its group's query rows, chunks over the threads:
        about 2x torch's CPU SDPA at 32K on SmolLM2's shapes), reading the cache's own
        buffers (an :class:`HSRCache`) or contiguous key and value tensors in place. None
        where it does not apply (the caller takes SDPA): ``dense_kernel="sdpa"``, not float32
        on the CPU, more than ``_BATCHED_MAX_Q`` query positions, key padding, or keys that
        are neither."""
        if self.settings["dense_kernel"] != "hsr":
            return None
        B, Hq, M, D = query.shape
        n = key.shape[2]
        if (M > _BATCHED_MAX_Q or key_padding is not None or query.device.type != "cpu"
                or not query.dtype == key.dtype == value.dtype == torch.float32 or Hq % key.shape[1]):
            return None
        layer = cache_layer_for(module, key, kwargs)
        bufs = layer.buffers() if layer is not None else None
        if bufs is None and key.is_contiguous() and value.is_contiguous():
            bufs = key, value
        views = _float32_views(bufs)
        if views is None:
            return None
        keys, values = views
        Q = query.detach().contiguous().numpy()
        out, _ = batched.layer_dense_softmax(Q, keys, values, n, scale, causal=True)
        return torch.from_numpy(out)

    def _choose_dense(self, layer_idx: int, M: int) -> bool:
        """Whether this decode call of the layer goes dense: the per-layer guard times both
        ways (the index's step, the dense step) and takes the faster, measuring each once
        first and the slower one again every ``GUARD_PROBE``-th call (the costs move as the
        cache grows)."""
        if not self.settings.get("guard") or M != 1:
            return False
        with self._guard_lock:
            g = self._guard.setdefault(layer_idx, _new_guard())
            if g["index_n"] < 2:  # two steps each way first: the first of each is not timed
                return False
            if g["dense_n"] < 2:
                return True
            g["calls"] += 1
            dense_faster = g["dense_s"] < g["index_s"]
            probe = g["calls"] % GUARD_PROBE == 0
            return dense_faster != probe

    def _timed(self, layer_idx: int, M: int, dense: bool, seconds: float) -> None:
        """Fold one decode call's seconds into the layer's estimate of that way (an average
        that halves the weight of the past at each call); each way's first call is left out."""
        if not self.settings.get("guard") or M != 1:
            return
        with self._guard_lock:
            g = self._guard.setdefault(layer_idx, _new_guard())
            way = "dense" if dense else "index"
            g[way + "_n"] += 1
            if g[way + "_n"] == 1:  # one-time costs (the index codes its keys at its first search)
                return
            key = way + "_s"
            g[key] = seconds if g[key] is None else 0.5 * (g[key] + seconds)

    def _hsr(self, module, query, key, value, attention_mask, kwargs, st, scale, key_padding):
        s = self.settings
        if key.shape[2] < s["dense_below"] and not isinstance(s["bias"], str):
            # short context: dense is faster than any index; no index is built or updated
            st.dense_calls += 1
            return self._dense(module, query, key, value, attention_mask, kwargs, st, scale, key_padding)
        layer_idx = getattr(module, "layer_idx", -1)
        layer_idx = -1 if layer_idx is None else layer_idx
        M = query.shape[2]
        t_start = time.perf_counter()
        if not isinstance(s["bias"], str) and self._choose_dense(layer_idx, M):
            # dense is this layer's faster way now: take it (the cache still grows)
            layer = cache_layer_for(module, key, kwargs)
            if layer is not None:
                layer.get_index()  # keep the index in step, for the probe that comes back to it
            st.guarded_calls += 1
            out = self._dense(module, query, key, value, attention_mask, kwargs, st, scale, key_padding)
            self._timed(layer_idx, M, True, time.perf_counter() - t_start)
            return out
        out = self._hsr_index(module, query, key, value, kwargs, st, scale, key_padding)
        self._timed(layer_idx, M, False, time.perf_counter() - t_start)
        return out

    def _hsr_index(self, module, query, key, value, kwargs, st, scale, key_padding):
        s = self.settings
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
        layer = cache_layer_for(module, key, kwargs)
        views = _float32_views(layer.buffers() if layer is not None else None)
        n = key.shape[2]
        if views is None or n < _core.DENSE_BELOW:
            return None
        ix = index.heads[0][0].index
        if ix.backend != "code" or ix.n_total != n or not (s["tau"] is None or np.ndim(s["tau"]) == 0):
            return None
        Q = query.detach().contiguous().numpy()
        if not np.isfinite(Q).all():
            raise ValueError("q contains NaN or Inf")
        keys, values = views
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
            kept = pattern_kept(pattern, N, M) * B
        else:
            # padded batch: the pattern (on cache positions) and the padding as one dense mask
            mask = torch.from_numpy(pattern.dense_mask(N, M))[None] & torch.from_numpy(key_padding)[:, None, :]
            out = masked_sdpa(query, key, value, mask[:, None], scale)
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


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
def _register(backend: HSRAttentionBackend) -> HSRAttentionBackend:
    if not HAVE_TRANSFORMERS:  # pragma: no cover
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
                           dense_below: Optional[int] = None, guard: Optional[bool] = None,
                           dense_kernel: str = "hsr") -> HSRAttentionBackend:
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
        default) every key, through ``dense_kernel`` at decode and torch's
        ``scaled_dot_product_attention`` otherwise; with ``tau``, ``topk`` or ``kind="relu"``
        with the same selection rule computed densely in torch. ``stats`` counts these calls (``dense_calls``). The
        default keeps SmolLM2-135M (8K context) dense on the CPU, where the index decoded
        slower than SDPA at every length measured (docs/transformers.md). 0: always use the
        index. ``bias="paper"`` always uses the index (its bias is computed per head from it).
    guard : bool, default :data:`GUARD` (True)
        Never slower than dense, per layer: at decode, the backend times each layer's step
        through the index and its dense step (as below ``dense_below``; two steps each, the
        first not counted: it pays one-time costs), takes the faster, and re-times the slower
        every ``GUARD_PROBE``-th step (the costs change as the cache
        grows). ``stats`` counts the dense ones (``guarded_calls``). On the 2-core CPU the
        index's step beat SDPA over the same buffers in 1–2 of 48 layer/rule/length
        configurations at 16K and 32K (``bench/bench_layer_guard.py``,
        ``bench/results/layer_guard_cpu.json``): there the guard sends most decode dense.
        False: always the index above ``dense_below``.
    dense_kernel : {"hsr", "sdpa"}, default "hsr"
        What computes full softmax where the backend attends densely (below ``dense_below``,
        where the guard chose dense, and with ``eps``): ``"hsr"`` the library's CPU decode
        kernel (:func:`hsr.attention.batched.layer_dense_softmax`: float32 on the CPU, up to 16
        query positions, no key padding; torch's SDPA elsewhere), ``"sdpa"`` always torch's
        ``scaled_dot_product_attention``. Both keep every visible key; they differ by float32
        rounding.

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
        eps = DEFAULT_EPS
    if kind == "relu" and any(x is not None for x in (eps, tau, topk)):
        raise ValueError("eps, tau and topk apply to kind='softmax' only")
    if sum(x is not None for x in (eps, tau, topk)) > 1:
        raise ValueError("give at most one of eps, tau and topk")
    if eps is not None:
        eps = check_share(eps, "eps")
    guard = GUARD if guard is None else guard
    if not isinstance(guard, bool):
        raise ValueError(f"guard must be True or False, got {guard!r}")
    if dense_kernel not in ("hsr", "sdpa"):
        raise ValueError(f"dense_kernel must be 'hsr' or 'sdpa', got {dense_kernel!r}")
    settings = dict(kind=kind, eps=eps, tau=tau, topk=topk, alpha=alpha, bias=bias, dense_below=dense_below,
                    guard=guard, dense_kernel=dense_kernel)
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
