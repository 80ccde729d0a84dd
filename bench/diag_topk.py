"""Where the GPU top-k step's time goes, and its tuning: the softmax's form (``certify=True``:
the scan of every score) and its splits and tile, each as a whole captured step; the selection
alone (``hsr.kernels._select.select_kth``, its programs per row and block) beside
``torch.topk`` and ``torch.kthvalue`` on the same scores.
(A first radix select, three rounds of 2048-bin ``tl.histogram`` digit counts, measured 5-7x
slower than ``torch.topk`` alone at 128K: ``topk_diag_h100_2026-12-06.json``, "radix". The
selection now counts 64 bins a round.)

    python bench/diag_topk.py --out bench/results/topk_diag_<device>_<date>.json

Inputs as ``bench/bench_topk_step.py`` (real keys tiled to n, k = 1% of n). Each variant: the
step (add one token, score, select, attend, merge) captured once and replayed over ``--steps``
steps of a growing cache, median per step; its output against the default's.
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
from bench_decode_loop import capture, make_inputs, sdpa_captured, time_loop  # noqa: E402
from diag_step_kernels import kernel_times  # noqa: E402

from hsr.kernels._select import select_kth  # noqa: E402
from hsr.kernels.codes import CodeKVCache  # noqa: E402

VARIANTS = [dict(), dict(certify=True), dict(splits=2), dict(splits=8), dict(splits=32), dict(block=32),
            dict(block=128)]
SELECT_VARIANTS = [dict(), dict(block=1024), dict(block=4096), dict(programs=1), dict(programs=2), dict(programs=8),
                   dict(programs=32), dict(finish_warps=1), dict(finish_warps=2), dict(finish_warps=8)]


def one(real, D, n, B, steps, reps, top, dev, variants=VARIANTS, profile=False):
    q, k, v = make_inputs(real, D, n, B, steps, dev)
    n0 = n - steps
    kk = max(1, int(round(top * n)))
    cache = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n)
    kn = k[:, :, n0:n0 + 1].contiguous()
    vn = v[:, :, n0:n0 + 1].contiguous()
    rows, ref = [], None
    for var in variants:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=dev)
        cache.crop(n0)
        try:
            g = capture(lambda: cache._topk(q, kk, scale=D ** -0.5, out=out, lse=lse, add=(kn, vn), **var), warm=1)
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            rows.append(dict(var, error=f"{type(e).__name__}: {e}"))
            continue
        cache.crop(n0)
        t = time_loop(lambda i: g.replay(), steps, reps, lambda: cache.lengths.fill_(n0))
        ref = out.float().clone() if ref is None else ref
        rows.append(dict(var, step_us=t * 1e3, max_diff_vs_default=float((out.float() - ref).abs().max())))
        del g
    sc = cache._score_all(q)  # the real scores at the cache's length
    sc[:, len(cache):] = float("-inf")  # (not written: no reader of the step looks there; torch.topk does)
    layout = (q.shape[1], 1, q.shape[1] // cache.Hkv, cache.Hkv)
    for var in SELECT_VARIANTS:
        g = capture(lambda var=var: select_kth(sc, kk, cache.lengths, layout, **var))
        rows.append(dict(alone="select", **var, us=time_loop(lambda i: g.replay(), steps, reps) * 1e3))
    for name, fn in (("topk", lambda: torch.topk(sc, kk, dim=1, sorted=False).values.amin(1)),
                     ("topk_positions", lambda: torch.topk(sc, kk + 64, dim=1, sorted=True)),
                     ("kthvalue", lambda: torch.kthvalue(-sc, kk, dim=1).values)):
        g = capture(fn)
        rows.append(dict(alone=name, us=time_loop(lambda i: g.replay(), steps, reps) * 1e3))
    sc = g = None
    t_graph, t_static = sdpa_captured(q, k, v, kn, vn, n0, n, steps, reps)
    res = dict(D=D, n=n, B=B, topk=kk, rows=rows, sdpa_best_us=min(t_graph, t_static) * 1e3)
    if profile:  # each kernel's GPU us in one replay of the default step (the merge's includes its wait)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=dev)
        cache.crop(n0)
        g = capture(lambda: cache._topk(q, kk, scale=D ** -0.5, out=out, lse=lse, add=(kn, vn)), warm=1)
        cache.crop(n0)
        res["kernels_us"] = {name: round(x, 2) for name, x in kernel_times(g.replay, steps).items()}
        print("  kernels (us):", res["kernels_us"], flush=True)
    print(f"d{D} n={n} B={B} k={kk} (sdpa best {res['sdpa_best_us']:.1f} us):",
          [(tuple((a, b) for a, b in r.items() if a in ("programs", "splits", "block", "certify", "alone",
                                                         "finish_warps")),
            round(r.get("step_us", r.get("us", float("nan"))), 1)) for r in rows], flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["128:131072:1", "128:16384:1", "64:16384:1", "128:131072:8"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=float, default=0.01)
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    ap.add_argument("--out", default=default_out("topk_diag.json"))
    ap.add_argument("--profile", action="store_true", help="each kernel's time in the default step; variants: "
                    "the default and the certified step only")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    real = np.load(args.real)
    res = []
    for c in args.configs:
        D, n, B = (int(x) for x in c.split(":"))
        var = [dict(), dict(certify=True)] if args.profile else VARIANTS
        res.append(one(real, D, n, B, args.steps, args.reps, args.top, dev, var, args.profile))
        torch.cuda.empty_cache()
        save(args.out, res, steps=args.steps, top=args.top)


if __name__ == "__main__":
    main()
