"""Asymptotic scaling of the index against the naive O(mn) scan (and FAISS when installed).

For each dataset and n, builds the index, picks per-query thresholds (a fixed count of 64
reported keys, 0.1% of keys, n^{4/5} keys as in the paper's regime, and 1% of keys), and times
``range_search`` for the tree, the brute-force BLAS scan and ``faiss.IndexFlatIP.range_search``
(FAISS keeps scores strictly above its threshold: it is given the next float below tau).
Fits log-log slopes of time per query against n and saves JSON + PNG to bench/results/.

Usage: python bench/bench_index_scaling.py [--max-log2n 20] [--queries 32] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import hsr  # noqa: E402
from _timing import best_of  # noqa: E402


def REGIMES(n):
    """(name, reported keys per query) for each threshold regime."""
    return [("fixed64", 64), ("0.1%", max(1, n // 1000)), ("n^0.8", int(n ** 0.8)), ("1%", max(1, n // 100))]


def dataset(name, n, rng):
    if name.startswith("gauss"):
        d = int(name[5:])
        return rng.standard_normal((n, d)).astype(np.float32)
    if name == "mixture64":  # 1024 clusters, spread 0.5 (cluster radius ~4 vs centre distance ~23)
        c = rng.standard_normal((1024, 64)).astype(np.float32) * 2
        return c[rng.integers(0, 1024, n)] + 0.5 * rng.standard_normal((n, 64)).astype(np.float32)
    if name == "tight64":  # 64 clusters, spread 0.1: well separated, the favourable case
        c = rng.standard_normal((64, 64)).astype(np.float32) * 2
        return c[rng.integers(0, 64, n)] + 0.1 * rng.standard_normal((n, 64)).astype(np.float32)
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-log2n", type=int, default=20)
    ap.add_argument("--min-log2n", type=int, default=12)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--datasets", default="gauss2,gauss4,gauss8,tight64,mixture64,gauss64")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"),
                    help="output folder (default: bench/out/; bench/results/ holds the committed figures)")
    a = ap.parse_args()
    try:
        import faiss
    except ImportError:
        faiss = None
    rows = []
    for name in a.datasets.split(","):
        for lg in range(a.min_log2n, a.max_log2n + 1, 2):
            n = 1 << lg
            rng = np.random.default_rng(lg)
            K = dataset(name, n, rng)
            Q = K[rng.integers(0, n, a.queries)] + 0.1 * rng.standard_normal((a.queries, K.shape[1])).astype(np.float32)
            t0 = time.perf_counter()
            idx = hsr.HSRIndex(K, method="tree")
            build = time.perf_counter() - t0
            brute = hsr.BruteForceIndex(K)
            S = Q @ K.T
            srt = np.sort(S, axis=1)
            for regime, k in REGIMES(n):
                tau = srt[:, -min(k, n)].astype(np.float64)
                idx.range_search(Q[:1], tau[:1])
                brute.range_search(Q[:1], tau[:1])
                *_, st = idx.range_search(Q, tau, return_stats=True)
                t_tree = best_of(lambda: idx.range_search(Q, tau), warmup=False)
                t_brute = best_of(lambda: brute.range_search(Q, tau), warmup=False)
                t_faiss = None
                if faiss is not None:
                    fi = faiss.IndexFlatIP(K.shape[1])
                    fi.add(K)
                    ft = np.nextafter(tau.astype(np.float32), -np.inf)
                    # faiss takes one threshold per call: time the per-query loop
                    t_faiss = best_of(lambda: [fi.range_search(Q[i:i + 1], float(ft[i])) for i in range(len(Q))], warmup=False)
                row = dict(dataset=name, d=K.shape[1], n=n, regime=regime, reported=float(st.keys_selected.mean()),
                           scan_fraction=st.scan_fraction, nodes_visited=float(st.nodes_visited.mean()),
                           build_s=build, tree_ms_per_query=1e3 * t_tree / len(Q),
                           brute_ms_per_query=1e3 * t_brute / len(Q),
                           faiss_ms_per_query=None if t_faiss is None else 1e3 * t_faiss / len(Q))
                rows.append(row)
                print(f"{name:10s} n=2^{lg:<2d} {regime:8s} reported {row['reported']:9.1f} scan {row['scan_fraction']:.4f} "
                      f"tree {row['tree_ms_per_query']:8.3f} ms/q  brute {row['brute_ms_per_query']:8.3f} ms/q "
                      f"faiss {row['faiss_ms_per_query'] or float('nan'):8.3f} ms/q  build {build:6.2f} s", flush=True)
    slopes = {}
    for name in a.datasets.split(","):
        for regime, _ in REGIMES(1):
            pts = [(r["n"], r["tree_ms_per_query"], r["brute_ms_per_query"]) for r in rows
                   if r["dataset"] == name and r["regime"] == regime]
            if len(pts) >= 2:
                x = np.log([p[0] for p in pts])
                slopes[f"{name}/{regime}"] = dict(tree=float(np.polyfit(x, np.log([p[1] for p in pts]), 1)[0]),
                                                  brute=float(np.polyfit(x, np.log([p[2] for p in pts]), 1)[0]))
    meta = dict(date=str(date.today()), machine=platform.machine(), processor=platform.processor(),
                cpus=os.cpu_count(), numpy=np.__version__, hsr=hsr.__version__,
                faiss=None if faiss is None else faiss.__version__, queries=a.queries,
                timing="best of 5 runs per method (a shared 2-core machine: the minimum is the least disturbed run)")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "index_scaling.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, slopes=slopes), f, indent=1)
    print(json.dumps(slopes, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = a.datasets.split(",")
        fig, axes = plt.subplots(1, 4, figsize=(19, 4.5), sharey=True)
        for ax, (regime, _) in zip(axes, REGIMES(1)):
            for name in names:
                pts = [r for r in rows if r["dataset"] == name and r["regime"] == regime]
                sl = slopes.get(f"{name}/{regime}", {}).get("tree", float("nan"))
                ax.loglog([p["n"] for p in pts], [p["tree_ms_per_query"] for p in pts], "o-", label=f"tree {name} (slope {sl:.2f})")
            pts = [r for r in rows if r["dataset"] == names[-1] and r["regime"] == regime]
            ax.loglog([p["n"] for p in pts], [p["brute_ms_per_query"] for p in pts], "k--", label=f"brute scan {names[-1]}")
            ax.set_title(f"threshold: {regime} reported keys")
            ax.set_xlabel("n keys")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("ms per query (2-core CPU)")
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "index_scaling.png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
