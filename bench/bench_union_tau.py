"""What asking for eps alone would keep on the GPU cache: the share of keys above the tau that
certifies eps with no calibration, against the smallest kept set that meets eps.

With no tau given, the only threshold that certifies a dropped share of at most eps for every
query before anything is scored is the union bound: ``n`` dropped keys below ``tau`` carry at
most ``n exp(s tau)`` and the kept mass is at least ``exp(s m)`` (``m`` the largest score, or
any lower bound of it), so ``tau = m - ln(n / eps) / s`` certifies ``eps``. This script measures,
in float64 on the carried real keys (``bench/cache/gpu_real_keys.npz``: 28 query rows over 4
kv heads, d 128, SmolLM2 post-RoPE keys of 8K tokens), the share of keys that tau keeps for
n = 8K (the real keys) and 128K (the same keys tiled: the same scores, a larger n), and the
smallest share of each row's keys whose dropped mass is at most eps (the oracle).

    python bench/bench_union_tau.py --out bench/results/union_tau_real_keys.json
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402


def shares(k, q, n_eff, eps):
    """Per query row: (share kept by the union-bound tau, smallest share meeting eps)."""
    s = k.shape[-1] ** -0.5
    G = q.shape[0] // k.shape[0]
    union, oracle = [], []
    for h in range(q.shape[0]):
        sc = k[h // G] @ q[h]
        m = sc.max()
        union.append(float((sc >= m - np.log(n_eff / eps) / s).mean()))
        w = np.sort(np.exp(s * (sc - m)))[::-1]  # the tiled keys repeat these scores: same shares
        c = np.cumsum(w)
        oracle.append(float((np.searchsorted(c, (1 - eps) * c[-1]) + 1) / len(sc)))
    return union, oracle


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    ap.add_argument("--out", default=default_out("union_tau_real_keys.json"))
    args = ap.parse_args(argv)
    real = np.load(args.real)
    k, q = real["k"].astype(np.float64), real["q"].astype(np.float64)
    rows = []
    for n_eff in (k.shape[1], 131072):
        for eps in (1e-2, 1e-3):
            union, oracle = shares(k, q, n_eff, eps)
            row = dict(n=n_eff, eps=eps, union_tau_kept_median=float(np.median(union)),
                       union_tau_kept_min=min(union), union_tau_kept_max=max(union),
                       smallest_kept_median=float(np.median(oracle)), smallest_kept_max=max(oracle))
            rows.append(row)
            print(f"n={n_eff:>6} eps={eps:g}: union-bound tau keeps {row['union_tau_kept_median']:.1%} (median; "
                  f"{row['union_tau_kept_min']:.1%}-{row['union_tau_kept_max']:.1%}), the smallest set meeting eps "
                  f"{row['smallest_kept_median']:.2%} (largest {row['smallest_kept_max']:.1%})")
    save(args.out, rows, keys=f"{pathlib.Path(args.real).name}: 28/4 heads, d 128, {k.shape[1]} real tokens")


if __name__ == "__main__":
    main()
