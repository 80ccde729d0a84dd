"""The command line: subcommands with their own help, version, unknown commands, no stray files
(the full demo itself runs in scripts/demo.sh)."""
import subprocess
import sys

import hsr


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hsr", *args], capture_output=True, text=True, cwd=cwd)


def test_help_version_and_unknown_command():
    r = _run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "receptive" in r.stdout
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hsr {hsr.__version__}"
    r = _run("frobnicate")
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr
    r = _run("demo", "--help")
    assert r.returncode == 0 and "--method" in r.stdout and "--seq-len" not in r.stdout
    r = _run("receptive", "--help")
    assert r.returncode == 0 and "--seq-len" in r.stdout and "--plot" in r.stdout and "--method" not in r.stdout
    r = _run("demo", "--n", "0")
    assert r.returncode == 2 and "--n" in r.stderr


def test_receptive_writes_nothing_unless_asked(tmp_path):
    r = _run("receptive", "--seq-len", "2048", "--block-size", "128", "--layers", "3", cwd=tmp_path)
    assert r.returncode == 0 and "power" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_small_demo_reports_compile_apart(tmp_path):
    r = _run("--n", "3000", "--dim", "16", "--queries", "4", "--selectivity", "0.01", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "compiling the numba kernels" in r.stdout and "numba compile / load" in r.stdout
    assert "range search exact       yes" in r.stdout


def test_small_demo_baselines_are_dense_float32_and_sdpa(tmp_path):
    r = _run("--n", "3000", "--dim", "16", "--queries", "4", "--selectivity", "0.01", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "BLAS scan QK^T >= tau" in r.stdout and "torch SDPA float32" in r.stdout
    assert "certified dropped mass eps_cert <=" in r.stdout and "reported error bound" in r.stdout


def test_demo_without_torch_skips_the_sdpa_column(tmp_path):
    # the core needs numpy and numba only: with torch unimportable the demo still runs
    code = ("import sys; sys.modules['torch'] = None; from hsr.__main__ import main; "
            "sys.exit(main(['--n', '3000', '--dim', '16', '--queries', '4', '--selectivity', '0.01']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped: torch is not installed" in r.stdout and "dense float32 (numpy)" in r.stdout
