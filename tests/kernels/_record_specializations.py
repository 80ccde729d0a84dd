"""Record the specializations of hsr's Triton kernels that the test-suite launches.

Regenerate ``tests/kernels/sm90_specializations.json`` (about 10 minutes on 2 cores) with::

    .venv/bin/python tests/kernels/_record_specializations.py

That runs the interpreted kernel tests (and the other tests that launch kernels in-process) with
``HSR_RECORD_SPECIALIZATIONS`` set, then merges the workers' records into the JSON that
``tests/kernels/_sm90_compile.py`` compiles for sm_90.

The hook itself (:func:`install`, which ``tests/kernels/conftest.py`` calls when the variable
names a file and the interpreter is on) wraps ``InterpretedFunction.run``, where every
``kernel[grid](*args, **kw)`` ends under ``TRITON_INTERPRET=1``, and keeps, per distinct launch
of a kernel defined in ``hsr``: the kernel's module and name, the Triton type of each argument
that is not a constexpr (a tensor ``*<dtype>``, an int ``i32``/``i64``, a float ``fp32``, a bool
``i1``), the value of each constexpr and the launch options (``num_warps``, ``num_stages``,
``launch_pdl``). With pytest-xdist every worker writes ``<file>.<worker>.part``; the process that
ends last without a worker id (the controller, or the only process) merges them into ``<file>``
(``tests/kernels/conftest.py`` calls :func:`write` at the session's end).
"""
from __future__ import annotations

import glob
import inspect
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ENV = "HSR_RECORD_SPECIALIZATIONS"
ROOT = pathlib.Path(__file__).resolve().parents[2]
JSON = pathlib.Path(__file__).with_name("sm90_specializations.json")
#: the tests that launch hsr's kernels in this process (tests/distributed launches them in
#: subprocesses of its own, which no conftest hooks; the kernels they use are the code cache's)
TESTS = ["tests/kernels", "tests/integrations/test_device_cache.py", "tests/attention/test_power.py"]
#: launch options that change the compiled code; the rest (grid, stream) do not
OPTIONS = {"num_warps": 4, "num_stages": 3, "launch_pdl": False}
REGENERATE = ".venv/bin/python tests/kernels/_record_specializations.py"

_records: set[str] = set()


def type_of(value) -> str:
    """The Triton signature type a launch gives a runtime (not constexpr) argument ``value``,
    as the compiled launcher would; ``constexpr`` for ``None`` (Triton specializes it)."""
    from triton._utils import canonicalize_dtype

    if hasattr(value, "data_ptr"):
        return "*" + canonicalize_dtype(value.dtype)
    if value is None:
        return "constexpr"
    if isinstance(value, bool):  # before int: a bool is an int
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for the argument {value!r} ({type(value).__name__})")


def constant(value):
    """A constexpr's value as JSON: numbers, bools, None and strings as they are; a ``tl.dtype``
    as ``"tl.dtype:<name>"`` (:func:`tests.kernels._sm90_compile` turns it back)."""
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, tl.dtype):
        return f"tl.dtype:{value.name}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr value {value!r} ({type(value).__name__}) is not recordable")


def describe(fn, args, kwargs) -> dict:
    """One launch as a JSON-able record (see the module's docstring)."""
    from triton.runtime.jit import _normalize_ty

    sig = inspect.signature(fn)
    names = list(sig.parameters)
    kernel_kw = {k: v for k, v in kwargs.items() if k in sig.parameters}
    bound = sig.bind(*args, **kernel_kw)
    bound.apply_defaults()
    annotations = {k: _normalize_ty(v) for k, v in fn.__annotations__.items()}
    types, constexprs = {}, {}
    for name in names:
        value = bound.arguments[name]
        if annotations.get(name) == "constexpr":
            constexprs[name] = constant(value)
            continue
        ty = type_of(value)
        if ty == "constexpr":
            constexprs[name] = None
        else:
            types[name] = ty
    options = {}
    for key, default in OPTIONS.items():
        value = kwargs.get(key)
        options[key] = default if value is None else type(default)(value)
    return dict(module=fn.__module__, name=fn.__name__, **options, constexprs=constexprs, types=types)


def install() -> None:
    """Wrap the interpreter's launch so that every launch of an hsr kernel is recorded (then
    written by :func:`write`, at the session's end). Only under ``TRITON_INTERPRET=1``."""
    from triton.runtime.interpreter import InterpretedFunction

    if getattr(InterpretedFunction.run, "_hsr_recording", False):
        return
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup and getattr(self.fn, "__module__", "").startswith("hsr."):
            _records.add(json.dumps(describe(self.fn, args, kwargs)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    recording_run._hsr_recording = True
    InterpretedFunction.run = recording_run


def write(path: str | None = None) -> None:
    """Write this process's records: a pytest-xdist worker to ``<path>.<worker>.part``, any
    other process to ``<path>``, merged with the parts the workers left there (then removed).

    The xdist controller's session ends after its workers', so it merges all of them."""
    path = path or os.environ.get(ENV)
    if not path:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        pathlib.Path(f"{path}.{worker}.part").write_text("\n".join(sorted(_records)) + "\n")
        return
    records = set(_records)
    parts = glob.glob(glob.escape(path) + ".*.part")
    for part in parts:
        records.update(line for line in pathlib.Path(part).read_text().splitlines() if line)
    pathlib.Path(path).write_text(dump([json.loads(r) for r in records]))
    for part in parts:
        os.remove(part)


def dump(records: list[dict], notes: dict | None = None) -> str:
    """The JSON text of ``records``: deduplicated, one launch a line, sorted by kernel then by
    the launch's canonical text; each line's keys in one order (the kernel first), and its
    constexprs and types in the kernel's parameter order, as recorded. ``notes``: a
    ``known_failure`` note by :func:`key`, kept on the records it names."""
    order = ("module", "name", "num_warps", "num_stages", "launch_pdl", "constexprs", "types")
    unique = {key(r): r for r in records}
    lines = []
    for k in sorted(unique, key=lambda k: (unique[k]["module"], unique[k]["name"], k)):
        rec = {f: unique[k][f] for f in order}
        if (notes or {}).get(k) or unique[k].get("known_failure"):
            rec["known_failure"] = (notes or {}).get(k) or unique[k]["known_failure"]
        lines.append(json.dumps(rec))
    head = json.dumps({"regenerate": REGENERATE, "compiled_by": "tests/kernels/_sm90_compile.py"})[1:-1]
    return "{" + head + ', "specializations": [\n' + ",\n".join(lines) + "\n]}\n"


def key(rec: dict) -> str:
    """A record's identity: its kernel, constexprs, argument types and launch options."""
    return json.dumps({f: rec[f] for f in ("module", "name", "constexprs", "types", *OPTIONS)}, sort_keys=True)


def load(path) -> list[dict]:
    """The records of a file :func:`dump` wrote."""
    return json.loads(pathlib.Path(path).read_text())["specializations"]


def main() -> int:
    """Run the tests that launch the kernels under the interpreter, recording, and write
    :data:`JSON`. Returns pytest's exit status (the JSON is written whatever it is)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "specializations.json")
        env = dict(os.environ, TRITON_INTERPRET="1", **{ENV: out})
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        # the seed: hypothesis' random examples, and so the record, the same from run to run
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--hypothesis-seed=0",
               "--deselect", "tests/kernels/test_sm90_compile.py", *TESTS]
        status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        if not os.path.exists(out):  # no controller merge (e.g. interrupted): merge what the workers left
            write(out)
        records = load(out)
    # a known failure's note (written by hand, see _sm90_compile.py) stays with its record
    notes = {key(r): r["known_failure"] for r in (load(JSON) if JSON.exists() else []) if r.get("known_failure")}
    JSON.write_text(dump(records, notes))
    kernels = {(r["module"], r["name"]) for r in records}
    print(f"{len(records)} specializations of {len(kernels)} kernels -> {JSON.relative_to(ROOT)}"
          + ("" if status == 0 else f" (pytest exited {status}: check the failures)"))
    return status


if __name__ == "__main__":
    sys.exit(main())
