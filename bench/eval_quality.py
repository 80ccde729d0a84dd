"""Quality of the HSR softmax backend with the index on, against dense, on SmolLM2-135M (CPU).

    python bench/eval_quality.py --out bench/results/quality_cpu.json            # the full grid
    python bench/eval_quality.py --ppl-lengths 1024 --steps 16 --passkey-lengths 1024 \\
        --depths 0 0.5 1 --out bench/out/q.json                                   # smoke

Two measures, each with the index really scoring (``dense_below=0`` on an
``HSRCache(index_from=0)``: every decode call searches the layer's index; the statistics'
``dense_calls`` are reported and are 0):

**Perplexity and next-token agreement** (``--ppl-lengths``, default 4K and 8K). One SDPA
prefill of ``max(--ppl-lengths)`` tokens of real text (:func:`real_token_ids`, the Python
language reference) gives every shorter context too (causal: the first ``n`` positions' keys
and values do not depend on later tokens). Each variant's cache is filled with the first ``n``
positions (the HSR cache builds its index then), then the next ``--steps`` real tokens — the
held-out continuation, not in the context — are fed **teacher-forced one token per decode
step**, the variants alternating step by step. Step ``s`` feeds token ``n + s`` and scores
token ``n + s + 1``: perplexity is ``exp`` of the mean negative log-likelihood over the
``--steps`` scored tokens, agreement is the share of steps whose argmax equals dense's (the
same input tokens, so the same question). Dense is transformers' ``sdpa`` on a
``DynamicCache``. Beyond 8,192 tokens the model runs past its trained context
(``max_position_embeddings`` 8,192): a 16K row is optional and labelled so.

**Passkey retrieval** (``--passkey-lengths`` 2K/4K/8K, ``--depths`` 0, 1/9, ..., 1: ten
depths). The prompt is the classic filler ("The grass is green. ...", as
``bench/eval_model.py``) with "The pass key is NNNNN. Remember it." (a random 5-digit key per
depth, seeded) inserted after ``depth`` of the filler repetitions, then "What is the pass key?
The pass key is"; ``n`` counts the whole prompt. The haystack (everything before the question)
is prefilled once with SDPA and copied into each variant's cache; the question's tokens are
then fed **one decode step at a time** and ``--new-tokens`` greedy tokens decoded the same way,
so every query that could retrieve the key goes through the variant's attention (for HSR: the
index). Found = the key's exact digits in the decoded text. Prefilling the haystack through the
index instead is not done: prefill takes the per-head ``hsr_attention`` path, hours at 8K on
2 cores (docs/transformers.md, Limits).

Threads: ``--threads`` for torch and numba (default 2). The JSON records wall times.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402
from bench_generate_cpu import filled, prefill  # noqa: E402

from hsr.integrations import transformers as ht  # noqa: E402
from hsr.testing.realdata import load_smollm2, real_token_ids  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASK = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
TRAINED_CONTEXT = 8192
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def variants(model, eps_list):
    """``{name: (attn_implementation, backend or None, make_cache)}``: dense SDPA on a
    ``DynamicCache`` and the HSR softmax backend, index on, per eps."""
    from transformers import DynamicCache

    out = {"dense": ("sdpa", None, lambda: DynamicCache(config=model.config))}
    for eps in eps_list:
        be = ht.register_hsr_attention(f"quality_eps{eps:g}", kind="softmax", eps=eps, dense_below=0,
                                       guard=False)  # the index's quality: no dense steps
        out[f"hsr_eps{eps:g}"] = (be.name, be, lambda: ht.HSRCache(model.config, index_from=0))
    return out


def step(model, impl, cache, token_ids):
    """One decode step (``token_ids`` of shape (1, 1)) through ``impl``; the last logits."""
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        return model(token_ids, cache=cache, use_cache=True).logits[0, -1].float()


def decode_stats(be):
    st = be.stats.decode.total
    return dict(scored_fraction=st.scored_fraction, selected_fraction=st.selected_fraction,
                max_dropped=be.stats.decode.max_dropped, dense_calls=st.dense_calls)


# ------------------------------------------------------------------------------------------
def run_perplexity(model, tok, lengths, steps, eps_list):
    vs = variants(model, eps_list)
    ids = torch.as_tensor(real_token_ids(tok, max(lengths) + steps + 1))[None]
    kv, t_prefill = prefill(model, ids[:, :max(lengths)])
    log(f"ppl: SDPA prefill of {max(lengths)} tokens {t_prefill:.1f} s")
    results = {}
    for n in sorted(lengths):
        t_len = time.perf_counter()
        caches = {name: filled(make(), kv, n) for name, (impl, be, make) in vs.items()}
        for impl, be, make in vs.values():
            if be is not None:
                be.stats.reset()
        nll = {k: [] for k in vs}
        arg = {k: [] for k in vs}
        secs = {k: 0.0 for k in vs}
        for s in range(steps):
            x, y = ids[:, n + s:n + s + 1], int(ids[0, n + s + 1])
            for name in (list(vs) if s % 2 == 0 else list(vs)[::-1]):
                impl, be, make = vs[name]
                t0 = time.perf_counter()
                logits = step(model, impl, caches[name], x)
                secs[name] += time.perf_counter() - t0
                nll[name].append(float(-torch.log_softmax(logits, -1)[y]))
                arg[name].append(int(logits.argmax()))
        row = {}
        for name, (impl, be, make) in vs.items():
            mean = float(np.mean(nll[name]))
            r = dict(perplexity=math.exp(mean), mean_nll=mean,
                     argmax_agreement=float(np.mean([a == b for a, b in zip(arg[name], arg["dense"])])),
                     top1_accuracy=float(np.mean([a == int(ids[0, n + s + 1]) for s, a in enumerate(arg[name])])),
                     seconds_per_step=secs[name] / steps)
            if name != "dense":
                r["delta_ppl"] = r["perplexity"] / row["dense"]["perplexity"] - 1
                r["max_abs_delta_nll"] = float(np.max(np.abs(np.subtract(nll[name], nll["dense"]))))
                r.update(decode_stats(be))
            row[name] = r
            log(f"ppl {n:6d} {name:12s} ppl {r['perplexity']:.4f} ({r.get('delta_ppl', 0):+.3%})  "
                f"agree {r['argmax_agreement']:.3f}  {r['seconds_per_step']:.3f} s/step"
                + (f"  scored {r['scored_fraction']:.3f}  max dropped {r['max_dropped']:.1e}"
                   f"  dense calls {r['dense_calls']}" if name != "dense" else ""))
        row["beyond_trained_context"] = n > TRAINED_CONTEXT
        row["wall_s"] = time.perf_counter() - t_len
        results[str(n)] = row
        del caches
    return results, t_prefill


# ------------------------------------------------------------------------------------------
def passkey_ids(tok, n_tokens: int, depth: float, key: str):
    """(haystack ids, question ids): ``n_tokens`` in all, up to a filler repetition; the needle
    after ``round(depth * reps)`` of the ``reps`` filler repetitions."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    f = len(enc(FILLER))
    q = enc(QUESTION)
    fixed = len(enc(TASK)) + len(enc(NEEDLE.format(key=key))) + len(q)
    reps = max(1, (n_tokens - fixed) // f)
    at = int(round(depth * reps))
    hay = enc(TASK + FILLER * at) + enc(NEEDLE.format(key=key)) + enc(FILLER * (reps - at))
    return hay, q


def greedy_from(model, impl, cache, question, new_tokens):
    """Feed ``question`` one token per step, then ``new_tokens`` greedy tokens; their ids."""
    for t in question[:-1]:
        step(model, impl, cache, torch.tensor([[t]]))
    logits = step(model, impl, cache, torch.tensor([[question[-1]]]))
    out = []
    for _ in range(new_tokens):
        out.append(int(logits.argmax()))
        logits = step(model, impl, cache, torch.tensor([[out[-1]]]))
    return out


def run_passkey(model, tok, lengths, depths, eps_list, new_tokens, seed=0, on_length=None):
    from transformers import DynamicCache

    vs = variants(model, eps_list)
    results = {}
    for n in sorted(lengths):
        rng = np.random.default_rng(seed + n)
        rows = []
        t_len = time.perf_counter()
        for depth in depths:
            key = str(int(rng.integers(10000, 100000)))
            hay, q = passkey_ids(tok, n, depth, key)
            t0 = time.perf_counter()
            pre = DynamicCache(config=model.config)
            model.set_attn_implementation("sdpa")
            with torch.inference_mode():
                model(torch.tensor([hay]), cache=pre, use_cache=True)
            kv = dict(k=[l.keys for l in pre.layers], v=[l.values for l in pre.layers])
            r = dict(depth=depth, key=key, n_tokens=len(hay) + len(q),
                     prefill_s=time.perf_counter() - t0)
            for name, (impl, be, make) in vs.items():
                if be is not None:
                    be.stats.reset()
                t0 = time.perf_counter()
                out = greedy_from(model, impl, filled(make(), kv, len(hay)), q, new_tokens)
                text = tok.decode(out, skip_special_tokens=True)
                r[name] = dict(output=text, found=key in text.replace(" ", ""), tokens=out,
                               seconds=time.perf_counter() - t0)
                if be is not None:
                    r[name].update(decode_stats(be), same_tokens_as_dense=out == r["dense"]["tokens"])
            del pre, kv
            rows.append(r)
            log(f"passkey {n:5d} depth {depth:4.0%} key {key}: "
                + "  ".join(f"{k} {'found' if r[k]['found'] else 'MISSED'} {r[k]['output']!r}" for k in vs))
        results[str(n)] = dict(rows=rows, wall_s=time.perf_counter() - t_len,
                               accuracy={k: float(np.mean([r[k]["found"] for r in rows])) for k in vs},
                               beyond_trained_context=n > TRAINED_CONTEXT)
        log(f"passkey {n}: accuracy " + "  ".join(f"{k} {v:.0%}" for k, v in results[str(n)]["accuracy"].items()))
        if on_length is not None:
            on_length(results)
    model.set_attn_implementation("sdpa")
    return results


# ------------------------------------------------------------------------------------------
def plot(doc, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pk = doc.get("passkey") or {}
    if not pk:
        return None
    names = list(dict.fromkeys(k for v in pk.values() for k in v["accuracy"]))  # dense first
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.6), sharey=True)
    axes = np.atleast_1d(axes)
    lengths = sorted(pk, key=int)
    depths = [r["depth"] for r in pk[lengths[0]]["rows"]]
    for ax, name in zip(axes, names):
        m = np.array([[float(r[name]["found"]) if name in r else np.nan for r in pk[n]["rows"]] for n in lengths])
        cmap = plt.get_cmap("Greens").copy()
        cmap.set_bad("lightgray")  # not run
        ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], rotation=90, fontsize=7)
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_title(f"{name}: {np.nanmean(m):.0%} of {int(np.sum(~np.isnan(m)))}", fontsize=9)
        ax.set_xlabel("needle depth", fontsize=8)
    axes[0].set_ylabel("context (tokens)")
    fig.suptitle("SmolLM2-135M passkey retrieval (green = found, gray = not run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return str(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl-lengths", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--steps", type=int, default=256, help="teacher-forced continuation tokens scored")
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--passkey-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--depths", type=float, nargs="+", default=[i / 9 for i in range(10)])
    ap.add_argument("--passkey-eps", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    ap.add_argument("--out", default=default_out("quality_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    model, tok = load_smollm2()
    model.eval()
    doc = dict(perplexity={}, passkey={})
    meta = dict(model="SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)", threads=args.threads,
                trained_context=TRAINED_CONTEXT, steps=args.steps, eps=args.eps, passkey_eps=args.passkey_eps,
                depths=args.depths, new_tokens=args.new_tokens,
                note="HSR: dense_below=0 on HSRCache(index_from=0), every decode call searches the index; "
                     "prefill (context / haystack) is SDPA, shared by all variants; the CPU was shared")

    def write():
        save(args.out, doc, wall_s=time.perf_counter() - T0, **meta)
        plot(doc, Path(args.out).with_suffix(".png"))

    if args.passkey_lengths:
        doc["passkey"] = run_passkey(model, tok, args.passkey_lengths, args.depths, args.passkey_eps,
                                     args.new_tokens, on_length=lambda r: (doc.__setitem__("passkey", r), write()))
    if args.ppl_lengths:
        doc["perplexity"], meta["ppl_prefill_s"] = run_perplexity(model, tok, args.ppl_lengths, args.steps, args.eps)
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
