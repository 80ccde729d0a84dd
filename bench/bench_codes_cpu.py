"""The code filter on the CPU: pruning, bytes and speed on real keys, appends and build.

    python bench/bench_codes_cpu.py                       # needs bench/cache/smollm2_qk_32768.npz
    python bench/bench_codes_cpu.py --quick               # fewer heads and repeats

Real keys: SmolLM2-135M post-RoPE q/k/v at 32K tokens (``bench/capture_real_keys.py
--n-tokens 32768 --layers 3,9,15,21 --values``; RoPE evaluated past the trained 8K). Queries
are each kv head's 3 query heads at the last 64 positions (decode-like: they see every key).
"128K" repeats the 32K keys 4 times along the sequence (tiled: every key appears 4 times).

Sections (all printed and saved to ``bench/results/codes_cpu.json``):

1. pruning: keys verified in full precision / keys reported, and bytes read / the bytes of a
   float32 scan, at thresholds keeping each query's top 0.1%, 1%, 5%, per rotation;
2. range search time: code filter vs the exact BLAS scan (method="brute") vs FAISS
   ``IndexFlatIP.range_search`` (approximate at ties: it keeps scores strictly above its
   threshold, computed with its own summation) for a batch of 64 queries and for 1;
3. decode step (one position, 9 query heads over 3 kv heads, d 64): ``hsr_attention`` with the
   code filter (softmax keeping the top 1% by tau; ReLU^2 with the bias at the top 1%;
   certified softmax eps=1e-3) vs torch SDPA on the same float32 cache, at 32K and 128K;
   certified softmax keys scored vs the oracle (the fewest top keys meeting the same
   criterion, dropped mass <= eps * kept mass);
4. growth: append per key at n = 256K, d = 64 (one key per call, and 64 per call), and the
   build of 1M x 64 random keys (codes written at the first search, included), numba's
   compile time apart.

Timings are best-of-R wall clock on this machine (2 cores, shared): read ratios within a run.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hsr  # noqa: E402
from _timing import best_of  # noqa: E402
from hsr.testing import realdata  # noqa: E402


def load(layers):
    path = realdata.cache_path(32768)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/capture_real_keys.py --n-tokens 32768 "
                         "--layers 3,9,15,21 --values --no-stats first")
    return realdata.load_capture(path, layers)


def pruning(cap, heads, rotations=("random", "pca", "none")):
    rows = []
    for l in cap["layers"]:
        for hk in heads:
            K = np.ascontiguousarray(cap["k"][l][hk])
            Q = np.ascontiguousarray(cap["q"][l][3 * hk:3 * hk + 3, -64:].reshape(-1, K.shape[1]))
            S = hsr.canonical_scores(Q, K)
            for rot in rotations:
                idx = hsr.HSRIndex(K, method="code", code_rotation=rot)
                for p in (0.001, 0.01, 0.05):
                    tau = np.quantile(S, 1 - p, axis=1)
                    lims, _, ids, st = idx.range_search(Q, tau, return_stats=True)
                    rep = int(np.diff(lims).sum())
                    ver = int(st.keys_scored.sum())
                    n, d = K.shape
                    code_bytes = len(Q) * n * idx.code_bytes_per_key() + ver * d * 4
                    rows.append(dict(layer=l, kv_head=hk, rotation=rot, top=p, reported=rep, verified=ver,
                                     verified_over_reported=ver / max(rep, 1),
                                     bytes_over_float32_scan=code_bytes / (len(Q) * n * d * 4),
                                     bytes_over_bf16_scan=code_bytes / (len(Q) * n * d * 2)))
    return rows


def summarize(rows, keys=("rotation", "top")):
    out = {}
    for r in rows:
        k = tuple(r[x] for x in keys)
        out.setdefault(k, []).append(r)
    table = []
    for k, rs in out.items():
        v = np.array([r["verified_over_reported"] for r in rs])
        b = np.array([r["bytes_over_float32_scan"] for r in rs])
        table.append(dict(zip(keys, k), verified_over_reported_min=float(v.min()),
                          verified_over_reported_max=float(v.max()), verified_over_reported_mean=float(v.mean()),
                          bytes_over_float32_scan_mean=float(b.mean())))
    return table


def range_times(cap, rep):
    try:
        import faiss
    except ImportError:  # pragma: no cover
        faiss = None
    l = cap["layers"][-1]
    out = []
    for tile in (1, 4):
        K = np.ascontiguousarray(np.tile(cap["k"][l][0], (tile, 1)))
        Qall = np.ascontiguousarray(cap["q"][l][0:3, -64:].reshape(-1, K.shape[1]))
        code = hsr.HSRIndex(K, method="code")
        brute = hsr.HSRIndex(K, method="brute")
        fx = None
        if faiss is not None:
            fx = faiss.IndexFlatIP(K.shape[1])
            fx.add(K)
        for m in (64, 1):
            Q = Qall[:m]
            tau = np.quantile(hsr.canonical_scores(Q, K), 0.99, axis=1)
            row = dict(n=K.shape[0], queries=m, top=0.01)
            row["code_s"] = best_of(lambda: code.range_search(Q, tau), rep)
            row["brute_s"] = best_of(lambda: brute.range_search(Q, tau), rep)
            if fx is not None and m == 1:  # FAISS takes one threshold for the whole batch
                thr = float(np.nextafter(np.float32(tau[0]), np.float32(-np.inf)))
                row["faiss_s"] = best_of(lambda: fx.range_search(Q, thr), rep)
            row["code_speedup_vs_brute"] = row["brute_s"] / row["code_s"]
            if "faiss_s" in row:
                row["code_speedup_vs_faiss"] = row["faiss_s"] / row["code_s"]
            out.append(row)
            print(f"  range n={row['n']:6d} m={m:3d}: code {row['code_s']*1e3:8.2f} ms  brute {row['brute_s']*1e3:8.2f} ms"
                  + (f"  faiss {row['faiss_s']*1e3:8.2f} ms" if "faiss_s" in row else "")
                  + f"  (x{row['code_speedup_vs_brute']:.1f} vs brute)", flush=True)
    return out


def decode(cap, rep):
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    l = cap["layers"][-1]
    out = []
    for tile in (1, 4):
        k = np.tile(cap["k"][l], (1, tile, 1))[None]  # (1, 3, n, 64)
        v = np.tile(cap["v"][l], (1, tile, 1))[None]
        q = cap["q"][l][:, -1:][None]  # (1, 9, 1, 64)
        n = k.shape[2]
        kv = hsr.KVCacheIndex(k, v)  # method="auto": the code filter at d = 64
        qt, kt, vt = (torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v))
        sdpa = best_of(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), rep)
        s = (q.reshape(3, 3, 64) @ k[0].transpose(0, 2, 1)).reshape(9, n)  # per query head
        tau = np.quantile(s, 0.99, axis=1)
        scale = 64 ** -0.5
        res = dict(n=n, sdpa_s=sdpa)
        t_soft = best_of(lambda: hsr.hsr_attention(q, kv, kind="softmax", tau=tau), rep)
        res["softmax_tau_s"] = t_soft
        bias = (tau * scale).astype(np.float64)
        res["relu_s"] = best_of(lambda: hsr.hsr_attention(q, kv, kind="relu", alpha=2, bias=bias), rep)
        res["certified_eps_s"] = best_of(lambda: hsr.hsr_attention(q, kv, kind="softmax", eps=1e-3), rep)
        out_c, info = hsr.hsr_attention(q, kv, kind="softmax", eps=1e-3, return_info=True)
        # oracle: fewest top keys with dropped mass <= eps * kept mass
        z = s * scale
        p = np.exp(z - z.max(axis=1, keepdims=True))
        ps = -np.sort(-p, axis=1)
        cs = np.cumsum(ps, axis=1)
        tot = cs[:, -1:]
        ok = (tot - cs) <= 1e-3 * cs
        oracle = ok.argmax(axis=1) + 1
        res["certified_scored_mean"] = float(info.keys_scored.mean())
        res["oracle_keys_mean"] = float(oracle.mean())
        res["certified_over_oracle"] = float((info.keys_scored.ravel() / oracle).mean())
        res["certified_bound_max"] = float(info.dropped_bound.max())
        ref = hsr.dense_softmax_attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1))
        res["certified_max_err"] = float(np.abs(out_c - ref).max())
        for key in ("softmax_tau_s", "relu_s", "certified_eps_s"):
            res[key.replace("_s", "_speedup_vs_sdpa")] = sdpa / res[key]
        out.append(res)
        print(f"  decode n={n:6d}: sdpa {sdpa*1e3:7.2f} ms  relu {res['relu_s']*1e3:7.2f} ms "
              f"(x{sdpa/res['relu_s']:.2f})  softmax tau {t_soft*1e3:7.2f} ms (x{sdpa/t_soft:.2f})  "
              f"certified {res['certified_eps_s']*1e3:7.2f} ms (x{sdpa/res['certified_eps_s']:.2f}); "
              f"certified scored {res['certified_scored_mean']:.0f} vs oracle {res['oracle_keys_mean']:.0f} keys",
              flush=True)
    return out


def growth(rep):
    rng = np.random.default_rng(0)
    out = {}
    K = rng.standard_normal((1 << 20, 64)).astype(np.float32)
    t0 = time.perf_counter()
    hsr.HSRIndex(K[:1000], method="code").count(K[:1], 0.0)
    out["compile_and_first_use_s"] = time.perf_counter() - t0

    def build():
        idx = hsr.HSRIndex(K, method="code")
        idx.count(K[:1], 1e30)  # the codes are written here
    out["build_1M_x_64_s"] = best_of(build, max(1, rep // 2))
    base = K[:256 * 1024]
    idx = hsr.HSRIndex(base, method="code")
    idx.count(K[:1], 1e30)
    extra = K[256 * 1024:256 * 1024 + 20000]
    t = time.perf_counter()
    for i in range(len(extra)):
        idx.add(extra[i])
    idx.count(K[:1], 1e30)  # codes of the appended keys, amortised into the next search
    out["append_one_key_per_call_us"] = (time.perf_counter() - t) / len(extra) * 1e6
    t = time.perf_counter()
    for s in range(0, len(extra), 64):
        idx.add(extra[s:s + 64])
    idx.count(K[:1], 1e30)
    out["append_64_keys_per_call_us_per_key"] = (time.perf_counter() - t) / len(extra) * 1e6
    print(f"  compile+first use {out['compile_and_first_use_s']:.2f} s; build 1M x 64 {out['build_1M_x_64_s']:.2f} s; "
          f"append {out['append_one_key_per_call_us']:.2f} us/key (1 per call), "
          f"{out['append_64_keys_per_call_us_per_key']:.2f} us/key (64 per call)", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one kv head per layer, fewer repeats")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "codes_cpu.json"),
                    help="JSON to write (default: bench/results/codes_cpu.json)")
    args = ap.parse_args(argv)
    rep = 3 if args.quick else 5
    print("growth:")
    grow = growth(rep)
    cap = load([3, 9, 15, 21])
    print("pruning (verified / reported, bytes / float32 scan):")
    prune = pruning(cap, [0] if args.quick else [0, 1, 2])
    table = summarize(prune)
    for t in table:
        print(f"  {t['rotation']:6s} top {t['top']*100:4.1f}%: verified/reported {t['verified_over_reported_min']:.2f}-"
              f"{t['verified_over_reported_max']:.2f} (mean {t['verified_over_reported_mean']:.2f}), "
              f"bytes {t['bytes_over_float32_scan_mean']*100:.1f}% of a float32 scan")
    print("range search:")
    rng_t = range_times(cap, rep)
    print("decode:")
    dec = decode(cap, rep)
    import numba
    import torch

    doc = dict(description=__doc__.strip(), machine=dict(cpus=os.cpu_count(), python=platform.python_version(),
                                                          numpy=np.__version__, numba=numba.__version__,
                                                          torch=torch.__version__, processor=platform.processor()),
               date=time.strftime("%Y-%m-%d"), growth=grow, pruning_summary=table, pruning=prune,
               range_search=rng_t, decode=dec)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
