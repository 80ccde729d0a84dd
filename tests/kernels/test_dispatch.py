"""hsr_attention over a GPUBlockIndex runs the Triton path and equals dense attention."""
import pytest
import torch

pytest.importorskip("triton")

import hsr  # noqa: E402
from hsr.kernels import build_index  # noqa: E402


def test_hsr_attention_dispatches_relu(device):
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, D = 1, 4, 2, 300, 32
    cent = torch.randn(5, D, generator=gen) * 2
    k = cent[torch.randint(0, 5, (B, Hkv, N), generator=gen)] + 0.5 * torch.randn(B, Hkv, N, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen)
    q = cent[torch.randint(0, 5, (B, Hq, 1), generator=gen)] * 0.5 + 0.3 * torch.randn(B, Hq, 1, D, generator=gen)
    idx = build_index(k.to(device), v.to(device), block_size=16, n_sub=4)
    out = hsr.hsr_attention(q.to(device), idx, kind="relu", alpha=2, bias=0.5)
    ref = hsr.dense_relu_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1),
                                   alpha=2, bias=0.5)
    assert out.shape == (B, Hq, 1, D)
    assert torch.allclose(out.float().cpu(), ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="tau"):
        hsr.hsr_attention(q.to(device), idx, kind="softmax", eps=1e-3)
    with pytest.raises(TypeError, match="same device"):
        hsr.hsr_attention(q.numpy(), idx, kind="relu")
