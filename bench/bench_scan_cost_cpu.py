"""Where a scored key's time goes in the CPU layer step (``hsr.attention.batched``).

    python bench/bench_scan_cost_cpu.py --out bench/results/scan_cost_cpu.json

A SmolLM2-shaped layer (9 query / 3 kv heads, d 64) at ``--n`` keys, synthetic clustered keys
(16 centres, the query near the last key: a selective head), one numba thread. Reported:

* ``score_ns``: a key's canonical score, eight keys at a time (``_dot8``), ids in ascending
  order over 40% of the keys (what a bucket holds), per key;
* ``score_and_add_ns``: the same plus adding its value to the output (``_accumulate8``);
* ``step_ms`` and ``ns_per_scored_key_row``: the layer's certified step
  (``softmax_bounds_rows``, bounds given) at two ``eps``, with its rows spread over the
  three heads (48 MB of keys and values at 32K: more than this machine's L3) or all reading
  one head (16 MB: fits), minus the step's fixed cost (``eps`` 0.5, almost nothing scored).

Minimum of ``--repeat`` runs after a warm-up; the two scan loops' numba compile time is
``compile_s``, apart.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402
from _timing import best_of  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--out", default=default_out("scan_cost_cpu.json"))
    args = ap.parse_args(argv)
    import numba
    from numba import njit

    from hsr import KVCacheIndex
    from hsr.attention.batched import _accumulate8, _dot8, softmax_bounds_rows

    numba.set_num_threads(1)

    @njit(cache=False, nogil=True)
    def score(q, K, order, out):
        sc8 = np.empty(8, dtype=K.dtype)
        s = 0.0
        for p in range(0, order.shape[0] - 7, 8):
            _dot8(q, K, order, p, sc8)
            s += sc8[0]
        out[0] = s

    @njit(cache=False, nogil=True)
    def score_and_add(q, K, V, order, scale, out):
        sc8 = np.empty(8, dtype=K.dtype)
        acc = np.zeros(V.shape[1])
        st = np.zeros(5)
        st[0] = -np.inf
        for p in range(0, order.shape[0] - 7, 8):
            _dot8(q, K, order, p, sc8)
            _accumulate8(sc8, order, p, scale, st, V, acc)
        out[0] = acc[0] + st[1]

    n, Hkv, G, d = args.n, 3, 3, 64
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((16, d))
    K = (centres[rng.integers(0, 16, (Hkv, n))] + 0.7 * rng.standard_normal((Hkv, n, d))).astype(np.float32)
    V = rng.standard_normal((Hkv, n, d)).astype(np.float32)
    order = np.sort(rng.choice(n, int(0.4 * n), replace=False)).astype(np.int64)
    q = (0.5 * rng.standard_normal(d) + 1.1 * K[0, -1]).astype(np.float32)
    out = np.zeros(1)
    res = dict(n=n, d=d, heads="9/3", threads=1)
    t0 = time.perf_counter()  # numba compiles at the first call: reported apart, not in the timings
    score(q, K[0], order, out)
    score_and_add(q, K[0], V[0], order, 0.125, out)
    res["compile_s"] = time.perf_counter() - t0
    res["score_ns"] = best_of(lambda: score(q, K[0], order, out), args.repeat) / len(order) * 1e9
    res["score_and_add_ns"] = best_of(lambda: score_and_add(q, K[0], V[0], order, 0.125, out),
                                      args.repeat) / len(order) * 1e9
    print(f"n {n}: score {res['score_ns']:.1f} ns a key, score and add {res['score_and_add_ns']:.1f} "
          f"(compile {res['compile_s']:.1f} s)")

    index = KVCacheIndex(K[None], V[None])
    R = Hkv * G
    lim = np.full(R, n - 1, np.int64)
    alive = np.ones((Hkv, 0), np.uint8)
    outs = np.empty((R, d), np.float32)
    info = np.zeros((R, 5))
    Q3 = (0.5 * rng.standard_normal((R, d)) + 1.1 * K[0, -1]).astype(np.float32)
    ub3 = np.empty((R, n))
    for h in range(Hkv):
        index.heads[0][h].index.upper_bounds(Q3[h * G:(h + 1) * G], out=ub3[h * G:(h + 1) * G])
    ub1 = np.empty((R, n))
    index.heads[0][0].index.upper_bounds(Q3, out=ub1)
    cases = {"three heads (48 MB)": (Q3, K, V, ub3, G), "one head (16 MB)": (Q3, K[:1], V[:1], ub1, R)}
    rows = []
    for name, (Q, Kc, Vc, ub, rph) in cases.items():
        def step(eps):
            softmax_bounds_rows(Q, Kc, Vc, alive[:Kc.shape[0]], False, ub, rph, 0.125, eps, lim, outs, info)
        fixed = best_of(lambda: step(0.5), args.repeat)
        for eps in (1e-2, 1e-3):
            t = best_of(lambda: step(eps), args.repeat)
            scored = float(info[:, 3].sum())
            row = dict(case=name, eps=eps, step_ms=t * 1e3, fixed_ms=fixed * 1e3, scored_share=scored / (R * n),
                       ns_per_scored_key_row=(t - fixed) / scored * 1e9)
            rows.append(row)
            print(f"{name}, eps {eps:g}: {row['step_ms']:.2f} ms ({row['scored_share']:.1%} scored, fixed "
                  f"{row['fixed_ms']:.2f} ms): {row['ns_per_scored_key_row']:.1f} ns a scored key-row")
    res["steps"] = rows
    save(args.out, [res], keys="synthetic clustered (16 centres), the query near the last key")


if __name__ == "__main__":
    main()
