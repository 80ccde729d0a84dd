"""GPU decode with the code filter (hsr.kernels.CodeKVCache) against SDPA and the byte floor.

    python bench/bench_gpu_codes.py --out-dir bench/results          # on a CUDA machine

Workload: decode (one query position), 28 query heads / 4 kv heads, head dim 128, bf16,
batch B in {1, 8}, n in {32K, 128K}; "1% selected": each query row's tau is its own top-1%
score over the n keys (softmax keeps score >= tau; ReLU^2 uses bias = scale * tau, exact).

Keys:
- ``real``: SmolLM2-135M post-RoPE keys captured on the CPU at 32K tokens
  (``bench/capture_real_keys.py``; RoPE evaluated past the model's trained 8K) and carried as
  ``bench/cache/gpu_real_keys.npz`` (``--real``): kv head i is layer i's (3, 9, 15, 21) kv heads
  0 and 1 concatenated (d = 128); its 7 query rows are query heads g%3 and 3+g%3
  concatenated at positions n-1-g//3. n = 128K repeats the 32K sequence 4 times (tiled:
  every key appears 4 times; the top-1% set scales with it). Values are random (they do not
  change what is selected). All B batch rows hold the same keys.
- ``gauss``: i.i.d. Gaussian keys and queries (no structure: what the filter costs when the
  bound is all it has).

Reported per configuration: median times (triton.testing.do_bench) of SDPA (torch's default
backend, GQA), of our step captured in a CUDA graph (filter + attend + merge) and of the
filter alone; the byte floor of each (bytes it must read / measured copy bandwidth); the
survivors (union over the GQA group) and kept keys per row; the max error against a float32
dense masked reference.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hsr import AttentionSpec  # noqa: E402
from hsr.kernels.codes import CodeKVCache  # noqa: E402


def copy_bandwidth(dev) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import triton

    x = torch.empty(2 << 30 >> 1, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def make_inputs(kind, n, B, dev, real, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "real":
        k32 = torch.from_numpy(real["k"].astype(np.float32))  # (4, 32768, 128)
        reps = -(-n // k32.shape[1])
        k = k32.repeat(1, reps, 1)[:, :n]
        q = torch.from_numpy(real["q"].astype(np.float32)).reshape(1, 28, 1, 128)
    else:
        k = torch.randn(4, n, 128, generator=g)
        q = torch.randn(1, 28, 1, 128, generator=g)
    v = torch.randn(4, n, 128, generator=g)
    k = k[None].expand(B, -1, -1, -1).to(dev, torch.bfloat16).contiguous()
    v = v[None].expand(B, -1, -1, -1).to(dev, torch.bfloat16).contiguous()
    q = q.expand(B, -1, -1, -1).to(dev, torch.bfloat16).contiguous()
    return q, k, v


def dense_scores(q, k):
    """fp32 scores ``(B, Hq, M, n)`` of the stored bf16 values, per GQA group (no K copy)."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    s = q.float().reshape(B, Hkv, G * M, D) @ k.float().transpose(-1, -2)
    return s.reshape(B, Hq, M, -1)


def reference(q, k, v, tau, kind, scale, bias):
    """Dense fp32 attention over the keys with score >= tau (GQA by group, no K/V copies)."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    s = dense_scores(q, k)
    keep = s >= tau[..., None]
    if kind == "softmax":
        w = torch.softmax(torch.where(keep, s * scale, -math.inf), -1)
    else:
        w = torch.where(keep, torch.clamp(s * scale - bias[..., None], min=0) ** 2, 0.0)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    out = w.reshape(B, Hkv, -1, s.shape[-1]) @ v.float()
    return out.reshape(B, Hq, M, D)


def graph(fn):
    """Capture ``fn`` in a CUDA graph; return a replay function."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def run(args):
    import triton

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    real = np.load(args.real) if args.real and pathlib.Path(args.real).exists() else None
    kinds = ["real", "gauss"] if real is not None else ["gauss"]
    rows = []
    for kind in kinds:
        for n in args.n:
            for B in args.batch:
                q, k, v = make_inputs(kind, n, B, dev, real)
                scale = 128 ** -0.5
                s = dense_scores(q, k)[..., 0, :]
                tau = torch.quantile(s[0].float(), 1 - args.top, dim=-1)[None].expand(B, -1)[..., None].contiguous()
                bias = (tau * scale).contiguous()
                del s
                cache = CodeKVCache(k, v, seed=0)
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                t_sdpa = triton.testing.do_bench(sdpa, warmup=25, rep=200, return_mode="median")
                if kind == "real" and args.sweep:
                    sweep = []
                    for pps in (1, 2, 4, 8, 16):
                        for bn in (128, 256):
                            for nw in (4, 8):
                                for ns in (2, 3, 4):
                                    f = graph(lambda: cache.plan(q, tau, block_n=bn, num_warps=nw, num_stages=ns,
                                                                   programs_per_sm=pps))
                                    t = triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median")
                                    sweep.append((t, pps, bn, nw, ns))
                    sweep.sort()
                    for t, pps, bn, nw, ns in sweep[:6]:
                        print(f"  sweep n={n} B={B}: {t*1e3:6.1f} us  programs/SM {pps} block_n {bn} warps {nw} "
                              f"stages {ns}")
                    print(f"  sweep n={n} B={B}: default (4, 256, 4, 3): "
                          f"{[t for t, *c in sweep if tuple(c) == (4, 256, 4, 3)][0]*1e3:.1f} us")
                if kind == "real" and args.tune:
                    for bn, nw, ns in ((128, 4, 3), (256, 4, 2), (256, 4, 3), (256, 8, 3), (256, 8, 4)):
                        f = graph(lambda: cache.plan(q, tau, block_n=bn, num_warps=nw, num_stages=ns))
                        t = triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")
                        print(f"  tune filter n={n} B={B} block_n={bn} warps={nw} stages={ns}: {t*1e3:.1f} us "
                              f"({cache.keys_read_bytes() / (t * 1e-3) / bw * 100:.0f}% of copy bw)")
                for akind in ("softmax", "relu"):
                    step = (lambda: cache.attend(q, AttentionSpec(kind="softmax", tau=tau, causal=True))[0]) \
                        if akind == "softmax" else \
                        (lambda: cache.run(q, cache.plan(q, tau, bias=bias), kind="relu", alpha=2)[0])
                    out = step()
                    ref = reference(q, k, v, tau, akind, scale, bias)
                    err = float((out.float() - ref).abs().max())
                    plan = cache.plan(q, tau, bias=bias if akind == "relu" else 0.0)
                    surv = plan.n_survivors().double().mean().item()
                    kept = float((dense_scores(q, k) >= tau[..., None]).sum(-1).double().mean())
                    t_eager = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
                    replay = graph(step)
                    t_graph = triton.testing.do_bench(replay, warmup=25, rep=200, return_mode="median")
                    filt = graph(lambda: cache.plan(q, tau))
                    t_filter = triton.testing.do_bench(filt, warmup=25, rep=200, return_mode="median")
                    run_only = graph(lambda: cache.run(q, plan, kind=akind, alpha=2))
                    t_attend = triton.testing.do_bench(run_only, warmup=25, rep=200, return_mode="median")
                    code_bytes = cache.keys_read_bytes()
                    kv_row = 2 * 128 * 2  # K + V, bf16
                    ours_bytes = code_bytes + B * 4 * surv * kv_row
                    dense_bytes = B * 4 * n * kv_row
                    row = dict(keys=kind, n=n, B=B, attention=akind, sdpa_ms=t_sdpa, ours_graph_ms=t_graph,
                               ours_eager_ms=t_eager, filter_ms=t_filter, attend_ms=t_attend,
                               speedup_vs_sdpa=t_sdpa / t_graph,
                               dense_floor_ms=dense_bytes / bw * 1e3, ours_floor_ms=ours_bytes / bw * 1e3,
                               ours_over_floor=t_graph / (ours_bytes / bw * 1e3),
                               filter_bandwidth_share=(code_bytes / (t_filter * 1e-3)) / bw,
                               survivors_per_head=surv, survivor_fraction=surv / n, kept_per_row=kept,
                               kept_fraction=kept / n, max_abs_err=err)
                    rows.append(row)
                    print(f"{kind:5s} n={n:6d} B={B} {akind:7s} sdpa {t_sdpa*1e3:7.1f} us  ours {t_graph*1e3:7.1f} us "
                          f"(eager {t_eager*1e3:6.1f}, filter {t_filter*1e3:6.1f}, attend {t_attend*1e3:5.1f}) x{t_sdpa/t_graph:4.2f}  "
                          f"floor {row['ours_floor_ms']*1e3:6.1f} us (x{row['ours_over_floor']:.2f})  "
                          f"filter bw {row['filter_bandwidth_share']*100:4.0f}%  surv {surv/n*100:5.2f}%  "
                          f"kept {kept/n*100:5.2f}%  err {err:.2e}", flush=True)
                del cache, q, k, v
                torch.cuda.empty_cache()
    return bw, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 131072], help="cache lengths (default: 32K 128K)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    ap.add_argument("--top", type=float, default=0.01, help="fraction of keys each row keeps (default: 0.01)")
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"),
                    help="carried real keys (default: bench/cache/gpu_real_keys.npz)")
    ap.add_argument("--tune", action="store_true", help="also time filter tile variants on the real keys")
    ap.add_argument("--sweep", action="store_true", help="sweep the filter's launch parameters (real keys)")
    ap.add_argument("--out-dir", default=None, help="where to write the JSON (default: print only)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    bw, rows = run(args)
    import triton

    doc = dict(description=__doc__.strip(), device=torch.cuda.get_device_name(),
               date=datetime.date.today().isoformat(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), copy_bandwidth_Bps=bw, rows=rows)
    if args.out_dir:
        out = pathlib.Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = f"gpu_codes_{torch.cuda.get_device_name().split()[-1].lower()}_{doc['date']}.json"
        (out / name).write_text(json.dumps(doc, indent=1))
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
