"""GPU block index: the filter never drops a key with <q,k> >= tau; fused decode == dense."""
import math

import pytest
import torch

pytest.importorskip("triton")

from hsr.kernels import build_index, hsr_decode  # noqa: E402
from hsr.testing.references import masked_attention, rel_err  # noqa: E402


def _clustered(B, Hkv, Hq, N, D, gen, dtype=torch.float16, integer=False, n_clusters=6):
    if integer:
        # small integers: every score is exact in float32, so ties with tau are exact too
        cent = torch.randint(-3, 4, (n_clusters, D), generator=gen).float()
        k = cent[torch.randint(0, n_clusters, (B, Hkv, N), generator=gen)]
        k = k + torch.randint(-1, 2, (B, Hkv, N, D), generator=gen).float()
        q = torch.randint(-2, 3, (B, Hq, 1, D), generator=gen).float()
    else:
        cent = torch.randn(n_clusters, D, generator=gen) * 2
        k = cent[torch.randint(0, n_clusters, (B, Hkv, N), generator=gen)]
        k = k + 0.5 * torch.randn(B, Hkv, N, D, generator=gen)
        q = cent[torch.randint(0, n_clusters, (B, Hq, 1), generator=gen)] * 0.5
        q = q + 0.3 * torch.randn(B, Hq, 1, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _scores(q, k):
    g = q.shape[1] // k.shape[1]
    return q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)


def _perm(B, Hkv, N, gen):
    return torch.stack([torch.stack([torch.randperm(N, generator=gen) for _ in range(Hkv)])
                        for _ in range(B)])


@pytest.mark.parametrize("method", ["kmeans", "pca", "none", "perm"])
@pytest.mark.parametrize("block", [16, 32])
def test_range_search_is_exact_set_with_ties(method, block, device):
    gen = torch.Generator().manual_seed(block + len(method))
    B, Hq, Hkv, N, D = 2, 4, 2, 203, 32
    q, k, v = _clustered(B, Hkv, Hq, N, D, gen, integer=True)
    perm = _perm(B, Hkv, N, gen) if method == "perm" else None
    idx = build_index(k.to(device), v.to(device), block_size=block, n_sub=4,
                      method="none" if method == "perm" else method, perm=perm,
                      rotate=(method == "pca"))
    sc = _scores(q, k)
    for quant in (0.5, 0.9, 0.99):
        # tau equal to an observed score: ties must be reported (>=)
        tau = torch.quantile(sc, quant, dim=-1, interpolation="higher")
        indptr, scores, ind = idx.range_search(q.to(device), tau.to(device))
        indptr, ind = indptr.cpu(), ind.cpu()
        for r in range(B * Hq):
            b, h = divmod(r, Hq)
            want = torch.nonzero(sc[b, h, 0] >= tau[b, h, 0]).flatten().sort().values
            got = ind[indptr[r]:indptr[r + 1]].long().sort().values
            assert torch.equal(got, want), (quant, r)


def test_filter_prunes_clustered_keys(device):
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, N, D = 1, 2, 1, 1024, 32
    q, k, v = _clustered(B, Hkv, Hq, N, D, gen, n_clusters=16)
    idx = build_index(k.to(device), v.to(device), block_size=16, n_sub=4)
    tau = torch.quantile(_scores(q, k), 0.99, dim=-1)
    plan = idx.plan(q.to(device), tau.to(device), per_row=True)
    frac = plan.kv_num_blocks.float().mean().item() / idx.num_blocks
    assert frac < 0.6, frac
    # the compacted union (one kernel, atomic slots) is the union of the per-row flags
    union = plan.flags.cpu().view(1, 1, 2, -1).amax(2)[0, 0].bool()
    n = int(plan.union_num_blocks.view(-1)[0])
    got = plan.union_indices.cpu().view(-1)[:n].long().sort().values
    assert torch.equal(got, torch.nonzero(union).flatten())


@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hsr_decode_relu_is_exact(G, dtype, device):
    gen = torch.Generator().manual_seed(G)
    B, Hkv, N, D = 1, 2, 300, 64
    Hq = G * Hkv
    q, k, v = _clustered(B, Hkv, Hq, N, D, gen, dtype=dtype)
    idx = build_index(k.to(device), v.to(device), block_size=16, n_sub=8)
    scale = 1 / math.sqrt(D)
    sc = _scores(q, k)
    bias = float(torch.quantile(sc, 0.9)) * scale  # tau = bias / scale
    out = hsr_decode(q.to(device), idx, kind="relu", alpha=2, bias=bias).cpu()
    w = torch.relu(sc * scale - bias) ** 2
    ref = (w @ v.float().repeat_interleave(G, 1)) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    ref = torch.where(w.sum(-1, keepdim=True) > 0, ref, torch.zeros_like(ref))
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (2e-3 if dtype == torch.float16 else 1.5e-2)


@pytest.mark.parametrize("exact_set", [False, True])
def test_hsr_decode_softmax_and_plan_run(exact_set, device):
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, N, D, C = 2, 8, 2, 250, 64, 16
    q, k, v = _clustered(B, Hkv, Hq, N, D, gen)
    idx = build_index(k.to(device), v.to(device), block_size=C, n_sub=8)
    sc = _scores(q, k)
    tau = torch.quantile(sc, 0.8, dim=-1)
    out = hsr_decode(q.to(device), idx, tau=tau.to(device), exact_set=exact_set,
                     mode="fused", kind="softmax").cpu()
    plan = idx.plan(q.to(device), tau.to(device))
    if exact_set:
        mask = sc >= tau[..., None]
    else:
        fl = plan.union_num_blocks  # union over each kv head's group
        mask = torch.zeros(B, Hkv, N, dtype=torch.bool)
        uidx = plan.union_indices.cpu()
        for b in range(B):
            for h in range(Hkv):
                blocks = uidx[b, h, 0, :int(fl[b, h, 0])].long()
                keys = (blocks[:, None] * C + torch.arange(C)).flatten()
                p = idx.pos[b, h].cpu()[keys].long()
                mask[b, h, p[p < N]] = True
        mask = mask.repeat_interleave(Hq // Hkv, 1)[:, :, None, :]
        # the kept set always contains the threshold set
        assert (mask | ~(sc >= tau[..., None])).all()
        run = idx.run(q.to(device), plan).cpu()
        assert rel_err(run, out.float()) < 2e-3
        planned = hsr_decode(q.to(device), idx, tau=tau.to(device), kind="softmax").cpu()  # default: planned
        assert rel_err(planned, out.float()) < 2e-3
    ref, _ = masked_attention(q, k, v, mask)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("mode", ["fused", "planned"])
def test_hsr_decode_empty_selection_no_nan(mode, device):
    gen = torch.Generator().manual_seed(5)
    q, k, v = _clustered(1, 1, 2, 100, 32, gen)
    idx = build_index(k.to(device), v.to(device), block_size=16, n_sub=4)
    out, lse = hsr_decode(q.to(device), idx, tau=1e9, return_lse=True, mode=mode, kind="softmax")
    assert (out.cpu() == 0).all() and torch.isneginf(lse.cpu()).all()


def test_tau_for_fraction_is_close(device):
    gen = torch.Generator().manual_seed(6)
    q, k, v = _clustered(1, 1, 2, 2000, 32, gen)
    idx = build_index(k.to(device), v.to(device), block_size=16, n_sub=4)
    tau = idx.tau_for_fraction(q.to(device), 0.1).cpu()
    frac = (_scores(q, k) >= tau[..., None]).float().mean().item()
    assert 0.05 < frac < 0.2


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["pca", "none"])
def test_gpu_filter_exact_real_size(method):
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, N, D = 1, 28, 4, 32768, 128
    q, k, v = _clustered(B, Hkv, Hq, N, D, gen, dtype=torch.bfloat16, n_clusters=64)
    idx = build_index(k.cuda(), v.cuda(), block_size=32, n_sub=8, method=method)
    sc = _scores(q.cuda(), k.cuda())
    tau = torch.quantile(sc[..., ::7].float(), 0.95, dim=-1)
    indptr, _, ind = idx.range_search(q.cuda(), tau)
    for r in range(B * Hq):
        b, h = divmod(r, Hq)
        want = torch.nonzero(sc[b, h, 0] >= tau[b, h, 0]).flatten().sort().values
        got = ind[indptr[r]:indptr[r + 1]].long().sort().values
        assert torch.equal(got, want)
    bias = float(tau.mean()) / math.sqrt(D)
    out = hsr_decode(q.cuda(), idx, kind="relu", bias=bias)
    w = torch.relu(sc / math.sqrt(D) - bias) ** 2
    ref = (w @ v.cuda().float().repeat_interleave(Hq // Hkv, 1)) / w.sum(-1, keepdim=True)
    assert rel_err(out.float(), ref) < 1e-2
