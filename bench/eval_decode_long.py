"""End to end on the CPU: SmolLM2-135M decoding at a long context with an HSRCache vs SDPA.

    python bench/eval_decode_long.py                          # 8K context, 32 decode steps
    python bench/eval_decode_long.py --n-tokens 4096 --steps 8 --out /tmp/x.json   # smoke

The prompt (``--n-tokens`` tokens of real text) is prefilled once per backend with torch SDPA
into the backend's cache (for HSR, an :class:`hsr.integrations.transformers.HSRCache`, whose
per-layer :class:`hsr.KVCacheIndex` — the code filter at d = 64 — is built from the prefill);
then ``--steps`` decode steps are teacher-forced over the next real tokens, with the backend's
attention. Reported per backend: decode tokens/s (wall time of the steps, the index appends
included), the perplexity of the ``--steps`` continuation tokens, the agreement of each step's
argmax with dense attention's, and the backend's statistics (keys scored / visible, largest
certified dropped mass).

Backends: ``dense`` (SDPA, a plain DynamicCache), HSR softmax at each ``--eps`` (certified),
HSR softmax keeping each query head's ``--topk`` best keys (certificate reported).
Output: ``bench/results/model_decode_long.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hsr.integrations import transformers as ht  # noqa: E402
from hsr.testing.realdata import load_smollm2, real_token_ids  # noqa: E402


def run(model, ids, n_prompt, steps, name, backend):
    """Prefill with SDPA, then teacher-forced decode steps with ``name``'s attention."""
    from transformers import DynamicCache

    cache = ht.HSRCache(model.config) if backend is not None else DynamicCache()
    prompt = ids[:, :n_prompt]
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        t0 = time.perf_counter()
        out = model(prompt, cache=cache, use_cache=True)
        t_prefill = time.perf_counter() - t0
        if backend is not None:
            model.set_attn_implementation(name)
            backend.stats.reset()
        logits = [out.logits[:, -1]]
        t0 = time.perf_counter()
        for s in range(steps - 1):
            tok = ids[:, n_prompt + s:n_prompt + s + 1]
            out = model(tok, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
        t_decode = time.perf_counter() - t0
        model.set_attn_implementation("sdpa")
    logits = torch.cat(logits).float()  # (steps, vocab): predictions of tokens n_prompt .. +steps-1
    target = ids[0, n_prompt:n_prompt + steps]
    nll = torch.nn.functional.cross_entropy(logits, target).item()
    res = dict(prefill_s=t_prefill, decode_s=t_decode, tokens_per_s=(steps - 1) / t_decode,
               perplexity=math.exp(nll), argmax=logits.argmax(-1).tolist())
    if backend is not None:
        st = backend.stats.total
        res.update(scored_fraction=st.scored_fraction, selected_fraction=st.selected_fraction,
                   max_dropped=backend.stats.max_dropped)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=8192, help="prompt tokens (default 8192)")
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps (default 32)")
    ap.add_argument("--eps", type=float, nargs="*", default=[1e-2], help="certified softmax targets")
    ap.add_argument("--topk", type=int, nargs="*", default=[256], help="top-k softmax sizes")
    ap.add_argument("--out", default=str(ROOT / "bench/out/model_decode_long.json"),
                    help="JSON path (default: bench/out/)")
    args = ap.parse_args(argv)

    model, tok = load_smollm2()
    ids = torch.as_tensor(real_token_ids(tok, args.n_tokens + args.steps))[None]
    configs = [("dense", None)]
    for e in args.eps:
        configs.append((f"hsr_eps{e:g}", ht.register_hsr_attention(f"bench_hsr_eps{e:g}", kind="softmax", eps=e,
                                                                          guard=False)))
    for k in args.topk:
        configs.append((f"hsr_top{k}", ht.register_hsr_attention(f"bench_hsr_top{k}", kind="softmax", topk=k,
                                                                        guard=False)))
    results = {}
    for label, be in configs:
        name = be.name if be is not None else "sdpa"
        r = run(model, ids, args.n_tokens, args.steps, name, be)
        results[label] = r
        extra = "" if be is None else (f"  scored {r['scored_fraction']:.1%} of visible keys, "
                                       f"max certified dropped {r['max_dropped']:.2e}")
        print(f"{label:14s} prefill {r['prefill_s']:6.1f} s  decode {r['tokens_per_s']:6.2f} tok/s  "
              f"ppl {r['perplexity']:7.3f}{extra}", flush=True)
    dense = results["dense"]["argmax"]
    for label, r in results.items():
        r["argmax_agreement"] = sum(a == b for a, b in zip(r.pop("argmax"), dense)) / len(dense)
    doc = dict(description=__doc__.strip(), n_tokens=args.n_tokens, steps=args.steps,
               machine=dict(cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__),
               date=time.strftime("%Y-%m-%d"), results=results)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items()}
                      for k, r in results.items()}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
