"""Orders of the keys for the GPU block index (``build_index``): k-means clusters padded to
whole blocks, or recursive bisection along principal directions (torch only)."""
from __future__ import annotations

import math

import torch

def _principal_dirs(X, valid, iters=4, generator=None):
    """Approximate top principal direction of each group. X (..., S, D) f32, valid (..., S)."""
    w = valid.to(X.dtype)[..., None]
    cnt = w.sum(-2, keepdim=True).clamp_min(1.0)
    mu = (X * w).sum(-2, keepdim=True) / cnt
    Xc = (X - mu) * w
    v = torch.randn(X.shape[:-2] + (X.shape[-1], 1), device=X.device, dtype=X.dtype,
                    generator=generator)
    for _ in range(iters):
        v = Xc.transpose(-1, -2) @ (Xc @ v)
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    return (Xc @ v)[..., 0]


def _bisect_order(kf, valid, block, seed=0):
    G, Np, D = kf.shape
    L = int(round(math.log2(Np // block)))
    gen = torch.Generator(device=kf.device)
    gen.manual_seed(seed)
    perm = torch.arange(Np, device=kf.device).expand(G, Np).contiguous()
    for level in range(L):
        groups = 1 << level
        S = Np // groups
        X = torch.gather(kf, 1, perm[..., None].expand(G, Np, D)).view(G, groups, S, D)
        vl = torch.gather(valid, 1, perm).view(G, groups, S)
        proj = _principal_dirs(X, vl, generator=gen)
        proj = torch.where(vl, proj, torch.full_like(proj, float("inf")))
        order = torch.argsort(proj, dim=-1, stable=True)
        perm = torch.gather(perm.view(G, groups, S), 2, order).view(G, Np)
    return perm


def _nearest(x, xn, cent, chunk=1 << 16):
    """argmin_j ||x_i - c_j||^2, in row chunks; the products in bf16 on the GPU (only the
    assignment depends on them; every bound is computed afterwards in float32)."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    cn = (cent * cent).sum(1)[None]
    lowp = x.is_cuda
    ct = cent.T.to(torch.bfloat16) if lowp else cent.T
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk]
        prod = (xi.to(torch.bfloat16) @ ct).float() if lowp else xi @ ct
        out[i:i + chunk] = (xn[i:i + chunk] - 2 * prod + cn).argmin(1)
    return out


def _kmeans_order(kf, n_real, block, n_clusters=None, iters=8, seed=0):
    """Padded cluster layout: k-means on each group's real keys (rows < n_real of kf
    (G, >=n_real+1, D)), keys sorted by cluster, each cluster padded to a multiple of
    ``block`` with the zero row ``n_real`` so that no block mixes two clusters.
    Returns order (G, Np) of source rows."""
    G, _, D = kf.shape
    N = n_real
    C = block
    K = n_clusters or max(1, min(N // C, 8192))
    gen = torch.Generator(device=kf.device)
    gen.manual_seed(seed)
    assign = torch.empty(G, N, dtype=torch.long, device=kf.device)
    for g in range(G):
        x = kf[g, :N]
        xn = (x * x).sum(1, keepdim=True)
        # k-means||-style seeding: a few rounds, each sampling points with probability
        # proportional to the squared distance to the centres chosen so far
        cent = x[torch.randint(0, N, (1,), generator=gen, device=kf.device)]
        rounds = 5
        for r in range(rounds):
            c_new = cent if r == 0 else cent[-m:]
            d_new = (xn - 2 * (x @ c_new.T) + (c_new * c_new).sum(1)[None]).min(1).values
            d = d_new.clamp_min(0) if r == 0 else torch.minimum(d, d_new.clamp_min(0))
            m = min(N, -(-K // rounds) if r < rounds - 1 else K - cent.shape[0])
            if m <= 0:
                break
            if float(d.sum()) <= 0:
                pick = torch.randint(0, N, (m,), generator=gen, device=kf.device)
            else:
                pick = torch.multinomial(d, m, replacement=False, generator=gen)
            cent = torch.cat([cent, x[pick]])
        cent = cent[:K].clone()
        K_g = cent.shape[0]
        for _ in range(iters):
            a = _nearest(x, xn, cent)
            cnt = torch.bincount(a, minlength=K_g).float()
            s = torch.zeros_like(cent).index_add_(0, a, x)
            upd = cnt > 0
            cent[upd] = s[upd] / cnt[upd, None]
        assign[g] = a
    cnt = torch.zeros(G, K, dtype=torch.long, device=kf.device)
    cnt.scatter_add_(1, assign, torch.ones_like(assign))
    pad = (cnt + C - 1) // C * C
    start = torch.cumsum(cnt, 1) - cnt
    pstart = torch.cumsum(pad, 1) - pad
    Np = int(pad.sum(1).max().item())
    sort_idx = torch.argsort(assign * (N + 1) + torch.arange(N, device=kf.device), dim=1)
    a_sorted = torch.gather(assign, 1, sort_idx)
    rank = torch.arange(N, device=kf.device)[None] - torch.gather(start, 1, a_sorted)
    slot = torch.gather(pstart, 1, a_sorted) + rank
    order = torch.full((G, Np), N, dtype=torch.long, device=kf.device)
    order.scatter_(1, slot, sort_idx)
    return order
