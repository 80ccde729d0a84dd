"""PowerAttention on the GPU: prefill and a decode step, against dense SDPA and compiled
FlexAttention with the same pattern, in one run.

Shapes of the paper's efficiency study: batch 1, 28 query heads, 4 KV heads, head dim 128,
bfloat16, contexts 16K..256K, PowerAttention with 256-token blocks, window 5, one sink block.

* prefill: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``,
  ``torch.compile(flex_attention)`` with ``hsr.attention.power.to_block_mask`` (block lists, no
  dense mask), and ``hsr.power_attention`` (the Triton block-sparse kernel);
* decode (one new query per head at the end of the cache): SDPA over the whole cache,
  ``power_attention`` with M = 1, and the bandwidth floor for the K/V blocks it reads.

Correctness first: ours against compiled Flex on the same mask (relative error) at every size,
and against a float32 dense masked reference at the smallest size. Timing: median of
``triton.testing.do_bench`` (prefill) and of ``do_bench_cudagraph`` (decode, as served). Writes $OUT/power_gpu.json (or bench/results/) and prints a table.

Usage (on a GPU machine): python bench/bench_power_gpu.py [--contexts 16384,32768,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hsr.attention import power_attention, power_pattern, to_block_mask  # noqa: E402


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="16384,32768,65536,131072,262144")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "out")),
                    help="output folder (default: $OUT or bench/out/)")
    a = ap.parse_args()
    dev = "cuda"
    B, Hq, Hkv, D = 1, 28, 4, 128
    pat = power_pattern(block_size=256, window=5, sink=1)
    flex = torch.compile(flex_attention, dynamic=False)
    # measured ceilings
    x = torch.empty(1 << 29, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t_copy = triton.testing.do_bench(lambda: y.copy_(x), quantiles=[0.5])
    copy_bw = 2 * x.numel() / (t_copy * 1e-3)
    del x, y
    rows = []
    for n in [int(c) for c in a.contexts.split(",")]:
        torch.manual_seed(n)
        q = torch.randn(B, Hq, n, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, n, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, n, D, device=dev, dtype=torch.bfloat16)
        row = dict(n=n, density=pat.density(n))
        t0 = time.time()
        bm = to_block_mask(pat, n, device=dev)
        row["block_mask_build_s"] = time.time() - t0
        ours = power_attention(q, k, v, pat, check_finite=False)
        ref_flex = flex(q, k, v, block_mask=bm, enable_gqa=True)
        row["ours_vs_flex_rel_err"] = rel(ours, ref_flex)
        if n == 16384:
            mask = torch.from_numpy(pat.dense_mask(n)).to(dev)
            kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), attn_mask=mask)
            row["ours_vs_dense_rel_err"] = rel(ours, ref)
            del mask, kr, vr, ref
        row["sdpa_prefill_ms"] = triton.testing.do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            quantiles=[0.5])
        row["flex_prefill_ms"] = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True),
                                                         quantiles=[0.5])
        row["ours_prefill_ms"] = triton.testing.do_bench(lambda: power_attention(q, k, v, pat, check_finite=False),
                                                         quantiles=[0.5])
        row["ours_vs_sdpa"] = row["sdpa_prefill_ms"] / row["ours_prefill_ms"]
        row["ours_vs_flex"] = row["flex_prefill_ms"] / row["ours_prefill_ms"]
        row["flex_vs_sdpa"] = row["sdpa_prefill_ms"] / row["flex_prefill_ms"]
        row["ideal_vs_sdpa"] = 1.0 / row["density"]
        # decode: one query per head at the end of the cache
        qd = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
        od = power_attention(qd, k, v, pat, check_finite=False)
        blocks = pat.decode_blocks(n)
        keep = torch.zeros(n, dtype=torch.bool, device=dev)
        for blk in blocks:
            keep[blk * 256:min((blk + 1) * 256, n)] = True
        kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        refd = torch.nn.functional.scaled_dot_product_attention(qd.float(), kr.float(), vr.float(),
                                                               attn_mask=keep[None, None, None, :])
        row["decode_rel_err"] = rel(od, refd)
        del kr, vr, refd
        # decode steps are launched from CUDA graphs in serving stacks: time graph replays so
        # that host launch overhead (tens of microseconds) does not hide the kernels
        row["sdpa_decode_ms"] = triton.testing.do_bench_cudagraph(
            lambda: torch.nn.functional.scaled_dot_product_attention(qd, k, v, enable_gqa=True), quantiles=[0.5])
        row["ours_decode_ms"] = triton.testing.do_bench_cudagraph(
            lambda: power_attention(qd, k, v, pat, check_finite=False), quantiles=[0.5])
        row["ours_decode_eager_ms"] = triton.testing.do_bench(
            lambda: power_attention(qd, k, v, pat, check_finite=False), quantiles=[0.5])
        kv_bytes_read = int(keep.sum().item()) * Hkv * D * 2 * 2
        row["decode_blocks_read"] = len(blocks)
        row["decode_floor_ms"] = kv_bytes_read / copy_bw * 1e3
        row["dense_decode_floor_ms"] = n * Hkv * D * 2 * 2 / copy_bw * 1e3
        row["ours_decode_vs_floor"] = row["ours_decode_ms"] / row["decode_floor_ms"]
        row["ours_decode_vs_sdpa"] = row["sdpa_decode_ms"] / row["ours_decode_ms"]
        rows.append(row)
        print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}), flush=True)
        del q, k, v, bm, ours, ref_flex
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), copy_bytes_per_s=copy_bw,
                shapes=dict(B=B, Hq=Hq, Hkv=Hkv, D=D, dtype="bfloat16"), pattern=pat.describe(),
                timing="prefill: median of triton.testing.do_bench; decode: median of do_bench_cudagraph "
                       "(eager decode time also recorded)")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "power_gpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{'n':>7} {'density':>8} {'SDPA ms':>9} {'Flex ms':>8} {'ours ms':>8} {'vs SDPA':>8} {'vs Flex':>8} "
          f"{'ideal':>6} | {'dec SDPA':>9} {'dec ours':>9} {'floor':>7} {'/floor':>6}")
    for r in rows:
        print(f"{r['n']:>7} {r['density']:>8.4f} {r['sdpa_prefill_ms']:>9.3f} {r['flex_prefill_ms']:>8.3f} "
              f"{r['ours_prefill_ms']:>8.3f} {r['ours_vs_sdpa']:>8.1f} {r['ours_vs_flex']:>8.2f} {r['ideal_vs_sdpa']:>6.1f} | "
              f"{r['sdpa_decode_ms']:>9.4f} {r['ours_decode_ms']:>9.4f} {r['decode_floor_ms']:>7.4f} "
              f"{r['ours_decode_vs_floor']:>6.2f}")


if __name__ == "__main__":
    main()
