#!/usr/bin/env bash
# One call on a GPU machine that already has torch, triton, transformers, peft, safetensors, rich,
# pytest and pytest-benchmark (and no network): install fastdelta without touching those, run
# the gpu-marked tests, then the full benchmark suite and its report (without matplotlib the
# report still writes JSON and Markdown and says the plot was skipped). Results go to $OUT when
# it is set (the device tool returns that folder): gpu-tests.*, benchmarks.txt, benchmarks/.
# The exit status is the tests' if they failed, else the benchmarks'.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
out="${OUT:-/tmp/fastdelta-gpu}"
mkdir -p "$out"
tests_status=0
python -m pytest -m gpu -q -rs --junitxml="$out/gpu-tests.xml" "$@" | tee "$out/gpu-tests.txt" ||
  tests_status=$?

bench_status=0
python -m benchmarks.run 2>&1 | tee "$out/benchmarks.txt" || bench_status=$?
mkdir -p "$out/benchmarks"
cp -r benchmarks/results/. "$out/benchmarks/"
if ((tests_status != 0)); then
  exit "$tests_status"
fi
exit "$bench_status"
