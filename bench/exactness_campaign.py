"""Exactness campaign: many random cases, every backend, against the brute-force oracle.

A *case* is one (index, batch of queries, thresholds) triple; each case checks every query's
result set (and scores) against the oracle. Cases draw, with a seeded generator:

* n in 1..3000 keys (30% under 40, 55% 40..400, 15% to 3000), d in 1..130, 1..8 queries, a query batch mixing magnitudes;
* key families: Gaussian, clustered, integer lattice (many exact ties and duplicates), a zero
  key and a duplicated key in every family, magnitudes from 1e-30 to 1e15;
* thresholds exactly at a key's score (ties), one float step either side, above and below all;
* a third of the cases remove some keys and add new ones before the search;
* input dtypes float32, float64 (a float64 index), float16 and bfloat16 (torch).

CPU (``--device cpu``): backends ``code``, ``tree``, ``brute`` of ``HSRIndex``; the oracle is
``canonical_scores(Q, K) >= tau``; sets and scores must be identical, bit for bit.

GPU (``--device cuda``): ``hsr.kernels.GPUCodeIndex`` (the code filter in Triton). Its scores
are float32 dot products summed in the GPU's order, not the CPU's canonical order, so the oracle
is the float64 score: every key with ``s64 >= tau + band`` must be reported and none with
``s64 < tau - band`` (``band = 2 * d * 2^-24 * |q| |k|``, the float32 rounding bound); keys
inside the band may go either way. Lattice cases (integer keys and queries, exact in float32)
use no band: the sets must be identical.

    python bench/exactness_campaign.py --device cpu --cases 100000
    python bench/exactness_campaign.py --device cuda --cases 100000
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import hsr  # noqa: E402
from _results import default_out, save  # noqa: E402

SCALES = [1e-30, 1e-6, 1.0, 1e3, 1e15]


def draw_case(rng, max_queries=8):
    u = rng.random()  # mostly small indexes (cheap, and where edge cases live), some large
    n = int(rng.integers(1, 40)) if u < 0.3 else int(rng.integers(40, 400)) if u < 0.85 else int(rng.integers(400, 3001))
    d = int(rng.choice([1, 2, 3, 5, 8, 16, 17, 31, 64, 65, 128, 130]))
    m = int(rng.integers(1, max_queries + 1))
    fam = rng.choice(["gauss", "clustered", "lattice"])
    if fam == "gauss":
        K = rng.standard_normal((n + 64, d))
    elif fam == "clustered":
        c = rng.standard_normal((max(n // 50, 1), d)) * 3
        K = c[rng.integers(0, len(c), n + 64)] + 0.2 * rng.standard_normal((n + 64, d))
    else:
        K = rng.integers(-2, 3, size=(n + 64, d)).astype(np.float64)
    scale = 1.0 if fam == "lattice" else float(rng.choice(SCALES))
    K = (K * scale).astype(np.float32)
    if n >= 4:
        K[0] = 0
        K[1] = K[2]
    Q = (rng.integers(-2, 3, size=(m, d)) if fam == "lattice" else rng.standard_normal((m, d))).astype(np.float32)
    if m > 1 and fam != "lattice":
        Q[1] *= np.float32(1e3)
    return fam, K[:n], K[n:], Q


def thresholds(rng, S):
    m, n = S.shape
    pick = S[np.arange(m), rng.integers(0, n, m)].astype(np.float64)
    choice = rng.integers(0, 5)
    if choice == 0:
        return pick
    if choice == 1:
        return np.nextafter(pick, np.inf)
    if choice == 2:
        return np.nextafter(pick, -np.inf)
    if choice == 3:
        return np.quantile(S.astype(np.float64), 0.9, axis=1)
    return np.where(rng.random(m) < 0.5, S.max(axis=1) + 1.0, S.min(axis=1) - 1.0).astype(np.float64)


def run_cpu(a):
    import torch

    rng = np.random.default_rng(a.seed)
    stats = dict(cases=0, queries=0, mismatches=0, by_backend={}, errors=[])
    t0 = time.perf_counter()
    while stats["cases"] < a.cases and time.perf_counter() - t0 < a.max_seconds:
        fam, K, extra, Q = draw_case(rng, a.queries)
        dtype = rng.choice(["float32", "float64", "float16", "bfloat16"], p=[0.55, 0.15, 0.15, 0.15])
        if dtype in ("float16", "bfloat16"):
            tdt = getattr(torch, dtype)
            # the index takes the half-precision tensor; the oracle sees the same rounded values
            Kin = torch.from_numpy(K).to(tdt)
            K = Kin.float().numpy()
            if not np.isfinite(K).all():
                continue
        else:
            Kin = K
        backend = ("code", "tree", "brute")[stats["cases"] % 3]
        if backend == "code" and (np.abs(K).max(initial=0) * np.abs(Q).max() > 1e30):
            backend = "tree"  # the code filter refuses such magnitudes (by design, with an error)
        idx = hsr.HSRIndex(Kin, dim=K.shape[1], method=backend, dtype="float64" if dtype == "float64" else None,
                           leaf_size=int(rng.choice([4, 16, 32])))
        Kall = K.astype(np.float64) if dtype == "float64" else K
        alive = np.ones(len(K), dtype=bool)
        if rng.random() < 0.33 and len(K) > 2:
            gone = rng.choice(len(K), size=min(len(K) // 3, 50), replace=False)
            idx.remove(gone)
            alive[gone] = False
            idx.add(extra[:8])
            Kall = np.concatenate([Kall, extra[:8].astype(Kall.dtype)])
            alive = np.concatenate([alive, np.ones(8, dtype=bool)])
        Qc = Q.astype(np.float64) if dtype == "float64" else Q
        S = hsr.canonical_scores(Qc, Kall, dtype="float64" if dtype == "float64" else None)
        tau = thresholds(rng, S)
        try:
            lims, D, I = idx.range_search(Qc, tau)
        except ValueError as e:
            stats["errors"].append(repr(e)[:200])
            continue
        bad = 0
        for i in range(len(Q)):
            want = np.flatnonzero((S[i].astype(np.float64) >= tau[i]) & alive)
            got = np.sort(I[lims[i]:lims[i + 1]])
            if not np.array_equal(got, want) or not np.array_equal(
                    D[lims[i]:lims[i + 1]], S[i, I[lims[i]:lims[i + 1]]]):
                bad += 1
        stats["cases"] += 1
        stats["queries"] += len(Q)
        stats["mismatches"] += bad
        b = stats["by_backend"].setdefault(backend, dict(cases=0, mismatches=0))
        b["cases"] += 1
        b["mismatches"] += bad
        if stats["cases"] % max(1, a.cases // 20) == 0:
            print(f"{stats['cases']:7d} cases, {stats['mismatches']} mismatches, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def run_cuda(a):
    import torch

    from hsr.kernels.code_index import GPUCodeIndex

    # on a machine without CUDA the same path runs under the Triton interpreter (TRITON_INTERPRET=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    rng = np.random.default_rng(a.seed)
    stats = dict(cases=0, indexes=0, queries=0, missed=0, extra=0, lattice_mismatches=0, errors=[])
    t0 = time.perf_counter()
    while stats["cases"] < a.cases and time.perf_counter() - t0 < a.max_seconds:
        fam, K, extra, Q = draw_case(rng, a.queries)
        # the Triton cache takes head dims 16..256, powers of two: zero-pad (scores unchanged)
        dp = next(x for x in (16, 32, 64, 128, 256) if x >= K.shape[1])
        K = np.pad(K, ((0, 0), (0, dp - K.shape[1])))
        Q = np.pad(Q, ((0, 0), (0, dp - Q.shape[1])))
        if np.abs(K).max(initial=0) * np.abs(Q).max() > 1e30:
            continue
        dtype = torch.float32 if rng.random() < 0.6 else (torch.float16 if rng.random() < 0.5 else torch.bfloat16)
        Kt = torch.from_numpy(K).to(dev, dtype)
        if not torch.isfinite(Kt).all():
            continue
        Kr = Kt.double().cpu().numpy()
        Qt = torch.from_numpy(Q).to(dev, dtype)
        Qr = Qt.double().cpu().numpy()
        try:
            idx = GPUCodeIndex(Kt)
        except ValueError as e:
            stats["errors"].append(repr(e)[:200])
            continue
        stats["indexes"] += 1
        S64 = Qr @ Kr.T
        band = 2 * Kr.shape[1] * 2.0 ** -24 * np.linalg.norm(Qr, axis=1)[:, None] * np.linalg.norm(Kr, axis=1)[None, :]
        exact = fam == "lattice"  # small integers: every product and sum is exact in float32
        for _ in range(a.reps):  # several threshold sets per index: each is a case
            tau = thresholds(rng, S64.astype(np.float32).astype(np.float64))
            try:
                lims, D, I = idx.range_search(Qt, torch.from_numpy(tau).float().to(dev))
            except ValueError as e:
                stats["errors"].append(repr(e)[:200])
                continue
            tau32 = tau.astype(np.float32).astype(np.float64)
            lims, I = lims.cpu().numpy(), I.cpu().numpy()
            for i in range(len(Q)):
                got = np.zeros(len(K), dtype=bool)
                got[I[lims[i]:lims[i + 1]]] = True
                if exact:
                    want = S64[i] >= tau32[i]
                    stats["lattice_mismatches"] += int((got != want).any())
                must = S64[i] >= tau32[i] + band[i]
                never = S64[i] < tau32[i] - band[i]
                stats["missed"] += int((must & ~got).sum())
                stats["extra"] += int((never & got).sum())
            stats["cases"] += 1
            stats["queries"] += len(Q)
            if stats["cases"] % max(1, a.cases // 20) == 0:
                print(f"{stats['cases']:7d} cases, missed {stats['missed']}, extra {stats['extra']}, "
                      f"lattice mismatches {stats['lattice_mismatches']}, {time.perf_counter() - t0:.0f} s",
                      flush=True)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def merge(paths, out):
    """Sum the workers' JSON files into one (the GPU run returns few files); keeps each run."""
    import json

    runs = [json.load(open(p)) for p in paths]
    keys = ("cases", "indexes", "queries", "missed", "extra", "lattice_mismatches", "mismatches")
    total = {k: sum(r["results"].get(k, 0) for r in runs) for k in keys if any(k in r["results"] for r in runs)}
    total["errors"] = sum(len(r["results"]["errors"]) for r in runs)
    print(total)
    save(out, dict(total=total, runs=[dict(command=r["meta"]["command"], results=r["results"]) for r in runs]),
         description=__doc__.strip().splitlines()[0] + f" ({len(runs)} workers merged)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only sum these workers' result files into --out, then exit")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    ap.add_argument("--cases", type=int, default=100_000, help="cases to run (default: 100000)")
    ap.add_argument("--seed", type=int, default=0, help="default: 0")
    ap.add_argument("--reps", type=int, default=1,
                    help="threshold sets searched per index built (each one case; default: 1)")
    ap.add_argument("--queries", type=int, default=8, help="most queries per case (default: 8)")
    ap.add_argument("--max-seconds", type=float, default=float("inf"),
                    help="stop after this long and report the cases run (default: no limit)")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/out/exactness_<device>.json)")
    a = ap.parse_args()
    if a.merge:
        return merge(a.merge, a.out or default_out(f"exactness_{a.device}.json"))
    stats = run_cpu(a) if a.device == "cpu" else run_cuda(a)
    stats["errors"] = stats["errors"][:20] + ([f"... {len(stats['errors']) - 20} more"] if len(stats["errors"]) > 20 else [])
    print(stats)
    save(a.out or default_out(f"exactness_{a.device}.json"), stats, description=__doc__.strip().splitlines()[0])


if __name__ == "__main__":
    main()
