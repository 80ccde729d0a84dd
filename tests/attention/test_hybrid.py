"""hybrid_attention lives in hsr.attention.hybrid, reads the index through its public API only,
and stays importable from hsr.integrations.transformers."""

import numpy as np
import pytest
import torch

import hsr.attention as attention
from hsr.attention import KVCacheIndex, paper_bias, power_pattern
from hsr.attention.hybrid import hybrid_attention, remove_key_padding


def _qkv(B=2, Hq=4, Hkv=2, M=24, N=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, M, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g))


class _PublicOnly:
    """Wraps an HSRIndex and refuses every private attribute: what hybrid_attention may read."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AssertionError(f"private attribute {name!r} of the index was read")
        return getattr(object.__getattribute__(self, "_inner"), name)


def _public_only(index: KVCacheIndex) -> KVCacheIndex:
    for row in index.heads:
        for kvi in row:
            kvi.index = _PublicOnly(kvi.index)
    return index


def test_importable_from_both_places():
    pytest.importorskip("transformers")
    from hsr.integrations import transformers as ht

    assert ht.hybrid_attention is hybrid_attention
    assert attention.hybrid_attention is hybrid_attention
    assert "hybrid_attention" in attention.__all__ and "hybrid_attention" in ht.__all__


def test_paper_tau_with_padding_matches_reference_and_uses_public_api_only():
    q, k, v = _qkv()
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g, s = Hq // Hkv, 0.3
    keypad = np.ones((B, N), dtype=bool)
    keypad[1, :9] = False  # left padding of row 1
    p = power_pattern(block_size=8, window=1, sink=0)

    index = KVCacheIndex(k, v)
    removed = remove_key_padding(index, keypad)
    assert (removed == ~keypad).all()
    out, info = hybrid_attention(q, k, v, _public_only(index), p, tau="paper", scale=s,
                                 key_padding=keypad, return_info=True)
    # the same, with the index built (and the padding removed) inside
    out2 = hybrid_attention(q, k, v, None, p, tau="paper", scale=s, key_padding=keypad)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)

    # reference: per query head b / s over the live keys, united with the pattern, dense SDPA
    pm = torch.from_numpy(p.dense_mask(N, M))
    ref = torch.zeros_like(q)
    for b in range(B):
        live = keypad[b]
        for h in range(Hq):
            kh, vh = k[b, h // g], v[b, h // g]
            tau = paper_bias(q[b, h].numpy(), kh.numpy()[live], s) / s
            mask = (pm | (q[b, h] @ kh.T >= tau)) & pm.new_tensor(live)[None, :]
            causal = torch.arange(N)[None, :] <= (torch.arange(M) + N - M)[:, None]
            mask &= causal
            o = torch.nn.functional.scaled_dot_product_attention(q[b, h][None], kh[None], vh[None],
                                                                 attn_mask=mask[None], scale=s)
            ref[b, h] = torch.nan_to_num(o[0])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert info["keys_selected"] > 0 and info["keys_scored"] > 0


def test_remove_key_padding_skips_already_removed_ids():
    _, k, v = _qkv(B=1)
    index = KVCacheIndex(k, v)
    keypad = np.ones((1, k.shape[2]), dtype=bool)
    keypad[0, :5] = False
    first = remove_key_padding(index, keypad)
    keypad2 = keypad.copy()
    keypad2[0, 5:7] = False
    remove_key_padding(index, keypad2, already_removed=first)  # would raise on a second removal of 0..4
    assert len(index.heads[0][0].index) == k.shape[2] - 7
    with pytest.raises(ValueError, match="does not match the index"):
        remove_key_padding(index, keypad[:, :-1])


def test_bad_tau_rejected():
    q, k, v = _qkv(B=1)
    p = power_pattern(block_size=8)
    with pytest.raises(ValueError, match="exactly one"):
        hybrid_attention(q, k, v, None, p)
    with pytest.raises(ValueError, match="'paper'"):
        hybrid_attention(q, k, v, None, p, tau="nonsense")
