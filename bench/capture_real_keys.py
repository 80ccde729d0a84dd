"""Capture post-RoPE queries/keys of SmolLM2-135M on real text and report how spread softmax is.

    python bench/capture_real_keys.py --n-tokens 4096            # capture (or reuse) + stats
    python bench/capture_real_keys.py --n-tokens 8192 --recapture

Writes ``bench/cache/smollm2_qk_<n>.npz`` (float16 q/k of every layer, see
``hsr.testing.realdata``) and merges a summary into ``bench/results/real_keys_stats.json``
under ``runs["<n>"]``.

Per layer and query head (query head h uses KV head h // 3), with scaled scores
``s_ij = <q_i, k_j> / sqrt(64)`` over causal pairs ``j <= i``:

- ``score_std``: standard deviation of s over all causal pairs;
- ``frac99_last`` / ``frac999_last``: smallest fraction of the n keys whose softmax weights sum to
  >= 99% / 99.9% of the last query's row (the decode case: the query sees every key);
- ``frac99_avg`` / ``frac999_avg``: the same fraction per query row (denominator: the i+1 keys
  row i can see), averaged over ``--query-samples`` query positions evenly spaced over the
  second half of the sequence (rows with at least n/2 keys; early rows see few keys and
  say little about long-context sparsity);
- ``top1pct_threshold``: the 99th percentile of s over all causal pairs (the score a key must
  reach to be among the top 1%), and ``top1pct_mass_last``: the softmax mass of the last query
  carried by its keys at or above that threshold.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hsr.testing import realdata  # noqa: E402


def mass_fraction(scores: np.ndarray, n_valid: np.ndarray, masses=(0.99, 0.999)) -> dict:
    """Fraction of valid keys needed to reach each softmax mass, per row.

    ``scores`` ``(rows, n)`` with invalid (non-causal) entries at ``-inf``; ``n_valid`` the number
    of valid keys per row. Returns {mass: (rows,) fractions}.
    """
    s = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=1, keepdims=True)
    p = -np.sort(-p, axis=1)
    c = np.cumsum(p, axis=1)
    out = {}
    for m in masses:
        # keys needed = first index where cumulative mass reaches m, plus one
        need = (c < m).sum(axis=1) + 1
        need = np.minimum(need, n_valid)
        out[m] = need / n_valid
    return out


def layer_stats(q: np.ndarray, k: np.ndarray, scale: float, n_samples: int, chunk: int = 512) -> dict:
    H, n, _ = q.shape
    rep = H // k.shape[0]
    sample_rows = np.unique(np.linspace(0, n - 1, n_samples).round().astype(np.int64))
    late = sample_rows >= n // 2
    res = {key: [] for key in (
        "score_std", "score_mean", "frac99_last", "frac999_last", "frac99_avg", "frac999_avg",
        "frac99_avg_all", "frac999_avg_all", "top1pct_threshold", "top1pct_mass_last", "top01pct_threshold")}
    for h in range(H):
        qh = q[h].astype(np.float64)
        kh = k[h // rep].astype(np.float64)
        # exact mean / std over all causal pairs, chunked over query rows
        s1 = s2 = 0.0
        cnt = 0
        pieces = []
        rng = np.random.default_rng(h)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            sc = (qh[a:b] @ kh[:b].T) * scale
            mask = np.arange(b)[None, :] <= np.arange(a, b)[:, None]
            v = sc[mask]
            s1 += v.sum()
            s2 += (v * v).sum()
            cnt += v.size
            # reservoir-free subsample for percentiles (about 2M values total)
            take = max(1, int(v.size * min(1.0, 2_000_000 / (n * (n + 1) / 2))))
            pieces.append(rng.choice(v, size=take, replace=False) if take < v.size else v)
        mean = s1 / cnt
        std = float(np.sqrt(max(s2 / cnt - mean * mean, 0.0)))
        allv = np.concatenate(pieces)
        thr1 = float(np.quantile(allv, 0.99))
        thr01 = float(np.quantile(allv, 0.999))

        last = (qh[-1] @ kh.T) * scale
        fl = mass_fraction(last[None], np.array([n]))
        pl = np.exp(last - last.max())
        pl /= pl.sum()

        rows = sample_rows
        sc = (qh[rows] @ kh.T) * scale
        valid = np.arange(n)[None, :] <= rows[:, None]
        sc = np.where(valid, sc, -np.inf)
        fa = mass_fraction(sc, rows + 1)

        res["score_std"].append(std)
        res["score_mean"].append(float(mean))
        res["frac99_last"].append(float(fl[0.99][0]))
        res["frac999_last"].append(float(fl[0.999][0]))
        res["frac99_avg"].append(float(fa[0.99][late].mean()))
        res["frac999_avg"].append(float(fa[0.999][late].mean()))
        res["frac99_avg_all"].append(float(fa[0.99].mean()))
        res["frac999_avg_all"].append(float(fa[0.999].mean()))
        res["top1pct_threshold"].append(thr1)
        res["top01pct_threshold"].append(thr01)
        res["top1pct_mass_last"].append(float(pl[last >= thr1].sum()))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=4096)
    ap.add_argument("--layers", type=str, default=None, help="comma-separated layer ids (default: all)")
    ap.add_argument("--cache-dir", default="bench/cache")
    ap.add_argument("--recapture", action="store_true", help="ignore an existing cache file")
    ap.add_argument("--values", action="store_true", help="also capture the values (v) of each layer")
    ap.add_argument("--no-stats", action="store_true", help="capture only; skip the O(n^2) statistics")
    ap.add_argument("--query-samples", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "real_keys_stats.json"),
                    help="JSON path (default: bench/out/)")
    args = ap.parse_args(argv)

    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    path = realdata.cache_path(args.n_tokens, args.cache_dir)
    t0 = time.perf_counter()
    if args.recapture or not path.exists():
        model, tok = realdata.load_smollm2()
        t_load = time.perf_counter() - t0
        # past the trained 8K the geometry is still the real model's (RoPE evaluated further out),
        # but the model was not trained there: the capture's meta records "extrapolated"
        cap = realdata.capture_qk(model, tok, None, n_tokens=args.n_tokens, layers=layers,
                                  with_values=args.values, extrapolate=True)
        del model
        t1 = time.perf_counter()
        realdata.save_capture(path, cap)
        t_save = time.perf_counter() - t1
        print(f"model load {t_load:.1f} s, capture ({args.n_tokens} tokens, "
              f"{len(cap['layers'])} layers) {cap['meta']['capture_seconds']:.1f} s, save {t_save:.1f} s")
        # the stats use the float16 values stored in the cache, like every consumer does
        cap = realdata.load_capture(path, layers)
    else:
        cap = realdata.get_real_qk(args.n_tokens, layers, args.cache_dir)
        print(f"loaded cache in {time.perf_counter() - t0:.1f} s "
              f"(captured in {cap['meta'].get('capture_seconds', float('nan')):.1f} s)")
    size = path.stat().st_size
    print(f"cache: {path} ({size / 2**20:.1f} MiB)")
    meta = cap["meta"]
    print(f"model: {meta['num_hidden_layers']} layers, {meta['num_attention_heads']} q heads, "
          f"{meta['num_key_value_heads']} kv heads, head_dim {meta['head_dim']}, "
          f"max_pos {meta['max_position_embeddings']}, rope {meta['rope']}")
    if args.no_stats:
        return 0

    t0 = time.perf_counter()
    per_layer = {}
    hdr = (f"{'layer':>5} {'std':>6} {'f99_last':>17} {'f99.9_last':>17} {'f99_avg':>17} "
           f"{'f99.9_avg':>17} {'thr1%':>6}")
    print(hdr)
    print("      (cells: mean [min-max] over the 9 query heads; fractions in %)")
    for l in cap["layers"]:
        st = layer_stats(cap["q"][l], cap["k"][l], cap["scale"], args.query_samples)
        per_layer[str(l)] = st

        def cell(key):
            a = np.asarray(st[key]) * 100
            return f"{a.mean():5.1f} [{a.min():4.1f}-{a.max():4.1f}]"

        print(f"{l:>5} {np.mean(st['score_std']):6.2f} {cell('frac99_last'):>17} {cell('frac999_last'):>17} "
              f"{cell('frac99_avg'):>17} {cell('frac999_avg'):>17} {np.mean(st['top1pct_threshold']):6.2f}",
              flush=True)
    t_stats = time.perf_counter() - t0

    def rng(key):
        a = np.concatenate([np.asarray(v[key]) for v in per_layer.values()])
        return [float(a.min()), float(a.max())]

    overall = {key: rng(key) for key in ("frac99_last", "frac999_last", "frac99_avg", "frac999_avg",
                                         "frac999_avg_all", "score_std", "top1pct_threshold")}
    print("overall [min, max] over layers and heads:")
    for key, (a, b) in overall.items():
        print(f"  {key:18s} {a:.4f} .. {b:.4f}")
    print(f"stats in {t_stats:.1f} s")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {}
    if out.exists():
        try:
            doc = json.loads(out.read_text())
        except Exception:
            doc = {}
    doc.setdefault("description", __doc__.strip().split("\n\n", 1)[1])
    doc.setdefault("runs", {})
    doc["runs"][str(args.n_tokens)] = {
        "meta": meta,
        "cache_file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "cache_bytes": size,
        "query_samples": args.query_samples,
        "overall_min_max": overall,
        "per_layer": per_layer,
    }
    out.write_text(json.dumps(doc, indent=1))
    print(f"summary: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
