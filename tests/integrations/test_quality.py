"""Quality of the HSR softmax backend with the index on, on SmolLM2-135M, at a short context: the
CI-sized version of ``bench/eval_quality.py`` (whose full runs, 2K-8K, are in
``bench/results/quality_cpu.json`` and docs/transformers.md, Quality).

The context is prefilled with SDPA and copied into a dense ``DynamicCache`` and an
``HSRCache(index_from=0)``; the tokens after it are fed one decode step at a time, so with
``dense_below=0`` every query that matters searches the layer's index (``dense_calls`` is 0).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hsr.integrations import transformers as ht  # noqa: E402
from hsr.testing import realdata  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASK = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = "\n\nWhat is the pass key? The pass key is"

#: next-token argmax agreement with dense measured on this continuation (1,024 tokens of
#: context, 32 teacher-forced steps, eps 1e-2): 32/32; the test allows 2 steps to differ
MEASURED_AGREEMENT = 1.0
MARGIN = 2 / 32


@pytest.fixture(scope="module")
def hsr_backend():
    return ht.register_hsr_attention("t_quality_eps1e-2", kind="softmax", eps=1e-2, dense_below=0)


def _prefilled(model, ids):
    """(dense DynamicCache, HSRCache with an index from key 0) holding an SDPA prefill of ``ids``."""
    from transformers import DynamicCache

    dense = DynamicCache(config=model.config)
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        model(ids, cache=dense, use_cache=True)
        hsr = ht.HSRCache(model.config, index_from=0)
        for i, layer in enumerate(dense.layers):
            hsr.update(layer.keys.clone(), layer.values.clone(), i)
    return dense, hsr


def _step(model, impl, cache, token):
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        return model(torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]


def _answer(model, impl, cache, question, new_tokens=8):
    for t in question[:-1]:
        _step(model, impl, cache, t)
    logits, out = _step(model, impl, cache, question[-1]), []
    for _ in range(new_tokens):
        out.append(int(logits.argmax()))
        logits = _step(model, impl, cache, out[-1])
    return out


@pytest.mark.model
def test_passkey_hsr_retrieves_what_dense_retrieves(smollm2, hsr_backend):
    """~1K tokens of filler, the key at depth 0, 50% and 100%: HSR (index on, eps 1e-2) finds
    the key exactly where dense does."""
    model, tok = smollm2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rng = np.random.default_rng(0)
    reps = (1024 - 60) // len(enc(FILLER))
    found = []
    for depth in (0.0, 0.5, 1.0):
        key = str(int(rng.integers(10000, 100000)))
        at = round(depth * reps)
        hay = enc(TASK + FILLER * at) + enc(NEEDLE.format(key=key)) + enc(FILLER * (reps - at))
        q = enc(QUESTION)
        dense, hsr = _prefilled(model, torch.tensor([hay]))
        hsr_backend.stats.reset()
        a_dense = tok.decode(_answer(model, "sdpa", dense, q), skip_special_tokens=True)
        a_hsr = tok.decode(_answer(model, hsr_backend.name, hsr, q), skip_special_tokens=True)
        model.set_attn_implementation("sdpa")
        st = hsr_backend.stats.decode.total
        assert st.dense_calls == 0 and st.keys_scored > 0, "the index path did not run"
        assert hsr_backend.stats.decode.max_dropped <= 1e-2
        found.append((depth, key in a_dense.replace(" ", ""), key in a_hsr.replace(" ", ""), a_dense, a_hsr))
    assert all(d == h for _, d, h, *_ in found), found
    assert any(d for _, d, *_ in found), f"dense found no key at all: the probe is broken ({found})"


@pytest.mark.model
def test_continuation_argmax_agrees_with_dense(smollm2, hsr_backend):
    """1,024 tokens of real text, then 32 teacher-forced steps: HSR's next-token argmax equals
    dense's in at least the measured share minus a margin, and its perplexity is within 1%."""
    model, tok = smollm2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    n, steps = 1024, 32
    ids = torch.as_tensor(realdata.real_token_ids(tok, n + steps + 1))[None]
    dense, hsr = _prefilled(model, ids[:, :n])
    hsr_backend.stats.reset()
    agree, nll_d, nll_h = [], [], []
    for s in range(steps):
        x, y = int(ids[0, n + s]), int(ids[0, n + s + 1])
        ld = _step(model, "sdpa", dense, x).float()
        lh = _step(model, hsr_backend.name, hsr, x).float()
        agree.append(int(ld.argmax()) == int(lh.argmax()))
        nll_d.append(-float(torch.log_softmax(ld, -1)[y]))
        nll_h.append(-float(torch.log_softmax(lh, -1)[y]))
    model.set_attn_implementation("sdpa")
    assert hsr_backend.stats.decode.total.dense_calls == 0
    assert np.mean(agree) >= MEASURED_AGREEMENT - MARGIN, agree
    assert abs(np.exp(np.mean(nll_h)) / np.exp(np.mean(nll_d)) - 1) < 0.01
