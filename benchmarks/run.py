"""Runs the benchmark suite, then its report: what `bash scripts/bench.sh` and `fastdelta bench`
call.

    python -m benchmarks.run [--quick] [--device cuda] [--dtypes bfloat16,float32]
        [--output-dir benchmarks/results] [--statistic min] [-- PYTEST_ARGS ...]

pytest-benchmark's raw JSON goes to `<output-dir>/raw/<device>.json` and the report to
`<output-dir>/<device>.{json,md,png}`. Arguments after `--` go to pytest last, so they can
override the timing options chosen here (e.g. `-- --benchmark-max-time=2 -k peft`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import harness, report
from fastdelta.cli import add_bench_arguments

SUITE_DIR = Path(__file__).parent
# Imported by the benchmark files (matplotlib is optional: the report skips the plot).
REQUIRED = ("pytest_benchmark", "peft")

# pytest-benchmark options per grid and device type (max-time: seconds of rounds per benchmark).
# A GPU call takes microseconds to milliseconds, so 0.05 s holds tens of rounds, and the full
# grid's ~900 benchmarks take about 5 minutes, mostly building models; on the CPU a call of the
# quick grid takes up to ~0.3 s (the end-to-end step), and at least 10 rounds of it are timed:
# with 5, one stall of a shared 2-core machine could decide the ratio of two such steps.
SMOKE_TIMING = [
    "--benchmark-min-rounds=1",
    "--benchmark-max-time=0",
    "--benchmark-min-time=0",
    "--benchmark-calibration-precision=1",
]
TIMING = {
    ("smoke", "cpu"): SMOKE_TIMING,
    ("smoke", "cuda"): SMOKE_TIMING,
    ("quick", "cpu"): ["--benchmark-min-rounds=10", "--benchmark-max-time=1.0"],
    ("full", "cpu"): ["--benchmark-min-rounds=3", "--benchmark-max-time=1.0"],
    ("quick", "cuda"): ["--benchmark-min-rounds=20", "--benchmark-max-time=0.2"],
    ("full", "cuda"): ["--benchmark-min-rounds=5", "--benchmark-max-time=0.05"],
}


def pytest_arguments(arguments: argparse.Namespace, device: torch.device, raw: Path) -> list:
    """The pytest command line of the run, user's extra arguments last."""
    command = [str(SUITE_DIR), f"--grid={arguments.grid}", f"--device={device}"]
    if arguments.dtypes:
        command.append(f"--dtypes={arguments.dtypes}")
    command += [f"--benchmark-json={raw}", *TIMING[arguments.grid, device.type]]
    return command + arguments.pytest_args


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write its report; returns pytest's exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    add_bench_arguments(parser)
    arguments = parser.parse_args(argv)
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(
            f"the benchmarks need {', '.join(missing)}: pip install -e '.[bench]' (from the "
            "repository root) installs them"
        )
    device = torch.device(arguments.device) if arguments.device else harness.default_device()
    output_dir = arguments.output_dir or report.RESULTS_DIR
    raw = output_dir / "raw" / f"{harness.device_slug(device)}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.unlink(missing_ok=True)
    started = time.perf_counter()
    status = pytest.main(pytest_arguments(arguments, device, raw))
    elapsed = time.perf_counter() - started
    if not raw.is_file() or raw.stat().st_size == 0:  # pytest-benchmark opens it up front
        print(f"The benchmark run wrote no results (pytest exit status {int(status)}).")
        return int(status) or 1
    written = report.write_report(json.loads(raw.read_text()), output_dir, arguments.statistic)
    print("\n".join(report.summary_lines(written)))
    print(f"The benchmarks took {elapsed:.0f} s; pytest-benchmark's own JSON is {raw}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
