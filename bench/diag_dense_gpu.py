"""Where a dense decode step's attention time goes on the GPU (8B shapes: 32/8 heads, d 128,
bf16), each form captured in a CUDA graph and replayed: the forms a static cache can use
(attending over the whole capacity under a mask, so one graph serves every length) against
SDPA over exactly the valid keys (one graph per length: the floor).

    python bench/diag_dense_gpu.py --out bench/results/diag_dense_gpu.json
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _results import default_out, save  # noqa: E402
from bench_gpu_codes import graph  # noqa: E402


def graph_us(fn, reps=50):
    replay = graph(fn)
    replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=default_out("diag_dense_gpu.json"))
    args = ap.parse_args()
    Hq, Hkv, D = 32, 8, 128
    G = Hq // Hkv
    rows = []
    for n in (32768, 131072):
        for B in (1, 8):
            for cap in (n + 65, (n + 65 + 127) // 128 * 128):
                dev = "cuda"
                q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
                k = torch.randn(B, Hkv, cap, D, device=dev, dtype=torch.bfloat16)
                v = torch.randn_like(k)
                pos = torch.arange(cap, device=dev)
                held = (pos < n).view(1, 1, 1, cap).expand(B, Hkv, 1, cap)
                held_q = (pos < n).view(1, 1, 1, cap).expand(B, 1, 1, cap)
                add = torch.zeros(B, 1, 1, cap, device=dev, dtype=torch.bfloat16).masked_fill(~held_q, float("-inf"))
                forms = {
                    "groups_bool_mask (dense_attend before)": lambda: F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v, attn_mask=held),
                    "repeat_kv_bool_mask": lambda: F.scaled_dot_product_attention(
                        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=held_q),
                    "repeat_kv_float_mask": lambda: F.scaled_dot_product_attention(
                        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=add),
                    "gqa_bool_mask (CodeLayer.dense_attend)": lambda: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=held_q, enable_gqa=True),
                    "gqa_float_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=add, enable_gqa=True),
                    "groups_float_mask": lambda: F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v,
                                                                                attn_mask=add.expand(B, Hkv, 1, cap)),
                    "exact_n_gqa": lambda: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True),
                    "exact_n_groups": lambda: F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k[:, :, :n], v[:, :, :n]),
                }
                row = dict(n=n, B=B, cap=cap)
                for name, fn in forms.items():
                    try:
                        row[name] = round(graph_us(fn), 1)
                    except Exception as exc:
                        row[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                print(row, flush=True)
                save(args.out, rows, note="one layer's decode attention, 32/8 heads, d 128, bf16, CUDA graph replay, us")
                del k, v
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
