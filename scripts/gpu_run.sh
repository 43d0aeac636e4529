#!/usr/bin/env bash
# One call on a GPU machine that already has torch, triton, transformers, peft, safetensors, rich,
# pytest and pytest-benchmark (and no network): install fastdelta without touching those, then run
# the gpu-marked tests. Results go to $OUT when it is set (the device tool returns that folder).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
out="${OUT:-/tmp/fastdelta-gpu}"
mkdir -p "$out"
python -m pytest -m gpu -q -rs --junitxml="$out/gpu-tests.xml" "$@" | tee "$out/gpu-tests.txt"
