"""``generate()`` on the GPU: a KV cache of int8 codes, preallocated, its length on the device.

:class:`CodeCache` is a transformers ``Cache`` whose layers (:class:`CodeLayer`) each hold a
:class:`hsr.kernels.CodeKVCache` of a fixed capacity. ``update`` appends on the device (one
launch, codes computed there, no host synchronisation); the backend registered by
:func:`register_code_attention` attends dense over the prompt (torch SDPA) and, at every decode
step, keeps the keys with ``score >= tau`` through the code filter. ``tau`` per (batch, query
head) is calibrated once at the prefill from the prompt itself (:func:`calibrate_tau`): the
lowest threshold at which the last prompt queries keep ``1 - eps`` of their softmax mass. A
model has no raw threshold of its own; this turns a dropped-mass target into one.

:func:`generate_greedy` runs prefill, then one decode step captured in a CUDA graph and
replayed for every token (the cache's kernels read their length on the device, so one capture
serves every length; the host only counts). Off CUDA it runs the same loop eagerly.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from .._protocol import AttentionSpec, check_share
from ._cache import HAVE_TRANSFORMERS, Cache, DynamicLayer, PreTrainedConfig
from ._masks import key_padding_of

#: the layer whose update ran last on this thread: the attention call that follows is its own
#: (transformers calls ``update`` then the attention function, layer by layer)
_LAST = threading.local()

__all__ = ["CodeLayer", "CodeCache", "CodeAttention", "register_code_attention", "calibrate_tau", "kept_share",
           "generate_greedy", "FILTER_FROM", "DENSE_ABOVE"]

#: a CodeCache whose batch holds fewer positions than this (``B * max_cache_len``) attends with
#: torch SDPA over its buffers, masked to the device-side length (transformers' static-cache
#: form), instead of the code filter: in the GPU decode loop on an H200
#: (``bench/results/decode_loop_h200_2026-12-05_run1.json``, real keys, top 1%) the filtered
#: step beat that form from ``B * n`` = 128K on (128K at B 1; 16K and 32K at B 8) and lost
#: below it (16K and 32K at B 1), at d 128 and d 64 alike; at d 256 (H100, 14/2 heads,
#: ``decode_loop_h100_2026-12-06_d256.json``) 1.11x that form at 16K B 8 and 1.32x at 128K B 1,
#: 0.82x at 16K B 1
FILTER_FROM = 1 << 17

#: a layer whose calibrated ``tau`` keeps more than this share of the prompt's keys (for the
#: calibration queries, :func:`kept_share`) decodes with SDPA over its buffers, not the filter.
#: Measured on an H100: in the decode loop on real keys
#: (``bench/results/decode_crossover_h100_2026-12-05.json``) the filtered step was still 1.04x
#: or more the static-cache SDPA at a 20% share in every configuration of at least
#: :data:`FILTER_FROM` positions, and fell below 1x at 30% (d 64, 128K, B 1) to 50%; in
#: ``generate()`` the filter kept 63% of the keys in a 1B shape's layers and ran at 0.81x the
#: dense loop (``bench/results/generate_gpu_h100_2026-12-05_1b_before_policy.json``)
DENSE_ABOVE = 0.2


def calibrate_tau(query: torch.Tensor, key: torch.Tensor, scale: float, eps: float, rows: int = 32) -> torch.Tensor:
    """Per (batch, query head), the raw-score threshold at which each of the last ``rows``
    prompt queries keeps at least ``1 - eps`` of its softmax mass (the smallest over them).

    Parameters
    ----------
    query : (B, Hq, M, D), the prompt's queries (post-RoPE)
    key : (B, Hkv, N, D), the keys they attend (the last M are theirs: causal)
    scale : float
    eps : float in (0, 1)
    rows : int
        Calibration queries, the last ones of the prompt.

    Returns
    -------
    tau : (B, Hq, 1) float32 on the device
    """
    return _calibrate(query, key, scale, eps, rows, with_share=False)[0]


def _calibrate(query, key, scale, eps, rows, with_share=True):
    """``(tau, share)``: :func:`calibrate_tau` and, from the same scores (one pass over the
    keys at the prefill, not two), :func:`kept_share` at that tau (None without ``with_share``)."""
    B, Hq, M, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    G = Hq // Hkv
    r = min(rows, M)
    tau = torch.empty(B, Hq, 1, dtype=torch.float32, device=query.device)
    pos = torch.arange(N, device=query.device)
    limit = (N - r + torch.arange(r, device=query.device))[:, None]  # causal: query i sees keys <= N - r + i
    hidden = (pos[None, :] > limit).repeat(G, 1)  # (G * r, N)
    visible = (~hidden).sum(1).double()
    total = torch.zeros((), dtype=torch.float64, device=query.device)
    for b in range(B):
        for hk in range(Hkv):  # one kv head at a time: (G * r, N) scores
            q = query[b, hk * G:(hk + 1) * G, M - r:].float().reshape(G * r, D)
            kf = key[b, hk].float()
            s = (q @ kf.T).masked_fill(hidden, float("-inf"))
            srt, _ = torch.sort(s, dim=1, descending=True)  # raw scores: the threshold is one of them
            w = torch.exp((srt - srt[:, :1]) * scale)
            share = torch.cumsum(w, 1) / w.sum(1, keepdim=True)
            need = (share < 1 - eps).sum(1).clamp(max=N - 1)  # keys before the one that reaches 1 - eps
            t = torch.gather(srt, 1, need[:, None])[:, 0]
            # the decode kernel scores in another order: lower tau by a bound on fp32 dot-product
            # rounding, so that the key that reaches 1 - eps is kept whatever the order
            slack = D * 2.0 ** -23 * q.norm(dim=1) * kf.norm(dim=1).max()
            tg = (t - slack).reshape(G, r).min(1).values
            tau[b, hk * G:(hk + 1) * G, 0] = tg
            if with_share:
                kept = (s >= tg.repeat_interleave(r)[:, None]) & ~hidden
                total += (kept.sum(1).double() / visible).sum()
    return tau, (float(total) / (B * Hq * r) if with_share else None)


def kept_share(query: torch.Tensor, key: torch.Tensor, tau: torch.Tensor, rows: int = 32) -> float:
    """The mean share of its visible keys that each of the last ``rows`` prompt queries keeps
    at ``tau`` (``score >= tau``): what a decode step's filter would keep, as seen at the prefill.

    Parameters
    ----------
    query : (B, Hq, M, D), the prompt's queries (post-RoPE)
    key : (B, Hkv, N, D), the keys they attend (the last M are theirs: causal)
    tau : (B, Hq, 1), raw-score thresholds (:func:`calibrate_tau`)
    rows : int

    Returns
    -------
    float in [0, 1] (one host synchronisation)
    """
    B, Hq, M, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    G = Hq // Hkv
    r = min(rows, M)
    pos = torch.arange(N, device=query.device)
    limit = (N - r + torch.arange(r, device=query.device))[:, None]
    visible = pos[None, :] <= limit  # (r, N)
    total = torch.zeros((), dtype=torch.float64, device=query.device)
    for b in range(B):
        for hk in range(Hkv):
            q = query[b, hk * G:(hk + 1) * G, M - r:].float()  # (G, r, D)
            s = q @ key[b, hk].float().T  # (G, r, N)
            kept = (s >= tau[b, hk * G:(hk + 1) * G, :, None]) & visible  # tau (G, 1, 1)
            total += (kept.sum(-1).double() / visible.sum(-1)).sum()
    return float(total) / (B * Hq * r)


class CodeLayer(DynamicLayer):
    """One decoder layer's cache: a :class:`hsr.kernels.CodeKVCache` of ``capacity`` positions.

    ``keys`` / ``values`` are views of the filled positions (what transformers' helpers read);
    :attr:`tau` is the layer's decode threshold, set at the prefill.
    """

    def __init__(self, capacity: int, seed: int = 0, filter_from: int = 0) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.seed = seed
        self.filter_from = int(filter_from)
        self.code = None
        self.tau = None
        #: whether decode steps go through the code filter (else SDPA over the buffers): the
        #: cache's size rule (:attr:`fits_filter`), and at each prefill chunk whether ``tau``
        #: keeps at most the backend's ``dense_above`` share of the keys
        self.filtered = None
        #: the size rule alone (``batch * capacity >= filter_from``), set at the first update
        self.fits_filter = None
        #: the share of the prompt's keys ``tau`` keeps for the calibration queries (None
        #: until a filtered layer's prefill)
        self.kept_share = None
        self._positions = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from ..kernels.codes import CodeKVCache  # triton loads with the first GPU cache

        self.device = key_states.device
        self.code = CodeKVCache(key_states[:, :, :0], value_states[:, :, :0], capacity=self.capacity, seed=self.seed)
        self.fits_filter = key_states.shape[0] * self.capacity >= self.filter_from
        self.filtered = self.fits_filter
        self._positions = torch.arange(self.capacity, device=self.device)
        self.is_initialized = True

    def dense_attend(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """SDPA of ``query (B, Hq, 1, D)`` over every held position (the whole capacity, masked
        to the device-side length: one captured graph serves every length), ``(B, Hq, 1, D)``."""
        code = self.code
        B = query.shape[0]
        # every kv head of a batch row holds the same positions: one (B, 1, 1, capacity) mask
        # and SDPA's own GQA, the form of transformers' static cache (a kv head's query heads
        # as query positions under a (B, Hkv, 1, capacity) mask ran at 0.69x that form in an
        # 8B-shaped generate() at 32K on an H200)
        held = self._positions < code.lengths.view(B, code.Hkv)[:, :1].reshape(B, 1, 1, 1)
        return torch.nn.functional.scaled_dot_product_attention(query, code.k, code.v, attn_mask=held, scale=scale,
                                                                enable_gqa=True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        if self.code.n + t > self.capacity:
            raise ValueError(f"the CodeCache is full ({self.code.n} + {t} > capacity {self.capacity}): make it "
                             "with a larger max_cache_len")
        # eager generate(): each decode step repeats the shapes of the first, so its add and
        # attend record their graphs there, in the warm-up step; a prompt's add is one-off
        self.code.replays.record_first = t == 1
        self.code.add(key_states, value_states, check=False)  # no synchronisation: code.check() raises later
        self.keys = self.code.k[:, :, :self.code.n]
        self.values = self.code.v[:, :, :self.code.n]
        _LAST.layer = self
        return self.keys, self.values

    def get_max_length(self) -> int:
        return self.capacity

    get_max_cache_shape = get_max_length  # the name of transformers releases before 5.24

    def reset(self) -> None:
        if self.code is not None:
            self.code.crop(0)
            self.keys = self.code.k[:, :, :0]
            self.values = self.code.v[:, :, :0]
        self.tau = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number: how many tokens to remove")
        if self.code is not None and tokens_to_remove:
            self.code.crop(self.code.n + tokens_to_remove)
            self.keys = self.code.k[:, :, :self.code.n]
            self.values = self.code.v[:, :, :self.code.n]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("CodeCache serves greedy or sampled decoding of a fixed batch (no beams)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("CodeCache serves greedy or sampled decoding of a fixed batch (no beams)")


class CodeCache(Cache):
    """A transformers ``Cache`` of :class:`CodeLayer` s, ``max_cache_len`` positions each.

    Parameters
    ----------
    config : PretrainedConfig
        The model's config (full-attention layers only).
    max_cache_len : int
        Prompt plus generated tokens.
    seed : int
        Seeds each layer's random rotation.
    filter_from : int, default :data:`FILTER_FROM`
        Decode through the code filter when the batch holds at least this many positions
        (``batch * max_cache_len``); below it, SDPA over the cache's buffers (every key kept:
        within any ``eps``), where the filter measured slower. 0: always the filter.
    """

    def __init__(self, config: PreTrainedConfig, max_cache_len: int, *, seed: int = 0,
                 filter_from: Optional[int] = None) -> None:
        if not HAVE_TRANSFORMERS:  # pragma: no cover
            raise ImportError("CodeCache needs transformers (pip install 'hsr-attention[transformers]')")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive integer, got {max_cache_len!r}")
        cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        bad = sorted({t for t in types if t != "full_attention"})
        if bad:
            raise NotImplementedError(f"CodeCache supports full-attention layers only, config has {bad}")
        if filter_from is None:
            filter_from = FILTER_FROM
        if isinstance(filter_from, bool) or not isinstance(filter_from, int) or filter_from < 0:
            raise ValueError(f"filter_from must be a non-negative integer, got {filter_from!r}")
        Cache.__init__(self, layers=[CodeLayer(max_cache_len, seed, filter_from) for _ in types])

    def check(self) -> None:
        """Raise a bad value any layer's kernels saw (NaN/Inf in q, k, v): one synchronisation."""
        for layer in self.layers:
            if layer.code is not None:
                layer.code.check()

    def advanced(self, t: int = 1) -> None:
        """Record ``t`` tokens appended by a replayed CUDA graph (the host's counters only)."""
        for layer in self.layers:
            layer.code.advanced(t)
            layer.keys = layer.code.k[:, :, :layer.code.n]
            layer.values = layer.code.v[:, :, :layer.code.n]

    def guard_counts(self) -> tuple[int, int]:
        """``(rows that attended every key, rows guarded)`` over every layer's decode steps,
        with ``register_code_attention(certified=True, count_guard=True)`` (zeros otherwise):
        how often the guard found the calibrated ``tau`` dropping more than ``eps``. One
        synchronisation."""
        counts = [layer.code.count_guard() for layer in self.layers
                  if layer.code is not None and layer.code.counts_guard]
        if not counts:
            return 0, 0
        full, guarded = torch.stack(counts).sum(0).tolist()
        return int(full), int(guarded)


class CodeAttention:
    """The attention function of a :class:`CodeCache` (transformers' ``AttentionInterface``).

    Prefill (more than one query position): torch SDPA over the prompt, and the layer's
    ``tau`` calibrated from it (:func:`calibrate_tau`, target ``eps``). Decode (one position):
    the code filter and attention over the keys with ``score >= tau``, no host synchronisation;
    in a cache below ``filter_from`` positions (:class:`CodeCache`), or in a layer whose ``tau``
    keeps more than ``dense_above`` of the prompt's keys (:func:`kept_share`), SDPA over its
    buffers. ``group_union=True``: each query row attends the keys any row of its GQA group
    keeps (the union the filter reads anyway: less dropped mass, the same bytes).

    ``certified=True``: the calibrated ``tau`` is a guess made at the prefill; with this, every
    decode step also bounds each row's dropped share under it, and a row whose bound exceeds
    ``eps`` attends every key (in the same step, no synchronisation): ``eps`` holds per row,
    layer and step (``AttentionSpec(tau=, eps=)``). On real keys (``bench/bench_calibration.py``)
    a ``tau`` calibrated at ``eps`` dropped more than ``eps`` in 1–10% of the later decode rows;
    ``calibrate_at=eps / 2`` (default ``eps``: ``tau`` keeps ``1 - calibrate_at`` of the
    calibration rows' mass) left 0–3.3% for the guard, for 5–7 points more of the keys kept.
    ``count_guard=True`` (with ``certified``): each layer counts its guarded rows on the device
    (three small launches a step), read with :meth:`CodeCache.guard_counts`.
    """

    def __init__(self, name: str, eps: float = 1e-3, calibration_rows: int = 32,
                 dense_above: Optional[float] = None, group_union: bool = False, certified: bool = False,
                 calibrate_at: Optional[float] = None, count_guard: bool = False) -> None:
        eps = check_share(eps, "eps")
        if calibrate_at is not None:
            calibrate_at = check_share(calibrate_at, "calibrate_at")
        if dense_above is not None and not 0.0 <= dense_above <= 1.0:
            raise ValueError(f"dense_above must be a share in [0, 1] (or None: DENSE_ABOVE), got {dense_above!r}")
        self.name, self.eps, self.rows = name, eps, int(calibration_rows)
        self.dense_above = dense_above
        self.group_union = bool(group_union)
        self.certified = bool(certified)
        self.calibrate_at = calibrate_at if calibrate_at is not None else eps
        if count_guard and not certified:
            raise ValueError("count_guard=True counts the guard of certified=True: pass both")
        self.count_guard = bool(count_guard)
        self.__name__ = "hsr_code_attention"

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = self._layer(module, key, kwargs)
        B, Hq, M, D = query.shape
        scale = float(scaling) if scaling is not None else D ** -0.5
        if M > 1 or (layer.filtered and layer.tau is None):  # the prefill: dense, and the threshold from it
            if key_padding_of(attention_mask, B, M, key.shape[2]) is not None:
                raise NotImplementedError("CodeCache does not serve padded batches (left padding): give "
                                          "prompts of one length")
            if layer.fits_filter:  # every prefill chunk calibrates again: the last one, over every key, decides
                layer.tau, layer.kept_share = _calibrate(query, key, scale, self.calibrate_at, self.rows)
                limit = DENSE_ABOVE if self.dense_above is None else self.dense_above
                # a tau that keeps most keys: dense is faster
                layer.filtered = layer.kept_share <= limit
                if self.count_guard:  # before any decode step is recorded
                    layer.code.count_guard()
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scale, **kwargs)
        if not layer.filtered:  # a small cache: dense SDPA over its buffers was measured faster
            out = layer.dense_attend(query, scale)
        else:
            spec = AttentionSpec(kind="softmax", tau=layer.tau, scale=scale, causal=True,
                                 group_union=self.group_union, eps=self.eps if self.certified else None)
            out, _ = layer.code.attend(query, spec, check=False)
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def _layer(module, key, kwargs) -> CodeLayer:
        cache = kwargs.get("cache")  # transformers 5.24 passes the cache as ``cache``; older as ``past_key_values``
        cache = kwargs.get("past_key_values") if cache is None else cache
        idx = getattr(module, "layer_idx", None)
        if isinstance(cache, CodeCache) and idx is not None and cache.layers[idx].keys is key:
            return cache.layers[idx]
        last = getattr(_LAST, "layer", None)
        if last is not None and last.keys is key:  # the key tensor *is* the layer's: it matches what we attend
            return last
        raise ValueError("the code attention backend runs with a CodeCache only: generate(..., "
                         "past_key_values=CodeCache(model.config, max_cache_len))")


def register_code_attention(name: str = "hsr_code", *, eps: float = 1e-3, calibration_rows: int = 32,
                            dense_above: Optional[float] = None, group_union: bool = False,
                            certified: bool = False, calibrate_at: Optional[float] = None,
                            count_guard: bool = False) -> CodeAttention:
    """Register :class:`CodeAttention` under ``name`` (with the stock SDPA mask builder) and
    return it: ``model.set_attn_implementation(name)``. ``dense_above``: a layer whose
    calibrated ``tau`` keeps more than this share of the prompt's keys decodes densely
    (default :data:`DENSE_ABOVE`, read at each prefill; 1 never). ``group_union``: each query
    row attends the union of its GQA group's kept sets; ``certified``: every decode step
    guarantees ``eps`` per row; ``calibrate_at``: the prefill's target for ``tau`` when it
    should differ from ``eps``; ``count_guard``: count the guard's rows
    (:meth:`CodeCache.guard_counts`) (:class:`CodeAttention`)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    backend = CodeAttention(name, eps, calibration_rows, dense_above, group_union, certified, calibrate_at,
                            count_guard)
    AttentionInterface.register(name, backend)
    AttentionMaskInterface.register(name, sdpa_mask)
    return backend


def _max_length(cache) -> Optional[int]:
    """Positions a transformers cache holds (None: it grows). The name moved between releases."""
    for name in ("get_max_length", "get_max_cache_shape"):
        fn = getattr(cache, name, None)
        if fn is not None:
            m = fn()
            return int(m) if m is not None and int(m) > 0 else None
    return None


@torch.no_grad()
def generate_greedy(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, cache: CodeCache, *,
                    graph: Optional[bool] = None, timings: Optional[dict] = None,
                    prefill_chunk: Optional[int] = None) -> torch.Tensor:
    """Greedy decoding: prefill, then one decode step replayed from a CUDA graph for every token
    (``graph`` defaults to on CUDA). Returns ``(B, prompt + new)`` token ids.

    With a :class:`CodeCache` the model uses the code attention backend
    (:func:`register_code_attention`). Any cache whose state lives on the device works the same
    way: transformers' ``StaticCache`` with SDPA is the dense loop to compare with.

    ``prefill_chunk``: feed the prompt this many positions at a time (default all at once):
    a long batch's prefill then holds one chunk's activations and mask, not the prompt's (an
    8B shape at 32K, batch 8, did not fit 80 GB in one pass). A :class:`CodeCache` calibrates
    each layer's ``tau`` again at every chunk; the last chunk's, over every key, stays (from
    the chunk's own rows: give chunks of at least the backend's ``calibration_rows``).

    ``timings``, a dict, receives ``prefill_s`` and ``decode_s`` (seconds, the device
    synchronised at both ends of each: only when asked), ``first_step_s`` (the part of
    ``decode_s`` spent on the first step, which compiles the kernels, and the graph's capture),
    and ``capture_error`` when the model's forward could not be captured (the loop then runs
    eagerly)."""
    import time
    import inspect

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, prompt_len) tensor of token ids")
    B, P = input_ids.shape
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive integer (or None), got {prefill_chunk!r}")
    dev = input_ids.device
    cap = _max_length(cache)
    if cap is not None and P + max_new_tokens - 1 > cap:  # the last token is produced, not stored
        # refused before the prefill: a replayed step past the end would not get to say it
        raise ValueError(f"the {type(cache).__name__} is full: {P} prompt + {max(max_new_tokens - 1, 0)} stored "
                         f"tokens > its {cap} positions; make it with a larger max_cache_len")
    use_graph = dev.type == "cuda" if graph is None else bool(graph)
    params = inspect.signature(model.forward).parameters
    # transformers >= 5.24 names the cache ``cache`` and takes no cache_position; older releases
    # ``past_key_values`` and ``cache_position``
    cache_kw = "cache" if "cache" in params else "past_key_values"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if timings is not None:
        sync()
        t0 = time.perf_counter()
    # only the last position's logits: a long prompt's full logits would take (B, P, vocab) of memory
    last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    chunk = P if prefill_chunk is None else prefill_chunk
    for a in range(0, P, chunk):
        part = {}
        if a:  # later chunks say where they sit (the first one's positions are the default)
            p = torch.arange(a, min(a + chunk, P), device=dev)
            part = {"position_ids": p[None].expand(B, -1)}
            if "cache_position" in params:
                part["cache_position"] = p
        out = model(input_ids=input_ids[:, a:a + chunk], use_cache=True, **{cache_kw: cache}, **last, **part)
    ids = torch.empty(B, P + max_new_tokens, dtype=input_ids.dtype, device=dev)
    ids[:, :P] = input_ids
    if max_new_tokens < 1:
        return ids[:, :P]
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    pos = torch.full((1,), P, dtype=torch.long, device=dev)
    if timings is not None:
        sync()
        t1 = time.perf_counter()
        timings["prefill_s"] = t1 - t0

    kw = {cache_kw: cache, "position_ids": pos[None].expand(B, 1), "use_cache": True}
    if "cache_position" in params:
        kw["cache_position"] = pos

    def step():
        o = model(input_ids=tok, **kw)
        tok.copy_(o.logits[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)

    g = None
    for i in range(max_new_tokens - 1):
        ids[:, P + i] = tok[:, 0]
        if g is not None:
            g.replay()
            if isinstance(cache, CodeCache):
                cache.advanced(1)
            continue
        step()
        if use_graph and i == 0:  # the first step ran eagerly (it compiled every kernel): now record one
            n = int(cache.get_seq_length())
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g):
                    step()
            except RuntimeError as exc:  # a model whose forward cannot be captured: go on eagerly, say why
                g = None
                if timings is not None:
                    timings["capture_error"] = f"{type(exc).__name__}: {exc}"
            if isinstance(cache, CodeCache):  # recording ran nothing: put the host's counts back
                for layer in cache.layers:
                    layer.crop(n - layer.code.n)
        if i == 0 and timings is not None:  # eager or not, the first step compiles the kernels
            sync()
            timings["first_step_s"] = time.perf_counter() - t1
    ids[:, P + max_new_tokens - 1] = tok[:, 0]
    if timings is not None:
        sync()
        timings["decode_s"] = time.perf_counter() - t1  # the first decode step includes the capture
    return ids
