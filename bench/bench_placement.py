"""Where should a sharded cache put its keys? Work balance of three placements on real keys.

    python bench/bench_placement.py --out bench/results/placement_cpu.json

A sharded decode step costs what its slowest rank costs. A rank's work is its filter (every
key it holds, read once per step) plus its attention (the keys it keeps, ``score >= tau``).
This script counts both, per rank, for the decode steps of real SmolLM2-135M keys and queries
(32K tokens, layers 3/9/15/21, 9 query / 3 kv heads, d 64: ``hsr.testing.realdata``), under
three placements over ``W`` ranks:

* ``blocks``: contiguous positions; the prompt (``--prompt`` tokens) split evenly, every decoded
  token appended to the last rank (what ``ShardedKVCache.add`` does today);
* ``even_blocks``: contiguous positions in W equal blocks of the current length (a position
  split rebalanced at every step: not a policy anyone can run cheaply, it isolates how the
  attention itself is spread over positions);
* ``stripes``: position ``t`` on rank ``t % W`` (prompt and decoded tokens alike);
* ``heads``: kv head ``h`` on rank ``h % W``, every position (tensor parallelism's split).

``tau`` per query row keeps the keys holding 99.9% of the row's softmax mass (the smallest
threshold whose dropped share is at most 1e-3), so "kept" is the attention a certified softmax
would do. Reported per placement: the slowest rank's share over the mean rank's, for keys held
and for keys kept, averaged over the decode steps (1.0 = perfect balance), and the same at the
last step. No GPU is involved: these are counts, the inputs of the step time, not a timing.

32K keys are past SmolLM2's trained 8K context: capture them once, on purpose (RoPE
extrapolated), with ``python bench/capture_real_keys.py --n-tokens 32768 --layers 3,9,15,21``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402

PLACEMENTS = ("blocks", "even_blocks", "stripes", "heads")


def kept_mask(scores: np.ndarray, scale: float, eps: float = 1e-3) -> np.ndarray:
    """Per row of ``scores (rows, n)``, the smallest set of best keys whose softmax mass is at
    least ``1 - eps`` (as a boolean mask)."""
    z = scores.astype(np.float64) * scale
    order = np.argsort(-z, axis=1)
    zs = np.take_along_axis(z, order, axis=1)
    w = np.exp(zs - zs[:, :1])
    cum = np.cumsum(w, axis=1) / w.sum(1, keepdims=True)
    keep_sorted = np.concatenate([np.ones((len(z), 1), bool), cum[:, :-1] < 1 - eps], axis=1)
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=1)
    return mask


def owner(placement: str, W: int, n: int, prompt: int, kv_head: int) -> np.ndarray:
    """Rank of each position ``0 .. n - 1`` of kv head ``kv_head``."""
    pos = np.arange(n)
    if placement == "stripes":
        return pos % W
    if placement == "heads":
        return np.full(n, kv_head % W)
    if placement == "even_blocks":
        return np.minimum(pos // -(-n // W), W - 1)
    block = -(-prompt // W)
    return np.where(pos < prompt, np.minimum(pos // block, W - 1), W - 1)


def measure(layers: dict, scale: float, W: int, prompt: int, steps: list[int]) -> dict:
    """Per placement: ``(steps, W)`` keys held and kept per rank, summed over layers and heads."""
    held = {p: np.zeros((len(steps), W)) for p in PLACEMENTS}
    kept = {p: np.zeros((len(steps), W)) for p in PLACEMENTS}
    for q, k in layers.values():
        Hq, Hkv = q.shape[0], k.shape[0]
        g = Hq // Hkv
        for si, p in enumerate(steps):
            n = p + 1
            for hk in range(Hkv):
                rows = q[hk * g:(hk + 1) * g, p].astype(np.float32)
                scores = rows @ k[hk, :n].astype(np.float32).T
                mask = kept_mask(scores, scale)
                per_key = mask.sum(0)  # rows of the group that keep each key
                for pl in PLACEMENTS:
                    own = owner(pl, W, n, prompt, hk)
                    held[pl][si] += np.bincount(own, minlength=W)
                    kept[pl][si] += np.bincount(own, weights=per_key, minlength=W)
    return {pl: (held[pl], kept[pl]) for pl in PLACEMENTS}


def imbalance(x: np.ndarray) -> np.ndarray:
    """Slowest rank over the mean rank, per step (rows of ``x (steps, W)``)."""
    return x.max(1) / np.maximum(x.mean(1), 1e-12)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--prompt", type=int, default=8192, help="tokens prefilled before decoding")
    ap.add_argument("--steps", type=int, default=12, help="decode positions sampled up to 32K")
    ap.add_argument("--out", default=default_out("placement_cpu.json"))
    args = ap.parse_args(argv)
    from hsr.testing import realdata

    cap = realdata.get_real_qk(32768, layers=(3, 9, 15, 21))
    layers = {int(L): (cap["q"][L], cap["k"][L]) for L in cap["q"]}
    scale = float(cap["scale"])
    n = next(iter(layers.values()))[1].shape[1]
    steps = [int(x) for x in np.linspace(args.prompt, n - 1, args.steps)]
    results = []
    print(f"{'W':>2} {'placement':>9} {'held max/mean':>14} {'kept max/mean':>14} {'last step held/kept':>20}")
    for W in (int(w) for w in args.worlds.split(",")):
        got = measure(layers, scale, W, args.prompt, steps)
        for pl, (held, kept) in got.items():
            ih, ik = imbalance(held), imbalance(kept)
            row = dict(world=W, placement=pl, held_imbalance_mean=float(ih.mean()), kept_imbalance_mean=float(ik.mean()),
                       held_imbalance_last=float(ih[-1]), kept_imbalance_last=float(ik[-1]),
                       kept_per_rank_last=kept[-1].tolist(), held_per_rank_last=held[-1].tolist())
            results.append(row)
            print(f"{W:>2} {pl:>9} {ih.mean():>14.2f} {ik.mean():>14.2f} {ih[-1]:>9.2f} / {ik[-1]:<8.2f}")
    save(args.out, results, steps=steps, prompt=args.prompt, eps=1e-3,
         data="SmolLM2-135M real q/k, 32K tokens, layers 3/9/15/21 (hsr.testing.realdata)")


if __name__ == "__main__":
    main()
