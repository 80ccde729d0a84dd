"""Start WORLD worker processes (gloo, FileStore) and collect what each saw, with a hard deadline:
a test never waits longer than ``deadline`` seconds, whatever the workers do."""

import os
import pickle
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_world(scenario, world, folder, *, timeout=30.0, deadline=50.0):
    """Run ``tests.distributed._worker`` on ``world`` ranks; returns ``(results, seconds)`` with
    ``results[r]`` rank r's pickled dict, or None where the rank left nothing."""
    folder = str(folder)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.monotonic()
    logs = [open(os.path.join(folder, f"rank{r}.log"), "wb") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed._worker", scenario, str(r), str(world),
                               folder, str(timeout)], cwd=ROOT, env=env, stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(world)]
    try:
        for p in procs:
            left = deadline - (time.monotonic() - t0)
            try:
                p.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for fh in logs:
            fh.close()
    seconds = time.monotonic() - t0
    results = []
    for r in range(world):
        path = os.path.join(folder, f"rank{r}.pkl")
        results.append(pickle.load(open(path, "rb")) if os.path.exists(path) else None)
    return results, seconds
