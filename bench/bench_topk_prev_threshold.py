"""How tight is a top-k threshold taken from the previous decode step's kept keys? (no timing)

A top-k step faster than dense needs a threshold it can filter with before the k-th best is
known (docs/codes.md, the selection's "What is left"). One that is always sound: the previous
step's k kept keys, plus the new token, scored exactly with the new query, are at least k keys
at or above their k-th best score, so that score is at most the new k-th best. The code filter
at it keeps a superset of the new top k; the selection then runs over its survivors alone.
This measures, on real post-RoPE queries and keys of SmolLM2-135M (every layer and query head,
the Python language reference as text, the last ``--steps`` positions of ``--n`` as decode
steps, each row keeping its top ``--top`` of the keys it sees):

- ``looseness``: keys scoring at or above that threshold over k (1 is the top k itself; the
  filter would read the codes of every key and the full K and V of ~1.2x these);
- ``looseness_2k``: the same from the previous step's 2k best (its k-th best among them);
- ``overlap``: the share of the new top k that the previous step kept.

    python bench/bench_topk_prev_threshold.py --out bench/results/topk_prev_threshold_cpu_<date>.json
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402

from hsr.testing.realdata import get_real_qk  # noqa: E402


def kth_largest(x: np.ndarray, k: int) -> float:
    return float(np.partition(x, x.size - k)[x.size - k])


def head_steps(q: np.ndarray, k: np.ndarray, t0: int, top: float) -> dict:
    """Per decode step t in [t0, n): looseness of the two thresholds and the overlap.

    q (n, d), k (n, d) of one query head and its kv head; row t sees keys 0..t."""
    n = q.shape[0]
    sc = q[t0 - 1:] @ k.T  # (n - t0 + 1, n) float32
    loose, loose2, overlap = [], [], []
    for i, t in enumerate(range(t0, n), start=1):
        prev, row = sc[i - 1, :t], sc[i, :t + 1]
        kp, kt = max(1, round(top * t)), max(1, round(top * (t + 1)))
        best_prev = np.argpartition(prev, t - min(2 * kp, t))[t - min(2 * kp, t):]  # the previous 2k best
        best_prev = best_prev[np.argsort(-prev[best_prev], kind="stable")]
        kept_prev = best_prev[:kp]
        kth = kth_largest(row, kt)
        for cand, out in ((kept_prev, loose), (best_prev, loose2)):
            c = np.append(cand, t)  # the new token: scored exactly by the step that adds it
            thr = kth_largest(row[c], kt)
            assert thr <= kth  # sound: kt keys at or above it
            out.append(int((row >= thr).sum()) / kt)
        kept_now = np.flatnonzero(row >= kth)
        overlap.append(np.intersect1d(kept_now, kept_prev).size / kt)
    return dict(looseness=loose, looseness_2k=loose2, overlap=overlap)


def summary(x) -> dict:
    x = np.asarray(x, dtype=np.float64)
    return dict(median=float(np.median(x)), p90=float(np.quantile(x, 0.9)), max=float(x.max()),
                share_at_most_2=float((x <= 2.0).mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--top", type=float, default=0.01)
    ap.add_argument("--out", default=default_out("topk_prev_threshold.json"))
    args = ap.parse_args(argv)
    cap = get_real_qk(args.n)
    rows, every = [], {"looseness": [], "looseness_2k": [], "overlap": []}
    for layer in cap["layers"]:
        q, k = cap["q"][layer], cap["k"][layer]
        group = q.shape[0] // k.shape[0]
        per = {"looseness": [], "looseness_2k": [], "overlap": []}
        for h in range(q.shape[0]):
            got = head_steps(q[h], k[h // group], args.n - args.steps, args.top)
            for name in per:
                per[name] += got[name]
        for name in per:
            every[name] += per[name]
        row = dict(layer=int(layer), **{name: summary(v) for name, v in per.items()})
        rows.append(row)
        print(f"layer {layer:2d}: looseness median {row['looseness']['median']:6.2f} p90 {row['looseness']['p90']:7.2f}"
              f" max {row['looseness']['max']:7.1f} | from 2k: median {row['looseness_2k']['median']:5.2f}"
              f" p90 {row['looseness_2k']['p90']:6.2f} | overlap median {row['overlap']['median']:.2f}")
    total = {name: summary(v) for name, v in every.items()}
    print("all layers and heads:", {name: {k: round(v, 3) for k, v in s.items()} for name, s in total.items()})
    save(args.out, dict(layers=rows, all=total), n=args.n, steps=args.steps, top=args.top,
         keys="SmolLM2-135M post-RoPE q/k, the Python language reference (hsr.testing.realdata)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
