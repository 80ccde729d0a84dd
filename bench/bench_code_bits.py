"""How many bits a per-key code needs: survivors of the exact bound at 8, 4 and 3 bits.

    python bench/bench_code_bits.py          # needs bench/cache/smollm2_qk_32768.npz

For each kv head of SmolLM2 layers 3, 9, 15, 21 (32K real tokens; queries: the head's 3 query
heads at the last 64 positions) the keys are rotated by one seeded random orthogonal matrix and
quantised per key to ``b`` bits (``|c| <= 2^(b-1) - 1``, step ``s = max|Rk| / cmax``); the
bound ``s <Rq, c> + ||q|| ||Rk - s c||`` is evaluated in float64 (the library adds a rounding
slack of ~1e-6 relative on top, which changes nothing at this resolution). Reported: the
fraction of keys whose bound reaches the threshold of each query's top p, as a multiple of p,
and the bytes a filter-then-verify scan reads per key at d = 64 for one stage of b bits, and for
a two-stage 4-bit -> 8-bit filter (8-bit codes read only for the 4-bit survivors).

This measures the pruning only; the library implements the 8-bit code (CPU and GPU). Output:
``bench/results/code_bits.json``.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hsr.testing import realdata  # noqa: E402


def main():
    path = realdata.cache_path(32768)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/capture_real_keys.py --n-tokens 32768 "
                         "--layers 3,9,15,21 --values --no-stats first")
    cap = realdata.load_capture(path, [3, 9, 15, 21])
    d = 64
    rng = np.random.default_rng(0)
    qm, rm = np.linalg.qr(rng.standard_normal((d, d)))
    R = (qm * np.sign(np.diag(rm))).T
    tops = (0.001, 0.01, 0.05)
    rows = []
    for l in cap["layers"]:
        for hk in range(3):
            K = cap["k"][l][hk].astype(np.float64)
            Q = cap["q"][l][3 * hk:3 * hk + 3, -64:].reshape(-1, d).astype(np.float64)
            S = Q @ K.T
            X = K @ R.T
            QR = Q @ R.T
            qn = np.linalg.norm(Q, axis=1)[:, None]
            for bits in (8, 4, 3):
                cmax = 2 ** (bits - 1) - 1
                s = np.abs(X).max(1) / cmax
                C = np.clip(np.rint(X / s[:, None]), -cmax, cmax)
                e = np.linalg.norm(X - s[:, None] * C, axis=1)
                ub = (QR @ C.T) * s[None] + qn * e[None]
                for p in tops:
                    tau = np.quantile(S, 1 - p, axis=1)
                    surv = float((ub >= tau[:, None]).mean())
                    rows.append(dict(layer=l, kv_head=hk, bits=bits, top=p, survivors=surv,
                                     survivors_over_top=surv / p))
    summary = []
    for bits in (8, 4, 3):
        for p in tops:
            x = np.array([r["survivors_over_top"] for r in rows if r["bits"] == bits and r["top"] == p])
            summary.append(dict(bits=bits, top=p, survivors_over_top_min=float(x.min()),
                                survivors_over_top_max=float(x.max()), survivors_over_top_mean=float(x.mean())))
            print(f"{bits} bits, top {p * 100:4.1f}%: survivors {x.min():5.2f}-{x.max():5.2f} x the answer "
                  f"(mean {x.mean():5.2f})")
    # bytes per key at d = 64 (codes + step + error; survivors read the float32 key)
    full = 4 * d
    bytes_ = {}
    for p in tops:
        s8 = next(r for r in summary if r["bits"] == 8 and r["top"] == p)["survivors_over_top_mean"] * p
        s4 = next(r for r in summary if r["bits"] == 4 and r["top"] == p)["survivors_over_top_mean"] * p
        one8 = d + 8 + s8 * full
        one4 = d / 2 + 8 + s4 * full
        two = d / 2 + 8 + s4 * (d + 8) + s8 * full
        bytes_[str(p)] = dict(int8=one8, int4=one4, int4_then_int8=two, float32_scan=full)
        print(f"top {p * 100:4.1f}%: bytes per key  int8 {one8:5.1f}   int4 {one4:5.1f}   int4->int8 {two:5.1f}   "
              f"float32 scan {full}")
    out = ROOT / "bench" / "out" / "code_bits.json"  # the committed copy: bench/results/code_bits.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(description=__doc__.strip(), summary=summary, bytes_per_key_d64=bytes_,
                                   rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
