"""Prefill on the GPU: the block-sparse prefill kernel (PowerAttention and random BSR masks)
against SDPA and FlexAttention, and exact ReLU^alpha prefill with block skipping, in one run.

Shapes (issue 14): batch 1, 28 query heads, 4 KV heads, head dim 128, bfloat16; causal.

Sections (each guarded: a failure is recorded and the next one runs; a wall-clock budget
skips what does not fit):

1. ceilings: bf16 8192^3 matmul and a 1 GiB device copy, measured here;
2. exactness: the default prefill kernel (and its knobs) against the float32 dense masked
   reference on PowerAttention and random lists at odd sizes; relu_prefill against
   ``dense_relu_attention``;
3. sweep: prefill configs (tiles, warps, stages, order, GQA packing) at 32K PowerAttention;
4. block-sparse prefill table: 32K and 128K PowerAttention (block 256, window 5, sink 1) and
   random causal block masks (block 128): SDPA causal, compiled FlexAttention on the same
   mask, the first kernel, the new default and the best swept config; density, ideal
   (density x SDPA), share of ideal, effective TFLOP/s;
5. hybrid: PowerAttention's lists union 8 extra key blocks per query block (a stand-in for
   index-selected blocks), one BSR;
6. ReLU^alpha prefill: skip fraction and time on real SmolLM2 q/k/v (``--real``: a
   ``.npz`` with q (Hq, N, d), k, v (Hkv, N, d)), on synthetic isotropic and clustered keys;
   against our kernel with skipping off, a chunked dense torch ReLU^alpha and compiled
   FlexAttention with ``score_mod = alpha * log(relu(score - bias))`` (softmax of that is
   exactly ReLU^alpha normalised, so it is the same function);
7. end-to-end: a Llama-shaped decoder layer stack (random weights; hidden 3584, 28/4 heads,
   SwiGLU 18944, RoPE) prefill at 32K and 128K with SDPA, Flex and our kernel;
8. ``dense``: our kernel with every causal block listed against SDPA and Flex causal (the
   kernel's own dense rate, the ceiling of its share of ideal);
9. ``bounds`` (CPU is fine): on the real q/k, the fraction of causal (query tile, key block)
   pairs whose true maximum score is below tau, and the fractions four bounds prove (per
   row vs key box, per row vs key ball, box vs box, ball vs ball).

The real q/k/v file (42 MB, git-ignored) is cut from the SmolLM2 capture of
``hsr.testing.realdata`` (``bench/cache/smollm2_qk_32768.npz``) by ``--make-real``: layers
3 and 15, kv head 0 and its query heads 0-2.

Timing: median of ``triton.testing.do_bench``. Writes ``prefill_gpu.json`` and
``prefill_gpu_log.txt`` into ``--out`` (default ``$OUT`` or bench/out/) and prints a
table last. ``--smoke`` runs tiny sizes (also on the CPU under TRITON_INTERPRET=1, where
timings mean nothing).

Usage: python bench/bench_prefill_gpu.py [--real bench/cache/prefill_real_qkv.npz]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hsr.attention.dense import dense_relu_attention  # noqa: E402
from hsr.attention import power_pattern, to_block_mask  # noqa: E402
from hsr.attention.patterns import _device_block_lists  # noqa: E402
from hsr.kernels import block_sparse as bsm  # noqa: E402
from hsr.testing.references import block_sparse_reference, rel_err  # noqa: E402
from hsr.kernels.relu_prefill import relu_prefill  # noqa: E402

RES: dict = {"errors": [], "correctness": [], "sweep": [], "prefill": [], "hybrid": [],
             "relu": [], "e2e": []}
LOG: list = []
T0 = time.time()
ARGS = None
HQ, HKV, HD = 28, 4, 128


def log(msg):
    line = f"[{time.time() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


def guard(name):
    def deco(fn):
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except Exception as e:  # record and continue: one failure must not lose the run
                RES["errors"].append(dict(section=name, error=repr(e), tb=traceback.format_exc()[-2000:]))
                log(f"ERROR in {name}: {e!r}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return run
    return deco


def over_budget():
    return time.time() - T0 > ARGS.budget_s


def bench_ms(fn):
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=ARGS.warmup_ms, rep=ARGS.rep_ms, quantiles=[0.5])


def save():
    import triton
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, triton=triton.__version__,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                shapes=dict(B=1, Hq=28, Hkv=4, D=128, dtype="bfloat16"), smoke=ARGS.smoke,
                timing="median of triton.testing.do_bench")
    os.makedirs(ARGS.out, exist_ok=True)
    with open(os.path.join(ARGS.out, "prefill_gpu.json"), "w") as f:
        json.dump(dict(meta=meta, **RES), f, indent=1)
    with open(os.path.join(ARGS.out, "prefill_gpu_log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=dev(), dtype=torch.float32).to(dtype)


def causal_pairs(n):
    return n * (n + 1) / 2


# ------------------------------------------------------------------------------ 1. ceilings
@guard("ceilings")
def ceilings():
    if not torch.cuda.is_available():
        return
    a = rnd(8192, 8192)
    b = rnd(8192, 8192)
    t = bench_ms(lambda: a @ b)
    RES["matmul_tflops"] = 2 * 8192 ** 3 / (t * 1e-3) / 1e12
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = bench_ms(lambda: y.copy_(x))
    RES["copy_tb_s"] = 2 * x.numel() / (t * 1e-3) / 1e12
    log(f"ceilings: bf16 matmul {RES['matmul_tflops']:.0f} TFLOP/s, copy {RES['copy_tb_s']:.2f} TB/s")
    del a, b, x, y


# ------------------------------------------------------------------------------ 2. exactness
def _ref_rel(q, k, v, num, idx, bs, causal, out, heads):
    """rel. error of ``out`` against the float32 dense masked reference on a few heads."""
    g = q.shape[1] // k.shape[1]
    errs = []
    for h in heads:
        hl = h if num.shape[1] == q.shape[1] else (h // g if num.shape[1] == k.shape[1] else 0)
        ref, _ = block_sparse_reference(q[:, h:h + 1].float(), k[:, h // g:h // g + 1].float(),
                                        v[:, h // g:h // g + 1].float(), num[:, hl:hl + 1].cpu(),
                                        idx[:, hl:hl + 1].cpu(), block_size=bs, causal=causal)
        errs.append(rel_err(out[:, h:h + 1].float(), ref))
    return max(errs)


@guard("exactness")
def exactness():
    sizes = [(1000, 64), (3000, 128)] if ARGS.smoke else [(4133, 128), (8192, 256), (6001, 256)]
    Hq, Hkv, D = (4, 2, 64) if ARGS.smoke else (28, 4, 128)
    for n, bs in sizes:
        torch.manual_seed(n)
        q, k, v = rnd(1, Hq, n, D), rnd(1, Hkv, n, D), rnd(1, Hkv, n, D)
        pat = power_pattern(block_size=bs, window=3, sink=1)
        num, idx = _device_block_lists(pat, n, n, dev())
        heads = [0, Hq // 2 + 1, Hq - 1]
        for name, kw in [("default", {}), ("lpt", dict(order="lpt")), ("hpp2", dict(heads_per_tile=2)),
                         ("bm64_bn128", dict(block_m=64, block_n=min(128, bs))),
                         ("tma_fused", dict(block_n=min(128, bs), tma=True, fused=True))]:
            out = torch.full_like(q, float("nan"))
            lse = torch.empty(1, Hq, n, device=q.device)
            off = 0
            bsm._prefill_v2(q, k, v, out, lse, num, idx, block_size=bs, causal=True, scale=D ** -0.5,
                            row_offset=off, list_group=Hq, upcast=q.dtype == torch.float32 or
                            os.environ.get("TRITON_INTERPRET") == "1", **kw)
            e = _ref_rel(q, k, v, num, idx, bs, True, out, heads)
            RES["correctness"].append(dict(what=f"power prefill {name}", n=n, bs=bs, rel_err=e,
                                           finite=bool(torch.isfinite(out).all())))
            log(f"exact power n={n} bs={bs} {name}: rel {e:.2e}")
        # random per-head lists, M < N
        M = n - 333
        nkb = -(-n // bs)
        R = (n - 1) // bs - (n - M) // bs + 1
        g = torch.Generator().manual_seed(n)
        numr = torch.randint(0, nkb + 1, (1, Hq, R), generator=g, dtype=torch.int32)
        numr[0, 0, 0] = 0
        idxr = torch.stack([torch.randperm(nkb, generator=g) for _ in range(Hq * R)]).view(1, Hq, R, nkb).int()
        qq = q[:, :, n - M:].contiguous()
        out = bsm.block_sparse_attention(qq, k, v, numr.to(dev()), idxr.to(dev()), block_size=bs)
        e = _ref_rel(qq, k, v, numr, idxr, bs, True, out, heads)
        RES["correctness"].append(dict(what="random Hq lists, M<N", n=n, M=M, bs=bs, rel_err=e))
        log(f"exact random n={n} M={M}: rel {e:.2e}")
    # relu
    for n, alpha, bias in ([(700, 2, 0.5)] if ARGS.smoke else [(4133, 2, 1.0), (3001, 3, 0.5)]):
        torch.manual_seed(n)
        q, k, v = rnd(1, Hq, n, D), rnd(1, Hkv, n, D), rnd(1, Hkv, n, D)
        out, st = relu_prefill(q, k, v, alpha=alpha, bias=bias, return_stats=True)
        g = Hq // Hkv
        errs = []
        for h in (0, Hq - 1):
            ref = dense_relu_attention(q[:, h].float(), k[:, h // g].float(), v[:, h // g].float(),
                                       alpha=alpha, bias=bias, causal=True)
            errs.append(rel_err(out[:, h].float(), ref))
        RES["correctness"].append(dict(what="relu_prefill", n=n, alpha=alpha, bias=bias, rel_err=max(errs),
                                       kept=st["kept"], tiles=st["tiles"]))
        log(f"exact relu n={n}: rel {max(errs):.2e}, kept {st['kept']}/{st['tiles']}")


# ------------------------------------------------------------------------------ 3. sweep
SWEEP = [
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=2),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=4),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3, fused=True),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True, fused=True),
    dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
    dict(block_m=64, block_n=128, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3, order="natural"),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3, order="lpt"),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3),  # the first one again: spread
]


def run_v2(q, k, v, num, idx, bs, cfg, split=None):
    B, Hq, M, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)
    return bsm._prefill_v2(q, k, v, out, lse, num, idx, block_size=bs, causal=True, scale=D ** -0.5,
                           row_offset=0, list_group=Hq if num.shape[1] == 1 else Hq // num.shape[1],
                           upcast=os.environ.get("TRITON_INTERPRET") == "1", split=split, **cfg)[0]


@guard("sweep")
def sweep():
    n = 1024 if ARGS.smoke else 32768
    bs = 256
    torch.manual_seed(0)
    q, k, v = rnd(1, HQ, n, HD), rnd(1, HKV, n, HD), rnd(1, HKV, n, HD)
    pat = power_pattern(block_size=bs, window=5, sink=1)
    num, idx = _device_block_lists(pat, n, n, dev())
    ref = bsm.block_sparse_attention(q, k, v, num, idx, block_size=bs)
    best = None
    for cfg in SWEEP:
        if over_budget():
            break
        try:
            o = run_v2(q, k, v, num, idx, bs, cfg)
            e = rel_err(o.float(), ref.float())
            t = bench_ms(lambda: run_v2(q, k, v, num, idx, bs, cfg))
        except Exception as ex:  # a config that does not compile (shared memory) is skipped
            log(f"sweep {cfg}: failed {ex!r}"[:300])
            continue
        RES["sweep"].append(dict(cfg=cfg, ms=t, rel_vs_default=e))
        log(f"sweep 32K power {cfg}: {t:.3f} ms (rel vs default {e:.1e})")
        if e < 2e-2 and (best is None or t < best[0]):
            best = (t, cfg)
    RES["best_cfg"] = best[1] if best else SWEEP[0]
    log(f"best cfg {RES['best_cfg']}")


# ------------------------------------------------------------------------------ 4. table
def flex_fn():
    from torch.nn.attention.flex_attention import flex_attention
    if not hasattr(flex_fn, "f"):
        flex_fn.f = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return flex_fn.f


def random_lists(n, bs, density, seed):
    """Causal random BSR lists (Hkv heads), the diagonal always kept; density of causal blocks."""
    g = torch.Generator().manual_seed(seed)
    nkb = -(-n // bs)
    keep = torch.rand(HKV, nkb, nkb, generator=g) < density
    ar = torch.arange(nkb)
    keep |= (ar[:, None] == ar[None, :])
    keep &= ar[None, :] <= ar[:, None]
    num = keep.sum(-1).int()[None]
    order = torch.argsort((~keep).int() * nkb + ar, dim=-1)
    idx = order.int()[None]
    return num.to(dev()), idx.contiguous().to(dev())


def lists_to_block_mask(num, idx, n, bs):
    """FlexAttention BlockMask of causal lists as ``to_block_mask`` builds PowerAttention's: the
    diagonal block partial (mask_mod applied), every other kept block full; the mask_mod also
    encodes the block table, so that eager Flex (which applies mask_mod everywhere) agrees."""
    from torch.nn.attention.flex_attention import BlockMask
    g = HQ // num.shape[1]  # Flex wants list heads 1 or Hq
    num, idx = num.repeat_interleave(g, 1), idx.repeat_interleave(g, 1)
    B, H, R, mb = idx.shape
    nkb = -(-n // bs)
    valid = torch.arange(mb, device=idx.device) < num[..., None]
    table = torch.zeros(B, H, R, nkb + 1, dtype=torch.bool, device=idx.device)
    table.scatter_(3, torch.where(valid, idx.long(), nkb), True)
    table = table[..., :nkb]
    ar = torch.arange(R, device=idx.device)
    diag = torch.zeros_like(table)
    diag[:, :, ar, ar] = table[:, :, ar, ar]
    full = table & ~diag

    def compact(t):
        cnt = t.sum(-1).int()
        order = torch.argsort((~t).int() * (nkb + 1) + torch.arange(nkb, device=t.device), dim=-1)
        return cnt.contiguous(), order.int().contiguous()
    pn, pi = compact(diag)
    fn, fi = compact(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & table[b, h, q_idx // bs, kv_idx // bs]
    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(n, n))


def allowed_pairs(num, idx, n, bs, Hq):
    """Allowed (query, key) pairs summed over query heads (exact, from the lists)."""
    Bl, Hl, R, mb = idx.shape
    nkb = -(-n // bs)
    tot = 0.0
    numc, idxc = num.cpu(), idx.cpu()
    for hl in range(Hl):
        for r in range(R):
            c = int(numc[0, hl, r])
            blocks = idxc[0, hl, r, :c].long()
            qlo, qhi = r * bs, min((r + 1) * bs, n)
            for kb in blocks.tolist():
                klo, khi = kb * bs, min((kb + 1) * bs, n)
                if kb < r:
                    tot += (qhi - qlo) * (khi - klo)
                elif kb == r:
                    m = qhi - qlo
                    tot += m * (m + 1) / 2
    return tot * (Hq / Hl)


def prefill_row(name, n, bs, num, idx, bm, q, k, v, sdpa_ms):
    Hq = q.shape[1]
    pairs = allowed_pairs(num, idx, n, bs, Hq)
    density = pairs / (causal_pairs(n) * Hq)
    row = dict(mask=name, n=n, block_size=bs, density=density, sdpa_ms=sdpa_ms)
    flex = flex_fn()
    o_new = bsm.block_sparse_attention(q, k, v, num, idx, block_size=bs)
    if bm is not None:
        o_flex = flex(q, k, v, block_mask=bm, enable_gqa=True)
        row["new_vs_flex_rel_err"] = rel_err(o_new.float(), o_flex.float())
        row["flex_ms"] = bench_ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
    bsm._FORCE_V1 = True
    try:
        o_old = bsm.block_sparse_attention(q, k, v, num, idx, block_size=bs)
        row["old_vs_new_rel_err"] = rel_err(o_new.float(), o_old.float())
        row["old_ms"] = bench_ms(lambda: bsm.block_sparse_attention(q, k, v, num, idx, block_size=bs))
    finally:
        bsm._FORCE_V1 = False
    row["new_ms"] = bench_ms(lambda: bsm.block_sparse_attention(q, k, v, num, idx, block_size=bs))
    # the same two timed again, interleaved: their spread is the noise of this table
    bsm._FORCE_V1 = True
    try:
        row["old_ms_again"] = bench_ms(lambda: bsm.block_sparse_attention(q, k, v, num, idx, block_size=bs))
    finally:
        bsm._FORCE_V1 = False
    row["new_ms_again"] = bench_ms(lambda: bsm.block_sparse_attention(q, k, v, num, idx, block_size=bs))
    cfg = RES.get("best_cfg")
    if cfg:
        split = bsm.split_block_lists(num, idx, block_size=bs, n_keys=n, row_offset=0, causal=True)
        row["best_cfg_ms"] = bench_ms(lambda: run_v2(q, k, v, num, idx, bs, cfg))
        row["best_cfg_presplit_ms"] = bench_ms(lambda: run_v2(q, k, v, num, idx, bs, cfg, split=split))
        row["split_ms"] = bench_ms(lambda: bsm.split_block_lists(num, idx, block_size=bs, n_keys=n,
                                                                 row_offset=0, causal=True))
    flops = 4 * q.shape[-1] * pairs
    ours = min(row["new_ms"], row.get("best_cfg_ms", 1e30))
    row["ours_ms"] = ours
    row["ours_tflops"] = flops / (ours * 1e-3) / 1e12
    row["sdpa_tflops"] = 4 * q.shape[-1] * causal_pairs(n) * Hq / (sdpa_ms * 1e-3) / 1e12
    row["ideal_ms"] = density * sdpa_ms
    row["share_of_ideal"] = row["ideal_ms"] / ours
    row["ours_vs_sdpa"] = sdpa_ms / ours
    if "flex_ms" in row:
        row["ours_vs_flex"] = row["flex_ms"] / ours
        row["old_vs_flex"] = row["flex_ms"] / row["old_ms"]
    RES["prefill"].append(row)
    log("prefill " + json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}))


@guard("prefill")
def prefill_table():
    ns = [1024] if ARGS.smoke else [32768, 131072]
    for n in ns:
        if over_budget():
            log("budget: skipping rest of prefill")
            break
        torch.manual_seed(n)
        q, k, v = rnd(1, HQ, n, HD), rnd(1, HKV, n, HD), rnd(1, HKV, n, HD)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sdpa_ms = bench_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))
        pat = power_pattern(block_size=256, window=5, sink=1)
        num, idx = _device_block_lists(pat, n, n, dev())
        bm = to_block_mask(pat, n, device=dev())
        prefill_row("power", n, 256, num, idx, bm, q, k, v, sdpa_ms)
        RES["prefill"][-1]["pattern"] = pat.describe() if hasattr(pat, "describe") else str(pat)
        if n == 32768 or ARGS.smoke:
            for dens in (0.05, 0.2):
                numr, idxr = random_lists(n, 128, dens, seed=int(dens * 100))
                bmr = lists_to_block_mask(numr, idxr, n, 128)
                prefill_row(f"random {dens:.0%}", n, 128, numr, idxr, bmr, q, k, v, sdpa_ms)
        # hybrid: power lists union 8 extra (random, causal) key blocks per query block
        if not over_budget():
            hybrid(n, q, k, v, num, idx, sdpa_ms)
        del q, k, v
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


@guard("hybrid")
def hybrid(n, q, k, v, num, idx, sdpa_ms):
    bs = 256
    nkb = -(-n // bs)
    g = torch.Generator().manual_seed(7)
    numc, idxc = num.cpu(), idx.cpu()
    R = numc.shape[-1]
    rows = []
    for r in range(R):
        have = set(idxc[0, 0, r, :int(numc[0, 0, r])].tolist())
        extra = [b for b in torch.randperm(r + 1, generator=g).tolist() if b not in have][:8]
        rows.append(sorted(have | set(extra)))
    mb = max(len(x) for x in rows)
    hn = torch.tensor([len(x) for x in rows], dtype=torch.int32).view(1, 1, R)
    hi = torch.zeros(1, 1, R, mb, dtype=torch.int32)
    for r, x in enumerate(rows):
        hi[0, 0, r, :len(x)] = torch.tensor(x, dtype=torch.int32)
    hn, hi = hn.to(dev()), hi.to(dev())
    pairs = allowed_pairs(hn, hi, n, bs, q.shape[1])
    o = bsm.block_sparse_attention(q, k, v, hn, hi, block_size=bs)
    heads = [0, HQ - 1]
    row = dict(n=n, density=pairs / (causal_pairs(n) * q.shape[1]), sdpa_ms=sdpa_ms,
               hybrid_ms=bench_ms(lambda: bsm.block_sparse_attention(q, k, v, hn, hi, block_size=bs)),
               power_ms=bench_ms(lambda: bsm.block_sparse_attention(q, k, v, num, idx, block_size=bs)),
               extra_blocks_per_row=8, note="extra blocks are random causal blocks, a stand-in for "
                                            "index-selected ones")
    if n <= 32768:
        row["rel_err_vs_dense_ref"] = _ref_rel(q, k, v, hn, hi, bs, True, o, heads)
    row["hybrid_vs_sdpa"] = sdpa_ms / row["hybrid_ms"]
    row["hybrid_vs_power"] = row["power_ms"] / row["hybrid_ms"]
    RES["hybrid"].append(row)
    log("hybrid " + json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}))


# ------------------------------------------------------------------------------ 6. relu
def torch_relu_dense(q, k, v, alpha, bias_h, scale, chunk):
    """Dense causal ReLU^alpha in torch (bf16 matmuls, float32 weights), query chunks."""
    B, Hq, M, D = q.shape
    g = Hq // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = torch.empty_like(q)
    bias = bias_h.view(1, Hq, 1, 1)
    for i in range(0, M, chunk):
        hi = min(M, i + chunk)
        s = torch.matmul(q[:, :, i:hi], kr[:, :, :hi].transpose(-1, -2)).float() * scale - bias
        w = torch.relu(s) ** alpha
        qpos = torch.arange(i, hi, device=q.device)[:, None]
        w = w.masked_fill(torch.arange(hi, device=q.device)[None, :] > qpos, 0.0)
        den = w.sum(-1, keepdim=True)
        out[:, :, i:hi] = (torch.matmul(w.to(q.dtype), vr[:, :, :hi]).float()
                           / torch.where(den > 0, den, torch.ones_like(den))).to(q.dtype)
        del s, w
    return out


def taus_for(q, k, sel, scale, samples=1 << 20):
    """Per query head: the score quantile with a fraction ``sel`` of causal scores above it."""
    B, Hq, M, D = q.shape
    g = Hq // k.shape[1]
    N = k.shape[2]
    gen = torch.Generator(device=q.device).manual_seed(0)
    taus = []
    for h in range(Hq):
        i = torch.randint(0, M, (samples,), device=q.device, generator=gen)
        j = (torch.rand(samples, device=q.device, generator=gen) * (i + N - M + 1)).long()
        s = (q[0, h, i].float() * k[0, h // g, j].float()).sum(-1) * scale
        taus.append(torch.quantile(s[: 1 << 24], 1 - sel).item())
    return torch.tensor(taus, device=q.device)


def relu_case(label, q, k, v, alpha, sel, do_flex=True, do_torch=True):
    B, Hq, M, D = q.shape
    scale = D ** -0.5
    tau = taus_for(q, k, sel, scale)
    out, st = relu_prefill(q, k, v, alpha=alpha, bias=tau, return_stats=True)
    out_ns = relu_prefill(q, k, v, alpha=alpha, bias=tau, skip=False)
    row = dict(data=label, n=M, Hq=Hq, Hkv=k.shape[1], D=D, alpha=alpha, selectivity=sel,
               tau=[round(float(x), 4) for x in tau], tiles=st["tiles"], kept=st["kept"],
               skip_fraction=1 - st["kept"] / st["tiles"],
               rel_err_skip_vs_noskip=rel_err(out.float(), out_ns.float()))
    g = Hq // k.shape[1]
    h = Hq - 1
    nq = min(M, 2048)
    ref = dense_relu_attention(q[0, h, -nq:].float(), k[0, h // g].float(), v[0, h // g].float(), alpha=alpha,
                               bias=float(tau[h]), causal=True)
    row["rel_err_vs_dense_last2048"] = rel_err(out[0, h, -nq:].float(), ref)
    row["ours_ms"] = bench_ms(lambda: relu_prefill(q, k, v, alpha=alpha, bias=tau))
    row["ours_noskip_ms"] = bench_ms(lambda: relu_prefill(q, k, v, alpha=alpha, bias=tau, skip=False))
    row["vs_ours_noskip"] = row["ours_noskip_ms"] / row["ours_ms"]
    # smaller query tiles: tighter per-tile bounds, less efficient tiles
    _, st64 = relu_prefill(q, k, v, alpha=alpha, bias=tau, block_m=64, return_stats=True)
    row["bm64_skip_fraction"] = 1 - st64["kept"] / st64["tiles"]
    row["bm64_ms"] = bench_ms(lambda: relu_prefill(q, k, v, alpha=alpha, bias=tau, block_m=64))
    row["bm64_noskip_ms"] = bench_ms(lambda: relu_prefill(q, k, v, alpha=alpha, bias=tau, block_m=64, skip=False))
    if do_torch:
        chunk = max(256, min(4096, (1 << 31) // (Hq * M * 4)))
        o_t = torch_relu_dense(q, k, v, alpha, tau, scale, chunk)
        row["torch_rel_err"] = rel_err(o_t.float(), out.float())
        row["torch_dense_ms"] = bench_ms(lambda: torch_relu_dense(q, k, v, alpha, tau, scale, chunk))
        row["vs_torch_dense"] = row["torch_dense_ms"] / row["ours_ms"]
    if do_flex and torch.cuda.is_available():
        from torch.nn.attention.flex_attention import create_block_mask
        bm = create_block_mask(lambda b, hh, qi, ki: qi >= ki, None, None, M, M, device=dev())
        taud = tau.float()

        def relu_mod(score, b, hh, qi, ki):
            return alpha * torch.log(torch.relu(score - taud[hh]))
        flex = flex_fn()
        o_f = flex(q, k, v, score_mod=relu_mod, block_mask=bm, enable_gqa=True)
        fin = torch.isfinite(o_f)
        row["flex_rel_err_finite_rows"] = rel_err(torch.where(fin, o_f, 0).float(), torch.where(fin, out, 0).float())
        row["flex_nonfinite_frac"] = float((~fin).float().mean())
        row["flex_relu_ms"] = bench_ms(lambda: flex(q, k, v, score_mod=relu_mod, block_mask=bm, enable_gqa=True))
        row["flex_causal_softmax_ms"] = bench_ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
        row["vs_flex_relu"] = row["flex_relu_ms"] / row["ours_ms"]
    RES["relu"].append(row)
    log("relu " + json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}))


def clustered(n, H, D, n_clusters, noise, gen_seed, dtype=torch.bfloat16):
    g = torch.Generator(device=dev()).manual_seed(gen_seed)
    cent = torch.randn(H, n_clusters, D, device=dev(), generator=g) * 2.0
    # runs of 256 consecutive tokens share a cluster (topic-like locality)
    lab = torch.randint(0, n_clusters, (H, -(-n // 256)), device=dev(), generator=g).repeat_interleave(256, 1)[:, :n]
    x = torch.gather(cent, 1, lab[..., None].expand(H, n, D)) + noise * torch.randn(H, n, D, device=dev(), generator=g)
    return x.to(dtype)[None]


@guard("relu")
def relu_section():
    alpha = 2
    if ARGS.real and os.path.exists(ARGS.real):
        import numpy as np
        z = np.load(ARGS.real)
        q = torch.from_numpy(z["q"]).to(dev(), torch.bfloat16)[None]
        k = torch.from_numpy(z["k"]).to(dev(), torch.bfloat16)[None]
        v = torch.from_numpy(z["v"]).to(dev(), torch.bfloat16)[None]
        if ARGS.smoke:
            q, k, v = (x[:, :, :2048].contiguous() for x in (q, k, v))
        for sel in (0.001, 0.01, 0.05):
            if over_budget():
                break
            relu_case("real SmolLM2 layers 3,15 (d 64, 6/2 heads)", q, k, v, alpha, sel)
        del q, k, v
    else:
        log(f"relu: no real data at {ARGS.real!r}")
    n = 2048 if ARGS.smoke else 32768
    Hq, Hkv, D = (4, 2, 64) if ARGS.smoke else (28, 4, 128)
    for label in ("synthetic isotropic", "synthetic clustered"):
        if over_budget():
            break
        torch.manual_seed(1)
        if label.endswith("isotropic"):
            q, k, v = rnd(1, Hq, n, D), rnd(1, Hkv, n, D), rnd(1, Hkv, n, D)
        else:
            k = clustered(n, Hkv, D, 64, 0.3, 1)
            q = clustered(n, Hq, D, 64, 0.3, 2)
            v = rnd(1, Hkv, n, D)
        relu_case(f"{label} (d {D}, {Hq}/{Hkv} heads)", q, k, v, alpha, 0.01)


# ------------------------------------------------------------------------------ dense ceiling
@guard("dense")
def dense_ceiling():
    """Our kernel on every causal block (density 1) against SDPA and Flex causal: the rate
    the kernel reaches when sparsity plays no part (the ceiling of 'share of ideal')."""
    from torch.nn.attention.flex_attention import create_block_mask
    n = 2048 if ARGS.smoke else 32768
    torch.manual_seed(3)
    q, k, v = rnd(1, HQ, n, HD), rnd(1, HKV, n, HD), rnd(1, HKV, n, HD)
    flops = 4 * HD * causal_pairs(n) * HQ
    row = dict(n=n)
    for bs in (128, 256):
        nkb = -(-n // bs)
        num = (torch.arange(nkb, dtype=torch.int32) + 1).view(1, 1, nkb).to(dev())
        idx = torch.arange(nkb, dtype=torch.int32).expand(1, 1, nkb, nkb).contiguous().to(dev())
        for name, cfg in (("default", dict(block_m=128, block_n=128, num_warps=8, num_stages=3)),
                          ("fused", dict(block_m=128, block_n=128, num_warps=8, num_stages=3, fused=True))):
            t = bench_ms(lambda: run_v2(q, k, v, num, idx, bs, cfg))
            row[f"ours_bs{bs}_{name}_ms"] = t
            row[f"ours_bs{bs}_{name}_tflops"] = flops / (t * 1e-3) / 1e12
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t = bench_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))
    row.update(sdpa_ms=t, sdpa_tflops=flops / (t * 1e-3) / 1e12)
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device=dev())
    flex = flex_fn()
    t = bench_ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
    row.update(flex_ms=t, flex_tflops=flops / (t * 1e-3) / 1e12)
    RES["dense_ceiling"] = row
    log("dense " + json.dumps({a: (round(b_, 3) if isinstance(b_, float) else b_) for a, b_ in row.items()}))


# ------------------------------------------------------------------------------ bounds
def tile_bounds(q, k, scale, bm, bn):
    """Per causal (query tile, key block) pair of one head: the true max score and four upper
    bounds (all times ``scale``). q (M, D), k (N, D) float32, M == N. Returns a dict of
    (n_tiles, nkb) tensors and the causal-pair mask."""
    N, D = k.shape
    nqt, nkb = -(-N // bm), -(-N // bn)
    pad = lambda x, b: torch.cat([x, x[-1:].expand(-(-x.shape[0] // b) * b - x.shape[0], x.shape[1])])  # noqa: E731
    qb = pad(q, bm).view(nqt, bm, D)
    kb = pad(k, bn).view(nkb, bn, D)
    kmax, kmin = kb.amax(1), kb.amin(1)
    qmax, qmin = qb.amax(1), qb.amin(1)
    kc = kb.mean(1)
    kr = (kb - kc[:, None]).norm(dim=-1).amax(1)
    qc = qb.mean(1)
    qr = (qb - qc[:, None]).norm(dim=-1).amax(1)
    out = {}
    # true max, causal, in row chunks
    tm = torch.full((nqt, nkb), float("-inf"))
    rows_per = max(bm, (1 << 26) // N // bm * bm)
    for r0 in range(0, N, rows_per):
        r1 = min(N, r0 + rows_per)
        s = q[r0:r1] @ k.T
        s = s.masked_fill(torch.arange(N)[None, :] > torch.arange(r0, r1)[:, None], float("-inf"))
        s = torch.cat([s, s[:, -1:].expand(-1, nkb * bn - N)], 1) if nkb * bn > N else s
        sm = s.view(r1 - r0, nkb, bn).amax(2)
        for t in range(r0 // bm, -(-r1 // bm)):
            lo, hi = max(t * bm, r0) - r0, min((t + 1) * bm, r1) - r0
            tm[t] = torch.maximum(tm[t], sm[lo:hi].amax(0))
    out["oracle"] = tm
    qp, qn = q.clamp_min(0), q.clamp_max(0)
    rowbox = (qp @ kmax.T + qn @ kmin.T)
    out["row_vs_keybox"] = pad(rowbox, bm).view(nqt, bm, nkb).amax(1)
    rowball = q @ kc.T + q.norm(dim=-1, keepdim=True) * kr[None]
    out["row_vs_keyball"] = pad(rowball, bm).view(nqt, bm, nkb).amax(1)
    bb = torch.zeros(nqt, nkb)
    for d in range(D):
        c = torch.stack([qmin[:, d, None] * kmin[None, :, d], qmin[:, d, None] * kmax[None, :, d],
                         qmax[:, d, None] * kmin[None, :, d], qmax[:, d, None] * kmax[None, :, d]]).amax(0)
        bb += c
    out["box_vs_box"] = bb
    out["ball_vs_ball"] = (qc @ kc.T + qc.norm(dim=-1)[:, None] * kr[None] + qr[:, None] * kc.norm(dim=-1)[None]
                           + qr[:, None] * kr[None])
    t_last = torch.clamp((torch.arange(nqt) + 1) * bm, max=N) - 1
    causal = torch.arange(nkb)[None, :] * bn <= t_last[:, None]
    return {a: b_ * scale for a, b_ in out.items()}, causal


@guard("bounds")
def bounds_section():
    """Skip fractions of four bound types (and the true fraction) on the real q/k, CPU or GPU."""
    import numpy as np
    if not (ARGS.real and os.path.exists(ARGS.real)):
        log("bounds: no real data")
        return
    z = np.load(ARGS.real)
    q_all, k_all = torch.from_numpy(z["q"]).float(), torch.from_numpy(z["k"]).float()
    n = 4096 if ARGS.smoke else q_all.shape[1]
    Hq, Hkv = q_all.shape[0], k_all.shape[0]
    g = Hq // Hkv
    scale = q_all.shape[-1] ** -0.5
    rows = []
    for sel in (0.001, 0.01, 0.05):
        tau = taus_for(q_all[None, :, :n], k_all[None, :, :n], sel, scale)
        for bm, bn in ((128, 64), (64, 64), (64, 32)):
            tot = {}
            cnt = 0
            for h in range(Hq):
                b, causal = tile_bounds(q_all[h, :n], k_all[h // g, :n], scale, bm, bn)
                cnt += int(causal.sum())
                for name, ub in b.items():
                    tot[name] = tot.get(name, 0) + int(((ub < tau[h]) & causal).sum())
            row = dict(selectivity=sel, block_m=bm, block_n=bn, n=n, causal_pairs=cnt,
                       **{f"skip_{a}": c / cnt for a, c in tot.items()})
            rows.append(row)
            log("bounds " + json.dumps({a: (round(b_, 4) if isinstance(b_, float) else b_) for a, b_ in row.items()}))
    RES["bounds_real"] = rows


# ------------------------------------------------------------------------------ 7. e2e
def rope(x, pos, theta=1e6):
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device).float() / D)
    f = pos.float()[:, None] * inv[None]
    c, s = f.cos().to(x.dtype), f.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)


@guard("e2e")
def e2e():
    hid, Hq, Hkv, D, ffn, L = 3584, 28, 4, 128, 18944, 2
    if ARGS.smoke:
        hid, ffn, Hq, Hkv, D, L = 256, 512, 4, 2, 64, 1
    torch.manual_seed(0)
    W = [dict(qkv=rnd(hid, (Hq + 2 * Hkv) * D) * hid ** -0.5, o=rnd(Hq * D, hid) * (Hq * D) ** -0.5,
              up=rnd(hid, 2 * ffn) * hid ** -0.5, down=rnd(ffn, hid) * ffn ** -0.5) for _ in range(L)]
    pat = power_pattern(block_size=256, window=5, sink=1)
    for n in ([2048] if ARGS.smoke else [32768, 131072]):
        if over_budget():
            break
        x0 = rnd(n, hid)
        pos = torch.arange(n, device=dev())
        num, idx = _device_block_lists(pat, n, n, dev())
        bm = to_block_mask(pat, n, device=dev())
        flex = flex_fn()
        attn_t = {}

        def attn(kind, q, k, v):
            if kind == "sdpa":
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            if kind == "flex":
                return flex(q, k, v, block_mask=bm, enable_gqa=True)
            return bsm.block_sparse_attention(q, k, v, num, idx, block_size=256)

        def forward(kind, x):
            for w in W:
                h = torch.nn.functional.rms_norm(x, (hid,))
                qkv = h @ w["qkv"]
                q = qkv[:, :Hq * D].view(n, Hq, D).transpose(0, 1)[None]
                k = qkv[:, Hq * D:(Hq + Hkv) * D].view(n, Hkv, D).transpose(0, 1)[None]
                v = qkv[:, (Hq + Hkv) * D:].view(n, Hkv, D).transpose(0, 1)[None].contiguous()
                q, k = rope(q, pos).contiguous(), rope(k, pos).contiguous()
                a = attn(kind, q, k, v)
                x = x + a[0].transpose(0, 1).reshape(n, Hq * D) @ w["o"]
                h = torch.nn.functional.rms_norm(x, (hid,))
                gu = h @ w["up"]
                x = x + (torch.nn.functional.silu(gu[:, :ffn]) * gu[:, ffn:]) @ w["down"]
            return x
        row = dict(n=n, layers=L, hidden=hid, ffn=ffn, weights="random (timing only)")
        qa, ka, va = rnd(1, Hq, n, D), rnd(1, Hkv, n, D), rnd(1, Hkv, n, D)
        for kind in ("sdpa", "flex", "ours"):
            row[f"{kind}_stack_ms"] = bench_ms(lambda: forward(kind, x0))
            attn_t[kind] = bench_ms(lambda: attn(kind, qa, ka, va)) * L
            row[f"{kind}_attn_ms"] = attn_t[kind]
        row["sdpa_attn_share"] = attn_t["sdpa"] / row["sdpa_stack_ms"]
        row["ours_vs_sdpa_e2e"] = row["sdpa_stack_ms"] / row["ours_stack_ms"]
        row["ours_vs_flex_e2e"] = row["flex_stack_ms"] / row["ours_stack_ms"]
        RES["e2e"].append(row)
        log("e2e " + json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}))
        del x0, qa, ka, va


def make_real(src, dst, layers=(3, 15)):
    """Cut the real-data file of the ReLU section from a SmolLM2 capture."""
    import numpy as np
    z = np.load(src)
    q = np.concatenate([z[f"q_{L}"][0:3] for L in layers])
    k = np.concatenate([z[f"k_{L}"][0:1] for L in layers])
    v = np.concatenate([z[f"v_{L}"][0:1] for L in layers])
    np.savez(dst, q=q, k=k, v=v, layers=np.array(layers),
             note=np.array("SmolLM2-135M post-RoPE q/k/v (from a 32K capture): kv head 0 of each layer "
                           "and its query heads 0-2; kv head i = layer i's"))
    print(f"wrote {dst}: q {q.shape}, k {k.shape}")


def table():
    print(f"\n{'mask':12s} {'n':>7} {'dens':>6} {'sdpa':>8} {'flex':>7} {'old':>7} {'new':>7} {'best':>7} "
          f"{'vsSDPA':>6} {'vsFlex':>6} {'ideal%':>6} {'TF/s':>5}")
    for r in RES["prefill"]:
        print(f"{r['mask']:12s} {r['n']:>7} {r['density']:>6.3f} {r['sdpa_ms']:>8.2f} {r.get('flex_ms', 0):>7.2f} "
              f"{r.get('old_ms', 0):>7.2f} {r['new_ms']:>7.2f} {r.get('best_cfg_ms', 0):>7.2f} "
              f"{r['ours_vs_sdpa']:>6.1f} {r.get('ours_vs_flex', 0):>6.2f} {100 * r['share_of_ideal']:>6.0f} "
              f"{r['ours_tflops']:>5.0f}")
    for r in RES["relu"]:
        print(f"relu {r['data'][:34]:34s} sel {r['selectivity']:.3f} skip {r['skip_fraction']:.3f} "
              f"ours {r['ours_ms']:.2f} noskip {r['ours_noskip_ms']:.2f} torch {r.get('torch_dense_ms', 0):.1f} "
              f"flex {r.get('flex_relu_ms', 0):.2f}")
    for r in RES["e2e"]:
        print(f"e2e n={r['n']} sdpa {r['sdpa_stack_ms']:.1f} flex {r['flex_stack_ms']:.1f} ours {r['ours_stack_ms']:.1f} "
              f"(x{r['ours_vs_sdpa_e2e']:.2f} vs sdpa)")
    for e in RES["errors"]:
        print("ERROR", e["section"], e["error"][:200])


def main():
    global ARGS, HQ, HKV, HD
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "out")),
                    help="output folder (default: $OUT or bench/out/)")
    ap.add_argument("--real", default=os.path.join(os.path.dirname(__file__), "cache", "prefill_real_qkv.npz"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--make-real", default=None, metavar="CAPTURE",
                    help="write --real from a SmolLM2 capture (.npz with q_L, k_L, v_L) and exit")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--sections", default="ceilings,exactness,sweep,prefill,relu,e2e,dense")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ARGS = ap.parse_args()
    if ARGS.make_real:
        make_real(ARGS.make_real, ARGS.real)
        return
    if ARGS.smoke:
        HQ, HKV, HD = 4, 2, 64
    secs = ARGS.sections.split(",")
    for name, fn in [("ceilings", ceilings), ("exactness", exactness), ("sweep", sweep),
                     ("prefill", prefill_table), ("relu", relu_section), ("e2e", e2e),
                     ("dense", dense_ceiling), ("bounds", bounds_section)]:
        if name in secs and not over_budget():
            fn()
            save()
    save()
    table()


if __name__ == "__main__":
    main()
