"""The host-overhead benchmark's cases and its part of the report: its targets are marked from
the rows of the same run (fastdelta on its automatic backend against the plain layer, PEFT or
the eager reference), and its section lists every provider's time per call."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))  # the benchmarks package lives beside the tests

from benchmarks import report  # noqa: E402
from benchmarks.cases import HostCase, host_overhead_cases  # noqa: E402

LAYER = HostCase("lora", "layer", True, 0.1, "full")


def host_entry(provider, seconds, case=LAYER, backend="cpp"):
    """One host-overhead benchmark as pytest-benchmark writes it."""
    return {
        "name": f"bench_host_overhead[{case.id}-float32-{provider}]",
        "stats": {"min": seconds, "median": seconds, "mean": seconds, "rounds": 200},
        "extra_info": {
            "op": report.HOST_OVERHEAD,
            "provider": provider,
            "case_id": case.id,
            "dtype": "float32",
            "device": "cpu",
            "auto_backend": "cpp",
            "mode": case.mode,
            "backend": "aten" if provider == "floor" else backend,
        },
    }


@pytest.fixture
def run():
    return {
        "datetime": "2025-01-01T00:00:00",
        "benchmarks": [
            host_entry("floor", 50e-6),
            host_entry("fastdelta", 120e-6),
            host_entry("peft", 200e-6, backend="peft"),
            host_entry("reference", 180e-6, backend="eager"),
        ],
        "fastdelta": {
            "device": "cpu",
            "device_name": "cpu",
            "device_slug": "cpu",
            "grid": "quick",
            "fastdelta_version": "0.1.0",
            "torch_version": "2.13.0",
            "cpu_threads": 1,
            "unavailable_providers": {},
        },
    }


def test_the_cases_are_unique_and_evaluation_runs_forward_without_dropout():
    cases = host_overhead_cases("quick", "cpu")
    assert len({case.id for case in cases}) == len(cases)
    evaluating = [case for case in cases if not case.training]
    assert evaluating and all(c.mode == "forward" and c.dropout == 0 for c in evaluating)
    assert {(case.op, case.subject) for case in cases} == {
        (op, subject) for op in ("lora", "adapter") for subject in ("layer", "op")
    }


def test_host_targets_are_marked_against_peft_and_the_plain_layer(run):
    targets = {t["description"]: t for t in report.build_report(run)["targets"]}
    versus_peft = targets[f"Host {LAYER.id}: fastdelta / peft"]
    assert versus_peft["value"] == pytest.approx(0.6) and versus_peft["status"] == "pass"
    versus_plain = targets[f"Host {LAYER.id}: fastdelta / plain layer"]
    assert versus_plain["value"] == pytest.approx(2.4) and versus_plain["status"] == "pass"
    forward = HostCase("lora", "layer", True, 0.1, "forward")
    assert targets[f"Host {forward.id}: fastdelta / plain layer"]["status"] == "not measured"


def test_the_host_section_lists_each_providers_time_per_call(run, tmp_path):
    report.write_report(run, tmp_path)
    lines = (tmp_path / "cpu.md").read_text().splitlines()
    assert "## Host overhead per call (tiny tensors, one CPU thread)" in lines
    assert f"| {LAYER.id} | 50.0 | 120.0 | 200.0 | 180.0 | cpp | 2.40x | 0.60x |" in lines
