"""How good the GPU code filter's codes are under each rotation: the share of keys that survive
the filter (the keys a step then reads in full) with the Haar rotation (the default) and the
randomized Hadamard rotation (``CodeKVCache(rotation="hadamard")``), on the carried real keys
(SmolLM2 post-RoPE keys, 28/4 heads of d 128, ``bench/make_gpu_keys.py``), each row keeping its
top 1%. No timing: the survivor counts decide the bytes. Runs on the CPU (the Triton
interpreter) or a GPU.

    python bench/eval_rotation_codes.py --n 8192 --out bench/results/rotation_codes_cpu.json
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

if not torch.cuda.is_available():  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _results import default_out, save  # noqa: E402

from hsr.kernels.codes import CodeKVCache  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--top", type=float, default=0.01, help="share of keys each row keeps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=default_out("rotation_codes.json"))
    args = ap.parse_args(argv)
    real = np.load(args.real)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k = torch.from_numpy(real["k"].astype(np.float32))[None, :, :args.n].contiguous().to(dev)  # (1, 4, n, 128)
    q = torch.from_numpy(real["q"].astype(np.float32))[None, :, None].contiguous().to(dev)  # (1, 28, 1, 128)
    Hkv, n = k.shape[1], k.shape[2]
    G = q.shape[1] // Hkv
    s = torch.einsum("bhgd,bknd->bhgn", q.view(1, Hkv, G, -1), k)
    tau = torch.quantile(s, 1 - args.top, dim=-1).reshape(1, Hkv * G, 1)
    rows = []
    for seed in args.seeds:
        for rotation in ("haar", "hadamard"):
            cache = CodeKVCache(k, None, seed=seed, rotation=rotation)
            surv = cache.plan(q, tau).n_survivors().cpu()
            err = cache.err[0, :, :n] / k[0].norm(dim=-1)
            rows.append(dict(rotation=rotation, seed=seed, n=n, top=args.top,
                             survivor_share=float(surv.sum()) / (Hkv * n), survivors_per_head=surv.tolist(),
                             union_of_kept_share=float((s >= tau.view(1, Hkv, G, 1)).any(2).float().mean()),
                             key_error_over_norm_median=float(err.median()), defect=cache.defect))
            print(f"seed {seed} {rotation:8s}: survivors {rows[-1]['survivor_share']:.4%} "
                  f"(the kept union {rows[-1]['union_of_kept_share']:.4%}), per head {surv.tolist()}, "
                  f"median error/|k| {rows[-1]['key_error_over_norm_median']:.5f}", flush=True)
            save(args.out, rows)


if __name__ == "__main__":
    main()
