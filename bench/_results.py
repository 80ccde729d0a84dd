"""One result schema for every benchmark: ``{"meta": environment(...), "results": ...}``.

``meta`` says where and when the numbers were measured (date, host CPU and GPU, library
versions, the command line). Scripts write by default to ``bench/out/`` (not committed), so a
run never overwrites the committed figures in ``bench/results/``; pass ``--out bench/results/…``
to refresh those on purpose.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
#: where benchmarks write unless told otherwise (git-ignored)
DEFAULT_OUT = ROOT / "out"


def environment(**extra) -> dict:
    """Date (UTC), machine, device and versions of python, numpy, numba, torch, triton and hsr."""
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                python=platform.python_version(), machine=platform.machine(),
                processor=platform.processor() or platform.machine(), cpus=os.cpu_count())
    for mod in ("numpy", "numba", "torch", "triton", "hsr"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:  # not installed: say so rather than fail
            meta[mod] = None
    try:
        import torch

        meta["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        meta["torch_threads"] = torch.get_num_threads()
    except Exception:
        meta["device"] = "cpu"
    # the threading settings that move CPU timings, where the run set them
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "NUMBA_THREADING_LAYER",
                                      "NUMBA_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    if env:
        meta["env"] = env
    meta.update(extra)
    return meta


def default_out(name: str) -> str:
    """``bench/out/<name>``: the default ``--out`` of a benchmark."""
    return str(DEFAULT_OUT / name)


def save(path, results, **meta) -> str:
    """Write ``{"meta": environment(**meta), "results": results}`` as JSON to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(meta=environment(**meta), results=results), f, indent=1, default=float)
    print(f"wrote {path}")
    return str(path)
