"""The text of :mod:`hsr.testing.realdata`: the Python language reference, no download.

``pydoc_data.topics`` ships with the standard library, so the text exists on every machine; its
exact content depends on the Python version (captures record the token ids and the version).
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["real_text", "real_token_ids"]

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
