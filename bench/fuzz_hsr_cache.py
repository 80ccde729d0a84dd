"""Fuzz the transformers cache at scale: HSRCache + the hsr backends against dense attention.

Runs the cases of ``tests/integrations/test_cache_fuzz.py`` (batch, grouped heads, left
padding, padded continuations, decode steps and chunks, beam reorders, crop,
``batch_repeat_interleave``, ``batch_select_indices``; one or two layers; ReLU^alpha exact and
softmax within its certificate, through the index from the first key or crossing over from the
dense short-context path at 8 keys; float32 and bfloat16; the index's default, small-leaf tree and
code backends) many more times than the CI does, and records every mismatch.

    python bench/fuzz_hsr_cache.py --cases 1000 --out bench/results/hsr_cache_fuzz.json
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from _results import default_out, save  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.join(HERE, "..", "tests", "integrations", "test_cache_fuzz.py")


def _load_fuzz():
    """The case strategy and runner, from the test module (one definition of a case)."""
    spec = importlib.util.spec_from_file_location("hsr_cache_fuzz_cases", FUZZ)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out("hsr_cache_fuzz.json"))
    args = ap.parse_args(argv)

    from hypothesis import HealthCheck, given, seed, settings

    fz = _load_fuzz()
    backends = {name: fz._backend(name) for name in fz.BACKENDS}
    tally = dict(cases=0, calls=0, mismatches=0, worst=0.0)
    ops = collections.Counter()
    shapes = collections.Counter()
    failures = []

    @settings(max_examples=args.cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fz.cases())
    def one(case):
        if tally["cases"] >= args.cases:
            return
        record = {}
        try:
            tally["calls"] += fz.run_case(case, backends, record)
        except AssertionError as exc:  # recorded, not raised: hypothesis would stop to shrink
            tally["mismatches"] += 1
            if len(failures) < 20:
                failures.append(str(exc)[:2000])
        tally["cases"] += 1
        tally["worst"] = max(tally["worst"], record.get("worst", 0.0))
        ops.update(op for op, _, _ in case["ops"])
        ops["holes"] += sum(1 for op, _, h in case["ops"] if op == "update" and h)
        shapes[f"B{case['B']}"] += 1
        shapes[f"layers{len(case['kinds'])}"] += 1
        shapes[case["dtype"]] += 1
        shapes["left_padded" if any(case["pads"]) else "unpadded"] += 1
        for k in case["kinds"]:
            shapes[f"kind_{k}"] += 1
        shapes[f"index_{case['index_kwargs'].get('method', 'default')}"] += 1
        shapes[f"upkeep_eager{case['upkeep']['eager']}_from{case['upkeep']['index_from']}"] += 1

    t0 = time.perf_counter()
    rounds = 0
    while tally["cases"] < args.cases and rounds < 10:  # hypothesis may stop short: draw again
        seed(args.seed + rounds)(one)()
        rounds += 1
    seconds = time.perf_counter() - t0
    print(f"{tally['cases']} cases, {tally['calls']} attention calls checked, {tally['mismatches']} mismatches, "
          f"worst |out - dense| / tolerance {tally['worst']:.3g}, {seconds:.0f} s")
    for f in failures[:3]:
        print(f)
    save(args.out, dict(tally, seconds=seconds, operations=dict(ops), case_mix=dict(sorted(shapes.items())),
                        failures=failures, tolerances=dict(
                            relu="1e-4 (1 + |V|_inf)", softmax=f"2 eps |V|_inf + 1e-5, eps = {fz.EPS}",
                            bfloat16="+ 2^-7 |V|_inf (output rounding)")),
         cases=args.cases, seed=args.seed)
    return 1 if tally["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
