"""``hsr.kernels._select.kth_largest`` (the top-k mode's radix select) against ``torch.topk``:
the same value bit for bit, over ties, signed zeros, ``-inf`` padding, extreme magnitudes and
sizes that are not multiples of the block. Under the Triton interpreter on the CPU, compiled on
a GPU."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from hsr.kernels._select import kth_largest  # noqa: E402

SETTINGS = dict(max_examples=15, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _same(got, ref):
    # equal values; -0.0 and 0.0 compare equal (which of two equal keys topk returns is its choice)
    return torch.equal(got == ref, torch.ones_like(ref, dtype=torch.bool)) or torch.equal(got, ref)


@settings(**SETTINGS)
@given(R=st.integers(1, 4), W=st.integers(1, 700), frac=st.floats(0, 1), kind=st.sampled_from(
    ["normal", "lattice", "extreme", "padded", "zeros"]), seed=st.integers(0, 2 ** 16))
def test_kth_largest_equals_torch_topk(device, R, W, frac, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, W, generator=g)
    if kind == "lattice":  # many ties, also at the k-th
        x = torch.randint(-3, 4, (R, W), generator=g).float()
    elif kind == "extreme":
        x = x * torch.tensor(10.0) ** torch.randint(-38, 38, (R, W), generator=g)
    elif kind == "padded":  # a decode step's row past its length
        x[:, W // 3:] = float("-inf")
    elif kind == "zeros":
        x = torch.where(torch.rand(R, W, generator=g) < 0.5, 0.0, -0.0)
    k = max(1, min(W, int(round(frac * W))))
    x = x.to(device)
    ref = torch.topk(x, k, dim=1).values[:, -1]
    for programs, block in ((None, 1024), (3, 128)):
        assert _same(kth_largest(x, k, programs=programs, block=block), ref)


def test_kth_largest_refuses_what_it_cannot_do(device):
    x = torch.zeros(2, 10, device=device)
    with pytest.raises(ValueError, match="k must be an integer in"):
        kth_largest(x, 0)
    with pytest.raises(ValueError, match="k must be an integer in"):
        kth_largest(x, 11)
    with pytest.raises(ValueError, match="float32"):
        kth_largest(x.double(), 1)
