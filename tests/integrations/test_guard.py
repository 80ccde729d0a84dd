"""The per-layer guard: at decode, each layer takes the faster of its step through the index and
its dense step (timed), re-times the slower every GUARD_PROBE steps, and says so in its stats."""
import pytest
import torch

pytest.importorskip("transformers")

import hsr.integrations.transformers as ht  # noqa: E402


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval(), cfg


@pytest.mark.parametrize("guard", [True, False])
def test_guarded_generation_equals_dense_and_is_counted(guard):
    model, cfg = _model()
    backend = ht.register_hsr_attention(f"hsr_guard_{guard}", eps=1e-6, dense_below=0, guard=guard)
    ids = torch.randint(3, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=9, do_sample=False, min_new_tokens=9)
    model.set_attn_implementation(f"hsr_guard_{guard}")
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=9, do_sample=False, min_new_tokens=9,
                             cache=ht.HSRCache(config=cfg, index_from=0))
    assert torch.equal(got, want)
    dec = backend.stats.decode
    for layer, st in dec.layers.items():
        if guard:  # two steps through the index, two dense (the first of each not timed), then the faster
            assert 2 <= st.guarded_calls <= 6, (layer, st.guarded_calls)
            g = backend._guard[layer]
            assert g["index_s"] > 0 and g["dense_s"] > 0
        else:
            assert st.guarded_calls == 0
    assert "guard" in backend.stats.table()


@pytest.mark.parametrize("dense_faster", [True, False])
def test_the_guard_takes_the_faster_way_and_probes_the_other(dense_faster, monkeypatch):
    monkeypatch.setattr(ht, "GUARD_PROBE", 4)
    backend = ht.register_hsr_attention("hsr_guard_unit", eps=1e-3, guard=True)
    assert backend._choose_dense(0, 1) is False  # the index first, twice (the first is not timed)
    backend._timed(0, 1, False, 100.0)  # one-time costs: left out
    assert backend._choose_dense(0, 1) is False
    backend._timed(0, 1, False, 2.0 if dense_faster else 1.0)
    assert backend._choose_dense(0, 1) is True  # then dense, twice
    backend._timed(0, 1, True, 100.0)
    backend._timed(0, 1, True, 1.0 if dense_faster else 2.0)
    picks = [backend._choose_dense(0, 1) for _ in range(8)]
    probe = [i % 4 == 3 for i in range(8)]  # the 4th and 8th calls re-time the slower way
    assert picks == [dense_faster != p for p in probe]
    assert backend._choose_dense(0, 5) is False  # prefill (more than one query) never goes by the guard


def test_guard_is_checked():
    with pytest.raises(ValueError, match="guard must be"):
        ht.register_hsr_attention("hsr_guard_bad", guard=1)


def test_the_default_is_the_module_setting(monkeypatch):
    monkeypatch.setattr(ht, "GUARD", True)
    assert ht.register_hsr_attention("hsr_guard_default").settings["guard"] is True
    monkeypatch.setattr(ht, "GUARD", False)
    assert ht.register_hsr_attention("hsr_guard_default").settings["guard"] is False
