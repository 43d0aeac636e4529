#!/usr/bin/env bash
# Runs the benchmark suite, then its report: benchmarks/results/<device>.{json,md,png}, where
# <device> is the GPU's name (nvidia-h100-80gb-hbm3, ...) or cpu.
# Usage: bash scripts/bench.sh [--quick] [--device cuda|cpu] [--dtypes bfloat16,float32]
#                              [-- PYTEST_ARGS ...]
# --quick takes a few minutes on a 2-core CPU; without it the full grid runs (made for a GPU,
# hours on a CPU). Needs the bench extras: pip install -e ".[bench]".
set -euo pipefail
cd "$(dirname "$0")/.."

python -m benchmarks.run "$@"
