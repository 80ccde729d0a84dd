"""What the readers-writer lock costs a GPU decode step of ``CodeKVCache``.

    python bench/bench_lock_gpu.py --out bench/out/lock_gpu.json

``CodeKVCache.attend`` takes the cache's read lock (and ``plan``/``run`` nest two more reads
inside it) so that a concurrent ``add`` cannot fall between filter and attention. This times
one decode step (B = 1, M = 1, 28 query / 4 key heads, d = 128, bf16, ReLU^2, the filter's
threshold at the 95th score percentile) with the cache's lock and with a no-op lock swapped in,
in alternating rounds of 100 steps (garbage collection off), each round ended by a device
synchronisation: so the figure is what an eager decode loop sees, host-side launch overhead
included. Reported: the median and quartiles of the rounds' step times, with the lock and
without, and the lock's own host cost (one locked call against the same call undecorated;
``attend`` takes one read for the whole step). ``--profile`` adds a cProfile of the eager step
(where its host time goes), written beside the JSON. A CUDA-graph replay of the step runs no Python, so no lock.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _results import default_out, save  # noqa: E402


class NoLock:
    """Same interface as ``hsr._lock.RWLock`` for what ``reads`` uses; does nothing."""

    def acquire_read(self):
        pass

    release_read = acquire_write = release_write = acquire_read


def lock_host_cost(reps=300_000) -> float:
    """Microseconds the lock adds to one call: a method under ``reads`` (``attend`` takes one
    read for its whole step) against the same method undecorated."""
    from hsr._lock import RWLock, reads

    class Locked:
        def __init__(self):
            self._lock = RWLock()

        @reads
        def attend(self):
            return 0

    class Bare:
        attend = Locked.attend.__wrapped__

    per_call = []
    for obj in (Locked(), Bare()):
        t0 = time.perf_counter()
        for _ in range(reps):
            obj.attend()
        per_call.append((time.perf_counter() - t0) / reps * 1e6)
    return per_call[0] - per_call[1]


def profile_steps(step, sync, steps, path) -> None:
    """cProfile of ``steps`` eager decode steps (host time by function) into a text file."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    sync()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(30)
    with open(path, "w") as f:
        f.write(f"{steps} eager decode steps\n" + buf.getvalue())
    print(f"wrote {path}")


def main():
    import torch

    from hsr import AttentionSpec
    from hsr.kernels import CodeKVCache

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32768,131072", help="keys per head (default: 32768,131072)")
    ap.add_argument("--rounds", type=int, default=40, help="alternating rounds (default: 40)")
    ap.add_argument("--steps", type=int, default=100, help="decode steps per round (default: 100)")
    ap.add_argument("--device", default="cuda", help="default: cuda (cpu runs the Triton interpreter: a check, not a timing)")
    ap.add_argument("--profile", action="store_true", help="also profile the eager step's host time")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/out/lock_gpu.json)")
    a = ap.parse_args()
    dev = a.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    gc.disable()
    host_us = lock_host_cost()
    print(f"lock, host: {host_us:.2f} us per attend (one read)", flush=True)
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        k = torch.randn(1, 4, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 4, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(1, 28, 1, 128, device=dev, dtype=torch.bfloat16, generator=g)
        cache = CodeKVCache(k, v, seed=0)
        s = (q.float().reshape(4, 7, 128) @ k.float()[0].transpose(1, 2))  # (4, 7, n)
        tau = torch.quantile(s[:, :, :16384], 0.95, dim=-1).reshape(1, 28, 1).contiguous()
        scale = 128 ** -0.5
        bias = (tau * scale).contiguous()
        step = lambda: cache.attend(q, AttentionSpec(kind="relu", alpha=2, bias=bias))[0]  # noqa: E731
        real_lock = cache._lock  # the bench swaps it; the library never does
        for _ in range(20):
            step()
        sync()
        times = {"locked": [], "unlocked": []}
        for r in range(a.rounds):
            for name in (("locked", "unlocked") if r % 2 == 0 else ("unlocked", "locked")):
                cache._lock = real_lock if name == "locked" else NoLock()
                sync()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step()
                sync()
                times[name].append((time.perf_counter() - t0) / a.steps * 1e6)
        cache._lock = real_lock
        if a.profile:
            out = a.out or default_out("lock_gpu.json")
            profile_steps(step, sync, a.steps, out.replace(".json", f"_profile_{n}.txt"))
        q1l, lk, q3l = (float(x) for x in np.percentile(times["locked"], [25, 50, 75]))
        q1u, un, q3u = (float(x) for x in np.percentile(times["unlocked"], [25, 50, 75]))
        row = dict(n=n, step_us_locked=lk, step_us_unlocked=un, quartiles_locked=[q1l, q3l],
                   quartiles_unlocked=[q1u, q3u], lock_host_us=host_us, lock_host_share=host_us / un,
                   rounds_us=times)
        rows.append(row)
        print(f"n={n:7d}  eager step {lk:7.1f} us locked [{q1l:.1f}, {q3l:.1f}], {un:7.1f} us unlocked "
              f"[{q1u:.1f}, {q3u:.1f}]; the lock's host cost {host_us:.2f} us = {100 * host_us / un:.2f}% "
              f"of the step", flush=True)
    save(a.out or default_out("lock_gpu.json"), rows, description=__doc__.strip().splitlines()[0])


if __name__ == "__main__":
    main()
