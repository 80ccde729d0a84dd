"""Where an eager decode step's host time goes (GPU): each piece of ``cache.add`` then
``cache.attend`` timed alone, on a small cache so that the GPU work never bounds the loop.

    python bench/diag_eager_host.py --out bench/results/eager_host_<device>_<date>.json

Host microseconds per call (``perf_counter`` over ``--calls`` calls, the device synchronised
only at both ends). Not a benchmark of the step: see ``bench/bench_decode_loop.py``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402

from hsr import AttentionSpec  # noqa: E402
from hsr.kernels._code_plan import capturing  # noqa: E402
from hsr.kernels.codes import CodeKVCache  # noqa: E402


def per_call_us(fn, calls):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=default_out("eager_host.json"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    B, Hq, Hkv, D, n = 1, 28, 4, 128, 4096
    g = torch.Generator(dev).manual_seed(0)
    k = torch.randn(B, Hkv, n, D, device=dev, generator=g).bfloat16()
    v = torch.randn(B, Hkv, n, D, device=dev, generator=g).bfloat16()
    q = torch.randn(B, Hq, 1, D, device=dev, generator=g).bfloat16()
    tau = torch.full((B, Hq, 1), 3.0, device=dev)
    k1, v1 = k[:, :, :1].clone(), v[:, :, :1].clone()
    cache = CodeKVCache(k, v, capacity=n + 2 * args.calls + 200)
    spec = AttentionSpec(kind="softmax", tau=tau, causal=True)
    x = torch.randn(B, Hq, 1, D, device=dev).bfloat16()
    buf = torch.empty_like(x)
    rows = {}
    rows["add (replayed)"] = per_call_us(lambda: cache.add(k1, v1, check=False), args.calls)
    rows["attend (replayed)"] = per_call_us(lambda: cache.attend(q, spec, check=False), args.calls)
    rows["AttentionSpec(...)"] = per_call_us(lambda: AttentionSpec(kind="softmax", tau=tau, causal=True), args.calls)
    cache.replays.enabled = False
    rows["add (launched)"] = per_call_us(lambda: cache.add(k1, v1, check=False), args.calls // 4)
    rows["attend (launched)"] = per_call_us(lambda: cache.attend(q, spec, check=False), args.calls // 4)
    cache.replays.enabled = True
    entries = list(cache.replays._entries.values())  # a diagnostic may look inside
    for e in entries:
        rows[f"graph.replay() alone, {len(e.outputs)} outputs"] = per_call_us(e.graph.replay, args.calls)
    rows["tensor.copy_ (1x28x128 bf16)"] = per_call_us(lambda: buf.copy_(x), args.calls)
    rows["tensor.clone"] = per_call_us(lambda: x.clone(), args.calls)
    rows["torch.cuda.current_stream()"] = per_call_us(torch.cuda.current_stream, args.calls)
    rows["capturing()"] = per_call_us(capturing, args.calls)
    rows["torch.cuda.is_available()"] = per_call_us(torch.cuda.is_available, args.calls)
    rows["sdpa eager (same shape)"] = per_call_us(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.calls)
    for name, us in rows.items():
        print(f"{name:40s} {us:8.1f} us")
    save(args.out, [dict(piece=k_, host_us=v_) for k_, v_ in rows.items()], shape=dict(B=B, Hq=Hq, Hkv=Hkv, D=D, n=n))


if __name__ == "__main__":
    main()
