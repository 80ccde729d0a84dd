#!/usr/bin/env bash
# The main job: install into .venv/ (hsr and torch), then run the demo on a synthetic KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec "${HSR_VENV:-.venv}/bin/python" -m hsr demo "$@"
