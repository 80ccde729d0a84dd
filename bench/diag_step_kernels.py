"""Where a captured decode step's time goes: the GPU time of each kernel of one replay of
``DecodeStep`` (add one token + filter + attend + merge, inputs in place) against the step's
time in a loop, at B 1 and 8, 16K and 128K, on the carried real keys. The difference is the
step's idle time: launch gaps and each kernel's ramp, what no kernel's speed removes.

    python bench/diag_step_kernels.py --out bench/results/step_kernels.json

d 128 with 28/4 heads (two real SmolLM2 heads per kv head, as ``bench_decode_loop.py``) and
the 8B shape's 32/8 (the real kv heads twice, four of each head's query rows); each row keeps
its top 1%.

``--sweep``: at B 1, the fused step (add + filter-and-attend + merge, one graph) over the
filter's launch parameters — programs per SM, keys per tile, warps — each timed in the same
loop; the defaults were chosen on the older, unfused filter. ``--prepare-sweep``: the same
over the parameters of the step's first launch (the query's rotation and the add), with each
kernel's GPU time. ``--variants``: the step in other forms (``VARIANTS``: three launches and two (the
query's Hadamard transform inside the filter, the add in its launch), the default
(``CodeKVCache.step_form``), the Haar rotation, the step without its add, plain launches), at
every configuration (``Hkv:n:B``, or ``3:n:B:64`` for d 64).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402
from bench_decode_loop import capture, make_inputs, scores, time_loop  # noqa: E402

from hsr.kernels.codes import CodeKVCache  # noqa: E402


def inputs(real, Hkv, n, B, dev, D=128):
    """q (B, Hq, 1, 128), k/v (B, Hkv, n, 128) bf16: the decode-loop bench's 28/4
    (``make_inputs``), or 32/8 from it: kv head i is its head i % 4, with four of that head's
    seven query rows; ``D=64``: the decode-loop bench's 9/3 heads of 64; ``D=256``: 14/2 heads,
    kv head i the real heads 2i and 2i + 1 side by side, query row j of its group their rows j
    side by side (each score the sum of two real heads' scores)."""
    if D != 128:
        return make_inputs(real, D, n, B, 0, dev)
    q, k, v = make_inputs(real, 128, n, B, 0, dev)
    if Hkv == 4:
        return q, k, v
    rows = [(i % 4) * 7 + j for i in range(Hkv) for j in range(4)]
    return q[:, rows].contiguous(), k.repeat(1, Hkv // 4, 1, 1), v.repeat(1, Hkv // 4, 1, 1)


def kernel_times(fn, calls):
    """GPU µs per call of each kernel ``fn`` launches (a graph replay's kernels included)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":  # a kernel (or memcpy/memset) run on the GPU
            per[ev.name] = per.get(ev.name, 0.0) + ev.time_range.elapsed_us() / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def step_with(cache, q, tau, knew, vnew, n0, steps, launch, kernels=False, add=True):
    """µs per step of the fused step (add + filter-and-attend + merge) in one graph with the
    launch parameters ``launch`` (``CodeKVCache._fused``); with ``kernels``, also each kernel's
    GPU µs in a replay. ``add=False``: the same step without its add (the cache stays at n0)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    g = capture(lambda: cache._fused(q, tau, bias=0.0, kind="softmax", alpha=2, scale=None, certify=False,
                                     out=out, lse=lse, add=(knew, vnew) if add else None, launch=launch))
    cache.crop(n0)

    def body(i):
        g.replay()
        if add:
            cache.advanced(1)

    t = 1e3 * time_loop(body, steps, 2, lambda: cache.crop(n0))
    last = out.clone()  # the answer at the final length, for comparing launches
    kt = None
    if kernels:
        cache.crop(n0)
        kt = {name: round(x, 2) for name, x in kernel_times(lambda: body(0), steps).items()}
    cache.crop(n0)
    return t, kt, last


def sweep(cache, q, tau, knew, vnew, n0, steps):
    """The fused step over the filter's launch parameters: a list of rows."""
    rows = []
    for pps in (1, 2, 4, 8):
        for bn in (64, 128, 256):
            for nw in (4, 8):
                launch = dict(programs_per_sm=pps, block_n=bn, num_warps=nw)
                t, _, _ = step_with(cache, q, tau, knew, vnew, n0, steps, launch)
                rows.append(dict(launch, step_us=t))
    best = sorted(rows, key=lambda r: r["step_us"])[:4]
    print("  fused step sweep, best (pps, block_n, warps, us):",
          [(r["programs_per_sm"], r["block_n"], r["num_warps"], round(r["step_us"], 1)) for r in best], flush=True)
    return rows


def prepare_sweep(cache, q, tau, knew, vnew, n0, steps):
    """The fused step over the parameters of its first launch (query rotation + add): rotated
    query columns per program, warps, key columns per pass of the add; each with the kernels'
    GPU µs."""
    t, kt, ref = step_with(cache, q, tau, knew, vnew, n0, steps, {}, kernels=True)
    rows = [dict(default=True, step_us=t, prepare_us=kt.get("_prepare_kernel"), kernels_us=kt)]
    print(f"  default: step {t:.1f} us, kernels {kt}", flush=True)
    for br in (16, 32, 64, 128):
        for nw in (2, 4, 8):
            for bj in (32, 128):
                prep = dict(block_r=br, num_warps=nw, block_j=bj)
                t, kt, out = step_with(cache, q, tau, knew, vnew, n0, steps, dict(prepare=prep), kernels=True)
                diff = float((out.float() - ref.float()).abs().max())
                rows.append(dict(prep, step_us=t, prepare_us=kt.get("_prepare_kernel"), kernels_us=kt,
                                 max_diff_vs_default=diff))
    best = sorted(rows[1:], key=lambda r: r["step_us"])[:4]
    print("  prepare sweep, best (block_r, warps, block_j, step us, prepare us, max diff):",
          [(r["block_r"], r["num_warps"], r["block_j"], round(r["step_us"], 1), r["prepare_us"],
            r["max_diff_vs_default"]) for r in best], flush=True)
    return rows


THREE = dict(rotate_inside=False, add_in_filter=False)
TWO = dict(rotate_inside=True, add_in_filter=True)
VARIANTS = [("three launches (the Hadamard rotation, the default cache)", THREE, True),
            ("two launches: the query's transform in the filter, the add in its launch", TWO, True),
            ("the default (CodeKVCache.step_form)", {}, True),
            ("the add in the filter's launch, the query rotated apart", dict(add_in_filter=True, rotate_inside=False),
             True),
            ("the Haar rotation (its codes), three launches", dict(THREE, rotation="haar"), True),
            ("three launches without the add", THREE, False),
            ("three launches, programmatic dependent launches off", dict(THREE, pdl=False), True),
            ("three launches again (drift)", THREE, True)]
# measured and dropped from the list (H100, 2026-12-06, bench/results/step_variants_h100_2026-12-06.json
# and _run2): the rotation inside the filter with the add in its own launch (+20 us at 128K),
# survivors attended 16, 32 or 128 at a time (+9, +5, +15 us), the add after the first column
# block's rotation (the default before: +3 us), the add apart with 8 warps (within 1 us);
# (H100, step_variants_h100_2026-12-06_pdl.json) the filter pipelined 2 or 4 deep (+7, +6 us
# at 128K), L2 prefetches of a filter program's first 4 or 8 tiles before its dependent-launch
# wait (+0.1, +0.9 us); (step_variants_h100_2026-12-06_codes_first.json) the tile's scores as
# codes @ query parts, keys the MMA's M (+3.1 us at 128K B 1, +2.0 at 16K, -3.1 at B 8);
# (step_variants_h100_2026-12-06_hoist.json) the filter's full tiles without masks, their
# offsets shared (17% fewer instructions a tile; +0.7 us at 128K B 1, +1.5 at 16K, +5.6 at B 8);
# (step_variants_h100_2026-12-06_tiles.json) two key tiles a filter iteration (+5.4 us at 128K B 1,
# +1.7 at 16K, +25.8 at B 8; -1.2 at d 64 128K B 1); (step_variants_h100_2026-12-06_apart.json) two
# launches with the add's program a function apart, noinline (49.8 against 50.9 us at 128K B 1, three
# launches 47.0; 19.8 against 19.9 at 16K)


def variants(cache, q, tau, knew, vnew, n0, steps):
    """The fused step in other forms (``VARIANTS``: other launches, another rotation, the step
    without its add), each with its kernels' GPU µs and its answer against the default's (at
    the same final length; another rotation's codes keep the same keys)."""
    rows, ref = [], None
    for name, launch, add in VARIANTS:
        launch = dict(launch)
        rotation = launch.pop("rotation", cache.rotation)
        # another rotation: a cache of its own over the same keys (other codes, the same kept set)
        c = cache if rotation == cache.rotation else CodeKVCache(
            cache.k[:, :, :n0], cache.v[:, :, :n0], capacity=cache.capacity, rotation=rotation)
        try:
            t, kt, out = step_with(c, q, tau, knew, vnew, n0, steps, launch, kernels=True, add=add)
        except Exception as e:  # noqa: BLE001 - recorded with the variant, the others still run
            rows.append(dict(variant=name, launch=dict(launch), rotation=rotation, error=f"{type(e).__name__}: {e}"))
            print(f"  {name}: failed: {rows[-1]['error']}", flush=True)
            c.crop(n0)
            continue
        ref = out if ref is None else ref
        row = dict(variant=name, launch=dict(launch), rotation=rotation, add=add, step_us=t, kernels_us=kt,
                   kernels_sum_us=sum(kt.values()))
        if add:
            row["max_diff_vs_default"] = float((out.float() - ref.float()).abs().max())
        rows.append(row)
        print(f"  {name}: step {t:.1f} us, kernels {kt}", flush=True)
    return rows


def one(real, Hkv, n, B, steps, reps, dev, do_sweep=False, do_prepare=False, do_variants=False, D=128):
    q, k, v = inputs(real, Hkv, n, B, dev, D)
    n0 = n - steps
    tau = torch.quantile(scores(q, k[:, :, :n0])[0, :, 0], 0.99, dim=-1)
    tau = tau[None, :, None].expand(B, -1, 1).contiguous()
    cache = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n)
    knew, vnew = k[:, :, n0:n0 + 1].contiguous(), v[:, :, n0:n0 + 1].contiguous()
    step = cache.decode_step(q, knew, vnew, kind="softmax", tau=tau)
    step(q, knew, vnew)  # eager first call, then the capture
    reset = lambda: cache.crop(n0)  # noqa: E731
    row = dict(D=D, Hq=q.shape[1], Hkv=Hkv, n=n, B=B, steps=steps,
               step_us=1e3 * time_loop(lambda i: step(), steps, reps, reset))
    cache.crop(n0)
    kt = kernel_times(lambda: step(), steps)  # steps replays: the cache grows to n again
    row["kernels_us"] = {name: round(t, 2) for name, t in kt.items()}
    row["kernels_sum_us"] = sum(kt.values())
    row["idle_us"] = row["step_us"] - row["kernels_sum_us"]
    row["codes_bytes"] = cache.keys_read_bytes()
    for flag, key, fn in ((do_sweep, "sweep", sweep), (do_prepare, "prepare_sweep", prepare_sweep),
                          (do_variants, "variants", variants)):
        if flag and (B == 1 or key == "variants"):
            cache.crop(n0)
            try:  # the profile above is saved whatever the sweep does
                row[key] = fn(cache, q, tau, knew, vnew, n0, steps)
            except Exception as e:  # noqa: BLE001 - recorded, not hidden
                row[key + "_error"] = f"{type(e).__name__}: {e}"
                print(f"  {key} failed:", row[key + "_error"], flush=True)
    print(f"{q.shape[1]}/{Hkv} n={n} B={B}: step {row['step_us']:.1f} us, kernels {row['kernels_sum_us']:.1f} "
          f"(idle {row['idle_us']:.1f}): " + ", ".join(f"{k_[:40]} {t:.1f}" for k_, t in kt.items()), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    ap.add_argument("--configs", nargs="+", default=["4:16384:1", "4:131072:1", "8:131072:1", "4:131072:8"],
                    help="Hkv:n:B[:D] (D 128, or 64 with Hkv 3: the decode-loop bench's 9/3 heads)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="at B 1, time the fused step over the filter's launches")
    ap.add_argument("--prepare-sweep", action="store_true",
                    help="at B 1, time the fused step over its first launch's parameters (rotation + add)")
    ap.add_argument("--variants", action="store_true",
                    help="time the step's other forms (VARIANTS) at every configuration")
    ap.add_argument("--out", default=default_out("step_kernels.json"))
    args = ap.parse_args(argv)
    real = np.load(args.real)
    dev = torch.device("cuda")
    rows = []
    for c in args.configs:
        Hkv, n, B, *D = (int(x) for x in c.split(":"))
        rows.append(one(real, Hkv, n, B, args.steps, args.reps, dev, args.sweep, args.prepare_sweep, args.variants,
                        *D))
        save(args.out, rows)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
