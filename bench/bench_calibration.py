"""How often a calibrated ``tau`` drops more than ``eps`` at later decode steps, on real keys
(CPU, float64 shares, no kernel): what ``register_code_attention(certified=True)``'s guard
would catch.

    python bench/bench_calibration.py --out bench/results/calibration_real_keys.json

Keys and queries: ``bench/cache/smollm2_qk_32768.npz`` (post-RoPE queries and keys of
SmolLM2-135M, layers 3, 9, 15, 21; 9 query heads over 3 kv heads, d 64). For a prompt of P
positions, ``tau`` is calibrated per query head as the GPU backend does it
(:func:`hsr.integrations.transformers.calibrate_tau`: each of the last 32 prompt queries keeps
``1 - target`` of its mass, the smallest threshold over them), at ``target = c * eps``. The
next ``--steps`` queries then decode, each over the keys up to its position; for each, the
true share of its softmax mass below ``tau``. Reported per (layer, P, eps, c): the share of
decode rows whose dropped share exceeds ``eps`` (a lower bound on how often the guard sends a
row to full attention: the guard's certified bound is never below the true share), the share
of (step, kv head) groups holding such a row (the guard reads those groups' keys), and the
mean share of visible keys ``tau`` keeps (what the filter attends).
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

from _results import default_out, save  # noqa: E402

from hsr.integrations.transformers import calibrate_tau  # noqa: E402


def decode_shares(q, k, tau, P, steps, scale):
    """``(dropped, kept)`` (Hq, steps): for the queries at P .. P + steps - 1, each over the
    keys up to its position, the true softmax share below ``tau`` and the share of keys kept."""
    Hq = q.shape[0]
    Hkv = k.shape[0]
    G = Hq // Hkv
    dropped = torch.empty(Hq, steps, dtype=torch.float64)
    kept = torch.empty(Hq, steps, dtype=torch.float64)
    for i in range(steps):
        p = P + i
        s = torch.einsum("hd,hnd->hn", q[:, p], k.repeat_interleave(G, 0)[:, :p + 1])  # (Hq, p + 1)
        w = torch.exp((s - s.amax(1, keepdim=True)) * scale)
        keep = s >= tau[:, None]
        dropped[:, i] = (w * ~keep).sum(1) / w.sum(1)
        kept[:, i] = keep.double().mean(1)
    return dropped, kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "smollm2_qk_32768.npz"))
    ap.add_argument("--prompts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=default_out("calibration_real_keys.json"))
    args = ap.parse_args(argv)
    z = np.load(args.real)
    scale = float(z["scale"])
    rows = []
    for layer in [int(x) for x in z["layers"]]:
        q = torch.from_numpy(z[f"q_{layer}"].astype(np.float64))
        k = torch.from_numpy(z[f"k_{layer}"].astype(np.float64))
        Hq, Hkv = q.shape[0], k.shape[0]
        G = Hq // Hkv
        for P in args.prompts:
            for eps in args.eps:
                for c in args.fractions:
                    tau = calibrate_tau(q[None, :, :P].float(), k[None, :, :P].float(), scale, c * eps)[0, :, 0]
                    dropped, kept = decode_shares(q, k, tau.double(), P, args.steps, scale)
                    past = dropped > eps
                    row = dict(layer=layer, prompt=P, eps=eps, target=c * eps, fraction=c,
                               rows_past_eps=float(past.double().mean()),
                               groups_past_eps=float(past.view(Hkv, G, -1).any(1).double().mean()),
                               dropped_median=float(dropped.median()), dropped_max=float(dropped.max()),
                               kept_share=float(kept.mean()))
                    rows.append(row)
                    print(f"layer {layer:2d} P {P:5d} eps {eps:.0e} target {c * eps:.1e}: rows past eps "
                          f"{row['rows_past_eps'] * 100:5.1f}% groups {row['groups_past_eps'] * 100:5.1f}% | "
                          f"dropped median {row['dropped_median']:.1e} max {row['dropped_max']:.1e} | "
                          f"kept {row['kept_share'] * 100:5.1f}%", flush=True)
    save(args.out, rows, steps=args.steps, keys="SmolLM2-135M post-RoPE q/k, layers 3, 9, 15, 21 (real text)")


if __name__ == "__main__":
    main()
