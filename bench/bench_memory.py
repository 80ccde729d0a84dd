"""Peak memory of building and querying an index, against the size of the key data.

    python bench/bench_memory.py                 # 1M and 2M x 64, code filter and trees

Each configuration runs in a fresh process (peak RSS is per process): generate float32 keys
(n x 64), build ``HSRIndex(keys, method=...)`` and run one search (the code filter writes its
codes there). Reported: the process's peak RSS before the build (the keys alone, plus the
interpreter and libraries), after the build and after the search, and the increments over the
key data. Output: ``bench/results/memory.json``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import resource, sys, json, numpy as np
sys.path.insert(0, {root!r})
import hsr
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
hsr.HSRIndex(np.ones((5000, 64), np.float32), method={method!r}).count(np.ones((1, 64), np.float32), 0.0)
base = peak()
keys = np.random.default_rng(0).standard_normal(({n}, 64), dtype=np.float32)
with_keys = peak()
idx = hsr.HSRIndex(keys, method={method!r})
built = peak()
idx.range_search(keys[:8], 30.0)
searched = peak()
print(json.dumps(dict(base=base, with_keys=with_keys, built=built, searched=searched, key_bytes=keys.nbytes)))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1 << 20, 1 << 21], help="key counts (default 1M 2M)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "memory.json"),
                    help="JSON path (default: bench/out/)")
    args = ap.parse_args(argv)
    rows = []
    for method in ("code", "tree"):
        for n in args.n:
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), method=method, n=n)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            kb = r["key_bytes"]
            row = dict(method=method, n=n, key_mib=kb / 2 ** 20,
                       build_peak_over_keys=(r["built"] - r["base"]) / kb,
                       search_peak_over_keys=(r["searched"] - r["base"]) / kb)
            rows.append(row)
            print(f"{method:5s} n={n:8d} keys {kb / 2**20:6.0f} MiB  peak after build {row['build_peak_over_keys']:.2f}x "
                  f"the keys, after the first search {row['search_peak_over_keys']:.2f}x (keys included)", flush=True)
    doc = dict(description=__doc__.strip(), date=time.strftime("%Y-%m-%d"), rows=rows)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
