"""What ``group_union=True`` buys in quality: each query row attending its GQA group's union of
kept sets instead of its own, on real keys (CPU, float64, no kernel).

    python bench/bench_group_union.py --out bench/results/group_union_real_keys.json

Keys and queries: ``bench/cache/gpu_real_keys.npz`` (post-RoPE keys of SmolLM2-135M, 4 kv
heads of d 128 made of two real heads each, 8,192 positions; 28 query rows, 7 per kv head;
``bench/make_gpu_keys.py``). Each row keeps its own top share of the scores (``tau`` its
quantile); the union is what the GPU filter reads for the group anyway, so attending it costs
no more key or value bytes. Reported per share: the union's size (share of keys), and over
the 28 rows the dropped softmax mass and the relative error of the output against softmax
over every key (random Gaussian values), median and largest, for the row's own set and the
union.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    ap.add_argument("--tops", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    ap.add_argument("--out", default=default_out("group_union_real_keys.json"))
    args = ap.parse_args(argv)
    z = np.load(args.real)
    K, Q = z["k"].astype(np.float64), z["q"].astype(np.float64)
    Hkv, n, D = K.shape
    G = Q.shape[0] // Hkv
    s = D ** -0.5
    V = np.random.default_rng(0).standard_normal((Hkv, n, D))
    rows = []
    for top in args.tops:
        res = {k: [] for k in ("own_dropped", "union_dropped", "own_err", "union_err", "union_share")}
        for h in range(Hkv):
            S = Q[h * G:(h + 1) * G] @ K[h].T  # (G, n)
            keep = S >= np.quantile(S, 1 - top, axis=1)[:, None]
            union = keep.any(0)
            res["union_share"].append(union.mean())
            for r in range(G):
                w = np.exp((S[r] - S[r].max()) * s)
                full = w @ V[h] / w.sum()
                for name, m in (("own", keep[r]), ("union", union)):
                    res[name + "_dropped"].append(1 - w[m].sum() / w.sum())
                    o = (w * m) @ V[h] / (w * m).sum()
                    res[name + "_err"].append(np.linalg.norm(o - full) / np.linalg.norm(full))
        row = dict(top=top, union_share=float(np.mean(res["union_share"])))
        for k in ("own_dropped", "union_dropped", "own_err", "union_err"):
            row[k + "_median"] = float(np.median(res[k]))
            row[k + "_max"] = float(np.max(res[k]))
        rows.append(row)
        print(f"top {top:.0%}: union {row['union_share']:.1%} of keys | dropped mass median "
              f"{row['own_dropped_median']:.2e} -> {row['union_dropped_median']:.2e}, max {row['own_dropped_max']:.2e} "
              f"-> {row['union_dropped_max']:.2e} | rel. error median {row['own_err_median']:.2e} -> "
              f"{row['union_err_median']:.2e}, max {row['own_err_max']:.2e} -> {row['union_err_max']:.2e}")
    save(args.out, rows, keys=args.real.split("/")[-1], n=n, Hkv=Hkv, G=G, D=D)


if __name__ == "__main__":
    main()
