"""The benchmark suite runs: its smoke grid (minuscule shapes, one round each) goes through the
harness and the report in a subprocess, as `bash scripts/bench.sh` runs it. The suite itself
never runs in the test run: its files are named bench_*.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def test_no_benchmark_file_is_collected_by_the_test_run():
    files = [path.name for path in (REPOSITORY / "benchmarks").glob("*.py")]
    assert any(name.startswith("bench_") for name in files)
    assert not [name for name in files if name.startswith("test_") or name.endswith("_test.py")]


def test_the_smoke_grid_runs_every_provider_and_writes_the_report(tmp_path):
    command = [sys.executable, "-m", "benchmarks.run", "--grid=smoke", "--device=cpu"]
    command += [f"--output-dir={tmp_path}"]
    # The cpp backend is left out: its first use compiles the C++ extension (minutes on a
    # fresh machine), which its own tests pay for.
    providers = "floor,fastdelta-torch,fastdelta-triton,peft,reference,fastdelta,full-finetune"
    command += ["--", f"--providers={providers}", "--threads=1", "-q", "-p", "no:warnings"]
    environment = {**os.environ, "FASTDELTA_BACKEND": "auto"}
    result = subprocess.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads((tmp_path / "cpu.json").read_text())
    rows = written["results"]
    providers = {(row["op"], row["provider"]) for row in rows}
    for op in ("lora_linear", "adapter_bottleneck"):
        assert {(op, "floor"), (op, "fastdelta-torch"), (op, "reference")} <= providers
        modes = {row["mode"] for row in rows if row["op"] == op}
        assert modes == {"forward", "backward", "full"}
    assert ("lora_linear", "peft") in providers
    assert {p for op, p in providers if op == "training_step"} == {
        "fastdelta",
        "peft",
        "full-finetune",
    }
    assert all(row["time_s"] > 0 and row["memory_bytes"] is not None for row in rows)
    assert "fastdelta-triton" in written["unavailable_providers"]  # no GPU: skipped, with why
    assert (tmp_path / "cpu.md").read_text().startswith("# fastdelta benchmarks: cpu")


def test_the_cpu_end_to_end_step_is_timed_in_sweeps_of_every_provider():
    command = [sys.executable, "-m", "pytest", "benchmarks/bench_end_to_end.py", "--quick"]
    command += ["--device=cpu", "--collect-only", "-q", "-p", "no:warnings"]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = re.findall(r"-(sweep\d)-([a-z-]+)\]$", result.stdout, flags=re.MULTILINE)
    providers = ["fastdelta", "compiled", "peft", "full-finetune"]
    assert collected == [(f"sweep{index}", p) for index in range(3) for p in providers]
