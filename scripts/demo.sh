#!/usr/bin/env bash
# The main job: install, then run the demo on an embedded synthetic KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m hsr demo "$@"
