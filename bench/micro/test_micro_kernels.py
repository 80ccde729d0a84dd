"""Regression micro-benchmarks of the Triton kernels at tiny sizes: ``CodeKVCache`` add and
attend, ``block_sparse_attention`` (docs/benchmarks.md, "Regression micro-benchmarks").

Without a CUDA GPU they run under the Triton CPU interpreter (``TRITON_INTERPRET=1``, set in
conftest.py): the numbers then guard the Python side (validation, launch set-up, the
interpreter's own cost), not GPU speed. Each measurement is a few rounds of one call.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from hsr import AttentionSpec  # noqa: E402
from hsr.kernels import CodeKVCache, block_sparse_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _qkv(B, Hq, Hkv, M, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).to(DEVICE)
                 for s in ((B, Hq, M, D), (B, Hkv, N, D), (B, Hkv, N, D)))


@pytest.fixture(scope="module")
def code_cache():
    q, k, v = _qkv(1, 4, 2, 1, 96, 32)
    cache = CodeKVCache(k[:, :, :64], v[:, :, :64], capacity=128)
    return cache, q, k, v


def test_code_cache_add_one_token(benchmark, code_cache):
    cache, _, k, v = code_cache
    k1, v1 = k[:, :, 64:65].contiguous(), v[:, :, 64:65].contiguous()

    def add():
        cache.add(k1, v1)
        _sync()

    benchmark.pedantic(add, setup=lambda: cache.crop(64), **ROUNDS)
    assert len(cache) == 65
    cache.crop(64)


@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_code_cache_attend(benchmark, code_cache, kind):
    cache, q, _, _ = code_cache
    kw = dict(tau=1.0) if kind == "softmax" else dict(bias=0.1)

    def attend():
        out, _ = cache.attend(q, AttentionSpec(kind=kind, causal=True, **kw))
        _sync()
        return out

    out = benchmark.pedantic(attend, **ROUNDS)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_block_sparse_attention_causal(benchmark):
    N, bs = 64, 16
    q, k, v = _qkv(1, 2, 1, N, N, 32, seed=1)
    nkb = N // bs
    num = torch.full((1, 1, nkb), nkb, dtype=torch.int32, device=DEVICE)
    idx = torch.arange(nkb, dtype=torch.int32, device=DEVICE).expand(1, 1, nkb, nkb).contiguous()

    def attend():
        out = block_sparse_attention(q, k, v, num, idx, block_size=bs, causal=True)
        _sync()
        return out

    out = benchmark.pedantic(attend, **ROUNDS)
    assert out.shape == q.shape and torch.isfinite(out).all()
