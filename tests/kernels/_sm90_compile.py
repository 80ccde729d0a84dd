"""Compile the top-k mode's Triton kernels for sm_90 (Hopper) on any machine, GPU or not.

The interpreter that runs the kernels in CI on the CPU executes them as numpy code and never
lowers them: a kernel it runs can still fail to compile for a GPU (a constexpr reassigned in a
static loop, a shape the lowering refuses). Triton compiles to a cubin without a GPU, so this
script does, for every kernel and constexpr combination the top-k step launches, and exits
non-zero on the first failure. ``tests/kernels/test_sm90_compile.py`` runs it in a process
without ``TRITON_INTERPRET`` (under the interpreter a kernel is not compilable).
"""
from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hsr.kernels import _code_kernels as K  # noqa: E402
from hsr.kernels import _select as S  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
#: pointer arguments' element types, by name; every other argument not a constexpr is an int32
POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", SC="*fp32", THR="*fp32", LIST="*i32", COUNT="*i32", LENS="*i32",
                MAXN="*fp32", STATUS="*i32", O_PART="*fp32", L_PART="*fp32", HIST="*i32")
FLOATS = {"qk_scale"}


def compile_kernel(fn, constexprs, num_warps=4):
    sig = {}
    for name in fn.arg_names:
        sig[name] = ("constexpr" if name in constexprs else POINTERS.get(name)
                     or ("fp32" if name in FLOATS else "i32"))
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET,
                   options=dict(num_warps=num_warps))


def main() -> int:
    bits, full = S.DIGIT_BITS, S.FULL_ROUNDS
    jobs = [(S._select_pass_kernel, dict(ROUND=r, BITS=bits, BLOCK=2048, COLLECT=r == full, PB=pb), 4)
            for r in range(full + 1) for pb in (1, 32)]
    jobs += [(S._select_finish_kernel, dict(FULL=full, ROUNDS=triton.cdiv(32, bits), BITS=bits,
                                            BLOCK=S.FINISH_BLOCK, PB=pb), w) for pb in (1, 32) for w in (4, 8)]
    jobs += [(K._topk_gather_kernel, dict(BLOCK=64, HEAD_DIM=d), 4) for d in (64, 128, 256)]
    jobs += [(K._score_all_kernel, dict(ROWS=16, BLOCK_N=64, HEAD_DIM=d, UPCAST=False), 4) for d in (64, 128, 256)]
    for fn, const, warps in jobs:
        try:
            compile_kernel(fn, const, warps)
        except Exception as e:  # noqa: BLE001 - reported with the kernel's name and options
            print(f"{fn.__name__} {const} num_warps={warps}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    print(f"compiled {len(jobs)} kernels for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
