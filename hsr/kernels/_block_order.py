"""Building the GPU block index: ``build_index`` and the orders of its keys (k-means clusters
padded to whole blocks, or recursive bisection along principal directions; torch only). The
layout it builds: the header of ``hsr/kernels/search.py``."""
from __future__ import annotations

import math

import torch

from ._block_kernels import EMPTY_RADIUS
from ._validate import check_index_build, check_triton_device
from .search import PAD_POS, GPUBlockIndex

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


def build_index(k: torch.Tensor, v: torch.Tensor, *, block_size: int | None = None, n_sub: int = 8,
                method: str = "kmeans", perm: torch.Tensor | None = None, rotate: bool = False, seed: int = 0,
                n_clusters: int | None = None) -> GPUBlockIndex:
    """Build a ``GPUBlockIndex`` over ``k, v (B, Hkv, N, D)``.

    block_size : keys per block C (16, 32, 64 or 128; default 32), the library's one name for a
        block's size. n_sub : subspaces S (power of two dividing D).
    method : ``"kmeans"`` (8 Lloyd iterations with ``n_clusters`` = N / (2 C) centroids,
        keys sorted by cluster, every cluster padded to a multiple of C so that no block
        mixes clusters; about N/4 pad rows on average), ``"pca"`` (recursive principal-direction
        median bisection; pads N up to C * 2**ceil(log2(N/C))) or ``"none"`` (positional
        pages, Quest-like). perm : optional
        ``(B, Hkv, N)`` int64 permutation of ``[0, N)`` per (batch, kv head), used as is.
    rotate : measure the per-subspace radii in each kv head's PCA basis (eigenvectors of the
        key covariance, descending variance, so the first subspace holds the top principal
        directions); the kernels rotate q by the same float32 matrix. The ball bound and
        <q, c> are rotation invariant.

    Raises ``ValueError`` for k/v of different shapes or not 4-D, a ``block_size`` outside
    (16, 32, 64, 128), an ``n_sub`` that is not a power of two dividing D, or an unknown
    ``method``.
    """
    block = 32 if block_size is None else block_size
    check_index_build(k, v, block, n_sub)
    check_triton_device("build_index", k=k, v=v)
    B, Hkv, N, D = k.shape
    dev = k.device
    C = block
    nb = -(-N // C)
    if method == "pca" and perm is None:
        nb = 1 << max(0, math.ceil(math.log2(nb)))
    Np = nb * C
    G = B * Hkv
    Nsrc = max(Np, N + 1)  # source rows: the N keys, then zero rows (row N is a pad row)
    kf = torch.zeros(G, Nsrc, D, device=dev, dtype=torch.float32)
    kf[:, :N] = k.reshape(G, N, D).float()
    valid = torch.zeros(G, Nsrc, device=dev, dtype=torch.bool)
    valid[:, :N] = True
    if method == "kmeans" and perm is None:
        order = _kmeans_order(kf, N, C, n_clusters=n_clusters, seed=seed)
        Np = order.shape[1]
        nb = Np // C
    elif perm is not None:
        perm = perm.reshape(G, N).to(dev).long()
        order = torch.cat([perm, torch.arange(N, Np, device=dev).expand(G, Np - N)], 1)
    elif method == "pca":
        order = _bisect_order(kf[:, :Np], valid[:, :Np], C, seed=seed)
    elif method == "none":
        order = torch.arange(Np, device=dev).expand(G, Np)
    else:
        raise ValueError(f"method must be 'kmeans', 'pca' or 'none' (or give perm), got {method!r}")
    order = order.contiguous()
    kpad = torch.zeros(G, Nsrc, D, device=dev, dtype=k.dtype)
    kpad[:, :N] = k.reshape(G, N, D)
    vpad = torch.zeros(G, Nsrc, D, device=dev, dtype=v.dtype)
    vpad[:, :N] = v.reshape(G, N, D)
    gidx = order[..., None].expand(G, Np, D)
    kp = torch.gather(kpad, 1, gidx)
    vp = torch.gather(vpad, 1, gidx)
    vm = torch.gather(valid, 1, order)
    pos = torch.where(vm, order, torch.full_like(order, PAD_POS)).to(torch.int32)
    # ---- bounds, from the stored (rounded) values
    kb = kp.float().view(G, nb, C, D)
    w = vm.view(G, nb, C, 1).float()
    cnt = w.sum(2)
    centre = ((kb * w).sum(2) / cnt.clamp_min(1.0)).to(k.dtype)
    diff = (kb - centre.float()[:, :, None]) * w
    d2 = diff.pow(2)
    inflate = 1.0 + 1e-5
    radius = d2.sum(-1).max(-1).values.sqrt() * inflate
    radius = torch.where(cnt[..., 0] > 0, radius, torch.full_like(radius, EMPTY_RADIUS))
    rot = None
    if rotate:
        mu = kf[:, :N].mean(1, keepdim=True)
        xc = kf[:, :N] - mu
        cov = xc.transpose(1, 2) @ xc
        evals, evecs = torch.linalg.eigh(cov.double())
        rot = evecs.flip(-1).float().contiguous()  # (G, D, D), columns by descending variance
        del xc, cov
        d2 = (diff @ rot[:, None]).pow(2)
        del diff
    sub = d2.view(G, nb, C, n_sub, D // n_sub).sum(-1).max(2).values.sqrt() * inflate
    sub = torch.where(cnt > 0, sub, torch.zeros_like(sub))
    kmax = (kf[:, :N].norm(dim=-1).max(-1).values).view(B, Hkv).contiguous()
    return GPUBlockIndex(
        kp=kp.view(B, Hkv, Np, D).contiguous(), vp=vp.view(B, Hkv, Np, D).contiguous(),
        pos=pos.view(B, Hkv, Np).contiguous(), centre=centre.view(B, Hkv, nb, D).contiguous(),
        radius=radius.view(B, Hkv, nb).contiguous(),
        sub_radius=sub.view(B, Hkv, nb, n_sub).contiguous(), block=C, n_sub=n_sub,
        n_valid=N, kmax=kmax, rot=None if rot is None else rot.view(B, Hkv, D, D).contiguous())
