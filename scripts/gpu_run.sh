#!/usr/bin/env bash
# One call on a GPU machine that already has torch, triton, transformers, peft, safetensors, rich,
# pytest and pytest-benchmark (and no network): install fastdelta without touching those, run
# `fastdelta doctor` (devices, backends, first-use verification of the kernels, a short
# benchmark), the gpu-marked tests, then the full benchmark suite and its report (without
# matplotlib the report still writes JSON and Markdown and says the plot was skipped). Results go
# to $OUT when it is set (the device tool returns that folder): doctor.json, doctor.txt,
# gpu-tests.*, benchmarks.txt, benchmarks/. The exit status is the doctor's if a check failed,
# else the tests' if they failed, else the benchmarks'.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
out="${OUT:-/tmp/fastdelta-gpu}"
mkdir -p "$out"
doctor_status=0
python -m fastdelta doctor --json "$out/doctor.json" 2>&1 | tee "$out/doctor.txt" || doctor_status=$?

tests_status=0
python -m pytest -m gpu -q -rs --junitxml="$out/gpu-tests.xml" "$@" | tee "$out/gpu-tests.txt" ||
  tests_status=$?

bench_status=0
python -m benchmarks.run 2>&1 | tee "$out/benchmarks.txt" || bench_status=$?
mkdir -p "$out/benchmarks"
cp -r benchmarks/results/. "$out/benchmarks/"
if ((doctor_status != 0)); then
  exit "$doctor_status"
fi
if ((tests_status != 0)); then
  exit "$tests_status"
fi
exit "$bench_status"
