"""The transformers backend's one-call-per-layer decode path and HSRLayer's growing buffers:
the same outputs and statistics as the per-head hsr_attention path, and the same cache
contents as DynamicLayer's torch.cat."""

import os
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hsr.attention import batched  # noqa: E402
from hsr.integrations import transformers as ht  # noqa: E402


def _module(layer_idx=0):
    return types.SimpleNamespace(layer_idx=layer_idx, is_causal=True, training=False)


@pytest.mark.parametrize("mode", [dict(eps=1e-2), dict(eps=1e-3), dict(topk=8), dict(tau=2.0)])
@pytest.mark.parametrize("padded", [False, True])
def test_batched_decode_equals_the_per_head_path(mode, padded, monkeypatch):
    B, Hq, Hkv, N, D = 2, 6, 2, 1100, 32
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, D, generator=g) * 2
    k = centres[torch.randint(0, 6, (B, Hkv, N), generator=g)] + 0.5 * torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    be = ht.register_hsr_attention("t_batched", kind="softmax", dense_below=0, **mode)
    cache = ht.HSRCache(index_from=0)
    cache.update(k, v, 0)
    calls = []
    real = batched.layer_softmax
    monkeypatch.setattr(batched, "layer_softmax", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    keypad = torch.ones(B, N + 3, dtype=torch.bool)
    if padded:
        keypad[1, :5] = False  # row 1 left-padded
    for step in range(3):
        n = N + step + 1
        k1 = torch.randn(B, Hkv, 1, D, generator=g)
        v1 = torch.randn(B, Hkv, 1, D, generator=g)
        keys, values = cache.update(k1, v1, 0)
        q = 0.6 * keys[:, [0, 0, 0, 1, 1, 1], -1:] + 0.4 * torch.randn(B, Hq, 1, D, generator=g)
        mask = keypad[:, None, None, :n].clone() if padded else None
        be.stats.reset()
        out_fast, _ = be(_module(), q, keys, values, mask, scaling=0.2, cache=cache)
        fast = be.stats.total
        monkeypatch.setattr(ht, "_BATCHED_MAX_Q", 0)  # the per-head path
        be.stats.reset()
        out_ref, _ = be(_module(), q, keys, values, mask, scaling=0.2, cache=cache)
        ref = be.stats.total
        monkeypatch.setattr(ht, "_BATCHED_MAX_Q", 16)
        assert torch.equal(out_fast, out_ref)
        assert (fast.keys_scored, fast.keys_selected, fast.max_dropped) == \
            (ref.keys_scored, ref.keys_selected, ref.max_dropped)
    assert len(calls) == 3  # the batched path ran every step
    assert 0 < fast.keys_selected < fast.keys_visible or "tau" in mode


def test_layer_buffers_hold_what_torch_cat_holds():
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator().manual_seed(1)
    ours, ref = ht.HSRLayer(index_from=1 << 30), DynamicLayer()

    def both(t, B=2):
        k, v = torch.randn(B, 2, t, 8, generator=g), torch.randn(B, 2, t, 8, generator=g)
        a = ours.update(k, v)
        b = ref.update(k.clone(), v.clone())
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    both(300)
    first = ours.buffers()[0]
    for _ in range(5):
        both(1)
    assert ours.buffers()[0] is first  # appended in place, no copy of the cache
    assert ours.buffers()[0].shape[2] > ours.keys.shape[2]
    both(400)  # past the capacity: a larger buffer
    for layer in (ours, ref):
        layer.crop(-7)
    both(2)
    for layer in (ours, ref):
        layer.reorder_cache(torch.tensor([1, 0]))
    both(1)
    for layer in (ours, ref):
        layer.batch_repeat_interleave(2)
    both(1, B=4)
    for layer in (ours, ref):
        layer.batch_select_indices(torch.tensor([0, 3]))
    both(3)
    with torch.inference_mode():  # inference tensors, then appended to outside inference mode
        both(1)
    both(1)
    ours.reset()
    assert ours.buffers() is None and ours.get_seq_length() == 0
