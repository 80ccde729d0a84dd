"""Compile hsr's Triton kernels for sm_90 (Hopper) on any machine, GPU or not.

The interpreter that runs the kernels in CI on the CPU executes them as numpy code and never
lowers them: a kernel it runs can still fail to compile for a GPU (a constexpr reassigned in a
static loop, a shape the lowering refuses, more shared memory than an SM has). Triton compiles
to a cubin without a GPU, so this script does, for

* every specialization the test-suite launches (``sm90_specializations.json``, recorded under
  the interpreter by ``_record_specializations.py``, which says how to regenerate it);
* the launches a GPU makes in their place (:func:`gpu_variants`): the interpreter always
  upcasts to fp32 and takes smaller tiles, and never makes a programmatic dependent launch;
* launches no test makes, by hand (:func:`hand_written`): bf16 at a model's head dims and
  block sizes, and the prefill's Hopper experiments (TMA, the fused step).

:func:`jobs` says what is left out to keep the run near 3 minutes on 2 cores (``--all``: nothing).
Every failure is reported (kernel, constexprs, options, error); the exit status is 1 if any.
A record with a ``known_failure`` note (written by hand into the JSON, kept when it is
regenerated) is a failure the run expects: reported, not counted, and counted once it compiles
(then drop the note). ``tests/kernels/test_sm90_compile.py`` runs this in a process without
``TRITON_INTERPRET`` (under the interpreter a kernel is not compilable).
Options: ``-j N`` compiling processes (default: the CPUs, at most 2: CI's runners have 2),
``-k WORD`` only the kernels whose name contains WORD, ``-v`` each compile's time and shared memory.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

JSON = pathlib.Path(__file__).with_name("sm90_specializations.json")
#: the shared memory a block may have on sm_90 (227 KiB): a kernel that needs more compiles but
#: cannot launch (Triton checks it only when it loads the kernel on a device)
MAX_SHARED = 232448
OPTIONS = ("num_warps", "num_stages", "launch_pdl")


def load(path=JSON) -> list[dict]:
    """The recorded specializations (a list of records, see ``_record_specializations.py``)."""
    return json.loads(pathlib.Path(path).read_text())["specializations"]


# ------------------------------------------------------------------ what only a GPU launches
#: bf16 is what a model runs in; fp16 the tests' usual 16-bit type
_HALF = ("*bf16", "*fp16")


def _variant(rec: dict, why: str, types=None, **changes) -> dict:
    """``rec`` with constexprs or launch options changed (and pointer types, ``types``)."""
    out = dict(rec, constexprs=dict(rec["constexprs"]), types=dict(rec["types"]), origin=why)
    out.pop("known_failure", None)
    for key, value in changes.items():
        (out if key in OPTIONS else out["constexprs"])[key] = value
    out["types"].update(types or {})
    return out


def _query_type(rec: dict):
    return rec["types"].get("Q") or rec["types"].get("q")


def gpu_variants(rec: dict) -> list[dict]:
    """The launches a GPU makes where the interpreter made ``rec``, by the launchers' rules
    (hsr/kernels: ``interpreting()``, ``pdl_supported``), that the record cannot show.

    * ``UPCAST``: the interpreter always computes in fp32 (``UPCAST=True``); a GPU only for fp32
      inputs, so a 16-bit launch is compiled with ``UPCAST=False`` (the tensor-core dots). The
      code cache's filter upcasts on a GPU only when it attends fp32 queries.
    * tiles: where the launcher shrinks its tiles for the interpreter (``upcast`` or
      ``interpreting()``), the GPU's default tiles and warps at the record's block size.
    * ``PDL``: a programmatic dependent launch (Hopper on; the code cache's ``pdl`` needs
      ``HEAD_DIM <= 128``): ``PDL=True, launch_pdl=True`` (``griddepcontrol``, which the
      interpreter has not).
    """
    name, ce = rec["name"], rec["constexprs"]
    half = _query_type(rec) in _HALF
    out = []
    if name == "_code_filter_kernel":
        if ce["UPCAST"] and not (ce["ATTEND"] and _query_type(rec) == "*fp32"):
            out.append(_variant(rec, "GPU: UPCAST=False", UPCAST=False))
    elif ce.get("UPCAST") and half:
        if name == "_relu_plan_kernel":  # relu_prefill: BLOCK_M 128, BLOCK_N 64, NB 64 on a GPU
            out.append(_variant(rec, "GPU: tiles", UPCAST=False, BLOCK_M=128, BLOCK_N=64, NB=64, num_warps=8))
        elif name == "_relu_prefill_kernel":
            out.append(_variant(rec, "GPU: tiles", UPCAST=False, BLOCK_M=128, BLOCK_N=64,
                                num_warps=8 if ce["HEAD_DIM"] >= 128 else 4))
        elif name in ("_bsa_prefill_kernel", "_bsa_prefill_v2_kernel"):  # tiles up to 128 (v2) / 128x64 (v1)
            bs, hpp = ce["BLOCK_SIZE"], ce.get("HPP", 1)
            bm = min(128, bs * hpp)
            bn = min(128 if name == "_bsa_prefill_v2_kernel" else 64, bs)
            nw = 8 if bm >= 128 and ce["HEAD_DIM"] >= 128 else 4
            out.append(_variant(rec, "GPU: UPCAST=False", UPCAST=False))
            if (bm, bn, nw) != (ce["BLOCK_M"], ce["BLOCK_N"], rec["num_warps"]):
                out.append(_variant(rec, "GPU: tiles", UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw))
        else:
            out.append(_variant(rec, "GPU: UPCAST=False", UPCAST=False))
    if name == "_selected_kernel" and ce["BLOCK_N"] == 32:  # selected_attention: 64 keys a tile on a GPU
        out.append(_variant(rec, "GPU: tiles", BLOCK_N=64))
    pdl = name == "_merge_kernel" or (name in ("_prepare_kernel", "_code_filter_kernel") and ce["HEAD_DIM"] <= 128)
    if pdl and not ce["PDL"]:
        # the launch a GPU makes (a 16-bit filter: its UPCAST=False form), as a dependent launch
        gpu = out or [rec]
        out += [_variant(v, v.get("origin", "GPU") + ", PDL", PDL=True, launch_pdl=True) for v in gpu]
    return out


def _pick(records: list[dict], name: str, **want) -> dict:
    """A record of kernel ``name`` whose constexprs include ``want`` (one with 16-bit data if
    there is one): the base of a hand-written launch, whose argument types are the launcher's."""
    found = [r for r in records if r["name"] == name and all(r["constexprs"].get(k) == v for k, v in want.items())]
    if not found:
        raise LookupError(f"no recorded {name} with {want}: record again, or change hand_written()")
    return next((r for r in found if {"*fp16", "*bf16"} & set(r["types"].values())), found[0])


#: the arguments that hold a model's queries, keys, values and outputs (bf16 at a model's sizes)
_DATA = ("Q", "K", "V", "KN", "VN", "KD", "VD", "O", "CENT", "KP", "VP")


def _at_model_size(rec: dict, why: str, types=None, **changes) -> dict:
    """``rec`` in bf16 (its fp16 arguments, which hold the data, and those of :data:`_DATA`),
    with ``types`` and ``changes``."""
    bf16 = {k: "*bf16" for k, v in rec["types"].items() if v == "*fp16" or (k in _DATA and v.startswith("*fp"))}
    return _variant(rec, why, types={**bf16, **(types or {})}, **changes)


def hand_written(records: list[dict]) -> list[dict]:
    """Launches no test makes, by hand: a model's decode step (bf16, head dims 64, 128, 256)
    through the code cache and its top-k mode, with the launchers' GPU defaults.

    The tests run these kernels in fp32 or fp16 at head dims up to 64 (the interpreter's
    cost); a model runs them in bf16 at 128, where tiles, registers and shared memory differ."""
    from hsr.kernels import _select as S

    out = []
    bits, full = S.DIGIT_BITS, S.FULL_ROUNDS
    for r in range(full + 1):  # the selection at its GPU block and the widest program split
        for pb in (1, 32):
            out.append(_variant(_pick(records, "_select_pass_kernel"), "hand: select", ROUND=r, BITS=bits,
                                BLOCK=2048, COLLECT=r == full, PB=pb, num_warps=4))
    for pb in (1, 32):
        for w in (4, 8):
            out.append(_variant(_pick(records, "_select_finish_kernel"), "hand: select", FULL=full,
                                ROUNDS=-(-32 // bits), BITS=bits, BLOCK=S.FINISH_BLOCK, PB=pb, num_warps=w))
    why, why_k = "hand: a model's decode step", "hand: the top-k mode at a model's sizes"
    for d in (64, 128, 256):
        # CodeKVCache: pdl from Hopper on, head dims up to 128; a step that adds a token rotates
        # the query and adds in one launch (three launches), or, with the Hadamard rotation at
        # d <= 128 (step_form), in the filter's launch (two)
        pdl = dict(PDL=d <= 128, launch_pdl=d <= 128)
        dims = dict(HEAD_DIM=d, DP=d)
        filt = dict(dims, LOG_D=d.bit_length() - 1, BLOCK_K=32, UPCAST=False, ROWS=16, BLOCK_N=128, STAGES=3,
                    BLOCK_A=64, num_warps=4, num_stages=3, **pdl)
        out += [
            _at_model_size(_pick(records, "_code_add_kernel", HAS_V=True, UPDATE_LEN=True), why, **dims, BLOCK_J=d,
                           num_warps=8 if d >= 128 else 4),
            _at_model_size(_pick(records, "_prepare_kernel", HAS_V=True, ADD=True, APART=True, ROWS=16, BLOCK_R=32),
                           why, **dims, BLOCK_J=d, num_warps=4, **pdl),
            _at_model_size(_pick(records, "_code_filter_kernel", ATTEND=True, KIND=0, ROTATE=False, ADD=False,
                                 CERTIFY=False), why, **filt),
            _at_model_size(_pick(records, "_code_attend_kernel", KIND=0, DENSE=False, CERTIFY=False), why,
                           HEAD_DIM=d, UPCAST=False),
            _at_model_size(_pick(records, "_certify_kernel"), why, HEAD_DIM=d),
            _at_model_size(_pick(records, "_merge_kernel", ADVANCE=True), why, HEAD_DIM=d, BLOCK_S=64, **pdl),
            _at_model_size(_pick(records, "_topk_gather_kernel"), why_k, BLOCK=64, HEAD_DIM=d),
            _at_model_size(_pick(records, "_score_all_kernel"), why_k, ROWS=16, BLOCK_N=64, HEAD_DIM=d, UPCAST=False),
            _at_model_size(_pick(records, "_topk_attend_kernel"), why_k, ROWS=16, BLOCK_N=64, HEAD_DIM=d,
                           UPCAST=False, CERTIFY=True),
        ]
        if d <= 128:
            out.append(_at_model_size(_pick(records, "_code_filter_kernel", ATTEND=True, KIND=0, ROTATE=True,
                                            ADD=True, HADAMARD=True, CERTIFY=False), why + " (two launches)", **filt))
    return out + _sparse_at_model_size(records)


def _sparse_at_model_size(records: list[dict]) -> list[dict]:
    """The block-sparse, relu and HSR-index kernels at head dim 128 in bf16, with the blocks of
    the attention patterns (256 keys) and of an index (32 keys, 8 subspaces), at the tiles
    their launchers pick on a GPU; and the prefill's Hopper experiments (TMA, fused step)."""
    why, d = "hand: a model's prefill and decode", 128
    v2 = dict(BLOCK_SIZE=256, BLOCK_M=128, BLOCK_N=128, HPP=1, HEAD_DIM=d, CAUSAL=True, UPCAST=False, ORDER_MODE=1,
              num_warps=8)
    base_v2 = _pick(records, "_bsa_prefill_v2_kernel", HPP=1, TMA=False, FUSED=False)
    desc = f"tensordesc<bf16[{v2['BLOCK_N']}, {d}]>"  # K and V of the full blocks, a tile a TMA copy
    index = dict(HEAD_DIM=d, S=8, NB=32, ROWS=16, UPCAST=False)
    return [
        _at_model_size(base_v2, why, **v2),
        _at_model_size(base_v2, "hand: prefill with TMA (Hopper)", types={"KD": desc, "VD": desc}, **v2, TMA=True),
        _at_model_size(base_v2, "hand: prefill's fused step", **v2, FUSED=True),
        _at_model_size(_pick(records, "_split_lists_kernel"), why, BLOCK_SIZE=256, CAUSAL=True, BLOCK_L=512),
        _at_model_size(_pick(records, "_bsa_decode_kernel", HAS_POS=False), why, BLOCK_SIZE=256, UNIT=64, BLOCK_N=64,
                       ROWS=16, HEAD_DIM=d, CAUSAL=True, UPCAST=False),
        _at_model_size(_pick(records, "_bsa_prefill_kernel", FLAT=False), why, BLOCK_SIZE=256, BLOCK_M=128,
                       BLOCK_N=64, HEAD_DIM=d, CAUSAL=True, UPCAST=False, num_warps=8),
        _at_model_size(_pick(records, "_relu_plan_kernel"), why, BLOCK_M=128, BLOCK_N=64, NB=64, HEAD_DIM=d,
                       CAUSAL=True, UPCAST=False, num_warps=8),
        _at_model_size(_pick(records, "_relu_prefill_kernel", ALPHA=2), why, BLOCK_M=128, BLOCK_N=64, HEAD_DIM=d,
                       CAUSAL=True, UPCAST=False, num_warps=8),
        _at_model_size(_pick(records, "_block_filter_kernel"), why, **index),
        _at_model_size(_pick(records, "_hsr_decode_kernel", KIND=0), why, **index, C=32),
    ]


def _pdl_key(rec: dict):
    """What a dependent launch of the filter is compiled once for: ``PDL`` only adds the wait
    at the kernel's start, so not for every combination of the other constexprs (each compile
    takes seconds)."""
    ce = rec["constexprs"]
    return (_query_type(rec), *(ce[k] for k in ("HEAD_DIM", "ATTEND", "ADD", "ROTATE", "UPCAST")))


def interpreter_only(rec: dict) -> bool:
    """Whether a GPU never makes the recorded launch ``rec``: one that upcasts 16-bit inputs
    to fp32, which only the interpreter does (the filter's: unless it attends fp32 queries).
    :func:`gpu_variants` gives the launch a GPU makes in its place."""
    ce = rec["constexprs"]
    if "origin" in rec or not ce.get("UPCAST"):
        return False
    if rec["name"] == "_code_filter_kernel":
        return not (ce["ATTEND"] and _query_type(rec) == "*fp32")
    return _query_type(rec) in _HALF


def jobs(records: list[dict], every: bool = False) -> list[dict]:
    """What to compile: the records, their GPU variants and the hand-written launches,
    deduplicated. Unless ``every``, two cuts keep the run under 3 minutes on 2 cores (all 475
    compiles took 221 s, these 368 took 144 s, without Triton's cache): a record
    :func:`interpreter_only` is compiled in its GPU form only (its constexprs but ``UPCAST``, its
    types; 78 records, 75 s of compiling on one core), and the filter's dependent launches
    derived from the records once per :func:`_pdl_key` (the hand-written ones all)."""
    seen, pdl, out = set(), set(), []
    for rec in records + [v for r in records for v in gpu_variants(r)] + hand_written(records):
        key = json.dumps({k: rec[k] for k in ("module", "name", "constexprs", "types") + OPTIONS}, sort_keys=True)
        if key in seen or (not every and interpreter_only(rec) and not rec.get("known_failure")):
            continue
        if not every and rec["name"] == "_code_filter_kernel" and rec.get("origin", "").startswith("GPU") \
                and rec["launch_pdl"]:
            if _pdl_key(rec) in pdl:
                continue
            pdl.add(_pdl_key(rec))
        seen.add(key)
        out.append(rec)
    return out


# ------------------------------------------------------------------ compiling
def _constant(value):
    if isinstance(value, str) and value.startswith("tl.dtype:"):
        import triton.language as tl

        return tl.dtype(value.removeprefix("tl.dtype:"))
    return value


def _error_text(e: BaseException) -> str:
    """The error and its cause: Triton wraps a failure in a helper function in one
    CompilationError per call level; the innermost shows the failing line, the root the reason."""
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    inner = [x for x in chain if type(x).__name__ == "CompilationError"]
    text = str(inner[-1] if inner else e).strip()
    root = chain[-1]
    if root is not (inner[-1] if inner else e) and str(root) not in text:
        text += f"\n{type(root).__name__}: {root}"
    return f"{type(e).__name__}: {text[-2000:]}"


def compile_one(rec: dict):
    """Compile one record for sm_90: ``(seconds, shared memory bytes, None)``, or ``(seconds,
    None, error text)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(rec["module"]), rec["name"])
        ce = {k: _constant(v) for k, v in rec["constexprs"].items()}
        missing = [a for a in fn.arg_names if a not in ce and a not in rec["types"]]
        if missing:
            raise KeyError(f"the record has no type for {missing}: record it again")
        sig = {a: "constexpr" if a in ce else rec["types"][a] for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce), target=GPUTarget("cuda", 90, 32),
                                options={k: rec[k] for k in OPTIONS})
        if kernel.metadata.shared > MAX_SHARED:
            raise RuntimeError(f"needs {kernel.metadata.shared} bytes of shared memory, sm_90 has {MAX_SHARED}")
    except Exception as e:  # noqa: BLE001 - every failure is reported with its kernel and options
        return time.perf_counter() - t0, None, _error_text(e)
    return time.perf_counter() - t0, kernel.metadata.shared, None


def describe(rec: dict) -> str:
    opts = " ".join(f"{k}={rec[k]}" for k in OPTIONS)
    origin = f" [{rec['origin']}]" if "origin" in rec else ""
    return f"{rec['name']}{origin} {json.dumps(rec['constexprs'])} {opts}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-j", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("-k", default="")
    ap.add_argument("-v", action="store_true")
    ap.add_argument("--all", action="store_true", help="no cuts (see jobs())")
    args = ap.parse_args(argv)
    todo = [r for r in jobs(load(), every=args.all) if args.k in r["name"]]
    # the filter's compiles take seconds, most others a fraction: first, so no process idles at the end
    todo.sort(key=lambda r: r["name"] != "_code_filter_kernel")
    t0 = time.perf_counter()
    if args.j > 1:
        with ProcessPoolExecutor(args.j) as pool:
            results = list(pool.map(compile_one, todo, chunksize=1))
    else:
        results = [compile_one(r) for r in todo]
    failed, known = [], []
    for rec, (secs, shared, err) in zip(todo, results):
        if args.v:
            print(f"{secs:6.2f}s {shared or 0:6d}B {describe(rec)}")
        if rec.get("known_failure") and err:
            known.append(rec)
        elif rec.get("known_failure"):  # the JSON would say it fails: a failure until the note goes
            failed.append((rec, "compiles now: drop its known_failure note from " + JSON.name))
        elif err:
            failed.append((rec, err))
    for rec in known:
        print(f"known failure, still failing ({rec['known_failure']}): {describe(rec)}")
    for rec, err in failed:
        print(f"FAILED {describe(rec)}\n{textwrap.indent(err, '    ')}", file=sys.stderr)
    n_kernels = len({(r["module"], r["name"]) for r in todo})
    print(f"compiled {len(todo) - len(failed) - len(known)} of {len(todo)} specializations of {n_kernels} kernels "
          f"for sm_90 in {time.perf_counter() - t0:.0f} s ({args.j} processes), {len(failed)} failed"
          + (f", {len(known)} known failures" if known else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
