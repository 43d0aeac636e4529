#!/usr/bin/env bash
# Sets up fastdelta with its test extras, then runs the linter and the whole test suite.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test
python -m ruff check .
python -m ruff format --check .
python -m pytest "$@"
