"""The CPU dense decode kernel against torch's SDPA: one layer's decode step, by cache length.

    python bench/bench_dense_decode_cpu.py --out bench/results/dense_decode_cpu.json

One decode step (one query position) of one SmolLM2-shaped layer (9 query / 3 kv heads, d 64,
float32) over a cache held in buffers with room to grow (as ``HSRCache`` holds it), at 4K-32K
keys, ``B`` 1 and 4:

``hsr``
    :func:`hsr.attention.batched.layer_dense_softmax` (what the transformers backend's dense
    path runs, ``dense_kernel="hsr"``): chunks of each kv head's keys over the threads, every
    key and value row read once for the group's three query rows, merged in float64.
``sdpa_folded``
    torch's SDPA with the group's query heads folded onto their kv head (``(B, 3, 3, 64)``
    against ``(B, 3, n, 64)``: what the backend calls with ``dense_kernel="sdpa"``);
``sdpa_gqa``
    torch's SDPA with ``enable_gqa=True`` (``(B, 9, 1, 64)``).

Reported: milliseconds (median of repeats, each the mean of a batch of calls; numba compiled
first), the kernel's read rate (keys and values once) against the machine's (a torch sum over
1 GiB), and the largest difference of each output from a float64 softmax.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numba
import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402
from _timing import median_of  # noqa: E402

from hsr.attention.batched import layer_dense_softmax  # noqa: E402


def read_rate() -> float:
    x = torch.ones(1 << 28)  # 1 GiB of float32
    return 4 * x.numel() / median_of(lambda: x.sum(), repeat=5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20, help="calls per timed batch")
    ap.add_argument("--out", default=default_out("dense_decode_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    Hkv, G, D = 3, 3, 64
    bw = read_rate()
    print(f"read rate {bw / 1e9:.1f} GB/s ({args.threads} threads)")
    rows = []
    for B in args.batch:
        for n in args.n:
            g = torch.Generator().manual_seed(n + B)
            cap = n + n // 4
            kb = torch.randn(B, Hkv, cap, D, generator=g)
            vb = torch.randn(B, Hkv, cap, D, generator=g)
            q = torch.randn(B, Hkv * G, 1, D, generator=g)
            k, v = kb[:, :, :n], vb[:, :, :n]
            s = D ** -0.5
            keys, values = kb.numpy().reshape(B * Hkv, cap, D), vb.numpy().reshape(B * Hkv, cap, D)
            qn = q.numpy()
            ways = {
                "hsr": lambda: torch.from_numpy(layer_dense_softmax(qn, keys, values, n, s)[0]),
                "sdpa_folded": lambda: torch.nn.functional.scaled_dot_product_attention(
                    q.reshape(B, Hkv, G, D), k, v, scale=s).reshape(B, Hkv * G, 1, D),
                "sdpa_gqa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=s,
                                                                                     enable_gqa=True),
            }
            sc = torch.einsum("bhgd,bhnd->bhgn", q.double().reshape(B, Hkv, G, D), k.double()) * s
            ref = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(sc, -1), v.double()).reshape(B, Hkv * G, 1, D)
            row = dict(B=B, n=n, Hq=Hkv * G, Hkv=Hkv, d=D, bytes=2 * k.numel() * 4)
            for name, fn in ways.items():
                row[f"{name}_err"] = float((fn().double() - ref).abs().max())

                def batch(fn=fn):
                    for _ in range(args.calls):
                        fn()

                row[f"{name}_ms"] = 1e3 * median_of(batch, repeat=5) / args.calls
            row["hsr_gb_s"] = row["bytes"] / (row["hsr_ms"] * 1e-3) / 1e9
            row["speedup_vs_sdpa_folded"] = row["sdpa_folded_ms"] / row["hsr_ms"]
            row["speedup_vs_sdpa_gqa"] = row["sdpa_gqa_ms"] / row["hsr_ms"]
            rows.append(row)
            print(f"B {B} n {n:6d}: hsr {row['hsr_ms']:.3f} ms ({row['hsr_gb_s']:.1f} GB/s), SDPA folded "
                  f"{row['sdpa_folded_ms']:.3f} ({row['speedup_vs_sdpa_folded']:.2f}x), SDPA gqa "
                  f"{row['sdpa_gqa_ms']:.3f} ({row['speedup_vs_sdpa_gqa']:.2f}x); err {row['hsr_err']:.1e} / "
                  f"{row['sdpa_folded_err']:.1e} / {row['sdpa_gqa_err']:.1e}", flush=True)
    save(args.out, rows, threads=args.threads, read_rate_gb_s=bw / 1e9,
         note="one SmolLM2-shaped layer, one query position, float32; median of 5 batches; shared 2-core machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
