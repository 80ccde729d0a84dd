#!/usr/bin/env bash
# The API reference, generated from the numpydoc docstrings into docs/api/ (HTML, not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${HSR_VENV:-.venv}/bin/python"  # the environment scripts/setup.sh made, else the active python
[ -x "$py" ] || py=python3
"$py" -m pdoc --docformat numpy -o docs/api hsr hsr.index hsr.attention hsr.kernels hsr.integrations "$@"
echo "API reference: docs/api/index.html"
