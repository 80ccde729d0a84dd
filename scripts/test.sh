#!/usr/bin/env bash
# The test command: install into .venv/, then run the whole suite (Triton kernels under the
# interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${HSR_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
