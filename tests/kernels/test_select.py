"""``hsr.kernels._select.select_kth`` (the top-k mode's selection) against ``torch.topk``: the
same k-th value bit for bit, and a list holding exactly the positions that reach it, over ties,
signed zeros, ``-inf`` (a causal row's masked keys), extreme magnitudes, rows of different
lengths and sizes that are not multiples of the block. Under the Triton interpreter on the CPU,
compiled on a GPU."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from hsr.kernels._select import select_kth  # noqa: E402

SETTINGS = dict(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _scores(kind, R, W, g):
    x = torch.randn(R, W, generator=g)
    if kind == "lattice":  # many ties, also at the k-th
        x = torch.randint(-3, 4, (R, W), generator=g).float()
    elif kind == "extreme":
        x = x * torch.tensor(10.0) ** torch.randint(-38, 38, (R, W), generator=g)
    elif kind == "masked":  # a causal row's keys past its position
        x[:, W // 3:] = float("-inf")
    elif kind == "zeros":
        x = torch.where(torch.rand(R, W, generator=g) < 0.5, 0.0, -0.0)
    elif kind == "near":  # distinct scores one ulp apart: every digit of the key matters
        x = (1.0 + torch.randint(0, 50, (R, W), generator=g).float() * 2.0 ** -23) * torch.sign(torch.randn(R, W,
                                                                                                        generator=g))
    return x


def _check(x, lens, k, sel):
    """Row r sees its first ``lens[r]`` scores: the threshold is their k-th best (-inf where
    fewer than k), the list their positions scoring at least it (every finite one where the
    threshold is -inf), ascending, plus perhaps some just below it."""
    for r in range(x.shape[0]):
        n = int(lens[r])
        row = x[r, :n]
        thr = sel.threshold[r].item()
        if n < k:
            assert thr == float("-inf")
        else:
            ref = torch.topk(row, k).values[-1].item()
            assert thr == ref, (r, thr, ref)
        pos = sel.positions[r, :int(sel.count[r])].long().cpu()
        assert (pos[1:] > pos[:-1]).all() and (pos < n).all()
        kept = set(pos[row[pos] >= thr].tolist()) - set(torch.nonzero(row == float("-inf")).flatten().tolist())
        assert kept == set(torch.nonzero((row >= thr) & (row > float("-inf"))).flatten().tolist())


@settings(**SETTINGS)
@given(R=st.integers(1, 4), W=st.integers(1, 700), frac=st.floats(0, 1), kind=st.sampled_from(
    ["normal", "lattice", "extreme", "masked", "zeros", "near"]), ragged=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_select_kth_equals_torch_topk(device, R, W, frac, kind, ragged, seed):
    g = torch.Generator().manual_seed(seed)
    x = _scores(kind, R, W, g)
    k = max(1, min(W, int(round(frac * W))))
    # each row its own kv head (layout (Hq, M, G, Hkv) = (R, 1, 1, R)); ragged: some shorter than k
    lens = torch.randint(0, W + 1, (R,), generator=g) if ragged else torch.full((R,), W)
    lens = lens.to(torch.int32)
    for programs, block in ((None, 2048), (3, 128)):
        sel = select_kth(x.to(device), k, lens.to(device), (R, 1, 1, R), programs=programs, block=block)
        _check(x, lens, k, sel)


def test_select_kth_rows_share_their_kv_heads_length(device):
    # rows ordered (b, hq, m): B 2, Hq 4, M 2, G 2 -> kv heads of lengths 5, 9, 0, 7
    g = torch.Generator().manual_seed(1)
    B, Hq, M, G = 2, 4, 2, 2
    Hkv = Hq // G
    x = torch.randint(-2, 3, (B * Hq * M, 12), generator=g).float()
    head_lens = torch.tensor([5, 9, 0, 7], dtype=torch.int32)
    rows = torch.arange(B * Hq * M)
    lens = head_lens[(rows // (Hq * M)) * Hkv + (rows // M) % Hq // G]
    sel = select_kth(x.to(device), 6, head_lens.to(device), (Hq, M, G, Hkv), programs=2, block=128)
    _check(x, lens, 6, sel)


@pytest.mark.parametrize("k", [10, 2999, 4000])
def test_select_kth_list_longer_than_the_finish_holds(device, k):
    # scores in {0, 1}: the bucket of the k-th is a tie of ~3000 keys, past the finish's
    # 2048-entry block (it then reads the list again every round)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 2, (2, 6000), generator=g).float()
    lens = torch.tensor([6000, 5000], dtype=torch.int32)
    sel = select_kth(x.to(device), k, lens.to(device), (2, 1, 1, 2), programs=3, block=1024)
    assert int(sel.count.max()) > 2048
    _check(x, lens, k, sel)


def test_select_kth_refuses_what_it_cannot_do(device):
    x = torch.zeros(2, 10, device=device)
    lens = torch.full((2,), 10, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="k must be an integer in"):
        select_kth(x, 0, lens, (2, 1, 1, 2))
    with pytest.raises(ValueError, match="k must be an integer in"):
        select_kth(x, 11, lens, (2, 1, 1, 2))
    with pytest.raises(ValueError, match="float32"):
        select_kth(x.double(), 1, lens, (2, 1, 1, 2))
    with pytest.raises(ValueError, match="does not describe 2 rows"):
        select_kth(x, 1, lens, (2, 1, 2, 2))  # Hq != G * Hkv
    with pytest.raises(ValueError, match="does not describe 2 rows"):
        select_kth(x, 1, lens, (4, 1, 2, 2))  # 2 rows are not a whole batch of 4 heads
    with pytest.raises(ValueError, match=r"lengths must be a \(2,\) int32"):
        select_kth(x, 1, lens.long(), (2, 1, 1, 2))
    with pytest.raises(ValueError, match=r"lengths must be a \(2,\) int32"):
        select_kth(x, 1, lens[:1], (2, 1, 1, 2))
