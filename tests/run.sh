#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
# The runtime requirements and SmolLM2's weights; torch only when it is missing (a CUDA build stays).
bash train.sh setup
echo "== test requirements: python3 -m pip install -r requirements-test.txt"
python3 -m pip install -q -r requirements-test.txt
# The oracle of the authors' metric convention (their BLEU / ROUGE-L); its own dependencies are not wanted.
python3 -c "import pycocoevalcap" 2>/dev/null || python3 -m pip install -q --no-deps pycocoevalcap
python3 -m pytest -q tests "$@"
