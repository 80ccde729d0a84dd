"""The CUDA kernels of one eager decode step of the 8B-shaped random model (32 layers, 32/8
heads, d 128, bf16) after a prefill of ``--n`` tokens, with the code cache (dense mode below
``filter_from``, else the filter) or transformers' static cache: the top kernels by GPU time.

    python bench/diag_profile_step.py --n 32768 --cache code
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--cache", choices=["code", "static"], default="code")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from bench_generate_gpu import SHAPES
    from hsr.integrations.transformers import CodeCache, register_code_attention

    register_code_attention("hsr_code", eps=1e-3)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=args.n + 80, **SHAPES["8b"])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, 32000, (args.B, args.n + 4), device="cuda")
    if args.cache == "code":
        model.set_attn_implementation("hsr_code")
        cache = CodeCache(cfg, args.n + 65)
    else:
        model.set_attn_implementation("sdpa")
        cache = StaticCache(config=cfg, max_cache_len=args.n + 65)
    import inspect

    params = inspect.signature(model.forward).parameters
    ckw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.24: ``cache``

    def step(s):
        kw = {ckw: cache, "use_cache": True, "position_ids": torch.full((args.B, 1), args.n + s, device="cuda")}
        if "cache_position" in params:
            kw["cache_position"] = torch.tensor([args.n + s], device="cuda")
        model(input_ids=ids[:, args.n + s:args.n + s + 1], **kw)

    with torch.no_grad():
        model(input_ids=ids[:, :args.n], use_cache=True, logits_to_keep=1, **{ckw: cache})
        for s in range(3):  # warm
            step(s)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step(3)
            torch.cuda.synchronize()
    print(f"cache={args.cache} n={args.n} B={args.B}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
