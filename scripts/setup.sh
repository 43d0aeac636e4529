#!/usr/bin/env bash
# Installs fastdelta (editable) and what it needs, on a machine that has Python and pip.
# A torch that is already installed is kept: only a machine without one gets torch 2.13.0
# (on the project's machines that is a local CPU wheel; plain `torch` would pull GBs of CUDA).
# Usage: bash scripts/setup.sh [--test]   (--test adds pytest, pytest-benchmark, peft, ruff)
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip --version >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
python -m pip install --quiet -e ".${extras}"
python -c "import fastdelta, torch; print(f'fastdelta {fastdelta.__version__} with torch {torch.__version__}')"
