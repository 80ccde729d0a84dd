"""Where the index starts to pay: hsr_attention's index path against its dense path (CPU).

One decode step of one SmolLM2-shaped layer (9 query heads on 3 kv heads, d 64), for cache
lengths n from 64 to 16K, on real SmolLM2 keys when the capture exists (layer 9) and on
clustered synthetic keys. Both paths give the same keys and weights (tested); the default
``hsr.attention.core.DENSE_BELOW`` is set from this table. Also times torch SDPA on the same
shapes. Min of repeats; numba compiled before timing.

Usage: python bench/bench_crossover.py [--out bench/out/crossover_cpu.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import hsr  # noqa: E402
from _results import default_out, save  # noqa: E402
from _timing import best_of  # noqa: E402

REAL = os.path.join(os.path.dirname(__file__), "cache", "smollm2_qk_32768.npz")


def keys_for(source, n, rng):
    if source == "real":
        z = np.load(REAL)
        K, V, Q = z["k_9"][:, :n], z["v_9"][:, :n], z["q_9"][:, n - 1:n]
        return K[None].astype(np.float32), V[None].astype(np.float32), Q[None].astype(np.float32)
    c = rng.standard_normal((64, 64)).astype(np.float32) * 2
    K = (c[rng.integers(0, 64, (3, n))] + 0.5 * rng.standard_normal((3, n, 64))).astype(np.float32)
    V = rng.standard_normal((3, n, 64)).astype(np.float32)
    Q = (c[rng.integers(0, 64, (9, 1))] + 0.5 * rng.standard_normal((9, 1, 64))).astype(np.float32)
    return K[None], V[None], Q[None]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-log2n", type=int, default=14, help="largest cache, log2 (default 14 = 16K)")
    ap.add_argument("--repeat", type=int, default=20, help="timed repeats, min taken (default 20)")
    ap.add_argument("--out", default=default_out("crossover_cpu.json"), help="JSON path (default bench/out/)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    sources = (["real"] if os.path.exists(REAL) else []) + ["synthetic"]
    rows = []
    for source in sources:
        for n in [2 ** e for e in range(6, a.max_log2n + 1)]:
            K, V, Q = keys_for(source, n, rng)
            cache = hsr.KVCacheIndex(K, V)
            s = 64 ** -0.5
            sc = np.einsum("bhmd,bknd->bhkmn", Q, K).reshape(-1)
            bias = float(np.quantile(s * sc, 0.99))  # ReLU^2 keeping about the top 1%
            qt, kt, vt = (torch.from_numpy(x) for x in (Q, K, V))
            row = dict(source=source, n=n)
            for kind, kw in (("relu2", dict(kind="relu", alpha=2, bias=bias)),
                             ("softmax_eps1e-3", dict(kind="softmax", eps=1e-3))):
                for path, db in (("index", 0), ("dense", n + 1)):
                    f = lambda: hsr.hsr_attention(Q, cache, causal=True, dense_below=db, **kw)  # noqa: E731
                    row[f"{kind}_{path}_s"] = best_of(f, a.repeat)
            row["sdpa_s"] = best_of(lambda: torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, enable_gqa=True), a.repeat)
            rows.append(row)
            print(f"{source:9s} n={n:6d}  relu2 index {row['relu2_index_s']*1e6:8.0f} us  dense "
                  f"{row['relu2_dense_s']*1e6:8.0f} us | softmax index {row['softmax_eps1e-3_index_s']*1e6:8.0f} us"
                  f"  dense {row['softmax_eps1e-3_dense_s']*1e6:8.0f} us | sdpa {row['sdpa_s']*1e6:6.0f} us", flush=True)
    save(a.out, rows, description=__doc__.strip().splitlines()[0],
         dense_below_default=hsr.attention.core.DENSE_BELOW)


if __name__ == "__main__":
    main()
