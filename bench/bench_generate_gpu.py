"""Greedy ``generate`` on the GPU: the code cache against transformers' static cache + SDPA, both in CUDA graphs.

    python bench/bench_generate_gpu.py --shapes 1b 8b --n 32768 131072 --batch 1 8 \\
        --out bench/results/generate_gpu_<device>_<date>.json

Models: Llama shapes with **random bf16 weights** (real weights cannot be carried to the test
GPU): ``8b`` = 32 layers, 32/8 heads, d 128, hidden 4096 (Llama-3-8B's attention and MLP
shapes); ``1b`` = 16 layers, 32/8 heads, d 64, hidden 2048 (Llama-3.2-1B's). The prompt is
``n`` random token ids. Random weights give nearly uniform attention, so the keys a step keeps
(tau calibrated at the prefill to keep ``1 - eps`` of the mass) are many more than a trained
model's: this measures the machinery, not the selectivity a real model would give
(``bench/bench_decode_loop.py`` times the step on real keys). ``--qk-gain`` multiplies every
layer's q projection so that attention concentrates as a trained model's does (gain 1: nearly
uniform, most keys kept); ``kept_fraction`` is the share of visible keys the rows keep at the
first decode step, averaged over rows and layers. Greedy tokens of the two loops are compared
(``same_tokens_share``; with random weights a near tie can flip). With ``--certified
--count-guard``, ``guard_rows_full_share`` is the share of the guarded rows (every layer,
every decode step, the counting's small launches included in the timing) that attended every
key because the calibrated tau dropped more than eps.

Both loops are :func:`hsr.integrations.transformers.generate_greedy`: prefill, then one decode
step captured in a CUDA graph and replayed. ``ours``: :class:`CodeCache` with the code
attention backend. ``dense``: transformers' ``StaticCache`` (preallocated to the same length)
with SDPA, which attends over the whole preallocated length under a mask, as transformers'
static cache does in its own compiled loop (its SDPA repeats K and V to every query head: a
weak baseline; ``--filter-from`` above ``B * n`` makes ``ours`` the strong dense loop, SDPA with
its own GQA over the code cache's buffers, to compare the filter with). Decode tokens/s = ``B * (new - 2)`` over the time
of the replayed steps (the decode time less the first step, which runs eagerly and records the
graph). ``--prefill-chunk`` feeds long prompts in pieces (the decode is the same).
``"oom"`` where a configuration does not fit; configurations with more than
``--max-tokens`` prompt tokens in all are listed as skipped. ``--ceiling`` adds a loop whose
attention reads nothing (it returns the query, with transformers' static cache still storing
K and V): its tokens/s over the strong dense loop's is the most that any attention, filtered
or not, can gain end to end at that shape.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),  # the CPU smoke test's
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
}


class KeptShare:
    """The code attention backend, counting at the first decode step (eager, before the capture)
    the share of the visible keys each row keeps (``score >= tau``), averaged over rows and layers.
    Each layer counts once: an eager loop (``--eager``) is not captured, and counting at every
    step (a dense fp32 score pass and a synchronisation per layer) was timed with it once."""

    def __init__(self, inner):
        self.inner, self.on, self.kept, self.counted = inner, False, [], set()
        self.__name__ = inner.__name__

    def start(self):
        self.on, self.kept, self.counted = True, [], set()

    def mean(self):
        return sum(self.kept) / len(self.kept) if self.kept else None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        import torch

        out = self.inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
        layer = self.inner._layer(module, key, kwargs) if self.on and query.shape[2] == 1 and not capturing else None
        if layer is not None and id(layer) in self.counted:
            layer = None
        elif layer is not None:
            self.counted.add(id(layer))
        if layer is not None and not layer.filtered:  # a dense layer keeps every key
            self.kept.append(1.0)
        elif layer is not None:
            B, Hq, _, D = query.shape
            Hkv = key.shape[1]
            sc = query.float().reshape(B, Hkv, Hq // Hkv, D) @ key.float().transpose(-1, -2)
            self.kept.append(float((sc.reshape(B, Hq, -1) >= layer.tau).float().mean()))
        return out


def no_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that reads no key (``--ceiling``): the output is the query itself, ``(B, M, Hq, D)``,
    so the layer's other work and the cache's writes are all that remain."""
    return query.transpose(1, 2), None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1b", "8b"])
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--qk-gain", type=float, nargs="+", default=[1.0, 4.0],
                    help="multiply every q projection by this (random weights attend nearly uniformly; "
                         "a gain concentrates attention as a trained model's is): one run per value")
    ap.add_argument("--filter-from", type=int, default=None,
                    help="CodeCache's filter_from (default: the library's FILTER_FROM; 0: the filter at every size)")
    ap.add_argument("--dense-mode", action="store_true",
                    help="also run CodeCache in dense mode (filter_from above every size): the strong dense loop")
    ap.add_argument("--ceiling", action="store_true",
                    help="also run the model with attention that costs nothing (it returns the query; a static "
                         "cache still stores K and V): the most any attention can gain end to end")
    ap.add_argument("--certified", action="store_true",
                    help="the backend guards eps at every decode step (rows past it attend every key)")
    ap.add_argument("--count-guard", action="store_true",
                    help="with --certified: count the rows the guard sends to every key (three small launches "
                         "a layer step: time without it)")
    ap.add_argument("--calibrate-at", type=float, default=None,
                    help="the prefill's calibration target for tau (default: eps)")
    ap.add_argument("--group-union", action="store_true",
                    help="each query row attends its GQA group's union of kept sets")
    ap.add_argument("--eager", action="store_true",
                    help="run every loop eagerly (no CUDA graph): what a caller without a captured step gets")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="feed the prompt this many positions at a time (every loop): a long batch's prefill "
                         "then fits (8B, 32K, B 8 did not in one pass on 80 GB)")
    ap.add_argument("--max-tokens", type=int, default=262144,
                    help="skip configurations whose prompt tokens B*n exceed this (prefill time and memory)")
    ap.add_argument("--out", default=default_out("generate_gpu.json"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a smoke test of the script (Triton's interpreter, no graphs; use --shapes tiny)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from hsr.integrations.transformers import CodeCache, generate_greedy, register_code_attention

    dev = torch.device(args.device)
    stats = KeptShare(register_code_attention("hsr_code", eps=args.eps, certified=args.certified,
                                              calibrate_at=args.calibrate_at, group_union=args.group_union,
                                              count_guard=args.count_guard))
    from transformers import AttentionInterface

    AttentionInterface.register("hsr_code", stats)
    if args.ceiling:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register("no_attention", no_attention)
        AttentionMaskInterface.register("no_attention", sdpa_mask)
    rows = []
    for shape in args.shapes:
        cfg = LlamaConfig(vocab_size=32000 if shape != "tiny" else 64, max_position_embeddings=max(args.n) + args.new + 8,
                          **SHAPES[shape])
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16 if dev.type == "cuda" else torch.float32)
        with dev:
            model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
        gain_now = 1.0
        for gain, n, B in [(g, n, B) for g in args.qk_gain for n in args.n for B in args.batch]:
            with torch.no_grad():  # sharper attention, as a trained model's: every layer's q scaled
                for layer in model.model.layers:
                    layer.self_attn.q_proj.weight.mul_(gain / gain_now)
            gain_now = gain
            row = dict(shape=shape, n=n, B=B, new=args.new, eps=args.eps, qk_gain=gain, graphs=not args.eager, certified=args.certified,
                       calibrate_at=args.calibrate_at, group_union=args.group_union,
                       prefill_chunk=args.prefill_chunk,
                       weights="random " + ("bf16" if dev.type == "cuda" else "fp32"))
            if B * n > args.max_tokens:  # the prefill's time and memory: said, not attempted
                row["skipped"] = f"B*n = {B * n} > --max-tokens {args.max_tokens}"
                rows.append(row)
                print(row, flush=True)
                continue
            ids = torch.randint(3, cfg.vocab_size, (B, n), device=dev, generator=torch.Generator(dev).manual_seed(n))
            got = {}
            loops = [("dense", "sdpa", lambda: StaticCache(config=cfg, max_cache_len=n + args.new + 1)),
                     ("ours", "hsr_code", lambda: CodeCache(cfg, n + args.new + 1, filter_from=args.filter_from))]
            if args.dense_mode:
                loops.append(("dense_mode", "hsr_code", lambda: CodeCache(cfg, n + args.new + 1, filter_from=2 ** 62)))
            if args.ceiling:
                loops.append(("no_attention", "no_attention",
                              lambda: StaticCache(config=cfg, max_cache_len=n + args.new + 1)))
            for name, impl, make in loops:
                model.set_attn_implementation(impl)
                try:
                    with torch.no_grad():
                        graph = False if args.eager else None
                        generate_greedy(model, ids[:, :64], 4, make(), graph=graph)  # warm: compile, autotune
                        tm = {}
                        cache = make()
                        stats.start()
                        out = generate_greedy(model, ids, args.new, cache, timings=tm, graph=graph,
                                              prefill_chunk=args.prefill_chunk)
                        stats.on = False
                    # the replayed steps: the decode time past the first step (eager + capture)
                    decode_s = max(tm["decode_s"] - tm.get("first_step_s", 0.0), 1e-9)
                    row[f"{name}_prefill_s"] = tm["prefill_s"]
                    row[f"{name}_first_step_s"] = tm.get("first_step_s")
                    row[f"{name}_capture_error"] = tm.get("capture_error")
                    row[f"{name}_decode_tok_s"] = B * (args.new - 2) / decode_s
                    got[name] = out[:, n:]
                    if name == "ours":
                        cache.check()
                        row["filtered"] = bool(cache.layers[0].filtered)
                        row["tau_mean"] = (float(sum(l.tau.float().mean() for l in cache.layers) / len(cache.layers))
                                           if cache.layers[0].tau is not None else None)
                        row["kept_fraction"] = stats.mean()  # first decode step, every layer
                        if args.count_guard:  # every decode step of every layer, the first included
                            full, guarded = cache.guard_counts()
                            row["guard_rows_full_share"] = full / max(guarded, 1)
                    cache = None
                except torch.cuda.OutOfMemoryError:
                    row[f"{name}_decode_tok_s"] = "oom"
                except Exception as exc:  # a failure is a result: record it, go on with the next loop
                    row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
                    print(row[f"{name}_error"], flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            if "dense" in got and "ours" in got:
                row["same_tokens_share"] = float((got["dense"] == got["ours"]).float().mean())
                row["speedup"] = row["ours_decode_tok_s"] / row["dense_decode_tok_s"]
            if "dense_mode" in got and "ours" in got:
                row["speedup_vs_dense_mode"] = row["ours_decode_tok_s"] / row["dense_mode_decode_tok_s"]
            if "no_attention" in got and "dense_mode" in got:  # free attention: the most any filter gains
                row["ceiling_vs_dense_mode"] = row["no_attention_decode_tok_s"] / row["dense_mode_decode_tok_s"]
            rows.append(row)
            save(args.out, rows, shapes={k: SHAPES[k] for k in args.shapes})  # every row: a timeout keeps them
            print(row, flush=True)
        model = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    save(args.out, rows, shapes={k: SHAPES[k] for k in args.shapes})


if __name__ == "__main__":
    main()
