"""Decode over a KV cache sharded by sequence position (``hsr.distributed.ShardedKVCache``).

For each total length N: one decode step (``q (1, Hq, 1, d)``, softmax over the keys with
``score >= tau``, tau per head at the 99.9th percentile of a sample of scores) timed

* ``sharded``: ``--world`` processes, each holding N / world positions (a CodeKVCache on the GPU,
  a KVCacheIndex on the CPU), queries broadcast from rank 0, partials gathered and merged;
  with the step's phases (broadcast, local attention, gather, merge) from a second pass that
  synchronises the GPU between them;
* ``single``: one process holding all N positions, the same library call;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over all N (dense).

``--backend gloo`` with CUDA tensors moves the collectives' tensors through host memory.
NCCL refuses two ranks on one GPU, so on a one-GPU machine the sharded run is gloo over two
processes sharing the GPU: it measures the merge's cost, not a two-GPU speed-up.

Usage::

    python bench/bench_distributed.py --device cpu --sizes 32768,65536,131072 --out bench/results/distributed_cpu.json
    python bench/bench_distributed.py --device cuda --sizes 262144,524288,1048576 --hq 28 --hkv 4 --dim 128 \\
        --out bench/results/distributed_h200.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _results import default_out, save  # noqa: E402


def _data(cfg, n, device):
    """Keys, values (1, Hkv, n, d), queries (1, Hq, 1, d) and tau (Hq,), the same in every process."""
    import torch

    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    shape = (1, cfg["hkv"], n, cfg["dim"])
    k = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    k[:, :, ::97] *= 3.0  # a few strong keys
    v = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    q = torch.randn((1, cfg["hq"], 1, cfg["dim"]), generator=g, device=device, dtype=torch.float32)
    grp = cfg["hq"] // cfg["hkv"]
    sample = k[:, :, : min(n, 65536)].repeat_interleave(grp, dim=1)
    scores = (q @ sample.transpose(-1, -2))[0, :, 0]  # (Hq, s)
    tau = torch.quantile(scores.float(), cfg["quantile"], dim=-1)
    return k.to(dt), v.to(dt), q.to(dt), tau.float()


def _time_steps(step, iters, sync):
    step()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def _single(cfg, n):
    import torch
    import torch.nn.functional as F

    import hsr

    dev = cfg["device"]
    k, v, q, tau = _data(cfg, n, dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        from hsr.kernels import CodeKVCache

        cache = CodeKVCache(k, v)
        qq, tt = q, tau
    else:
        cache = hsr.KVCacheIndex(k.numpy(), v.numpy())
        qq, tt = q.numpy(), tau.numpy().astype("float64")
    step = lambda: hsr.hsr_attention(qq, cache, kind="softmax", tau=tt, causal=True)  # noqa: E731
    out = step()
    med, best = _time_steps(step, cfg["iters"], sync)
    sd = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    dense = sd()
    sdpa_med, sdpa_best = _time_steps(sd, cfg["iters"], sync)
    out_t = out if torch.is_tensor(out) else torch.from_numpy(out)
    return {"single_s": med, "single_best_s": best, "sdpa_s": sdpa_med, "sdpa_best_s": sdpa_best,
            "single_vs_sdpa_max_abs": float((out_t.float() - dense.float()).abs().max())}, out_t.float().cpu()


def _rank_main(rank, cfg, folder):
    world = cfg["world"]
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    import torch
    import torch.distributed as dist

    import hsr
    import hsr.distributed as hd

    dev = cfg["device"]
    if dev == "cuda":  # one GPU per rank where there are enough; else they share
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(cfg["backend"], init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    res = {}
    for n in cfg["sizes"]:
        k, v, q, tau = _data(cfg, n, dev)
        a, b = hd.shard_range(n, world, rank)
        if dev == "cuda":
            from hsr.kernels import CodeKVCache

            here = torch.device("cuda", torch.cuda.current_device())
            local = CodeKVCache(k[:, :, a:b].to(here).contiguous(), v[:, :, a:b].to(here).contiguous())
            qq, tt = q.to(here), tau.cpu().numpy().astype("float64")
        else:
            local = hsr.KVCacheIndex(k[:, :, a:b].numpy(), v[:, :, a:b].numpy())
            qq, tt = q.numpy(), tau.numpy().astype("float64")
        del k, v
        cache = hd.ShardedKVCache(local)
        # every rank holds q already (SPMD, as inside a model): no broadcast, one collective a step
        cache.broadcast_queries = False
        spmd = lambda: hsr.hsr_attention(qq, cache, kind="softmax", tau=tt, causal=True)  # noqa: E731
        spmd()
        dist.barrier()
        spmd_med, _ = _time_steps(spmd, cfg["iters"], sync)
        cache.broadcast_queries = True
        mine = qq if rank == 0 else None
        step = lambda: hsr.hsr_attention(mine, cache, kind="softmax", tau=tt, causal=True)  # noqa: E731
        out = step()
        dist.barrier()
        med, best = _time_steps(step, cfg["iters"], sync)
        cache.sync_timing = True
        phases = {p: [] for p in ("broadcast", "local", "gather", "merge", "total")}
        for _ in range(cfg["iters"]):
            step()
            for p in phases:
                phases[p].append(cache.last_timing.get(p, 0.0))
        cache.sync_timing = False
        ph = {p: statistics.median(x) for p, x in phases.items()}
        out_t = out if torch.is_tensor(out) else torch.from_numpy(out)
        shares = [(x + y + z) / t for x, y, z, t in zip(phases["broadcast"], phases["gather"], phases["merge"],
                                                        phases["total"])]
        res[n] = {"sharded_s": med, "sharded_best_s": best, "sharded_no_broadcast_s": spmd_med, "phases_s": ph,
                  "merge_share": statistics.median(shares),
                  "local_keys": b - a}
        torch.save(out_t.float().cpu(), os.path.join(folder, f"out_{n}_{rank}.pt"))
        local = cache = step = None  # free this size before the next
        if dev == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    dist.barrier()
    dist.destroy_process_group()


def _nccl_probe_rank(rank, port, folder):
    """Two ranks on GPU 0 through NCCL: does one all_gather run? (NCCL usually refuses.)"""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(0)
    try:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=20))
        t = torch.full((4,), float(rank), device="cuda")
        out = torch.empty(8, device="cuda")
        dist.all_gather_into_tensor(out, t)
        torch.cuda.synchronize()
        msg = f"ok: {out.tolist()}"
    except Exception as exc:  # record the refusal
        msg = f"{type(exc).__name__}: {str(exc)[:600]}"
    with open(os.path.join(folder, f"nccl{rank}.txt"), "w") as fh:
        fh.write(msg)
    os._exit(0)


def probe_nccl():
    """What NCCL says to two ranks on one GPU (a dict rank -> message)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.spawn(_nccl_probe_rank, args=(_free_port(), folder), nprocs=2, join=False)
        deadline = time.time() + 60
        while not ctx.join(timeout=1) and time.time() < deadline:
            pass
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        got = {}
        for r in range(2):
            path = os.path.join(folder, f"nccl{r}.txt")
            got[r] = open(path).read() if os.path.exists(path) else "no answer within 60 s (killed)"
    return got


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--backend", default="gloo", help="gloo (CPU, or CUDA tensors through host memory) or nccl")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes", default="32768,65536,131072")
    ap.add_argument("--hq", type=int, default=8)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--quantile", type=float, default=0.999)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out("distributed.json"))
    ap.add_argument("--probe-nccl", action="store_true", help="first try NCCL with two ranks on GPU 0, and record it")
    args = ap.parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    nccl = None
    if args.probe_nccl:
        try:
            nccl = probe_nccl()
        except Exception as exc:  # the probe must not stop the benchmark
            nccl = {"error": f"{type(exc).__name__}: {exc}"}
        print("NCCL, two ranks on one GPU:", nccl, flush=True)
    cfg = dict(vars(args), sizes=[int(x) for x in args.sizes.split(",")], port=_free_port())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        singles = {}
        for n in cfg["sizes"]:
            row, out = _single(cfg, n)
            singles[n] = out
            rows.append(dict(total_tokens=n, **row))
            print(f"single N={n}: {row}", flush=True)
        mp.spawn(_rank_main, args=(cfg, folder), nprocs=cfg["world"], join=True)
        ranks = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(cfg["world"])]
        for row in rows:
            n = row["total_tokens"]
            r0 = ranks[0][str(n)]
            out0 = torch.load(os.path.join(folder, f"out_{n}_0.pt"))  # rank 0 of the sharded run
            row.update(r0)
            row["local_s_per_rank"] = [rk[str(n)]["phases_s"]["local"] for rk in ranks]
            row["sharded_vs_single_max_abs"] = float((out0 - singles[n]).abs().max())
            row["same_on_every_rank"] = all(
                bool(torch.equal(out0, torch.load(os.path.join(folder, f"out_{n}_{r}.pt"))))
                for r in range(1, cfg["world"]))
            row["speedup_vs_single"] = row["single_s"] / row["sharded_s"]
            row["speedup_vs_sdpa"] = row["sdpa_s"] / row["sharded_s"]
            print(f"N={n}: sharded {row['sharded_s'] * 1e3:.3f} ms (merge share {row['merge_share']:.1%}; "
                  f"{row['sharded_no_broadcast_s'] * 1e3:.3f} ms without the query broadcast), "
                  f"single {row['single_s'] * 1e3:.3f} ms, sdpa {row['sdpa_s'] * 1e3:.3f} ms", flush=True)
    info = {"backend": args.backend, "world": args.world,
            "ranks_per_device": args.world if args.device == "cuda" else None,
            "shape": {"B": 1, "Hq": args.hq, "Hkv": args.hkv, "d": args.dim, "M": 1},
            "kind": "softmax, keys with score >= tau (tau: per head, the %g quantile of sampled scores)" % args.quantile,
            "iters": args.iters, "timer": "median wall-clock seconds per step (synchronised)",
            "nccl_two_ranks_one_gpu": nccl}
    if args.device == "cpu":
        info["numba_threads_per_rank"] = max(1, (os.cpu_count() or 1) // args.world)
    save(args.out, rows, **info)  # the shared schema: {"meta": environment + info, "results": rows}
    return rows


if __name__ == "__main__":
    main()
