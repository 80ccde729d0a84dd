"""Fuzz the transformers cache: HSRCache + an hsr backend against dense attention over a plain
tensor KV cache that went through the same operations (issue 23).

A case draws the batch size, heads (grouped-query), head dim, left padding per row, and a
sequence of cache operations: decode steps (one token), chunks of a few tokens, beam reorders
(``reorder_cache``, ``index_select`` semantics, rows repeated or dropped), ``crop``,
``batch_repeat_interleave`` and ``batch_select_indices``. After every update the backend
attends the new queries through the cache's index, and the result is compared with float64
dense attention over the reference tensors with the same causal + padding mask:

- ReLU^alpha (exact): equal up to float32 rounding;
- softmax with ``eps``: within the certificate ``2 eps |V|_inf`` of dense.

The reference cache's keys and values must also equal the HSRCache's. float32 and bfloat16
caches (the reference is float64 over the same stored values; a bfloat16 output adds its own
rounding, 2^-8 relative, to the tolerance). Cases use one or two
layers (each its own backend: the layer is found by ``module.layer_idx``) and the index's
default, small-leaf tree or code backends. The CI run draws a
modest number of cases; ``bench/fuzz_hsr_cache.py`` runs the same cases at >= 1000.
"""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hsr.integrations import transformers as ht  # noqa: E402

EPS = 1e-3
#: the backends under test: the index from the first key, or (``*_from8``) the dense
#: short-context path below 8 keys and the index from there on, so cases cross over
BACKENDS = {
    "relu": dict(kind="relu", alpha=2, bias=0.05, dense_below=0),
    "relu3": dict(kind="relu", alpha=3, bias=-0.1, dense_below=0),
    "softmax": dict(kind="softmax", eps=EPS, dense_below=0),
    "relu_from8": dict(kind="relu", alpha=2, bias=0.05, dense_below=8),
    "softmax_from8": dict(kind="softmax", eps=EPS, dense_below=8),
}
CI_EXAMPLES = 100


def _backend(name):
    return ht.register_hsr_attention(f"hsr_cache_fuzz_{name}", **BACKENDS[name])


# ------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------
@st.composite
def cases(draw):
    """One fuzz case: shapes, padding and a list of operations (plain data, printable)."""
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([4, 8, 16]))
    n0 = draw(st.integers(1, 12))
    pads = draw(st.lists(st.integers(0, n0 - 1), min_size=B, max_size=B))
    kinds = draw(st.lists(st.sampled_from(sorted(BACKENDS)), min_size=1, max_size=2))  # one per layer
    ops = []
    b = B
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["decode", "decode", "chunk", "reorder", "crop", "repeat", "select"]))
        if op == "decode":
            ops.append(("update", 1, False))
        elif op == "chunk":  # holes: some of the new tokens are padding (a padded continuation)
            ops.append(("update", draw(st.integers(2, 5)), draw(st.booleans())))
        elif op == "reorder":  # beams: any rows, repeats allowed, batch size kept
            ops.append(("reorder", draw(st.lists(st.integers(0, b - 1), min_size=b, max_size=b)), None))
        elif op == "crop":
            ops.append(("crop", draw(st.integers(1, 6)), None))
        elif op == "repeat" and b <= 3:
            r = draw(st.integers(1, 2))
            ops.append(("repeat", r, None))
            b *= r
        elif op == "select":
            rows = draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b, unique=True))
            ops.append(("select", sorted(rows), None))
            b = len(rows)
    # the index: its default, or small leaves and buffer so a few tokens already merge trees
    # (not method="brute": softmax with a certificate refuses it, by design)
    index_kwargs = draw(st.sampled_from([{}, dict(method="tree", leaf_size=4, buffer_size=4),
                                         dict(method="code")]))
    # eager: the index follows every update; lazy or index_from > 0: built when a backend asks,
    # so reorders and crops also meet a stale or missing index
    upkeep = draw(st.sampled_from([dict(eager=True, index_from=0), dict(eager=False, index_from=0),
                                   dict(eager=True, index_from=6)]))
    return dict(B=B, Hkv=Hkv, G=G, D=D, n0=n0, pads=pads, kinds=kinds, ops=ops, index_kwargs=index_kwargs,
                upkeep=upkeep, dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)), mask=draw(st.booleans()))


# ------------------------------------------------------------------------------------------
# the reference and one case
# ------------------------------------------------------------------------------------------
def _reference(q, K, V, keypad, setting, scale):
    """float64 dense attention of the last M positions over K, V (B, Hkv, N, D) with the
    causal + key padding mask; rows with no visible key (or no firing key) are zeros."""
    B, Hq, M, D = q.shape
    N = K.shape[2]
    G = Hq // K.shape[1]
    k = K.double().repeat_interleave(G, 1)
    v = V.double().repeat_interleave(G, 1)
    S = q.double() @ k.transpose(-1, -2)
    vis = (torch.arange(N)[None, :] <= (torch.arange(M) + (N - M))[:, None])[None, None]
    vis = vis & keypad[:, None, None, :]
    if setting["kind"] == "relu":
        w = torch.where(vis, (scale * S - setting["bias"]).clamp_min(0) ** setting["alpha"], 0.0)
    else:
        x = torch.where(vis, scale * S, -torch.inf)
        mx = x.amax(-1, keepdim=True)
        w = torch.exp(x - torch.where(torch.isfinite(mx), mx, 0.0))
    den = w.sum(-1, keepdim=True)
    return (w @ v) / torch.where(den > 0, den, 1.0)


def _mask4d(keypad, M, N):
    causal = torch.arange(N)[None, :] <= (torch.arange(M) + (N - M))[:, None]
    return (causal[None] & keypad[:, None, :])[:, None]


def run_case(case, backends=None, record=None):
    """Run one case; returns the number of attention calls checked. Raises AssertionError on
    the first mismatch (with the operation that led to it). ``record`` (a dict), if given,
    gets ``worst``: the largest ``|out - dense| / tolerance`` seen (below 1 when all pass)."""
    backends = {} if backends is None else backends
    for name in case["kinds"]:
        if name not in backends:
            backends[name] = _backend(name)
    gen = torch.Generator().manual_seed(case["seed"])
    B, Hkv, D = case["B"], case["Hkv"], case["D"]
    Hq = Hkv * case["G"]
    L = len(case["kinds"])
    scale = D ** -0.5
    dtype = getattr(torch, case.get("dtype", "float32"))
    # a bfloat16 output is rounded to 8 bits of mantissa: that much more tolerance
    rounding = 0.0 if dtype == torch.float32 else 2.0 ** -7
    cache = ht.HSRCache(index_kwargs=case.get("index_kwargs"), **case.get("upkeep", dict(index_from=0)))
    K = [torch.zeros(B, Hkv, 0, D, dtype=dtype) for _ in range(L)]  # the reference cache, per layer
    V = [torch.zeros(B, Hkv, 0, D, dtype=dtype) for _ in range(L)]
    keypad = torch.zeros(B, 0, dtype=torch.bool)
    checked = 0

    def update(M, pad=None, holes=False):
        nonlocal keypad, checked
        b = keypad.shape[0]
        real = torch.ones(b, M, dtype=torch.bool)
        if pad is not None:  # left padding of the prompt
            for r, p in enumerate(pad):
                real[r, :p] = False
        if holes:
            real &= torch.rand(b, M, generator=gen) < 0.6
        keypad = torch.cat([keypad, real], 1)
        N = keypad.shape[1]
        mask = _mask4d(keypad, M, N) if (case["mask"] or not bool(keypad.all())) else None
        for layer, name in enumerate(case["kinds"]):
            setting = BACKENDS[name]
            k = torch.randn(b, Hkv, M, D, generator=gen).to(dtype)
            v = torch.randn(b, Hkv, M, D, generator=gen).to(dtype)
            q = (torch.randn(b, Hq, M, D, generator=gen) * 1.5).to(dtype)
            K[layer], V[layer] = torch.cat([K[layer], k], 2), torch.cat([V[layer], v], 2)
            keys, values = cache.update(k, v, layer)
            assert torch.equal(keys, K[layer]) and torch.equal(values, V[layer]), \
                "the cache's tensors left the reference"
            module = types.SimpleNamespace(layer_idx=layer, is_causal=True, training=False,
                                           num_key_value_groups=case["G"])
            out, _ = backends[name](module, q, keys, values, mask, scaling=scale, cache=cache)
            if N >= setting["dense_below"]:
                assert cache.layers[layer].n_indexed == N, "the backend did not attend through the cache's index"
            ref = _reference(q, K[layer], V[layer], keypad, setting, scale).transpose(1, 2)
            vmax = float(V[layer].abs().max())
            tol = 1e-4 * (1 + vmax) if setting["kind"] == "relu" else 2 * EPS * vmax + 1e-5
            tol += rounding * vmax
            assert out.dtype == dtype, f"output dtype {out.dtype}, queries {dtype}"
            err = float((out.double() - ref).abs().max())
            if record is not None:
                record["worst"] = max(record.get("worst", 0.0), err / tol)
            assert out.shape == ref.shape and err <= tol, f"layer {layer} ({name}): |out - dense| = {err:.3g} > {tol:.3g}"
            checked += 1

    update(case["n0"], pad=case["pads"])
    for i, (op, arg, holes) in enumerate(case["ops"]):
        try:
            if op == "update":
                update(arg, holes=holes)
            elif op == "reorder":
                rows = torch.tensor(arg, dtype=torch.long)
                cache.reorder_cache(rows)
                K = [x.index_select(0, rows) for x in K]
                V = [x.index_select(0, rows) for x in V]
                keypad = keypad.index_select(0, rows)
            elif op == "crop":
                n = keypad.shape[1]
                t = min(arg, n - 1)  # keep at least one token: a row needs a prompt to decode from
                if t > 0:
                    cache.crop(-t)
                    K = [x[:, :, :n - t] for x in K]
                    V = [x[:, :, :n - t] for x in V]
                    keypad = keypad[:, :n - t]
            elif op == "repeat":
                cache.batch_repeat_interleave(arg)
                K = [x.repeat_interleave(arg, 0) for x in K]
                V = [x.repeat_interleave(arg, 0) for x in V]
                keypad = keypad.repeat_interleave(arg, 0)
            elif op == "select":
                rows = torch.tensor(arg, dtype=torch.long)
                cache.batch_select_indices(rows)
                K = [x[rows] for x in K]
                V = [x[rows] for x in V]
                keypad = keypad[rows]
        except AssertionError as exc:
            raise AssertionError(f"after operation {i} {(op, arg)} of {case}: {exc}") from exc
    return checked


# ------------------------------------------------------------------------------------------
# the CI run
# ------------------------------------------------------------------------------------------
@settings(max_examples=CI_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_hsr_cache_matches_dense_attention_over_the_same_cache_operations(case):
    assert run_case(case) >= 1


def test_a_reordered_left_padded_batch_decodes_like_dense():
    """A fixed case with every operation, so the CI sees each one whatever hypothesis draws."""
    case = dict(B=3, Hkv=2, G=2, D=8, n0=7, pads=[0, 3, 6], kinds=["relu", "softmax"], seed=1, mask=True,
                index_kwargs=dict(method="tree", leaf_size=4, buffer_size=4),
                ops=[("update", 1, False), ("reorder", [2, 2, 0], None), ("update", 1, False), ("crop", 2, None),
                     ("update", 3, True), ("repeat", 2, None), ("update", 1, False), ("select", [1, 4, 5], None),
                     ("update", 1, False)])
    assert run_case(case) == 2 * 6
    case["kinds"] = ["softmax"]
    assert run_case(case) == 6


def test_tiny_model_generate_matches_sdpa_with_beams_padding_and_a_continued_cache():
    """generate() on a tiny random Llama: beam search over a left-padded batch, then greedy
    generation continued from the saved cache with new tokens, through HSRCache and the index
    (softmax, eps = 1e-6) and through SDPA with a DynamicCache: same tokens, same scores."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    ht.register_hsr_attention("hsr_cache_fuzz_generate", kind="softmax", eps=1e-6, dense_below=0)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = (ids != 0).long()

    def run(impl, make_cache):
        model.set_attn_implementation(impl)
        kw = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, max_new_tokens=4)
        with torch.no_grad():
            beams = model.generate(ids, attention_mask=mask, num_beams=2, cache=make_cache(), **kw)
            cache = make_cache()
            first = model.generate(ids, attention_mask=mask, cache=cache, **kw)
            more = torch.cat([first.sequences, torch.tensor([[20, 21], [22, 23]])], 1)
            mask2 = torch.cat([mask, torch.ones(2, more.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
            cont = model.generate(more, attention_mask=mask2, cache=cache, **kw)
        return (beams, first, cont), cache

    ref, _ = run("sdpa", DynamicCache)
    got, cache = run("hsr_cache_fuzz_generate", lambda: ht.HSRCache(config=cfg, index_from=0))
    for r, g in zip(ref, got):
        assert torch.equal(r.sequences, g.sequences)
        for a, b in zip(r.scores, g.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(layer.n_builds == 1 and layer.n_appends > 0 for layer in cache.layers)  # appended, never rebuilt
