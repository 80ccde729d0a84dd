"""PowerAttention on CPU: pattern density and receptive fields at equal budget, and the CPU
reference path's time against dense torch SDPA.

Usage::

    python bench/bench_power_cpu.py            # everything, writes bench/results/power_*.json|png
    python bench/bench_power_cpu.py --quick    # smaller sizes

(a) For contexts 16K..512K (256-token blocks), PowerAttention (window 5, sink 1) and its
    baselines at the same mean number of kept blocks per query block (``matched_baselines``):
    tile density (fraction of causal tiles kept), token density, kept blocks per row, hops for
    the last block to see every block, worst block's hops, blocks that never see everything.
(b) Time of ``power_attention`` on CPU (a block-wise reference path: gather the kept blocks,
    float32 SDPA per query block) vs one dense causal ``scaled_dot_product_attention``, prefill
    and decode, median of repeats. This is a correctness path; the numbers say how far it is from
    the dense CPU kernel, and how many keys each path reads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hsr.attention import full_pattern, matched_baselines, power_attention, power_pattern  # noqa: E402
from _timing import median_of  # noqa: E402
from hsr.attention.receptive import hop_distances, hops_to_full_coverage, plot_receptive  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")  # committed figures: bench/results


def density_table(contexts, block_size, window, sink):
    rows = []
    for n in contexts:
        pats = matched_baselines(n, block_size, window, sink)
        for name, p in pats.items():
            t0 = time.perf_counter()
            dist = hop_distances(p, n)
            allh = hops_to_full_coverage(p, n)
            rows.append({
                "context": n,
                "pattern": name,
                "params": p.describe(),
                "mean_kept_blocks": float(p.kept_blocks_per_row(n).mean()),
                "max_kept_blocks": int(p.kept_blocks_per_row(n).max()),
                "tile_density": p.density(n),
                "token_density": p.token_density(n),
                "last_block_hops_to_full": -1 if (dist < 0).any() else int(dist.max()),
                "max_hops_to_full_any_block": -1 if (allh < 0).any() else int(allh.max()),
                "blocks_never_complete": int((allh < 0).sum()),
                "analysis_s": time.perf_counter() - t0,
            })
            r = rows[-1]
            print(f"{n:>7d} {name:15s} kept/row {r['mean_kept_blocks']:7.2f}  tiles {100 * r['tile_density']:6.2f}%  "
                  f"last->all {r['last_block_hops_to_full']:>4d}  any->all {r['max_hops_to_full_any_block']:>4d}  "
                  f"never {r['blocks_never_complete']:>5d}  {r['params']}", flush=True)
    return rows


def plot_density(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["pattern"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for name in names:
        rs = [r for r in rows if r["pattern"] == name]
        x = [r["context"] // 1024 for r in rs]
        axes[0].plot(x, [100 * r["tile_density"] for r in rs], marker="o", color=colors[name], label=name)
        h = [r["last_block_hops_to_full"] for r in rs]
        xs = [a for a, b in zip(x, h) if b >= 0]
        hs = [b for b in h if b >= 0]
        if hs:
            axes[1].plot(xs, hs, marker="o", color=colors[name], label=name)
        never = [a for a, b in zip(x, h) if b < 0]
        if never:
            axes[1].scatter(never, [0.8] * len(never), marker="x", color=colors[name], label=f"{name}: never")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("tiles kept (% of causal tiles)")
    axes[0].set_title("Density at equal budget (256-token blocks)")
    axes[1].set_yscale("log", base=2)
    axes[1].set_ylabel("layers for the last block to see all blocks")
    axes[1].set_title("Hops to full coverage (x at bottom: never)")
    axes[1].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def timing_table(prefill_lens, decode_lens, repeats, heads=8, kv_heads=2, dim=64):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    g = torch.Generator().manual_seed(0)
    for mode, lens in (("prefill", prefill_lens), ("decode", decode_lens)):
        for n in lens:
            m = n if mode == "prefill" else 1
            q = torch.randn(1, heads, m, dim, generator=g)
            k = torch.randn(1, kv_heads, n, dim, generator=g)
            v = torch.randn(1, kv_heads, n, dim, generator=g)
            pw, fu = power_pattern(), full_pattern()
            t_pow = median_of(lambda: power_attention(q, k, v, pw), repeats)
            t_full = median_of(lambda: power_attention(q, k, v, fu), repeats)
            if mode == "prefill":
                t_sdpa = median_of(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), repeats)
                keys_pow = pw.token_density(n) * n * (n + 1) / 2
                keys_dense = n * (n + 1) / 2
            else:
                # one query at the end sees every key: no causal mask needed
                t_sdpa = median_of(lambda: sdpa(q, k, v, enable_gqa=True), repeats)
                blocks = pw.decode_blocks(n)
                keys_pow = float(sum(min(256, n - 256 * b) for b in blocks))
                keys_dense = float(n)
            # flop count of the kept (query, key) pairs: 2 matmuls of 2*dim flops per pair per head
            flops_pow = 4 * dim * heads * keys_pow
            rows.append({
                "mode": mode, "seq_len": n, "q_len": m, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                "power_cpu_s": t_pow, "full_pattern_cpu_s": t_full, "sdpa_dense_s": t_sdpa,
                "speedup_vs_sdpa": t_sdpa / t_pow,
                "pairs_kept_power": keys_pow, "pairs_dense": keys_dense,
                "pair_fraction": keys_pow / keys_dense,
                "power_gflops": flops_pow / t_pow / 1e9,
            })
            r = rows[-1]
            print(f"{mode:7s} N={n:>7d}  power {1e3 * t_pow:9.2f} ms  full-pattern path {1e3 * t_full:9.2f} ms  "
                  f"SDPA {1e3 * t_sdpa:9.2f} ms  pairs kept {100 * r['pair_fraction']:6.2f}%  "
                  f"speedup {r['speedup_vs_sdpa']:5.2f}x", flush=True)
    return rows


def plot_timing(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("prefill", "decode")):
        rs = [r for r in rows if r["mode"] == mode]
        x = [r["seq_len"] // 1024 for r in rs]
        ax.plot(x, [1e3 * r["power_cpu_s"] for r in rs], marker="o", label="power_attention (CPU block path)")
        ax.plot(x, [1e3 * r["full_pattern_cpu_s"] for r in rs], marker="s", label="same path, full pattern")
        ax.plot(x, [1e3 * r["sdpa_dense_s"] for r in rs], marker="^", label="torch SDPA dense (causal in prefill)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"CPU {mode}, 8 q heads / 2 kv heads, d=64, fp32")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-density", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the timing part (1: per-core numbers, least disturbed by other jobs)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    env = {
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    torch.set_num_threads(a.threads)
    env["threads"] = torch.get_num_threads()
    env["loadavg_at_start"] = os.getloadavg()
    contexts = [16384, 32768, 65536] if a.quick else [16384, 32768, 65536, 131072, 262144, 524288]
    if not a.skip_density:
        print("== (a) density and receptive field at equal budget ==")
        rows = density_table(contexts, 256, 5, 1)
        with open(os.path.join(a.out, "power_density.json"), "w") as f:
            json.dump({"env": env, "block_size": 256, "power_window": 5, "power_sink": 1,
                       "budget": "baselines matched to PowerAttention's mean kept blocks per query block at each context",
                       "rows": rows}, f, indent=1)
        plot_density(rows, os.path.join(a.out, "power_density.png"))
        for n, tag in ((32768, "32k"), (131072, "128k")):
            if n in contexts:
                plot_receptive(matched_baselines(n, 256, 5, 1), n, 12 if n == 32768 else 14,
                               os.path.join(a.out, f"power_receptive_{tag}.png"))
    if a.skip_timing:
        return 0
    print("== (b) CPU time: block-wise reference path vs dense SDPA ==")
    pre = [2048, 4096, 8192] if a.quick else [2048, 4096, 8192, 16384]
    dec = [16384, 65536] if a.quick else [16384, 65536, 131072, 262144]
    trows = timing_table(pre, dec, repeats=a.repeats)
    env["loadavg_at_end"] = os.getloadavg()
    with open(os.path.join(a.out, "power_cpu_timing.json"), "w") as f:
        json.dump({"env": env, "dtype": "float32", "block_size": 256, "pattern": power_pattern().describe(),
                   "note": "CPU reference path (gather kept blocks + float32 SDPA per query block); "
                           "machine shared with other jobs, so timings are noisy",
                   "rows": trows}, f, indent=1)
    plot_timing(trows, os.path.join(a.out, "power_cpu_timing.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
