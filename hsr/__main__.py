"""Command line: ``python -m hsr [demo|receptive] ...`` (default: the demo)."""

from __future__ import annotations

import argparse
import sys
import time


def _median_time(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _demo_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--n", type=int, default=1 << 17, help="cached keys (default: 131072)")
    p.add_argument("--dim", type=int, default=64, help="head dimension (default: 64)")
    p.add_argument("--queries", type=int, default=32, help="queries (default: 32)")
    p.add_argument("--selectivity", type=float, default=0.001, help="fraction of keys per query (default: 0.001)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--method", default="auto", choices=("auto", "code", "tree", "brute"),
                   help="index backend (default: auto, the code filter at this dimension)")
    return p


def _torch():
    """torch, or None when it is not installed (the core needs only numpy and numba)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def demo(argv=None, args=None) -> int:
    """Build an index over a synthetic clustered KV cache, check it against brute force and
    dense attention, and time it against the dense baselines (a BLAS scan for the search, torch
    SDPA in float32 for softmax attention), warm, in the same run."""
    import numpy as np

    import hsr

    a = args if args is not None else _demo_parser(argparse.ArgumentParser(
        prog="hsr demo", description=demo.__doc__)).parse_args(argv)
    if a.n < 1 or a.dim < 1 or a.queries < 1 or not 0 < a.selectivity <= 1:
        print("hsr demo: --n, --dim and --queries must be >= 1 and --selectivity in (0, 1]", file=sys.stderr)
        return 2
    torch = _torch()

    def step(msg):
        print(f"  {msg} ...", flush=True)

    # numba compiles each kernel at its first call and caches it on disk: a first run pays
    # seconds here, later runs a fraction of one; said and timed apart from everything else
    print("compiling the numba kernels (first run only: they are cached on disk afterwards) ...", flush=True)
    t0 = time.perf_counter()
    _warm(a.dim, a.method)
    compile_s = time.perf_counter() - t0
    print(f"  done in {compile_s:.1f} s", flush=True)

    rng = np.random.default_rng(a.seed)
    step("making the keys")
    # a Gaussian mixture: keys of real models cluster; see docs/benchmarks.md for real keys
    centers = rng.standard_normal((256, a.dim)).astype(np.float32) * 2.0
    keys = centers[rng.integers(0, 256, a.n)] + 0.5 * rng.standard_normal((a.n, a.dim)).astype(np.float32)
    values = rng.standard_normal((a.n, a.dim)).astype(np.float32)
    queries = keys[rng.integers(0, a.n, a.queries)] + 0.3 * rng.standard_normal((a.queries, a.dim)).astype(np.float32)

    step("building the index")
    t0 = time.perf_counter()
    kv = hsr.KVIndex(keys, values, method=a.method)
    kv.index.count(queries[:1], 0.0)  # the code filter writes its codes at the first search
    build = time.perf_counter() - t0

    step("range search: the index against the brute-force scan")
    exact = hsr.canonical_scores(queries, keys)
    k_sel = max(1, int(a.selectivity * a.n))
    tau = np.sort(exact, axis=1)[:, -k_sel].astype(np.float64)
    brute = hsr.BruteForceIndex(keys)
    kv.index.range_search(queries[:2], tau[:2])  # compile outside the timing
    lims, scores, ids, stats = kv.index.range_search(queries, tau, return_stats=True)
    bl, _, bi = brute.range_search(queries, tau)  # the exactness oracle (canonical scores)
    same = all(set(ids[lims[i]:lims[i + 1]].tolist()) == set(bi[bl[i]:bl[i + 1]].tolist())
               for i in range(a.queries))
    tau32 = tau.astype(np.float32)[:, None]

    def scan():  # the dense baseline of a search: one float32 BLAS matmul and a comparison
        return np.nonzero(queries @ keys.T >= tau32)

    scan()
    t_tree = _median_time(lambda: kv.index.range_search(queries, tau))
    t_scan = _median_time(scan)

    step("ReLU^2 attention")
    s = a.dim ** -0.5
    bias = float(np.median(tau)) * s
    out = hsr.hsr_attention(queries, kv, alpha=2, bias=bias)
    ref = hsr.dense_relu_attention(queries, keys, values, alpha=2, bias=bias)  # float64: accuracy only
    relu_err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
    t_relu = _median_time(lambda: hsr.hsr_attention(queries, kv, alpha=2, bias=bias))
    relu_dense = _relu_dense32(torch, queries, keys, values, bias, s)
    relu_dense()
    t_relu_dense = _median_time(relu_dense)

    step("softmax attention")
    eps = 1e-3
    out_s, info = hsr.hsr_attention(queries, kv, kind="softmax", eps=eps, return_info=True)
    ref_s = hsr.dense_softmax_attention(queries, keys, values)  # float64: accuracy only
    soft_err = float(np.abs(out_s - ref_s).max())
    eps_cert = float(info.dropped_bound.max())
    bound = 2 * eps_cert * float(np.abs(values).max())
    t_soft = _median_time(lambda: hsr.hsr_attention(queries, kv, kind="softmax", eps=eps))
    t_sdpa = None
    if torch is not None:
        qt, kt, vt = (torch.from_numpy(x)[None] for x in (queries, keys, values))
        with torch.inference_mode():
            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

            sdpa()  # warm
            t_sdpa = _median_time(sdpa)
            sdpa_err = float(np.abs(sdpa()[0].numpy() - ref_s).max())

    print(f"\nkeys {a.n} x {a.dim} (clustered), queries {a.queries}, {k_sel} keys per query "
          f"({a.selectivity:.2%}); every time below is the median of warm runs in this process")
    print(f"numba compile / load     {compile_s:8.3f} s   (once per machine; cached afterwards)")
    print(f"index build              {build:8.3f} s   {kv.index}")
    print(f"range search exact       {'yes' if same else 'NO'} ({stats.method} == brute-force scan, inclusive >=)")
    print(f"  {stats.method + ' index':22s} {t_tree * 1e3:8.2f} ms   scored {stats.scan_fraction:.2%} of keys in full "
          f"precision ({stats.keys_scored.sum() / max(1, stats.keys_selected.sum()):.2f}x the answer)")
    print(f"  BLAS scan QK^T >= tau  {t_scan * 1e3:8.2f} ms   float32 numpy; the index takes "
          f"{t_tree / t_scan:.2f}x its time")
    print(f"ReLU^2 attention         exact: max rel. error vs a float64 reference {relu_err:.1e}")
    print(f"  hsr_attention          {t_relu * 1e3:8.2f} ms")
    print(f"  dense float32 {'(torch)' if torch is not None else '(numpy)'}  {t_relu_dense * 1e3:8.2f} ms   "
          f"(the index takes {t_relu / t_relu_dense:.2f}x its time)")
    print(f"softmax, target eps={eps:g}  certified dropped mass eps_cert <= {eps_cert:.1e} (largest over queries)")
    print(f"  reported error bound   2 eps_cert max|V| = {bound:.1e}; measured max abs error {soft_err:.1e} "
          f"vs a float64 reference: {'within' if soft_err <= bound + 1e-5 else 'NOT within'} the bound")
    print(f"  hsr_attention          {t_soft * 1e3:8.2f} ms   scored {info.scan_fraction:.1%} of keys")
    if t_sdpa is not None:
        print(f"  torch SDPA float32     {t_sdpa * 1e3:8.2f} ms   exact up to float32 rounding ({sdpa_err:.1e}); "
              f"the index takes {t_soft / t_sdpa:.2f}x its time")
    else:
        print("  torch SDPA             skipped: torch is not installed (pip install torch for this column)")
    ok = same and relu_err <= 1e-4 and soft_err <= bound + 1e-5
    return 0 if ok else 1


def _relu_dense32(torch, q, k, v, bias, scale):
    """Dense ReLU^2 attention in float32 (torch when installed, else numpy): the baseline that
    scores every key, as a model would without an index."""
    import numpy as np

    if torch is not None:
        qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))

        def run():
            with torch.inference_mode():
                w = torch.relu(qt @ kt.T * scale - bias) ** 2
                return (w @ vt) / w.sum(-1, keepdim=True).clamp_min(1e-30)
        return run

    def run_np():
        w = np.maximum(q @ k.T * np.float32(scale) - np.float32(bias), 0) ** 2
        return (w @ v) / np.maximum(w.sum(-1, keepdims=True), np.float32(1e-30))
    return run_np


def _warm(dim: int, method: str) -> None:
    """Run every kernel the demo uses once on a tiny problem of the same types (numba compiles
    per type signature, not per size)."""
    import numpy as np

    import hsr

    rng = np.random.default_rng(0)
    k = rng.standard_normal((64, dim)).astype(np.float32)
    kv = hsr.KVIndex(k, k, method=method)
    q = k[:2]
    kv.index.range_search(q, 0.0, return_stats=True)
    kv.index.count(q, 0.0)
    hsr.BruteForceIndex(k).range_search(q, 0.0)
    hsr.canonical_scores(q, k)
    hsr.hsr_attention(q, kv, alpha=2, bias=0.1, dense_below=0)
    hsr.hsr_attention(q, kv, kind="softmax", eps=1e-3, dense_below=0)


def build_parser() -> argparse.ArgumentParser:
    """``hsr`` / ``python -m hsr``: one subcommand per job, each with its own ``--help``."""
    from . import __version__
    from .attention.receptive import add_receptive_arguments

    p = argparse.ArgumentParser(prog="hsr", description="Exact half-space reporting for sparse attention. "
                                "Without a command: the demo.")
    p.add_argument("--version", action="version", version=f"hsr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,receptive}")
    _demo_parser(sub.add_parser("demo", help="build an index over a synthetic KV cache, check it against "
                                "brute force and dense attention, time both", description=demo.__doc__))
    add_receptive_arguments(sub.add_parser("receptive", help="PowerAttention receptive-field analysis",
                                           description="Receptive fields of PowerAttention and baselines "
                                           "at equal budget"))
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["demo", *argv]  # no command: the demo, with its options
    a = p.parse_args(argv)
    if a.command == "receptive":
        from .attention.receptive import run_receptive

        return run_receptive(a)
    return demo(args=a)


if __name__ == "__main__":
    sys.exit(main())
