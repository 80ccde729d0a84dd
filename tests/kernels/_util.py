import torch


def rand_lists(Bl, Hl, R, nkb, max_blocks, gen, empty_rows=True, full_rows=True):
    """Random BSR lists: random counts (some 0, some all blocks), distinct shuffled ids."""
    maxb = max(1, min(max_blocks, nkb))
    num = torch.randint(0, maxb + 1, (Bl, Hl, R), generator=gen, dtype=torch.int32)
    idx = torch.zeros(Bl, Hl, R, maxb, dtype=torch.int32)
    for b in range(Bl):
        for h in range(Hl):
            for r in range(R):
                idx[b, h, r] = torch.randperm(nkb, generator=gen)[:maxb].int()
    flat = num.view(-1)
    if empty_rows and flat.numel() > 1:
        flat[0] = 0
    if full_rows and flat.numel() > 2:
        flat[-1] = maxb
    return num, idx


def full_lists(Bl, Hl, R, nkb):
    num = torch.full((Bl, Hl, R), nkb, dtype=torch.int32)
    idx = torch.arange(nkb, dtype=torch.int32).expand(Bl, Hl, R, nkb).contiguous()
    return num, idx


def qkv(B, Hq, Hkv, M, N, D, dtype, device, seed=0):
    """Seeded ``q (B, Hq, M, D)``, ``k, v (B, Hkv, N, D)`` in ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=gen).to(dtype).to(device)
                 for s in ((B, Hq, M, D), (B, Hkv, N, D), (B, Hkv, N, D)))


def code_inputs(B, Hkv, G, M, N, D, dtype, device, lattice, seed):
    """Seeded ``q (B, Hkv*G, M, D)``, ``k, v (B, Hkv, N, D)``: integer-valued (every fp32 score
    exact, ties) or real-valued; key 0 is zero and keys 1 and 2 are duplicates."""
    g = torch.Generator().manual_seed(seed)
    if lattice:
        k = torch.randint(-3, 4, (B, Hkv, N, D), generator=g).double()
        q = torch.randint(-3, 4, (B, Hkv * G, M, D), generator=g).double()
    else:
        k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64) * 2
        q = torch.randn(B, Hkv * G, M, D, generator=g, dtype=torch.float64)
    k[:, :, 0] = 0  # a zero key
    k[:, :, 2] = k[:, :, 1]  # duplicates
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    return [x.to(dtype).to(device) for x in (q, k, v)]
