"""One-shot GPU benchmark of hsr.kernels (one H100/H200, < 8 minutes).

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 bench/bench_gpu.py [--out DIR] [--smoke]

Sections (each guarded: a failure is recorded in the JSON and the run goes on):

1. ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate.
2. correctness at real sizes against dense float32 torch references, fresh random inputs:
   ||out - ref|| / ||ref|| < 1e-2 (bf16); the GPU filter's key set vs brute force.
3. decode: dense SDPA vs the K+V bandwidth floor vs HSR decode (fused; and plan = search,
   run = attend, separately) at 1/5/10 % of keys above tau, on two synthetic key families
   (Gaussian mixture; "real-like": outlier dims + clusters + RoPE rotation). Timed with
   CUDA-graph replay (triton.testing.do_bench_cudagraph, median): a decode step is a few
   microseconds of GPU work and Python launch overhead would otherwise dominate.
4. block-sparse prefill: PowerAttention and random block masks, ours vs SDPA causal vs
   compiled FlexAttention on the same block lists (triton.testing.do_bench, median).

Writes ``<out>/gpu_results.json`` (and ``gpu_results.png``), prints a compact table last.
``--smoke`` runs every code path at toy sizes on the CPU (Triton interpreter) to check the
script itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from hsr.kernels import block_sparse_attention, build_index, hsr_decode, selected_attention  # noqa: E402
from hsr.testing.references import (block_sparse_reference, masked_attention, rel_err,  # noqa: E402
                                    selected_reference)

DEV = "cpu" if SMOKE else "cuda"
T0 = time.time()
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "400"))
# tight: GMM with noise 0.05/dim (blocks are small balls: the filter's best case);
# gmm: noise 0.35/dim (ball radius ~ distance between clusters: the bound prunes little);
# reallike: clusters + outlier dims + RoPE (positions smear the clusters).
FAMILIES = ("tight", "gmm", "reallike")
RES: dict = {"errors": [], "correctness": [], "decode": [], "prefill": [], "tuning": []}


def elapsed():
    return time.time() - T0


def log(*a):
    print(f"[{elapsed():6.1f}s]", *a, flush=True)


def guard(name):
    def deco(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # keep going; record
                tb = traceback.format_exc()
                log(f"ERROR in {name}: {e!r}")
                print(tb[-3000:], flush=True)
                RES["errors"].append({"where": name, "error": repr(e), "tb": tb[-3000:]})
                if DEV == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                return None
        return run
    return deco


def bench(fn, graph=False, rep=None):
    """Median milliseconds."""
    if SMOKE:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    if graph:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep or 30,
                                                           return_mode="median"))
        except Exception as e:  # fall back to plain events
            log(f"cudagraph timing failed ({e!r}); plain do_bench")
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep or 40, return_mode="median"))


# ----------------------------------------------------------------------------- patterns

def power_blocks(nqb, window=5):
    """PowerAttention lists: qb keeps kb <= qb with d = qb-kb < window, d a power of two,
    or kb == 0. Returns (num (nqb,), idx (nqb, maxb)) int32, ascending kb."""
    rows = []
    for qb in range(nqb):
        kb = np.arange(qb + 1)
        d = qb - kb
        keep = (d < window) | ((d & (d - 1)) == 0) | (kb == 0)
        rows.append(kb[keep])
    return _pack(rows)


def random_blocks(nqb, density, seed=0):
    """Causal random lists: each kb < qb kept with probability `density`, diagonal always."""
    rng = np.random.default_rng(seed)
    rows = []
    for qb in range(nqb):
        kb = np.arange(qb)
        rows.append(np.concatenate([kb[rng.random(qb) < density], [qb]]))
    return _pack(rows)


def _pack(rows):
    maxb = max(len(r) for r in rows)
    num = np.array([len(r) for r in rows], dtype=np.int32)
    idx = np.zeros((len(rows), maxb), dtype=np.int32)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = r
    return num, idx


def pairs_of(num, idx, bs):
    """Allowed (query, key) pairs of a causal block list with N = nqb * bs."""
    tot = 0
    for qb in range(len(num)):
        kb = idx[qb, :num[qb]]
        tot += int((kb < qb).sum()) * bs * bs + int((kb == qb).sum()) * bs * (bs + 1) // 2
    return tot


# ----------------------------------------------------------------------------- data

def gmm_keys(B, Hkv, N, D, gen, n_clusters=256, noise=0.35, rank=None, iso=0.05):
    """Gaussian mixture at random positions. rank=None: isotropic noise (the hard case in
    128 dims: every block's ball radius is ~ noise * sqrt(D)); rank=r: noise in a random
    r-dimensional subspace per kv head plus a little isotropic noise (low effective rank,
    as real keys have)."""
    cent = torch.randn(B, Hkv, n_clusters, D, device=DEV, generator=gen)
    lab = torch.randint(0, n_clusters, (B, Hkv, N), device=DEV, generator=gen)
    k = torch.gather(cent, 2, lab[..., None].expand(B, Hkv, N, D))
    if rank is None:
        k = k + noise * torch.randn(B, Hkv, N, D, device=DEV, generator=gen)
    else:
        U = torch.linalg.qr(torch.randn(B, Hkv, D, rank, device=DEV, generator=gen))[0]
        z = torch.randn(B, Hkv, N, rank, device=DEV, generator=gen)
        k = k + noise * math.sqrt(D / rank) * (z @ U.transpose(-1, -2))
        k = k + iso * torch.randn(B, Hkv, N, D, device=DEV, generator=gen)
    return k, cent


def rope(x, pos, base=10000.0):
    D = x.shape[-1]
    half = D // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / D)
    ang = pos.float()[:, None] * inv[None, :]
    c, s = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def reallike_keys(B, Hkv, N, D, gen, n_clusters=128):
    """Clusters + a few large outlier dims + RoPE rotation by position."""
    k, cent = gmm_keys(B, Hkv, N, D, gen, n_clusters=n_clusters, noise=0.5)
    out_dims = torch.randperm(D, device=DEV, generator=gen)[:4]
    offs = torch.zeros(D, device=DEV)
    offs[out_dims] = torch.tensor([8.0, -6.0, 5.0, -4.0], device=DEV)
    k = k + offs
    k = rope(k, torch.arange(N, device=DEV))
    return k, cent, offs


def make_decode_inputs(kind, B, Hq, Hkv, N, D, seed):
    gen = torch.Generator(device=DEV)
    gen.manual_seed(seed)
    G = Hq // Hkv
    if kind in ("gmm", "lowrank", "tight"):
        k, cent = gmm_keys(B, Hkv, N, D, gen, rank=8 if kind == "lowrank" else None,
                           noise=0.05 if kind == "tight" else 0.35)
        pick = torch.randint(0, cent.shape[2], (B, Hkv, G), device=DEV, generator=gen)
        qc = torch.gather(cent, 2, pick[..., None].expand(B, Hkv, G, D)).reshape(B, Hq, D)
        q = 1.5 * qc + 0.5 * torch.randn(B, Hq, D, device=DEV, generator=gen)
    else:
        k, cent, offs = reallike_keys(B, Hkv, N, D, gen)
        pick = torch.randint(0, cent.shape[2], (B, Hkv, G), device=DEV, generator=gen)
        qc = torch.gather(cent, 2, pick[..., None].expand(B, Hkv, G, D)).reshape(B, Hq, D)
        q = 1.5 * qc + 0.5 * torch.randn(B, Hq, D, device=DEV, generator=gen) + 0.3 * offs
        q = rope(q, torch.full((1,), N - 1, device=DEV))
    q = q[:, :, None, :]
    k = k.to(torch.bfloat16)
    v = torch.randn(B, Hkv, N, D, device=DEV, generator=gen).to(torch.bfloat16)
    return q.to(torch.bfloat16).contiguous(), k.contiguous(), v


def oracle_tau(q, k, fraction):
    """Per query row: the score quantile that keeps `fraction` of the keys (exact)."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    taus = []
    for b in range(B):
        sc = torch.einsum("hgd,hnd->hgn", q[b, :, 0].float().view(Hkv, G, D), k[b].float())
        kk = max(1, int(round(fraction * k.shape[2])))
        taus.append(torch.topk(sc, kk, dim=-1).values[..., -1].reshape(Hq))
    return torch.stack(taus)[..., None].contiguous()  # (B,Hq,1)


# ----------------------------------------------------------------------------- sections

@guard("ceilings")
def ceilings():
    n = (1 << 28) if not SMOKE else (1 << 16)  # 512 MiB of bf16
    x = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 2 / (t * 1e-3)
    m = 8192 if not SMOKE else 64
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    tm = bench(lambda: a @ b)
    flops = 2 * m ** 3 / (tm * 1e-3)
    RES["ceilings"] = {"copy_bytes_per_s": bw, "copy_ms": t, "matmul_flops": flops,
                       "matmul_ms": tm}
    log(f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    del x, y, a, b


def _corr(name, err, tol=1e-2, **kw):
    ok = bool(err < tol)
    RES["correctness"].append({"name": name, "rel_err": err, "tol": tol, "ok": ok, **kw})
    log(f"check {name}: rel_err {err:.2e} {'OK' if ok else 'FAIL'}")


@guard("correctness")
def correctness():
    S = 1 if not SMOKE else 0
    # --- block-sparse prefill, PowerAttention lists, checked on 3 heads
    N, bs = (16384, 128) if S else (256, 32)
    Hq, Hkv, D = (28, 4, 128) if S else (4, 1, 64)
    num, idx = power_blocks(N // bs)
    q = torch.randn(1, Hq, N, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    tn = torch.from_numpy(num)[None, None].to(DEV)
    ti = torch.from_numpy(idx)[None, None].to(DEV)
    out = block_sparse_attention(q, k, v, tn, ti, block_size=bs)
    heads = [0, Hq // 2, Hq - 1]
    G = Hq // Hkv
    errs = []
    for h in heads:
        mask = _dense_mask_from_lists(num, idx, bs, N)
        ref, _ = masked_attention(q[:, h:h + 1], k[:, h // G:h // G + 1], v[:, h // G:h // G + 1],
                                  mask[None, None])
        errs.append(rel_err(out[:, h:h + 1], ref))
        del ref
    _corr("block_sparse_prefill_power", max(errs), N=N, bs=bs)
    del q, k, v, out
    # --- decode path, random per-head lists, 128K
    N = 131072 if S else 512
    q = torch.randn(1, Hq, 1, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    nkb = N // bs
    gen = torch.Generator(device="cpu").manual_seed(1)
    numd = torch.randint(1, nkb // 4, (1, Hq, 1), generator=gen, dtype=torch.int32)
    idxd = torch.stack([torch.randperm(nkb, generator=gen)[:nkb // 4] for _ in range(Hq)])
    idxd = idxd.int()[None, :, None]
    out = block_sparse_attention(q, k, v, numd.to(DEV), idxd.to(DEV), block_size=bs)
    ref, _ = block_sparse_reference(q, k, v, numd, idxd, block_size=bs)
    _corr("block_sparse_decode_split_kv", rel_err(out, ref), N=N)
    # --- selected (CSR) softmax and relu, 32K slice
    Ns = min(N, 32768)
    lens = torch.randint(0, 2000 if S else 50, (Hq,), generator=gen)
    indptr = torch.zeros(Hq + 1, dtype=torch.int64)
    indptr[1:] = lens.cumsum(0)
    indices = torch.cat([torch.randperm(Ns, generator=gen)[:n] for n in lens.tolist()]).int()
    for kind in ("softmax", "relu"):
        o = selected_attention(q, k[:, :, :Ns], v[:, :, :Ns], indptr.to(DEV), indices.to(DEV),
                               kind=kind, bias=0.0)
        r, _ = selected_reference(q, k[:, :, :Ns], v[:, :, :Ns], indptr, indices, kind=kind)
        _corr(f"selected_{kind}", rel_err(o, r), N=Ns)
    del q, k, v
    # --- HSR index: exact filter set + fused decode, clustered keys
    for fam in FAMILIES:
        q, k, v = make_decode_inputs(fam, 1, Hq, Hkv, N, D, seed=3)
        index = build_index(k, v, block_size=32 if S else 16, n_sub=8)
        tau = oracle_tau(q, k, 0.05)
        indptr, _, ind = index.range_search(q, tau)
        sc = torch.einsum("hd,hnd->hn", q[0, :, 0].float(),
                          k[0].float().repeat_interleave(G, 0))
        # keys with score >= tau + band must be found; keys below tau - band must not
        band = 1e-3 * sc.abs().max().item()
        n_miss = n_extra = n_exact = 0
        for h in range(Hq):
            got = torch.zeros(N, dtype=torch.bool, device=DEV)
            got[ind[indptr[h]:indptr[h + 1]].long()] = True
            want = sc[h] >= tau[0, h, 0]
            n_miss += int((want & ~got & (sc[h] >= tau[0, h, 0] + band)).sum())
            n_extra += int((got & ~want & (sc[h] < tau[0, h, 0] - band)).sum())
            n_exact += int(torch.equal(got, want))
        RES["correctness"].append({"name": f"filter_exact_set_{fam}", "ok": n_miss == 0 and n_extra == 0,
                                   "missed": n_miss, "extra": n_extra,
                                   "rows_bit_identical": n_exact, "rows": Hq, "N": N})
        log(f"check filter {fam}: missed {n_miss}, extra {n_extra}, identical rows {n_exact}/{Hq}")
        scale = 1 / math.sqrt(D)
        bias = float(tau.mean()) * scale
        o = hsr_decode(q, index, kind="relu", alpha=2, bias=bias)
        w = torch.relu(sc * scale - bias) ** 2
        vf = v[0].float().repeat_interleave(G, 0)
        r = torch.einsum("hn,hnd->hd", w, vf) / w.sum(-1, keepdim=True)
        _corr(f"hsr_decode_relu_{fam}", rel_err(o[0, :, 0], r), N=N)
        o = hsr_decode(q, index, tau=tau, kind="softmax", kind="softmax", exact_set=True)
        s2 = (sc * scale).masked_fill(sc < tau[0, :, 0, None], float("-inf"))
        r = torch.einsum("hn,hnd->hd", torch.softmax(s2, -1), vf)
        _corr(f"hsr_decode_softmax_exactset_{fam}", rel_err(o[0, :, 0], r), N=N)
        del q, k, v, index, sc, vf


def _dense_mask_from_lists(num, idx, bs, N):
    nb = N // bs
    bm = torch.zeros(nb, nb, dtype=torch.bool)
    for qb in range(nb):
        bm[qb, torch.from_numpy(idx[qb, :num[qb]]).long()] = True
    m = bm.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    return (m & torch.ones(N, N, dtype=torch.bool).tril()).to(DEV)


@guard("decode")
def decode_section():
    S = not SMOKE
    bw = RES.get("ceilings", {}).get("copy_bytes_per_s", 3.0e12)
    D = 128 if S else 64
    configs = ([(1, 28, 4, 32768), (1, 28, 4, 131072), (8, 28, 4, 32768), (8, 28, 4, 131072),
                (1, 28, 4, 524288), (1, 32, 8, 131072), (8, 32, 8, 131072)] if S
               else [(1, 4, 1, 512), (2, 8, 2, 256)])
    C = 32 if S else 16
    for (B, Hq, Hkv, N) in configs:
        for fam in FAMILIES:
            if elapsed() > BUDGET_S * 0.55:
                log("decode: time budget reached, skipping the rest")
                return
            _decode_one(B, Hq, Hkv, N, D, C, fam, bw)
            if DEV == "cuda":
                torch.cuda.empty_cache()


@guard("decode_one")
def _decode_one(B, Hq, Hkv, N, D, C, fam, bw):
    q, k, v = make_decode_inputs(fam, B, Hq, Hkv, N, D, seed=B * 1000 + N % 997)
    kv_bytes = 2 * k.numel() * k.element_size()
    floor_ms = kv_bytes / bw * 1e3
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph=True)
    tb = time.time()
    index = build_index(k, v, block_size=C, n_sub=8)
    if DEV == "cuda":
        torch.cuda.synchronize()
    t_build = time.time() - tb
    row = {"B": B, "Hq": Hq, "Hkv": Hkv, "N": N, "D": D, "keys": fam, "block": C,
           "sdpa_ms": t_sdpa, "floor_ms": floor_ms, "kv_bytes": kv_bytes,
           "build_s": t_build, "summary_bytes": index.summary_bytes(), "by_fraction": []}
    log(f"decode B={B} {Hq}/{Hkv} N={N} {fam}: sdpa {t_sdpa * 1e3:.1f} us "
        f"(floor {floor_ms * 1e3:.1f} us), build {t_build:.2f} s")
    G = Hq // Hkv
    for frac in (0.01, 0.05, 0.10):
        tau = oracle_tau(q, k, frac)
        out, vis = hsr_decode(q, index, tau=tau, kind="softmax", count_visited=True)
        blocks_read = int(vis.sum())
        nb_total = B * Hkv * index.num_blocks
        read_frac = blocks_read / max(nb_total, 1)
        # real (non-pad) keys in the surviving blocks: pad rows are masked out of the loads
        plan0 = index.plan(q, tau)
        real_per_block = (index.pos.view(B, Hkv, -1, C) < N).sum(-1)  # (B,Hkv,nb)
        cnt = plan0.union_num_blocks.view(B, Hkv)
        ids = plan0.union_indices.view(B, Hkv, -1).long().clamp(0, index.num_blocks - 1)
        okm = torch.arange(ids.shape[-1], device=ids.device)[None, None] < cnt[..., None]
        real_keys = int((torch.gather(real_per_block, 2, ids) * okm).sum())
        sparse_bytes = (index.summary_bytes() + real_keys * 2 * D * k.element_size()
                        + blocks_read * C * 4 + q.numel() * 2)
        t_fused = bench(lambda: hsr_decode(q, index, tau=tau, kind="softmax", mode="fused"), graph=True)
        t_plan = bench(lambda: index.plan(q, tau), graph=True)
        plan = index.plan(q, tau)
        t_run = bench(lambda: index.run(q, plan), graph=True)
        t_planned = bench(lambda: hsr_decode(q, index, tau=tau, kind="softmax", mode="planned"), graph=True)
        t_relu = bench(lambda: hsr_decode(q, index, tau=tau, kind="softmax", kind="relu",
                                          bias=0.0), graph=True)
        # accuracy of the softmax output against dense (how much mass the kept set has)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
        err_dense = rel_err(out, ref)
        r = {"fraction": frac, "blocks_read_frac": read_frac,
             "rows_read_frac_of_N": blocks_read * C / (B * Hkv * N),
             "real_keys_read_frac": real_keys / (B * Hkv * N),
             "fused_ms": t_fused, "plan_ms": t_plan, "run_ms": t_run, "relu_fused_ms": t_relu,
             "planned_ms": t_planned, "best_ms": min(t_fused, t_planned),
             "speedup_vs_sdpa": t_sdpa / min(t_fused, t_planned), "sparse_bytes": sparse_bytes,
             "sparse_floor_ms": sparse_bytes / bw * 1e3,
             "achieved_bytes_per_s": sparse_bytes / (t_fused * 1e-3),
             "softmax_rel_err_vs_dense": err_dense}
        row["by_fraction"].append(r)
        log(f"   {frac:4.0%}: blocks read {read_frac:6.1%} (keys {r['real_keys_read_frac']:5.1%})  fused {t_fused * 1e3:7.1f} us "
            f"planned {t_planned * 1e3:7.1f} us ({r['speedup_vs_sdpa']:5.2f}x sdpa)  "
            f"plan {t_plan * 1e3:7.1f}  run {t_run * 1e3:7.1f}"
            f"  relu {t_relu * 1e3:7.1f}  sparse floor {r['sparse_floor_ms'] * 1e3:6.1f} us"
            f"  achieved {r['achieved_bytes_per_s'] / 1e12:4.2f} TB/s"
            f"  err vs dense {err_dense:.1e}")
        del ref
    # block size sweep on one configuration
    if N == (131072 if not SMOKE else 512) and B == 1 and Hkv == (4 if not SMOKE else 1) \
            and fam == "tight":
        sweep = []
        tau = oracle_tau(q, k, 0.05)
        for Cs in ((16, 64) if not SMOKE else (32,)):
            idx2 = build_index(k, v, block_size=Cs, n_sub=8)
            _, vis = hsr_decode(q, idx2, tau=tau, kind="softmax", count_visited=True)
            t = bench(lambda: hsr_decode(q, idx2, tau=tau, kind="softmax", mode="fused"), graph=True)
            sweep.append({"block": Cs, "fused_ms": t,
                          "blocks_read_frac": int(vis.sum()) / (B * Hkv * idx2.num_blocks)})
            log(f"   block {Cs}: fused {t * 1e3:.1f} us, blocks read "
                f"{sweep[-1]['blocks_read_frac']:.1%}")
            del idx2
        plan = index.plan(q, tau)
        for bn, nw in ((128, 4), (128, 8), (32, 4)):
            t = bench(lambda: index.run(q, plan, block_n=bn, num_warps=nw), graph=True)
            sweep.append({"block": C, "run_block_n": bn, "run_num_warps": nw, "run_ms": t})
            log(f"   run with BLOCK_N={bn} warps={nw}: {t * 1e3:.1f} us")
        idx3 = build_index(k, v, block_size=C, n_sub=8, method="none")
        _, vis = hsr_decode(q, idx3, tau=tau, kind="softmax", count_visited=True)
        t = bench(lambda: hsr_decode(q, idx3, tau=tau, kind="softmax", mode="fused"), graph=True)
        sweep.append({"block": C, "method": "none (positional pages)", "fused_ms": t,
                      "blocks_read_frac": int(vis.sum()) / (B * Hkv * idx3.num_blocks)})
        log(f"   positional pages: fused {t * 1e3:.1f} us, blocks read "
            f"{sweep[-1]['blocks_read_frac']:.1%}")
        row["block_sweep_5pct"] = sweep
    RES["decode"].append(row)
    del q, k, v, index


@guard("prefill_tune")
def tune_prefill():
    if SMOKE:
        RES["prefill_cfg"] = {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2}
        return
    N, bs, Hq, Hkv, D = 32768, 128, 28, 4, 128
    q = torch.randn(1, Hq, N, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    num, idx = power_blocks(N // bs)
    tn = torch.from_numpy(num)[None, None].to(DEV)
    ti = torch.from_numpy(idx)[None, None].to(DEV)
    best = None
    # (BLOCK_M, BLOCK_N, warps, stages, K row-major, block pointers, flat loop)
    for (bm, bn, nw, ns, kr, bp, fl) in [
            (64, 64, 4, 3, True, False, False), (64, 64, 4, 3, True, False, True),
            (128, 64, 8, 3, True, False, True), (128, 128, 8, 3, True, False, True),
            (128, 128, 8, 2, True, False, True), (128, 64, 8, 4, True, False, True),
            (64, 64, 4, 4, True, False, True), (64, 128, 4, 3, True, False, True),
            (128, 32, 4, 4, True, False, True), (128, 64, 8, 3, True, True, True),
            (64, 32, 4, 4, True, False, True)]:
        try:
            t = bench(lambda: block_sparse_attention(q, k, v, tn, ti, block_size=bs, block_m=bm,
                                                     block_n=bn, num_warps=nw, num_stages=ns,
                                                     k_rowmajor=kr, block_ptr=bp, flat=fl))
        except Exception as e:
            RES["tuning"].append({"cfg": [bm, bn, nw, ns, kr, bp, fl], "error": repr(e)[:300]})
            continue
        RES["tuning"].append({"cfg": [bm, bn, nw, ns, kr, bp, fl], "ms": t})
        log(f"tune prefill 32K power: BLOCK_M={bm} BLOCK_N={bn} warps={nw} stages={ns} "
            f"k_rowmajor={kr} block_ptr={bp} flat={fl}: {t:.3f} ms")
        if best is None or t < best[0]:
            best = (t, bm, bn, nw, ns, kr, bp, fl)
    RES["prefill_cfg"] = {"block_m": best[1], "block_n": best[2], "num_warps": best[3],
                          "num_stages": best[4], "k_rowmajor": best[5], "block_ptr": best[6],
                          "flat": best[7]}


@guard("prefill")
def prefill_section():
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    cfg = RES.get("prefill_cfg", {})
    mm = RES.get("ceilings", {}).get("matmul_flops", 7.9e14)
    Hq, Hkv, D = (28, 4, 128) if not SMOKE else (4, 1, 64)
    if SMOKE:
        flex = flex_attention
    else:
        torch._dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    ctxs = [16384, 32768, 65536, 131072] if not SMOKE else [256, 512]
    for N in ctxs:
        if elapsed() > BUDGET_S:
            log("prefill: time budget reached, skipping the rest")
            break
        _prefill_one(N, Hq, Hkv, D, cfg, mm, flex, BlockMask, causal)
        if DEV == "cuda":
            torch.cuda.empty_cache()


@guard("prefill_one")
def _prefill_one(N, Hq, Hkv, D, cfg, mm, flex, BlockMask, causal):
    q = torch.randn(1, Hq, N, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                          enable_gqa=True),
                   rep=100 if N <= 32768 else 300)
    dense_pairs = N * (N + 1) // 2
    log(f"prefill N={N}: sdpa causal {t_sdpa:.2f} ms "
        f"({4 * D * dense_pairs * Hq / (t_sdpa * 1e-3) / 1e12:.0f} TFLOP/s)")
    bsz = 128 if not SMOKE else 32
    masks = [("power", bsz, power_blocks(N // bsz)),
             ("random10", bsz, random_blocks(N // bsz, 0.10, seed=N))]
    if not SMOKE:
        masks.insert(1, ("power", 256, power_blocks(N // 256)))
    for name, bs, (num, idx) in masks:
        nqb = N // bs
        tn = torch.from_numpy(num)[None, None].to(DEV)
        ti = torch.from_numpy(idx)[None, None].to(DEV)
        pairs = pairs_of(num, idx, bs)
        density = pairs / dense_pairs
        kw = dict(block_m=cfg.get("block_m"), block_n=cfg.get("block_n"),
                  num_warps=cfg.get("num_warps"), num_stages=cfg.get("num_stages"),
                  k_rowmajor=cfg.get("k_rowmajor", True), block_ptr=cfg.get("block_ptr", False),
                  flat=cfg.get("flat", True))
        t_ours = bench(lambda: block_sparse_attention(q, k, v, tn, ti, block_size=bs, **kw))
        # FlexAttention: diagonal blocks partial (mask_mod applied), the rest full
        diag = idx == np.arange(nqb)[:, None]
        valid = np.arange(idx.shape[1])[None, :] < num[:, None]
        pn = (diag & valid).sum(1).astype(np.int32)
        # indices padded to one column per key block (BlockMask's q-block transpose
        # scatters by block id into that last dimension)
        pi = np.zeros((nqb, nqb), dtype=np.int32)
        pi[:, 0] = np.arange(nqb)
        fn_ = (~diag & valid).sum(1).astype(np.int32)
        fi = np.zeros((nqb, nqb), dtype=np.int32)
        for qb in range(nqb):
            r = idx[qb, :num[qb]]
            r = r[r != qb]
            fi[qb, :len(r)] = r
        t_flex = None
        try:
            bmask = BlockMask.from_kv_blocks(
                torch.from_numpy(pn)[None, None].to(DEV), torch.from_numpy(pi)[None, None].to(DEV),
                torch.from_numpy(fn_)[None, None].to(DEV), torch.from_numpy(fi)[None, None].to(DEV),
                BLOCK_SIZE=bs, mask_mod=causal, seq_lengths=(N, N))
            o_flex = flex(q, k, v, block_mask=bmask, enable_gqa=True)
            o_ours = block_sparse_attention(q, k, v, tn, ti, block_size=bs, **kw)
            agree = rel_err(o_ours, o_flex.float())
            t_flex = bench(lambda: flex(q, k, v, block_mask=bmask, enable_gqa=True))
        except Exception as e:
            agree = None
            RES["errors"].append({"where": f"flex N={N} {name}", "error": repr(e)[:500]})
            log(f"flex failed: {e!r}"[:300])
        flops = 4 * D * pairs * Hq
        ideal = t_sdpa * density
        r = {"N": N, "mask": name, "block_size": bs, "density": density, "sdpa_ms": t_sdpa,
             "ours_ms": t_ours, "flex_ms": t_flex, "ours_vs_sdpa": t_sdpa / t_ours,
             "ours_vs_flex": (t_flex / t_ours) if t_flex else None,
             "ideal_ms": ideal, "fraction_of_ideal": ideal / t_ours,
             "ours_tflops": flops / (t_ours * 1e-3) / 1e12,
             "flex_tflops": (flops / (t_flex * 1e-3) / 1e12) if t_flex else None,
             "ceiling_tflops": mm / 1e12, "ours_vs_flex_rel_diff": agree}
        RES["prefill"].append(r)
        log(f"   {name:8s} bs={bs} density {density:6.2%}: ours {t_ours:7.3f} ms, flex "
            f"{t_flex if t_flex else float('nan'):7.3f} ms, sdpa/ours {t_sdpa / t_ours:5.1f}x, "
            f"flex/ours {r['ours_vs_flex'] or float('nan'):4.2f}x, ideal frac "
            f"{r['fraction_of_ideal']:.0%}, {r['ours_tflops']:.0f} TFLOP/s")
    del q, k, v


def plot(path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    labels, vals = [], []
    for row in RES["decode"]:
        for r in row["by_fraction"]:
            labels.append(f"B{row['B']} {row['Hq']}/{row['Hkv']} {row['N'] // 1024}K "
                          f"{row['keys'][:4]} {int(r['fraction'] * 100)}%")
            vals.append(r["speedup_vs_sdpa"])
    ax.barh(range(len(vals)), vals, color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(8.0, color="r", lw=0.8, ls="--")
    ax.set_yticks(range(len(vals)))
    ax.set_yticklabels(labels, fontsize=5)
    ax.set_xlabel("SDPA decode time / HSR decode time (best of fused, planned)")
    ax.set_title("decode (bf16, D=128)")
    ax = axes[1]
    for key, style in (("sdpa_ms", "k-o"), ("ours_ms", "b-s"), ("flex_ms", "g-^")):
        for mask, bs, ls in (("power", 128, "-"), ("random10", 128, ":")):
            rows = [r for r in RES["prefill"] if r["mask"] == mask and r["block_size"] == bs]
            if not rows or (key == "sdpa_ms" and mask != "power"):
                continue
            xs = [r["N"] for r in rows if r[key]]
            ys = [r[key] for r in rows if r[key]]
            ax.plot(xs, ys, style[:-2] + ls + style[-1], label=f"{key[:-3]} {mask}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context")
    ax.set_ylabel("ms")
    ax.set_title("prefill, 28/4 heads, block 128")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table():
    print("\n==== summary ====")
    c = RES.get("ceilings", {})
    if c:
        print(f"copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s | bf16 matmul "
              f"{c['matmul_flops'] / 1e12:.0f} TFLOP/s")
    for r in RES["correctness"]:
        print(f"check {r['name']:34s} {'OK ' if r['ok'] else 'BAD'} "
              f"{r.get('rel_err', r.get('missed', ''))}")
    print(f"{'decode':28s} {'sdpa':>7s} {'floor':>7s} | frac  keys   fused planned x-sdpa   "
          f"plan    run  sp.floor")
    for row in RES["decode"]:
        for r in row["by_fraction"]:
            print(f"B{row['B']} {row['Hq']}/{row['Hkv']} {row['N'] // 1024:4d}K {row['keys']:9s}"
                  f" {row['sdpa_ms'] * 1e3:6.1f}u {row['floor_ms'] * 1e3:6.1f}u | "
                  f"{r['fraction']:4.0%} {r['real_keys_read_frac']:5.1%} {r['fused_ms'] * 1e3:6.1f}u "
                  f"{r['planned_ms'] * 1e3:6.1f}u "
                  f"{r['speedup_vs_sdpa']:5.2f}x {r['plan_ms'] * 1e3:6.1f}u {r['run_ms'] * 1e3:6.1f}u"
                  f" {r['sparse_floor_ms'] * 1e3:6.1f}u")
    print(f"{'prefill':22s} dens    sdpa     ours     flex  sdpa/o flex/o ideal TFLOP/s")
    for r in RES["prefill"]:
        fl = r["flex_ms"] if r["flex_ms"] else float("nan")
        print(f"{r['N'] // 1024:4d}K {r['mask']:8s} bs{r['block_size']:3d} {r['density']:6.2%} "
              f"{r['sdpa_ms']:8.2f} {r['ours_ms']:8.3f} {fl:8.3f} {r['ours_vs_sdpa']:6.1f} "
              f"{(r['ours_vs_flex'] or float('nan')):6.2f} {r['fraction_of_ideal']:5.0%} "
              f"{r['ours_tflops']:6.0f}")
    if RES["errors"]:
        print(f"{len(RES['errors'])} errors recorded: " + "; ".join(e["where"] for e in RES["errors"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"),
                    help="output folder (default: $OUT or bench/out/)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    args = ap.parse_args()
    skip = set(args.skip.split(",")) if args.skip else set()
    os.makedirs(args.out, exist_ok=True)
    RES["meta"] = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": SMOKE, "timing": "decode: do_bench_cudagraph median; prefill: do_bench median",
    }
    log(RES["meta"])
    torch.manual_seed(0)
    path = os.path.join(args.out, "gpu_results.json")

    def dump():
        RES["meta"]["total_s"] = elapsed()
        with open(path, "w") as f:
            json.dump(RES, f, indent=1)

    if "ceilings" not in skip:
        ceilings()
    if "correctness" not in skip:
        correctness()
        dump()
    if "decode" not in skip:
        decode_section()
        dump()
    if "prefill" not in skip:
        tune_prefill()
        prefill_section()
    dump()
    plot(os.path.join(args.out, "gpu_results.png"))
    table()
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
