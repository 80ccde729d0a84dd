"""CodeCache (the GPU generate() path): greedy decoding through the code filter equals dense
decoding, on a tiny random Llama; run by Triton's interpreter on the CPU in CI."""
import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

from hsr.integrations.transformers import (CodeCache, calibrate_tau, generate_greedy, kept_share,  # noqa: E402
                                           register_code_attention)


#: the code cache's kernels run on the GPU where there is one (compiled), else under Triton's
#: interpreter on the CPU (tests/conftest.py sets it): the model and its inputs live there
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval().to(DEV), cfg


def _dense_greedy(model, ids, new):
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)


def test_greedy_decoding_through_the_code_cache_equals_dense():
    model, cfg = _model()
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEV)
    want = _dense_greedy(model, ids, 6)
    backend = register_code_attention("hsr_code_test", eps=1e-6)
    model.set_attn_implementation("hsr_code_test")
    cache = CodeCache(cfg, max_cache_len=64)
    tm = {}
    got = generate_greedy(model, ids, 6, cache, timings=tm)
    assert torch.equal(got, want)
    # the first decode step (it compiles the kernels) is timed apart, with or without a graph
    assert 0 < tm["first_step_s"] <= tm["decode_s"] and tm["prefill_s"] > 0
    assert cache.get_seq_length() == 40 + 5  # the last token is produced, not stored
    assert all(layer.tau is not None and layer.tau.shape == (2, 4, 1) for layer in cache.layers)
    cache.check()
    assert backend.eps == 1e-6
    # eager (no graph of the model): each layer's add and attend record their own graphs at
    # the first decode step (the warm-up), replayed from the second; the same tokens. Two
    # graphs a layer: the decode step's add and its attend (the 40-token prompt's add, one-off,
    # records none)
    cache = CodeCache(cfg, max_cache_len=64)
    assert torch.equal(generate_greedy(model, ids, 6, cache, graph=False), want)
    assert all(len(layer.code.replays) == (2 if DEV == "cuda" else 0) for layer in cache.layers)
    assert all(layer.code.replays.record_first for layer in cache.layers)
    # each row attending its GQA group's union keeps more of the mass: the same tokens
    register_code_attention("hsr_code_union", eps=1e-3, group_union=True)
    model.set_attn_implementation("hsr_code_union")
    assert torch.equal(generate_greedy(model, ids, 6, CodeCache(cfg, max_cache_len=64)), want)


def test_a_small_cache_decodes_with_sdpa_over_its_buffers():
    """Below filter_from (batch x capacity) the decode steps attend densely over the buffers
    (masked to the device-side length), no threshold is calibrated, and greedy tokens equal
    dense decoding; the filter_from argument is checked."""
    model, cfg = _model()
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEV)
    want = _dense_greedy(model, ids, 6)
    register_code_attention("hsr_code_small", eps=1e-3)
    model.set_attn_implementation("hsr_code_small")
    cache = CodeCache(cfg, max_cache_len=64, filter_from=2 * 64 + 1)
    got = generate_greedy(model, ids, 6, cache)
    assert torch.equal(got, want)
    assert all(layer.filtered is False and layer.tau is None for layer in cache.layers)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3)).to(DEV)
    layer = cache.layers[0]
    n = layer.code.n
    ref = torch.nn.functional.scaled_dot_product_attention(q, layer.code.k[:, :, :n], layer.code.v[:, :, :n],
                                                           enable_gqa=True)
    torch.testing.assert_close(layer.dense_attend(q, 16 ** -0.5), ref)
    assert all(layer.filtered for layer in _filled(cfg, model, ids, filter_from=2 * 64).layers)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="filter_from"):
            CodeCache(cfg, max_cache_len=64, filter_from=bad)


def _filled(cfg, model, ids, **kw):
    cache = CodeCache(cfg, max_cache_len=64, **kw)
    model.set_attn_implementation("hsr_code_small")
    with torch.no_grad():
        generate_greedy(model, ids, 1, cache)
    return cache


def test_calibrated_tau_keeps_the_target_mass():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 16, 16, generator=g) * 2
    k = torch.randn(1, 2, 16, 16, generator=g) * 2
    scale = 0.25
    for eps in (1e-1, 1e-3):
        tau = calibrate_tau(q, k, scale, eps, rows=8)
        for h in range(4):
            for i in range(8, 16):  # every calibration row keeps at least 1 - eps of its mass
                s = (q[0, h, i] @ k[0, h // 2, :i + 1].T) * scale
                w = torch.softmax(s, 0)
                kept = w[s / scale >= tau[0, h, 0]].sum()
                assert kept >= 1 - eps - 1e-5


def test_a_full_cache_and_a_foreign_cache_are_refused():
    model, cfg = _model()
    register_code_attention("hsr_code_test2")
    model.set_attn_implementation("hsr_code_test2")
    ids = torch.randint(3, 64, (1, 10)).to(DEV)
    with pytest.raises(ValueError, match="CodeCache is full"):
        generate_greedy(model, ids, 8, CodeCache(cfg, max_cache_len=12))
    with pytest.raises(ValueError, match="runs with a CodeCache only"):
        with torch.no_grad():
            model(ids)
    with pytest.raises(ValueError, match="max_cache_len"):
        CodeCache(cfg, max_cache_len=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(model, ids, -1, CodeCache(cfg, max_cache_len=12))
    with pytest.raises(ValueError, match="input_ids"):
        generate_greedy(model, ids[0], 2, CodeCache(cfg, max_cache_len=12))


def test_the_dense_loop_to_compare_with_is_greedy_decoding_too():
    # generate_greedy with transformers' StaticCache and SDPA: the benchmark's dense baseline
    from transformers import StaticCache

    model, cfg = _model(seed=3)
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(4)).to(DEV)
    want = _dense_greedy(model, ids, 5)
    got = generate_greedy(model, ids, 5, StaticCache(config=cfg, max_cache_len=32))
    assert torch.equal(got, want)


def test_a_layer_whose_tau_keeps_most_keys_decodes_densely():
    """At the prefill each filtered layer measures the share of the prompt's keys its tau keeps
    (kept_share, checked against a direct count); above dense_above it decodes with SDPA over
    its buffers and says so (filtered False); greedy tokens still equal dense decoding."""
    model, cfg = _model()
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEV)
    want = _dense_greedy(model, ids, 6)
    for above, filtered in ((0.0, False), (1.0, True)):
        register_code_attention("hsr_code_above", eps=1e-3, dense_above=above)
        model.set_attn_implementation("hsr_code_above")
        cache = CodeCache(cfg, max_cache_len=64)
        assert torch.equal(generate_greedy(model, ids, 6, cache), want)
        assert all(layer.filtered is filtered for layer in cache.layers)
        assert all(0.0 < layer.kept_share <= 1.0 for layer in cache.layers)
    with pytest.raises(ValueError, match="dense_above"):
        register_code_attention("hsr_code_bad", dense_above=1.5)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    tau = torch.randn(1, 4, 1, generator=g)
    want_share = []
    for h in range(4):
        for i in range(8, 12):  # the last 4 rows: row i sees keys 0..i
            s = q[0, h, i] @ k[0, h // 2, :i + 1].T
            want_share.append(float((s >= tau[0, h, 0]).float().mean()))
    assert abs(kept_share(q, k, tau, rows=4) - sum(want_share) / len(want_share)) < 1e-6  # float32 means
    # the backend takes tau and its share from one pass over the scores: the same as the two calls
    from hsr.integrations._device_cache import _calibrate

    both, share = _calibrate(q, k, 0.3, 1e-2, 4)
    assert torch.equal(both, calibrate_tau(q, k, 0.3, 1e-2, 4))
    assert abs(share - kept_share(q, k, both, rows=4)) < 1e-6


def test_a_chunked_prefill_decodes_as_one_pass():
    """generate_greedy(prefill_chunk=c) feeds the prompt c positions at a time: the tokens
    equal dense decoding and the one-pass prefill's, and each layer's tau is the one the last
    chunk calibrates over every key (the one-pass tau when the chunk holds the calibration
    rows)."""
    from transformers import StaticCache

    model, cfg = _model(seed=5)
    ids = torch.randint(3, 64, (2, 44), generator=torch.Generator().manual_seed(6)).to(DEV)
    want = _dense_greedy(model, ids, 5)
    assert torch.equal(generate_greedy(model, ids, 5, StaticCache(config=cfg, max_cache_len=64), prefill_chunk=16),
                       want)
    register_code_attention("hsr_code_chunk", eps=1e-6, calibration_rows=8)
    model.set_attn_implementation("hsr_code_chunk")
    one = CodeCache(cfg, max_cache_len=64)
    assert torch.equal(generate_greedy(model, ids, 5, one), want)
    for chunk in (12, 5):
        cache = CodeCache(cfg, max_cache_len=64)
        assert torch.equal(generate_greedy(model, ids, 5, cache, prefill_chunk=chunk), want)
        if chunk == 12:  # the last chunk (8 positions) holds the 8 calibration rows: the same tau
            for a, b in zip(one.layers, cache.layers):
                torch.testing.assert_close(a.tau, b.tau, rtol=1e-5, atol=1e-5)
                assert a.filtered == b.filtered
        else:  # a last chunk of 4 calibrates from its 4 rows
            assert all(b.tau.shape == (2, 4, 1) for b in cache.layers)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk"):
            generate_greedy(model, ids, 2, CodeCache(cfg, max_cache_len=64), prefill_chunk=bad)


def test_a_certified_backend_attends_every_key_where_tau_drops_too_much():
    """``certified=True``: a row whose bound under the layer's tau exceeds eps attends every
    key. With a tau that keeps nothing, the certified decode step still gives dense's logits;
    the uncertified one does not."""
    import inspect

    model, cfg = _model()
    ids = torch.randint(3, 64, (1, 41), generator=torch.Generator().manual_seed(3)).to(DEV)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(ids).logits[:, -1]
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    got = {}
    for certified in (False, True):
        name = f"hsr_code_certified_{certified}"
        register_code_attention(name, eps=1e-3, certified=certified, count_guard=certified)
        model.set_attn_implementation(name)
        cache = CodeCache(cfg, max_cache_len=64)
        with torch.no_grad():
            model(ids[:, :40], use_cache=True, **{kw: cache})  # the prefill calibrates tau
            assert cache.guard_counts() == (0, 0)
            for layer in cache.layers:
                layer.tau.fill_(1e4)  # now a threshold that keeps nothing
            got[certified] = model(ids[:, 40:], use_cache=True, **{kw: cache}).logits[:, -1]
        cache.check()
        rows = cfg.num_hidden_layers * cfg.num_attention_heads if certified else 0  # B 1, one position
        assert cache.guard_counts() == (rows, rows)  # every row past eps, and counted once
    torch.testing.assert_close(got[True], want, atol=1e-4, rtol=1e-4)
    assert (got[False] - want).abs().max() > 1e-2
    with pytest.raises(ValueError, match="count_guard"):
        register_code_attention("hsr_code_count_only", count_guard=True)


def test_calibrate_at_sets_the_prefill_target_apart_from_eps():
    """``calibrate_at``: tau is calibrated at that target (lower tau for a smaller one: more
    keys kept), while ``eps`` stays the guard's; a bad value is refused by name."""
    import inspect

    model, cfg = _model()
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(5)).to(DEV)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    taus = {}
    for at in (None, 1e-4):
        name = f"hsr_code_calibrate_{at}"
        backend = register_code_attention(name, eps=0.9, certified=True, calibrate_at=at)  # a random model:
        assert backend.eps == 0.9 and backend.calibrate_at == (0.9 if at is None else at)  # near-uniform mass
        model.set_attn_implementation(name)
        cache = CodeCache(cfg, max_cache_len=64)
        with torch.no_grad():
            model(ids, use_cache=True, **{kw: cache})
        taus[at] = torch.stack([layer.tau for layer in cache.layers])
    assert (taus[1e-4] <= taus[None]).all() and (taus[1e-4] < taus[None]).any()
    with pytest.raises(ValueError, match="calibrate_at must be in"):
        register_code_attention("hsr_code_bad", eps=1e-2, calibrate_at=1.5)
