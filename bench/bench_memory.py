"""Peak memory of building and querying an index, against the size of the key data.

    python bench/bench_memory.py                 # 1M, 2M and 4M x 64, code filter and trees

Each configuration runs in a fresh process (peak RSS is per process): generate float32 keys
(n x 64), build ``HSRIndex(keys, method=..., copy=...)`` and run one search (the code filter
writes its codes there). Reported, over the key bytes: the peak RSS after the build and after
the first search, counted from before the keys existed (so the caller's keys are included: 1.0
is the keys alone), and the index's resident size (current RSS after the search minus current
RSS with the keys alone). ``copy=True`` (the default) gives the index its own copy of the keys;
``copy=False`` reads the caller's array in place.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _results import save  # noqa: E402

CHILD = r"""
import resource, sys, json, numpy as np
sys.path.insert(0, {root!r})
import hsr
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def now():  # current RSS (Linux)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
hsr.HSRIndex(np.ones((5000, 64), np.float32), method={method!r}, copy={copy!r}).count(np.ones((1, 64), np.float32), 0.0)
base = peak()
keys = np.random.default_rng(0).standard_normal(({n}, 64), dtype=np.float32)
keys_now = now()
idx = hsr.HSRIndex(keys, method={method!r}, copy={copy!r})
built = peak()
idx.range_search(keys[:8], 30.0)
searched = peak()
index_now = now() - keys_now
print(json.dumps(dict(base=base, built=built, searched=searched, index=index_now, key_bytes=keys.nbytes)))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1 << 20, 1 << 21, 1 << 22],
                    help="key counts (default 1M 2M 4M)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "memory.json"),
                    help="JSON path (default: bench/out/)")
    args = ap.parse_args(argv)
    rows = []
    for method in ("code", "tree"):
        for copy in (True, False):
            for n in args.n:
                code = CHILD.format(root=str(ROOT), method=method, n=n, copy=copy)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                kb = r["key_bytes"]
                row = dict(method=method, copy=copy, n=n, key_mib=kb / 2 ** 20,
                           build_peak_over_keys=(r["built"] - r["base"]) / kb,
                           search_peak_over_keys=(r["searched"] - r["base"]) / kb,
                           index_over_keys=r["index"] / kb)
                rows.append(row)
                print(f"{method:5s} copy={copy!s:5s} n={n:8d} keys {kb / 2**20:5.0f} MiB  peak after build "
                      f"{row['build_peak_over_keys']:.2f}x the keys, after the first search "
                      f"{row['search_peak_over_keys']:.2f}x (keys included); index {row['index_over_keys']:.2f}x",
                      flush=True)
    save(args.out, rows, description=__doc__.strip().splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
