"""The top-k mode's kernels compile for sm_90 (``tests/kernels/_sm90_compile.py``), checked on
the CPU in CI, where the interpreter runs them but never lowers them."""
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_topk_kernels_compile_for_sm90():
    script = pathlib.Path(__file__).with_name("_sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled" in res.stdout
