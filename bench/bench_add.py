"""Cost of growing the index: one key per call (a decode step) and in batches, amortised over
the whole growth (buffer writes plus logarithmic merges), and query time of the grown forest
against a fresh build of the same keys. Also the build time of one tree at 1M x 64.

Usage: python bench/bench_add.py [--n 262144] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import hsr  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 18)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--build-n", type=int, default=1 << 20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "index_add.json"),
                    help="JSON path (default: bench/out/; bench/results/ holds the committed figures)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    c = rng.standard_normal((1024, a.dim)).astype(np.float32) * 2
    K = c[rng.integers(0, 1024, a.n)] + 0.5 * rng.standard_normal((a.n, a.dim)).astype(np.float32)
    hsr.HSRIndex(K[:5000], method="tree").add(K[:2000])  # compile outside the timing
    res = dict(date=str(date.today()), cpus=os.cpu_count(), n=a.n, dim=a.dim)

    idx = hsr.HSRIndex(dim=a.dim, method="tree")
    t0 = time.perf_counter()
    for i in range(a.n):
        idx.add(K[i])
    t_single = time.perf_counter() - t0
    res["add_one_key_per_call_us"] = 1e6 * t_single / a.n
    res["trees_after_single_adds"] = idx.n_trees

    idx2 = hsr.HSRIndex(dim=a.dim, method="tree")
    t0 = time.perf_counter()
    for s in range(0, a.n, 4096):
        idx2.add(K[s:s + 4096])
    res["add_batches_of_4096_us_per_key"] = 1e6 * (time.perf_counter() - t0) / a.n

    fresh = hsr.HSRIndex(K, method="tree")
    Q = K[rng.integers(0, a.n, 32)] + 0.1 * rng.standard_normal((32, a.dim)).astype(np.float32)
    tau = np.sort(Q @ K.T, axis=1)[:, -max(1, a.n // 1000)].astype(np.float64)
    for name, ix in (("grown", idx), ("fresh", fresh)):
        ix.range_search(Q[:1], tau[:1])
        t0 = time.perf_counter()
        for _ in range(3):
            *_, st = ix.range_search(Q, tau, return_stats=True)
        res[f"query_{name}_ms_per_query"] = 1e3 * (time.perf_counter() - t0) / 3 / len(Q)
        res[f"query_{name}_scan_fraction"] = st.scan_fraction

    Kb = rng.standard_normal((a.build_n, a.dim)).astype(np.float32)
    for split in ("pca", "axis"):
        t0 = time.perf_counter()
        hsr.HSRIndex(Kb, method="tree", split=split)
        res[f"build_{a.build_n}x{a.dim}_{split}_s"] = time.perf_counter() - t0
    print(json.dumps(res, indent=1))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
