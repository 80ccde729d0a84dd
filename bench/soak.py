"""Soak: a million appends with searches, removals and periodic save/load in one process.

    python bench/soak.py --appends 1000000 --out bench/results/soak_cpu.json

An ``HSRIndex`` (the default code filter) grows one key per ``add`` call, as a KV cache does in
decode. Every ``--search-every`` appends it answers a batch of range searches; every
``--check-every`` appends that batch is checked against the brute-force answer over the live
keys (exact: the canonical set, bit for bit); every ``--remove-every`` appends a random live
key is removed; every ``--save-every`` appends the index is saved and replaced by the loaded
copy. The resident set size (``/proc/self/statm``) is sampled throughout: it must stay within
the data's size plus a constant (no leak per call, per save or per load).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402

import hsr  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--appends", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--start", type=int, default=4096)
    ap.add_argument("--search-every", type=int, default=1000)
    ap.add_argument("--check-every", type=int, default=50_000)
    ap.add_argument("--remove-every", type=int, default=97)
    ap.add_argument("--save-every", type=int, default=200_000)
    ap.add_argument("--out", default=default_out("soak_cpu.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n_total = args.start + args.appends
    keys = rng.standard_normal((n_total, args.d)).astype(np.float32)  # the data (counted in RSS)
    queries = rng.standard_normal((16, args.d)).astype(np.float32)
    tau = 2.5 * np.sqrt(args.d)  # about the top 0.6% of scores
    live = np.ones(n_total, dtype=bool)
    live[args.start:] = False
    index = hsr.HSRIndex(keys[:args.start])
    index.range_search(queries, tau)  # compile outside the figures
    base = rss_bytes()
    samples, checks, saves, removed = [], 0, 0, 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "soak.hsr"
        for i in range(args.appends):
            j = args.start + i
            index.add(keys[j:j + 1])
            live[j] = True
            if (i + 1) % args.remove_every == 0:
                victim = int(rng.integers(0, j + 1))
                if live[victim]:
                    index.remove([victim])
                    live[victim] = False
                    removed += 1
            if (i + 1) % args.search_every == 0:
                lims, D, ids = index.range_search(queries, tau)
                if (i + 1) % args.check_every == 0:
                    ids_live = np.flatnonzero(live[:j + 1])
                    S = hsr.canonical_scores(queries, keys[ids_live])
                    for r in range(len(queries)):
                        want = ids_live[S[r] >= tau]
                        got = np.sort(ids[lims[r]:lims[r + 1]])
                        if not np.array_equal(want, got):
                            raise SystemExit(f"mismatch at append {i + 1}, query {r}")
                    checks += 1
                    samples.append(dict(appends=i + 1, rss_over_start_MiB=(rss_bytes() - base) / 2 ** 20,
                                        index_keys=int(index.ntotal), seconds=time.perf_counter() - t0))
                    print(samples[-1], flush=True)
            if (i + 1) % args.save_every == 0:
                index.save(path)
                index = hsr.HSRIndex.load(path)
                saves += 1
    grown = args.appends * args.d * 4  # the index's own copy of the appended keys
    final = (rss_bytes() - base)
    res = dict(appends=args.appends, d=args.d, removed=removed, saves_and_loads=saves, exact_checks=checks,
               mismatches=0, seconds=time.perf_counter() - t0, rss_growth_MiB=final / 2 ** 20,
               appended_key_bytes_MiB=grown / 2 ** 20, rss_growth_over_appended_keys=final / grown, samples=samples)
    print({k: v for k, v in res.items() if k != "samples"})
    save(args.out, res, machine_note="2-core machine shared with other work")


if __name__ == "__main__":
    main()
