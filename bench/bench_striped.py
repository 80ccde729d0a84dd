"""A decode loop over a KV cache striped over W GPUs (``hsr.distributed.StripedDecodeStep``).

    python bench/bench_striped.py --worlds 1,2 --n 131072 1048576 4194304 --batch 1 8 \\
        --out bench/results/striped_<device>_<date>.json
    python bench/bench_striped.py --device cpu --worlds 1,2 --n 256 --batch 1 --steps 2 --reps 1   # smoke test

For each world size W (one process per GPU, NCCL; ``--device cpu``: gloo and Triton's
interpreter, a smoke test only), context length n and batch B:

* ``striped_ms``: one decode step of the loop (the cache grows every step): the rank whose turn
  it is adds the token, every rank filters and attends its stripe (one replayed CUDA graph),
  then one all_gather of the partials and the merge (a second graph). Median over ``--reps``
  of the mean over ``--steps`` steps, CUDA events, the slowest rank's figure;
* ``single_step_ms`` (W = 1 only): the one-GPU :class:`hsr.kernels.decode.DecodeStep` loop,
  no collective, the baseline the W-GPU step is compared with;
* ``sdpa_graph_ms`` (W = 1 only, where it fits): torch SDPA over the whole cache at the final
  length, captured in a CUDA graph (dense's best case);
* ``bytes_per_position`` and ``max_context_est``: the cache's bytes per position per GPU
  (``CodeKVCache.memory_bytes``) and the context the W GPUs' free memory would hold (an
  estimate from those bytes, not an allocation);
* ``max_abs_vs_w1``: the last step's output against the W = 1 run's (the same keys, merged
  exactly: float rounding only).

Keys: real post-RoPE SmolLM2 keys (``bench/cache/gpu_real_keys.npz``, ``make_gpu_keys.py``),
28/4 heads, d 128, tiled to n; values a fixed function of the position. Softmax keeps the keys
with ``score >= tau``, tau per query row at the top ``--top`` fraction of the first keys' scores.
A configuration that does not fit is recorded as ``"oom"``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import socket
import statistics
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402


def positions_kv(real_k: np.ndarray, pos: np.ndarray, B: int):
    """Keys and values ``(B, Hkv, len(pos), D)`` float32 of the given global positions: the real
    keys tiled (position p holds real key ``p % n_real``), values a fixed function of p."""
    import torch

    nr = real_k.shape[1]
    k = torch.from_numpy(real_k[:, pos % nr].astype(np.float32))
    v = torch.from_numpy(np.roll(real_k, 1, axis=0)[:, (pos * 7 + 3) % nr].astype(np.float32))
    return k[None].expand(B, -1, -1, -1), v[None].expand(B, -1, -1, -1)


def _timed(fn, steps, reps, sync, dev):
    import torch

    per = []
    for r in range(reps + 1):
        sync()
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(steps):
                fn(r * steps + i)
            b.record()
            sync()
            ms = a.elapsed_time(b) / steps
        else:
            t0 = datetime.datetime.now()
            for i in range(steps):
                fn(r * steps + i)
            ms = (datetime.datetime.now() - t0).total_seconds() * 1e3 / steps
        if r:
            per.append(ms)
    return statistics.median(per)


def _rank_main(rank, world, cfg, folder):
    if cfg["device"] == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    import hsr.distributed as hd
    from hsr.kernels import CodeKVCache

    cuda = cfg["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dt = torch.bfloat16 if cuda else torch.float32
    real = np.load(cfg["real"])
    real_k, real_q = real["k"], real["q"]
    Hkv, D = real_k.shape[0], real_k.shape[2]
    Hq = real_q.shape[0]
    grows = cfg["steps"] * (cfg["reps"] + 1) + 1
    rows = []
    for n in cfg["n"]:
        for B in cfg["batch"]:
            row = dict(world=world, n=n, B=B, Hq=Hq, Hkv=Hkv, D=D)
            try:
                mine = np.arange(rank, n, world)
                k, v = positions_kv(real_k, mine, B)
                local = CodeKVCache(k.to(dev, dt).contiguous(), v.to(dev, dt).contiguous(),
                                    capacity=len(mine) + grows // world + 2)
                del k, v
                q = torch.from_numpy(real_q.astype(np.float32)).reshape(1, Hq, 1, D).expand(B, -1, -1, -1)
                q = q.to(dev, dt).contiguous()
                s0 = (q.float().reshape(B, Hkv, Hq // Hkv, D)
                      @ torch.from_numpy(real_k[:, :4096].astype(np.float32)).to(dev).transpose(-1, -2))
                tau = torch.quantile(s0.reshape(B * Hq, -1), 1 - cfg["top"], dim=-1).reshape(B, Hq, 1).contiguous()
                step = hd.StripedDecodeStep(local, n, q, kind="softmax", tau=tau)
                new = np.arange(n, n + grows)
                kn, vn = positions_kv(real_k, new, B)
                kn, vn = kn.to(dev, dt).contiguous(), vn.to(dev, dt).contiguous()

                def body(i):
                    return step(q, kn[:, :, i:i + 1], vn[:, :, i:i + 1])

                ms = _timed(body, cfg["steps"], cfg["reps"], sync, dev)
                out = body(grows - 1).float().cpu()
                step.check()
                slowest = torch.tensor([ms], dtype=torch.float64, device=dev)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                row["striped_ms"] = float(slowest)
                row["gather_capture_error"] = step.capture_error
                row["tokens_per_s"] = B * 1e3 / row["striped_ms"]
                mem = local.memory_bytes()
                per_pos = (mem["kv"] + mem["index"]) / local.capacity
                row["bytes_per_position"] = per_pos
                if cuda:
                    free, _ = torch.cuda.mem_get_info(dev)
                    row["max_context_est"] = int(world * (len(local) + 0.9 * free / per_pos))
                torch.save(out, os.path.join(folder, f"out_{world}_{n}_{B}_{rank}.pt"))
                if world == 1:
                    row.update(_single_baselines(local, q, tau, kn, vn, dict(cfg, n_now=n), sync, dev))
                step = local = None  # free the cache before the next configuration
            except torch.cuda.OutOfMemoryError:
                row["striped_ms"] = "oom"
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
    if rank == 0:
        torch.save(rows, os.path.join(folder, f"rows_{world}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _single_baselines(local, q, tau, kn, vn, cfg, sync, dev):
    """On one GPU: the plain DecodeStep loop and SDPA (graph, final length) over the same cache."""
    import torch

    res = {}
    local.crop(cfg["n_now"])  # back to the start length
    step = local.decode_step(q, kn[:, :, :1], vn[:, :, :1], kind="softmax", tau=tau)
    res["single_step_ms"] = _timed(lambda i: step(q, kn[:, :, i:i + 1], vn[:, :, i:i + 1]), cfg["steps"],
                                   cfg["reps"], sync, dev)
    if dev.type == "cuda":
        try:
            n = len(local)
            k, v = local.k[:, :, :n], local.v[:, :, :n]

            def dense():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            dense()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                dense()
            res["sdpa_graph_ms"] = _timed(lambda i: g.replay(), cfg["steps"], cfg["reps"], sync, dev)
        except torch.cuda.OutOfMemoryError:
            res["sdpa_graph_ms"] = "oom"
    return res


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--n", type=int, nargs="+", default=[131072, 1048576, 4194304])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=float, default=0.01)
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    ap.add_argument("--out", default=default_out("striped.json"))
    args = ap.parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for world in (int(w) for w in args.worlds.split(",")):
            cfg = dict(vars(args), port=_free_port())
            mp.spawn(_rank_main, args=(world, cfg, folder), nprocs=world, join=True)
            results += torch.load(os.path.join(folder, f"rows_{world}.pt"))
        for row in results:  # the W-rank outputs against the one-rank run's (same keys, same steps)
            base = os.path.join(folder, f"out_1_{row['n']}_{row['B']}_0.pt")
            mine = os.path.join(folder, f"out_{row['world']}_{row['n']}_{row['B']}_0.pt")
            if os.path.exists(base) and os.path.exists(mine):
                row["max_abs_vs_w1"] = float((torch.load(mine) - torch.load(base)).abs().max())
            one = next((r for r in results if r["world"] == 1 and r["n"] == row["n"] and r["B"] == row["B"]), None)
            if one and isinstance(one.get("striped_ms"), float) and isinstance(row.get("striped_ms"), float):
                row["speedup_vs_w1_striped"] = one["striped_ms"] / row["striped_ms"]
                if isinstance(one.get("single_step_ms"), float):
                    row["speedup_vs_single_step"] = one["single_step_ms"] / row["striped_ms"]
                if isinstance(one.get("sdpa_graph_ms"), float):
                    row["speedup_vs_sdpa_graph"] = one["sdpa_graph_ms"] / row["striped_ms"]
    save(args.out, results, steps=args.steps, reps=args.reps, top=args.top,
         gpus=torch.cuda.device_count() if args.device == "cuda" else 0)


if __name__ == "__main__":
    main()
