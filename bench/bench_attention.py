"""Decode and causal prefill on the CPU: hsr_attention against dense O(mn) and torch SDPA.

Decode: one query per head (a GQA group of 7 query heads on one KV head, as in 28/4-head
models) against n cached keys. Prefill: the last ``--prefill-queries`` positions of a causal
prefill, each seeing only earlier keys. For clustered synthetic keys (a Gaussian mixture) and,
when the capture exists, real SmolLM2 keys. Methods, in one run, timed side by side:

* ``hsr relu2``: exact ReLU^2 with the threshold that selects ~0.1% of keys,
* ``hsr softmax eps``: certified softmax at eps 1e-2 and 1e-3,
* ``dense relu2``: the O(mn) numpy reference,
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (float32, CPU).

Reports the keys-scored fraction beside each time. JSON + PNG to bench/results/.

Usage: python bench/bench_attention.py [--max-log2n 20] [--real]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import hsr  # noqa: E402
from _timing import best_of  # noqa: E402


def clustered(n, d, rng, clusters=1024):
    c = rng.standard_normal((clusters, d)).astype(np.float32) * 2
    return c[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)


def run_case(name, K, V, Q, causal, rows):
    n, d = K.shape
    s = d ** -0.5
    t0 = time.perf_counter()
    kv = hsr.KVIndex(K, V, method="tree")
    build = time.perf_counter() - t0
    S = hsr.canonical_scores(Q, K)
    k_sel = max(1, n // 1000)
    tau = float(np.median(np.sort(S, axis=1)[:, -k_sel]))
    bias = tau * s
    qt, kt, vt = (torch.from_numpy(x) for x in (Q, K, V))
    res = dict(case=name, n=n, d=d, queries=len(Q), causal=causal, build_s=build)

    def sdpa():
        with torch.no_grad():
            if causal:
                m = len(Q)
                mask = torch.arange(n)[None, :] <= (torch.arange(m)[:, None] + n - m)
                return torch.nn.functional.scaled_dot_product_attention(qt[None], kt[None], vt[None], attn_mask=mask[None])
            return torch.nn.functional.scaled_dot_product_attention(qt[None], kt[None], vt[None])

    res["sdpa_ms"] = 1e3 * best_of(sdpa)
    res["dense_relu2_ms"] = 1e3 * best_of(lambda: hsr.dense_relu_attention(Q, K, V, alpha=2, bias=bias, causal=causal), 3)
    out, info = hsr.hsr_attention(Q, kv, alpha=2, bias=bias, causal=causal, return_info=True)
    ref = hsr.dense_relu_attention(Q, K, V, alpha=2, bias=bias, causal=causal)
    res["relu2_rel_err"] = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
    res["hsr_relu2_ms"] = 1e3 * best_of(lambda: hsr.hsr_attention(Q, kv, alpha=2, bias=bias, causal=causal))
    res["hsr_relu2_scanned"] = info.scan_fraction
    res["hsr_relu2_selected"] = float(info.keys_selected.mean() / n)
    ref_s = hsr.dense_softmax_attention(Q, K, V, causal=causal)
    for eps in (1e-2, 1e-3):
        out, info = hsr.hsr_attention(Q, kv, kind="softmax", eps=eps, causal=causal, return_info=True)
        res[f"hsr_softmax_{eps:g}_ms"] = 1e3 * best_of(lambda: hsr.hsr_attention(Q, kv, kind="softmax", eps=eps, causal=causal), 3)
        res[f"hsr_softmax_{eps:g}_scanned"] = info.scan_fraction
        res[f"hsr_softmax_{eps:g}_maxerr"] = float(np.abs(out - ref_s).max())
        res[f"hsr_softmax_{eps:g}_bound"] = float(2 * info.dropped_bound.max() * np.abs(V).max())
    rows.append(res)
    print(f"{name:10s} n={n:8d} {'prefill' if causal else 'decode '} sdpa {res['sdpa_ms']:8.2f} ms | "
          f"relu2 {res['hsr_relu2_ms']:8.2f} ms ({res['sdpa_ms'] / res['hsr_relu2_ms']:5.1f}x sdpa, scanned "
          f"{res['hsr_relu2_scanned']:.3f}) | softmax 1e-3 {res['hsr_softmax_0.001_ms']:8.2f} ms (scanned "
          f"{res['hsr_softmax_0.001_scanned']:.3f}) | dense relu2 {res['dense_relu2_ms']:8.2f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-log2n", type=int, default=12)
    ap.add_argument("--max-log2n", type=int, default=20)
    ap.add_argument("--group", type=int, default=7, help="query heads per KV head in decode")
    ap.add_argument("--prefill-queries", type=int, default=256)
    ap.add_argument("--real", action="store_true", help="also run on captured SmolLM2 keys")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"),
                    help="output folder (default: bench/out/; bench/results/ holds the committed figures)")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    rows = []
    d = 64
    for lg in range(a.min_log2n, a.max_log2n + 1, 2):
        n = 1 << lg
        rng = np.random.default_rng(lg)
        K = clustered(n, d, rng)
        V = rng.standard_normal((n, d)).astype(np.float32)
        Q = K[rng.integers(0, n, a.group)] + 0.3 * rng.standard_normal((a.group, d)).astype(np.float32)
        run_case("clustered", K, V, Q, False, rows)
        if n <= 1 << 16:
            Qp = K[n - a.prefill_queries:] + 0.3 * rng.standard_normal((a.prefill_queries, d)).astype(np.float32)
            run_case("clustered", K, V, Qp, True, rows)
    if a.real:
        from hsr.testing.realdata import get_real_qk

        cap = get_real_qk(n_tokens=8192, layers=[10, 20])
        for layer in (10, 20):
            for n in (2048, 8192):
                K = np.ascontiguousarray(cap["k"][layer][0, :n])
                V = np.random.default_rng(0).standard_normal((n, K.shape[1])).astype(np.float32)
                Q = np.ascontiguousarray(cap["q"][layer][:3, n - 1])  # the decode query of the group
                run_case(f"real L{layer}", K, V, Q, False, rows)
    meta = dict(date=str(date.today()), cpus=os.cpu_count(), torch=torch.__version__, numpy=np.__version__,
                note="2-core shared CPU; times are the best of N runs; ratios measured side by side in one run")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "attention_cpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dec = [r for r in rows if r["case"] == "clustered" and not r["causal"]]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ns = [r["n"] for r in dec]
        for key, lab in [("sdpa_ms", "torch SDPA"), ("dense_relu2_ms", "dense ReLU² O(mn)"),
                         ("hsr_relu2_ms", "hsr ReLU² (exact)"), ("hsr_softmax_0.01_ms", "hsr softmax ε=1e-2"),
                         ("hsr_softmax_0.001_ms", "hsr softmax ε=1e-3")]:
            ax.loglog(ns, [r[key] for r in dec], "o-", label=lab)
        ax.set_xlabel("cached keys n")
        ax.set_ylabel(f"ms per decode step ({a.group} query heads, 1 KV head, d={d})")
        ax.set_title("CPU decode, clustered keys (2 cores)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "attention_cpu.png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
