"""The CPU code filter side by side with FAISS and a BLAS scan, at every batch size.

    python bench/bench_faiss.py                    # needs bench/cache/smollm2_qk_32768.npz
    python bench/bench_faiss.py --quick            # fewer sizes and repeats
    python bench/bench_faiss.py --out bench/results/faiss_cpu.json
    python bench/bench_faiss.py --threads-scaling 1,2,4,8,16 --out bench/results/faiss_cpu_threads.json

Compared on the same keys, queries and threshold:

* ``hsr``: ``HSRIndex(K).range_search(Q, tau)`` (the code filter, ``score >= tau``) and
  ``search(Q, 10)``, at 2 numba threads and at 1 (the scaling);
* ``faiss``: ``IndexFlatIP.range_search(Q, thresh)`` and ``search(Q, 10)`` at 1 and 2 OpenMP
  threads (the faster of the two is the baseline). FAISS keeps scores *strictly above*
  ``thresh``, so it gets ``thresh = nextafter(float32(tau), -inf)``;
* ``blas``: the scan a user writes: ``S = Q @ K[c].T`` per chunk of 32768 keys (numpy's BLAS),
  ``np.nonzero(S >= tau)``.

Thresholds: ``tau`` is the 99th percentile of the scores of a sample (64 queries x 4096 keys),
one value for every query of a call (FAISS takes one threshold per call), so a query keeps
about its top 1% on average. Keys: real SmolLM2-135M post-RoPE keys (layer 9, kv head 0, 32K
tokens of real text; 128K and 1M are those keys tiled, as in ``bench_codes_cpu.py``), and
synthetic N(0, 1) keys; d = 64. Queries: the three query heads of that kv head at the last
positions (real), N(0, 1) (synthetic); 1, 8, 64 and 512 per call.

Single queries (``single``; ``--single-only`` runs only these): one query per call, each with
its own threshold (the 99th percentile of its scores: top 1% exactly), medians over 8 queries
spread over the batch — the decode case of the issue's first goal (in the batch section the
first real query happens to have no score above the shared tau).

Results are checked: hsr's sets equal the canonical brute-force sets (on up to 16 queries
per configuration); FAISS's and BLAS's sets differ from them only by keys whose canonical
score is within the float summation band of tau (their sums are not the canonical one).

Timing: every method of a configuration runs interleaved with the others, ``R`` rounds,
medians reported (the machine is shared; ratios within a round are what to read). numba's
compile time is measured apart, in a fresh process with an empty cache.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numba  # noqa: E402

try:
    import faiss
except ImportError:  # the thread-scaling mode runs without it (hosts where it is not installed)
    faiss = None

import hsr  # noqa: E402
from _results import default_out, save  # noqa: E402
from hsr.testing import realdata  # noqa: E402

K_TOP = 10
BLAS_CHUNK = 32768


def real_data(n_tokens=32768, layer=9, kv_head=0):
    path = realdata.cache_path(n_tokens)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/capture_real_keys.py --n-tokens {n_tokens} "
                         f"--layers {layer} --no-stats first")
    cap = realdata.load_capture(path, [layer])
    K = np.ascontiguousarray(cap["k"][layer][kv_head], dtype=np.float32)
    Q = cap["q"][layer][3 * kv_head:3 * kv_head + 3, -512:]  # (3, 512, d): the group's heads
    Q = np.ascontiguousarray(Q.transpose(1, 0, 2).reshape(-1, K.shape[1])[-512:], dtype=np.float32)
    return K, Q


def threshold(Q, K, rng):
    """The 99th percentile of a sample of scores: one tau for every query."""
    qi = rng.integers(0, len(Q), 64)
    ki = rng.integers(0, len(K), 4096)
    return float(np.quantile((Q[qi] @ K[ki].T).ravel(), 0.99))


def blas_scan(Q, K, tau):
    rows, cols = [], []
    for s in range(0, len(K), BLAS_CHUNK):
        r, c = np.nonzero(Q @ K[s:s + BLAS_CHUNK].T >= tau)
        rows.append(r)
        cols.append(c + s)
    return np.concatenate(rows), np.concatenate(cols)


def with_threads(nt, fn, lib):
    def run():
        if lib == "numba":
            numba.set_num_threads(nt)
        else:
            faiss.omp_set_num_threads(nt)
        return fn()
    return run


def interleaved(fns, budget_s, max_rounds, min_rounds=3):
    """Medians (seconds) of each function over rounds that run all of them, in a shuffled order."""
    for f in fns.values():  # warm-up (compilation, page faults, FAISS's thread pool)
        f()
    ts = {k: [] for k in fns}
    names = list(fns)
    order = np.random.default_rng(1)
    t_start = time.perf_counter()
    for r in range(max_rounds):
        for k in order.permutation(names):  # a fresh order each round: no method always follows another
            t0 = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t0)
        if r + 1 >= min_rounds and time.perf_counter() - t_start > budget_s:
            break
    return {k: statistics.median(v) for k, v in ts.items()}, len(ts[next(iter(ts))])


def check(index, Q, K, tau, faiss_res, blas_res, n_check=16):
    """hsr == canonical on up to n_check queries; FAISS and BLAS differences within the band."""
    m = min(len(Q), n_check)
    S = hsr.canonical_scores(Q[:m], K).astype(np.float64)
    lims, _, ids = index.range_search(Q[:m], tau)
    qn = np.linalg.norm(Q[:m].astype(np.float64), axis=1)
    band = 2.2 * 64 * 2.0 ** -24 * qn * np.linalg.norm(K.astype(np.float64), axis=1).max()
    flims, _, fids = faiss_res
    brows, bcols = blas_res
    hsr_ok, f_off, b_off, f_diff, b_diff = True, 0, 0, 0, 0
    for i in range(m):
        want = set(np.flatnonzero(S[i] >= tau).tolist())
        hsr_ok &= set(ids[lims[i]:lims[i + 1]].tolist()) == want
        fs = set(fids[flims[i]:flims[i + 1]].tolist())
        bs = set(bcols[brows == i].tolist())
        for other, name in ((fs, "f"), (bs, "b")):
            diff = other ^ want
            far = sum(abs(S[i, j] - tau) > band[i] for j in diff)
            if name == "f":
                f_diff += len(diff)
                f_off += far
            else:
                b_diff += len(diff)
                b_off += far
    return dict(checked_queries=m, hsr_equals_canonical=bool(hsr_ok), faiss_set_differences=int(f_diff),
                faiss_differences_outside_band=int(f_off), blas_set_differences=int(b_diff),
                blas_differences_outside_band=int(b_off))


def run_config(source, K, Q, tau, m, budget_s, max_rounds):
    Qm = np.ascontiguousarray(Q[:m])
    index = hsr.HSRIndex(K, method="code")
    index.range_search(Qm[:1], tau)  # codes written at the first search: not timed
    fi = faiss.IndexFlatIP(K.shape[1])
    fi.add(K)
    thresh = float(np.nextafter(np.float32(tau), np.float32(-np.inf)))
    fns = {
        "hsr_range_2t": with_threads(2, lambda: index.range_search(Qm, tau), "numba"),
        "hsr_range_1t": with_threads(1, lambda: index.range_search(Qm, tau), "numba"),
        "faiss_range_2t": with_threads(2, lambda: fi.range_search(Qm, thresh), "omp"),
        "faiss_range_1t": with_threads(1, lambda: fi.range_search(Qm, thresh), "omp"),
        "blas_scan": lambda: blas_scan(Qm, K, tau),
        "hsr_search_2t": with_threads(2, lambda: index.search(Qm, K_TOP), "numba"),
        "faiss_search_2t": with_threads(2, lambda: fi.search(Qm, K_TOP), "omp"),
        "faiss_search_1t": with_threads(1, lambda: fi.search(Qm, K_TOP), "omp"),
    }
    med, rounds = interleaved(fns, budget_s, max_rounds)
    numba.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    lims, _, ids, st = index.range_search(Qm, tau, return_stats=True)
    chk = check(index, Qm, K, tau, fi.range_search(Qm, thresh), blas_scan(Qm, K, tau))
    Dh, Ih = index.search(Qm[:16], K_TOP)
    Sx = hsr.canonical_scores(Qm[:16], K).astype(np.float64)
    chk["search_equals_canonical_topk"] = bool(np.array_equal(
        Dh.astype(np.float64), -np.sort(-Sx, axis=1)[:, :K_TOP]))
    ms = {k: v * 1e3 for k, v in med.items()}
    faiss_range = min(ms["faiss_range_2t"], ms["faiss_range_1t"])
    faiss_search = min(ms["faiss_search_2t"], ms["faiss_search_1t"])
    row = dict(keys=source, n=int(len(K)), m=int(m), d=int(K.shape[1]), tau=tau, rounds=rounds,
               hits_per_query=float(len(ids) / m), verified_per_hit=float(st.keys_scored.sum() / max(len(ids), 1)),
               ms=ms, hsr_vs_faiss_range=faiss_range / ms["hsr_range_2t"],
               hsr_vs_blas=ms["blas_scan"] / ms["hsr_range_2t"],
               hsr_search_vs_faiss_search=faiss_search / ms["hsr_search_2t"],
               hsr_thread_scaling_2_over_1=ms["hsr_range_1t"] / ms["hsr_range_2t"],
               hsr_gmac_per_s=m * len(K) * K.shape[1] / (ms["hsr_range_2t"] * 1e-3) / 1e9, **chk)
    print(f"{source:9s} n={len(K):8d} m={m:4d} | hsr {ms['hsr_range_2t']:9.3f} (1t {ms['hsr_range_1t']:9.3f}) "
          f"faiss {faiss_range:9.3f} blas {ms['blas_scan']:9.3f} ms | x faiss {row['hsr_vs_faiss_range']:5.2f} "
          f"x blas {row['hsr_vs_blas']:5.2f} | search hsr {ms['hsr_search_2t']:8.3f} faiss {faiss_search:8.3f} "
          f"| exact {chk['hsr_equals_canonical']} {chk['search_equals_canonical_topk']} "
          f"faiss off-band {chk['faiss_differences_outside_band']}", flush=True)
    return row


def single_queries(source, K, Q, budget_s, n_q=8):
    """One query per call, each with its own top-1% threshold (its 99th-percentile score: FAISS
    and hsr get the same one): medians over ``n_q`` queries spread over the batch, interleaved."""
    index = hsr.HSRIndex(K, method="code")
    index.range_search(Q[:1], 0.0)
    fi = faiss.IndexFlatIP(K.shape[1])
    fi.add(K)
    picks = np.linspace(0, len(Q) - 1, n_q).astype(int)
    per = {k: [] for k in ("hsr_range_2t", "hsr_range_1t", "faiss_range_2t", "faiss_range_1t", "blas_scan")}
    exact = True
    for i in picks:
        q = np.ascontiguousarray(Q[i:i + 1])
        tau = float(np.quantile(hsr.canonical_scores(q, K), 0.99))
        thresh = float(np.nextafter(np.float32(tau), np.float32(-np.inf)))
        fns = {
            "hsr_range_2t": with_threads(2, lambda: index.range_search(q, tau), "numba"),
            "hsr_range_1t": with_threads(1, lambda: index.range_search(q, tau), "numba"),
            "faiss_range_2t": with_threads(2, lambda: fi.range_search(q, thresh), "omp"),
            "faiss_range_1t": with_threads(1, lambda: fi.range_search(q, thresh), "omp"),
            "blas_scan": lambda: blas_scan(q, K, tau),
        }
        med, _ = interleaved(fns, budget_s / n_q, max_rounds=401, min_rounds=51)
        for k, v in med.items():
            per[k].append(v * 1e3)
        _, _, ids = index.range_search(q, tau)
        exact &= set(ids.tolist()) == set(np.flatnonzero(hsr.canonical_scores(q, K)[0] >= tau).tolist())
    numba.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    ms = {k: statistics.median(v) for k, v in per.items()}
    h = min(ms["hsr_range_2t"], ms["hsr_range_1t"])
    f = min(ms["faiss_range_2t"], ms["faiss_range_1t"])
    row = dict(keys=source, n=int(len(K)), m=1, queries=int(n_q), own_tau="99th percentile of each query's scores",
               ms=ms, per_query_ms=per, hsr_vs_faiss_range=f / h, hsr_vs_blas=ms["blas_scan"] / h,
               hsr_equals_canonical=bool(exact))
    print(f"single {source:9s} n={len(K):8d} | hsr {ms['hsr_range_2t']:.3f} (1t {ms['hsr_range_1t']:.3f}) faiss "
          f"{f:.3f} blas {ms['blas_scan']:.3f} ms | x faiss {f / h:.2f} x blas {ms['blas_scan'] / h:.2f} | "
          f"exact {exact}", flush=True)
    return row


COMPILE_SNIPPET = """
import time, numpy as np
t0 = time.perf_counter()
import hsr
t1 = time.perf_counter()
K = np.random.default_rng(0).standard_normal((5000, 64)).astype(np.float32)
idx = hsr.HSRIndex(K, method="code")
for m in (1, 64):
    idx.range_search(K[:m], 3.0)
    idx.search(K[:m], 10)
t2 = time.perf_counter()
for m in (1, 64):
    idx.range_search(K[:m], 3.0)
    idx.search(K[:m], 10)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def compile_times():
    """Seconds of the first searches in a fresh process with an empty numba cache (compile)
    and again with the cache it wrote (load), less the same searches once compiled."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold_cache", "warm_cache"):
            res = subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, capture_output=True, text=True,
                                 check=True, cwd=str(ROOT))
            imp, first, again = map(float, res.stdout.split()[-3:])
            out[label] = dict(import_s=imp, first_searches_s=first, same_searches_compiled_s=again)
    print("compile:", out, flush=True)
    return out


def thread_scaling(threads, budget_s, on_row=None):
    """hsr alone (no FAISS needed) at each numba thread count, synthetic N(0, 1) keys, d = 64,
    the same shared tau per configuration as the main table: medians of interleaved rounds.
    ``on_row(rows)`` after each configuration (the caller saves: a time limit keeps them)."""
    rng = np.random.default_rng(0)
    out = []
    for n, m in ((32768, 1), (1 << 20, 1), (131072, 64), (1 << 20, 64), (1 << 20, 512)):
        K = rng.standard_normal((n, 64)).astype(np.float32)
        Q = rng.standard_normal((max(m, 64), 64)).astype(np.float32)
        tau = threshold(Q, K, rng)
        Qm = np.ascontiguousarray(Q[:m])
        index = hsr.HSRIndex(K, method="code")
        index.range_search(Qm, tau)
        fns = {f"range_{t}t": with_threads(t, lambda: index.range_search(Qm, tau), "numba") for t in threads}
        fns.update({f"search_{t}t": with_threads(t, lambda: index.search(Qm, K_TOP), "numba") for t in threads})
        med, rounds = interleaved(fns, budget_s, max_rounds=201)
        ms = {k: v * 1e3 for k, v in med.items()}
        one = ms[f"range_{threads[0]}t"]
        row = dict(n=n, m=m, rounds=rounds, ms=ms, range_speedup={t: one / ms[f"range_{t}t"] for t in threads})
        print(f"n={n:8d} m={m:4d} " + " ".join(f"{t}t {ms[f'range_{t}t']:.3f}" for t in threads) + " ms | speed-up "
              + " ".join(f"{row['range_speedup'][t]:.2f}" for t in threads), flush=True)
        out.append(row)
        if on_row is not None:
            on_row(out)
    numba.set_num_threads(max(threads))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="32768,131072,1048576")
    ap.add_argument("--batches", default="1,8,64,512")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of timing per configuration (at least 3 rounds)")
    ap.add_argument("--out", default=default_out("faiss_cpu.json"))
    ap.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    ap.add_argument("--single-only", action="store_true",
                    help="only the single-query section (own thresholds), written to --out")
    ap.add_argument("--threads-scaling", default=None,
                    help="comma-separated numba thread counts: only hsr's scaling on synthetic keys, to --out")
    args = ap.parse_args()
    if args.threads_scaling:
        from hsr.index import _code_kernels

        threads = [int(t) for t in args.threads_scaling.split(",")]
        thread_scaling(threads, args.budget, lambda rows: save(
            args.out, dict(scaling=rows), flavour=_code_kernels._FLAVOUR, numba_threads=numba.config.NUMBA_NUM_THREADS))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        sizes, batches, args.budget = sizes[:2], batches, 1.5
    Kr, Qr = real_data()
    rng = np.random.default_rng(0)
    singles = []
    for source in ("real", "synthetic"):
        for n in sizes[:2]:
            if source == "real":
                K = np.ascontiguousarray(np.tile(Kr, (-(-n // len(Kr)), 1))[:n])
                Q = Qr
            else:
                K = np.random.default_rng(n).standard_normal((n, Kr.shape[1])).astype(np.float32)
                Q = np.random.default_rng(n + 1).standard_normal((64, Kr.shape[1])).astype(np.float32)
            singles.append(single_queries(source, K, Q, args.budget * 2))
    if args.single_only:
        save(args.out, dict(single=singles), note="2 cores shared with other jobs while measuring: medians of "
             "interleaved rounds; read ratios", faiss_version=faiss.__version__)
        return
    rows = []
    for source in ("real", "synthetic"):
        for n in sizes:
            if source == "real":
                K = np.ascontiguousarray(np.tile(Kr, (-(-n // len(Kr)), 1))[:n])
                Q = Qr
            else:
                K = rng.standard_normal((n, Kr.shape[1])).astype(np.float32)
                Q = rng.standard_normal((512, Kr.shape[1])).astype(np.float32)
            tau = threshold(Q, K, rng)
            for m in batches:
                budget = args.budget * (2 if n * m >= 1 << 28 else 1)
                rows.append(run_config(source, K, Q, tau, m, budget, max_rounds=201))
    comp = compile_times()
    path = save(args.out, dict(configs=rows, single=singles, compile=comp),
                note="2 cores shared with other jobs while measuring: medians of interleaved rounds; read ratios",
                numba_threads=numba.config.NUMBA_NUM_THREADS, faiss_version=faiss.__version__,
                top_fraction="tau = 99th percentile of a 64 x 4096 sample of scores, one per call", search_k=K_TOP)
    plot(rows, args.plot or str(pathlib.Path(path).with_suffix(".png")))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({r["keys"] for r in rows})
    sizes = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(len(sources), len(sizes), figsize=(4.2 * len(sizes), 3.6 * len(sources)), squeeze=False)
    series = [("hsr_range_2t", "hsr range_search", "C0", "-"), ("faiss_range", "FAISS range_search", "C1", "-"),
              ("blas_scan", "BLAS scan", "C2", "-"), ("hsr_search_2t", "hsr search k=10", "C0", "--"),
              ("faiss_search", "FAISS search k=10", "C1", "--")]
    for a, src in enumerate(sources):
        for b, n in enumerate(sizes):
            ax = axes[a][b]
            sel = sorted((r for r in rows if r["keys"] == src and r["n"] == n), key=lambda r: r["m"])
            if not sel:
                continue
            ms = [r["m"] for r in sel]
            for key, label, col, ls in series:
                if key in ("faiss_range", "faiss_search"):
                    ys = [min(r["ms"][key + "_2t"], r["ms"][key + "_1t"]) for r in sel]
                else:
                    ys = [r["ms"][key] for r in sel]
                ax.plot(ms, ys, ls, color=col, marker="o", ms=3, label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{src} keys, n = {n // 1024}K, d = {sel[0]['d']}", fontsize=9)
            ax.set_xlabel("queries per call")
            ax.set_ylabel("ms (median)")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Exact range search (top 1%) and top-10 on 2 shared CPU cores: hsr code filter vs FAISS flat vs BLAS",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
