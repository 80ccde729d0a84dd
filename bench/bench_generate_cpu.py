"""Decode speed of SmolLM2-135M on the CPU: HSR backends against SDPA, paired, by context length.

    python bench/bench_generate_cpu.py                                    # 1K-8K, 16 steps each
    python bench/bench_generate_cpu.py --lengths 4096 8192 16384 --steps 12 --out bench/results/generate_cpu.json

One SDPA prefill of ``max(--lengths)`` tokens of real text gives the keys and values of every
shorter prompt too (attention is causal: the first ``n`` positions' keys and values do not
depend on later tokens), so each length starts from a copy of that prefill's cache, truncated.
Then ``--steps`` teacher-forced decode steps over the next real tokens, the variants
**alternating step by step** in one process (a load change on a shared machine hits all of
them), each variant with its own cache:

``sdpa``
    transformers' ``sdpa`` backend on a ``DynamicCache`` (what ``generate()`` does by default;
    the cache grows by ``torch.cat``, a copy of the whole cache per layer per step).
``sdpa_hsrcache``
    torch's SDPA through the HSR backend's dense path (``dense_kernel="sdpa"``) on an
    ``HSRCache`` with no index (its layers append into buffers with room to grow: no copy per
    step).
``dense_hsrcache``
    the same with the library's CPU decode kernel (``dense_kernel="hsr"``, the default:
    :func:`hsr.attention.batched.layer_dense_softmax`): full softmax, no index.
``hsr_eps<e>``, ``hsr_top<k>``
    the HSR softmax backend with ``dense_below=0`` on an ``HSRCache(index_from=0)``: the code
    filter index appended per step, certified ``eps``, or each query's ``topk`` best keys, the
    index at every step (``guard=False``).
``hsr_eps<e>_guard``
    the same with the per-layer guard (the default): each layer times its step through the
    index and its dense step (the decode kernel) and takes the faster.

Reported per length and variant: tokens/s (the median step), the median of the per-step speed
ratios against ``sdpa``, ``sdpa_hsrcache`` and ``dense_hsrcache`` (paired: the same step), the agreement of
each step's next-token argmax with ``sdpa``'s, and the backend's decode statistics (keys
scored, largest certified dropped mass). Threads: ``--threads`` for torch and numba alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numba  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402

from hsr.integrations import transformers as ht  # noqa: E402
from hsr.testing.realdata import load_smollm2, real_token_ids  # noqa: E402


def prefill(model, ids, kv_file=None):
    """Keys and values of every layer after an SDPA prefill of ``ids`` (optionally kept in
    ``kv_file``, a torch file, so that repeated runs skip the prefill)."""
    from transformers import DynamicCache

    if kv_file and Path(kv_file).exists():
        kv = torch.load(kv_file)
        if kv["k"][0].shape[2] >= ids.shape[1]:
            return kv, 0.0
    cache = DynamicCache(config=model.config)
    model.set_attn_implementation("sdpa")
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(ids, cache=cache, use_cache=True)
    dt = time.perf_counter() - t0
    kv = dict(k=[l.keys.clone() for l in cache.layers], v=[l.values.clone() for l in cache.layers])
    if kv_file:
        torch.save(kv, kv_file)
    return kv, dt


def filled(cache, kv, n):
    """``cache`` holding the first ``n`` positions of the prefill (an index is built where the
    cache keeps one)."""
    with torch.inference_mode():
        for i, (k, v) in enumerate(zip(kv["k"], kv["v"])):
            cache.update(k[:, :, :n].clone(), v[:, :, :n].clone(), i)
    return cache


def numba_passive():
    """Start numba's thread pool with ``OMP_WAIT_POLICY=PASSIVE`` (its workers sleep after a
    parallel region instead of spinning), then restore the environment. torch's OpenMP runtime
    read the variable when torch loaded, so it keeps its own setting."""
    from numba.np.ufunc import parallel

    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        parallel._launch_threads()
    finally:
        if before is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = before


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per length (after 2 warm-up steps)")
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads (default 1)")
    ap.add_argument("--kv-file", default=None, help="keep the prefill's keys and values here (torch file)")
    ap.add_argument("--numba-passive", action="store_true",
                    help="numba's OpenMP runtime (a second libgomp beside torch's) with OMP_WAIT_POLICY=PASSIVE, "
                         "torch's left at the default: each runtime reads the variable once, when it loads")
    ap.add_argument("--out", default=default_out("generate_cpu.json"))
    args = ap.parse_args(argv)
    if args.numba_passive:
        numba_passive()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)

    model, tok = load_smollm2()
    warm = 2
    total = max(args.lengths) + warm + args.steps + 1
    ids = torch.as_tensor(real_token_ids(tok, total))[None]
    kv, t_prefill = prefill(model, ids[:, :max(args.lengths)], args.kv_file)
    print(f"prefill of {max(args.lengths)} tokens: {t_prefill:.1f} s", flush=True)

    from transformers import DynamicCache

    sdpa_bufs = ht.register_hsr_attention("bench_gen_sdpa_bufs", kind="softmax", eps=args.eps, dense_below=1 << 40,
                                          dense_kernel="sdpa")
    dense = ht.register_hsr_attention("bench_gen_dense", kind="softmax", eps=args.eps, dense_below=1 << 40)
    backends = {
        "sdpa": ("sdpa", None, lambda: DynamicCache(config=model.config)),
        "sdpa_hsrcache": (sdpa_bufs.name, sdpa_bufs, lambda: ht.HSRCache(model.config, index_from=1 << 40)),
        "dense_hsrcache": (dense.name, dense, lambda: ht.HSRCache(model.config, index_from=1 << 40)),
        f"hsr_eps{args.eps:g}": (None, ht.register_hsr_attention("bench_gen_eps", kind="softmax", eps=args.eps,
                                                                 dense_below=0, guard=False), None),
        f"hsr_eps{args.eps:g}_guard": (None, ht.register_hsr_attention("bench_gen_eps_guard", kind="softmax",
                                                                       eps=args.eps, dense_below=0, guard=True), None),
        f"hsr_top{args.topk}": (None, ht.register_hsr_attention("bench_gen_top", kind="softmax", topk=args.topk,
                                                                dense_below=0, guard=False), None),
    }
    for name, (impl, be, make) in list(backends.items()):
        if impl is None:
            backends[name] = (be.name, be, lambda: ht.HSRCache(model.config, index_from=0))

    results = {}
    for n in sorted(args.lengths):
        caches, steps, tokens, build = {}, {k: [] for k in backends}, {k: [] for k in backends}, {}
        for name, (impl, be, make) in backends.items():
            t0 = time.perf_counter()
            caches[name] = filled(make(), kv, n)
            build[name] = time.perf_counter() - t0
        for s in range(warm + args.steps):
            tok_s = ids[:, n + s:n + s + 1]
            order = list(backends) if s % 2 == 0 else list(backends)[::-1]
            if s == warm:
                for impl, be, make in backends.values():
                    if be is not None:
                        be.stats.reset()
            for name in order:
                impl, be, make = backends[name]
                model.set_attn_implementation(impl)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    out = model(tok_s, cache=caches[name], use_cache=True)
                    dt = time.perf_counter() - t0
                if s >= warm:
                    steps[name].append(dt)
                    tokens[name].append(int(out.logits[0, -1].argmax()))
        model.set_attn_implementation("sdpa")
        row = {}
        for name, (impl, be, make) in backends.items():
            r = dict(tokens_per_s=1.0 / statistics.median(steps[name]),
                     speed_vs_sdpa=statistics.median(a / b for a, b in zip(steps["sdpa"], steps[name])),
                     speed_vs_sdpa_hsrcache=statistics.median(
                         a / b for a, b in zip(steps["sdpa_hsrcache"], steps[name])),
                     speed_vs_dense_hsrcache=statistics.median(
                         a / b for a, b in zip(steps["dense_hsrcache"], steps[name])),
                     argmax_agreement=sum(a == b for a, b in zip(tokens[name], tokens["sdpa"])) / args.steps,
                     cache_fill_s=build[name], step_s=steps[name])
            if be is not None and name not in ("sdpa_hsrcache", "dense_hsrcache"):
                st = be.stats.decode.total
                r.update(scored_fraction=st.scored_fraction, selected_fraction=st.selected_fraction,
                         max_dropped=be.stats.decode.max_dropped, dense_calls=st.dense_calls,
                         guarded_calls=st.guarded_calls)
            row[name] = r
            extra = f"  scored {r['scored_fraction']:.3f}  max dropped {r['max_dropped']:.1e}" if "scored_fraction" in r else ""
            print(f"{n:6d} {name:14s} {r['tokens_per_s']:6.2f} tok/s  x{r['speed_vs_sdpa']:.2f} sdpa  "
                  f"x{r['speed_vs_sdpa_hsrcache']:.2f} sdpa_hsrcache  x{r['speed_vs_dense_hsrcache']:.2f} "
                  f"dense_hsrcache  agree {r['argmax_agreement']:.2f}{extra}",
                  flush=True)
        results[str(n)] = row
        del caches
    save(args.out, results, model="SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)",
         steps=args.steps, warmup_steps=warm, threads=args.threads, eps=args.eps, topk=args.topk,
         numba_passive=args.numba_passive,
         prefill_s=t_prefill, note="paired: variants alternate step by step in one process; "
         "median step; the CPU was shared with other jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
