"""A decode step's kernels, eagerly, for a profiler: run it under Nsight Compute.

    ncu --launch-skip 9 --launch-count 3 -k regex:"_prepare_kernel|_code_filter_kernel|_merge_kernel" \
        --section WarpStateStats ... python bench/profile_step_ncu.py --config 4:131072:1

Builds the decode-loop bench's cache (real keys, each row keeping its top 1%; ``Hkv:n:B`` as
``diag_step_kernels.py``) and runs the fused step (add one token, filter and attend, merge)
``--steps`` times from the same length. Prints nothing but the step's count: the profiler's
report is the output (``bench/run_gpu_pending.sh ncu``).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_decode_loop import scores  # noqa: E402
from diag_step_kernels import inputs  # noqa: E402

from hsr.kernels.codes import CodeKVCache  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    ap.add_argument("--config", default="4:131072:1", help="Hkv:n:B")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    Hkv, n, B = (int(x) for x in args.config.split(":"))
    q, k, v = inputs(np.load(args.real), Hkv, n, B, torch.device("cuda"))
    n0 = n - 1
    tau = torch.quantile(scores(q, k[:, :, :n0])[0, :, 0], 0.99, dim=-1)
    tau = tau[None, :, None].expand(B, -1, 1).contiguous()
    cache = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n)
    add = (k[:, :, n0:].contiguous(), v[:, :, n0:].contiguous())
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for _ in range(args.steps):
        cache.crop(n0)
        cache._fused(q, tau, bias=0.0, kind="softmax", alpha=2, scale=None, certify=False, out=out, lse=lse, add=add)
    torch.cuda.synchronize()
    print(f"{args.steps} steps at {args.config}, pdl={cache.pdl}")


if __name__ == "__main__":
    main()
