"""The command line: help, version, unknown commands (the demo itself runs in scripts/demo.sh)."""
import subprocess
import sys

import hsr


def _run(*args):
    return subprocess.run([sys.executable, "-m", "hsr", *args], capture_output=True, text=True)


def test_help_version_and_unknown_command():
    r = _run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "receptive" in r.stdout
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hsr {hsr.__version__}"
    r = _run("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
    r = _run("demo", "--help")
    assert r.returncode == 0 and "--method" in r.stdout
