"""The benchmark report: ratios to the floor of the same run, target marks, and the files it
writes, from a small synthetic pytest-benchmark JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))  # the benchmarks package lives beside the tests

from benchmarks import report  # noqa: E402
from benchmarks.cases import CPU_LORA_TARGET  # noqa: E402

CASE = CPU_LORA_TARGET.id
DECODE = "M16-K1024-N1024-r16-p0.1"


def entry(provider, seconds, *, op="lora_linear", case_id=CASE, mode="full", **extra):
    """One benchmark as pytest-benchmark writes it, with the harness's extra_info."""
    default_backend = provider.removeprefix("fastdelta-") if "fastdelta" in provider else "aten"
    backend = extra.pop("backend", default_backend)
    memory = extra.pop("memory", 1000)
    median = extra.pop("median", seconds)
    return {
        "name": f"bench_{op}[{case_id}-float32-{mode}-{provider}]",
        "stats": {"min": seconds, "median": median, "mean": median, "rounds": 5},
        "extra_info": {
            "op": op,
            "provider": provider,
            "case_id": case_id,
            "dtype": "float32",
            "device": "cpu",
            "auto_backend": "torch",
            "mode": mode,
            "backend": backend,
            "saved_bytes": memory,
            **extra,
        },
    }


def step(provider, seconds, memory):
    """An end-to-end training-step benchmark of 1000 tokens."""
    return entry(
        provider,
        seconds,
        op="training_step",
        case_id="h256-L4-b4-s128",
        mode="step",
        backend="torch" if provider == "fastdelta" else provider,
        memory_bytes=memory,
        memory_kind="resident at backward start",
        tokens=1000,
        trainable_parameters=123,
    )


def run_json(benchmarks):
    return {
        "datetime": "2025-01-01T00:00:00",
        "benchmarks": benchmarks,
        "fastdelta": {
            "device": "cpu",
            "device_name": "cpu",
            "device_slug": "cpu",
            "grid": "quick",
            "fastdelta_version": "0.1.0",
            "torch_version": "2.13.0",
            "cpu_threads": 2,
            "unavailable_providers": {"fastdelta-triton": "Triton runs on CUDA tensors"},
        },
    }


@pytest.fixture
def run():
    return run_json(
        [
            entry("floor", 0.100, memory=0),
            entry("fastdelta-cpp", 0.200),  # not what "auto" picks: no target uses it
            entry("fastdelta-torch", 0.110, memory=2 * 2**20),
            entry("peft", 0.150, median=0.180, memory=6 * 2**20),
            entry("reference", 0.140),
            entry("floor", 0.001, case_id=DECODE),
            entry("fastdelta-torch", 0.004, case_id=DECODE),
            entry("floor", 0.050, mode="forward"),
            entry("fastdelta-torch", 0.060, mode="forward"),
            step("fastdelta", 0.8, memory=90),
            step("peft", 1.0, memory=100),
            step("full-finetune", 1.6, memory=300),
        ]
    )


def by_name(report_dict, provider, case_id=CASE, mode="full"):
    return next(
        row
        for row in report_dict["results"]
        if (row["provider"], row["case_id"], row["mode"]) == (provider, case_id, mode)
    )


def test_ratios_divide_by_the_floor_of_the_same_case_and_mode(run):
    built = report.build_report(run)
    assert by_name(built, "fastdelta-torch")["ratio_to_floor"] == pytest.approx(1.10)
    assert by_name(built, "peft")["ratio_to_floor"] == pytest.approx(1.50)
    assert by_name(built, "fastdelta-torch", DECODE)["ratio_to_floor"] == pytest.approx(4.0)
    assert by_name(built, "fastdelta-torch", mode="forward")["ratio_to_floor"] == pytest.approx(1.2)
    assert by_name(built, "floor")["ratio_to_floor"] == pytest.approx(1.0)


def test_the_statistic_chooses_which_time_is_compared(run):
    built = report.build_report(run, statistic="median")
    assert by_name(built, "peft")["ratio_to_floor"] == pytest.approx(1.80)


def test_end_to_end_rows_get_tokens_per_second_and_ratios_to_peft(run):
    built = report.build_report(run)
    fastdelta = by_name(built, "fastdelta", "h256-L4-b4-s128", "step")
    assert fastdelta["tokens_per_s"] == pytest.approx(1250)
    assert fastdelta["speedup_vs_peft"] == pytest.approx(1.25)
    assert fastdelta["memory_vs_peft"] == pytest.approx(0.9)


def test_targets_are_marked_from_the_automatic_backend(run):
    targets = {t["description"]: t for t in report.build_report(run)["targets"]}
    cpu = targets[f"CPU LoRA {CASE} fp32 fwd+bwd: fastdelta / floor"]
    assert cpu["value"] == pytest.approx(1.10)  # fastdelta-torch, not fastdelta-cpp's 2.0
    assert (cpu["status"], cpu["fastdelta_backend"]) == ("pass", "torch")
    speed = targets["End to end: fastdelta tokens/s / PEFT tokens/s"]
    assert speed["value"] == pytest.approx(1.25) and speed["status"] == "pass"
    memory = targets["End to end: fastdelta memory / PEFT memory"]
    assert memory["value"] == pytest.approx(0.9) and memory["status"] == "miss"
    gpu = [t for t in targets.values() if t["device"] == "cuda"]
    assert len(gpu) == 5  # LoRA x2, DoRA, mixed-batch LoRA, adapter
    assert all(t["status"] == "not measured" and "cuda run" in t["why"] for t in gpu)


def test_a_target_misses_past_its_limit(run):
    run["benchmarks"][2]["stats"]["min"] = 0.116
    targets = report.build_report(run)["targets"]
    cpu = next(t for t in targets if t["description"].startswith("CPU LoRA"))
    assert cpu["status"] == "miss" and cpu["value"] == pytest.approx(1.16)


def test_a_target_without_its_measurements_is_not_measured(run):
    run["benchmarks"] = [b for b in run["benchmarks"] if b["extra_info"]["provider"] != "floor"]
    cpu = next(t for t in report.build_report(run)["targets"] if t["device"] == "cpu")
    assert cpu["status"] == "not measured" and "no floor measurement" in cpu["why"]


def test_the_markdown_says_backends_targets_and_what_was_left_out(run, tmp_path):
    report.write_report(run, tmp_path)
    lines = (tmp_path / "cpu.md").read_text().splitlines()
    expected = [
        f"| {CASE} | float32 | 100.00 ms | 2.00x | 1.10x | 1.50x | 1.40x |",
        f"| {CASE} | float32 | fwd+bwd | fastdelta-cpp | cpp | 200.00 ms | 2.00x | 0.0 |",
        "- `fastdelta-triton`: Triton runs on CUDA tensors",
        "| h256-L4-b4-s128 | float32 | fastdelta | torch | 123 | 800.00 ms | 1,250 | 1.25x | "
        "0.0 | 0.90x |",
    ]
    for line in expected:
        assert line in lines
    target = f"| CPU LoRA {CASE} fp32 fwd+bwd: fastdelta / floor | 1.10 (fastdelta on torch) |"
    assert any(line.startswith(target) and "✅ pass" in line for line in lines)
    marks = "\n".join(lines)
    assert "❌ miss" in marks and "— not measured: stated for a cuda run" in marks


def test_the_json_holds_the_rows_and_targets(run, tmp_path):
    report.write_report(run, tmp_path)
    written = json.loads((tmp_path / "cpu.json").read_text())
    assert written["device"] == "cpu" and written["statistic"] == "min"
    assert len(written["results"]) == len(run["benchmarks"])
    assert {t["status"] for t in written["targets"]} == {"pass", "miss", "not measured"}


def test_the_plot_is_a_png(run, tmp_path):
    pytest.importorskip("matplotlib")
    written = report.write_report(run, tmp_path)
    assert written["plot_skipped"] is None
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![fwd+bwd ratio to the floor per shape](cpu.png)" in (tmp_path / "cpu.md").read_text()


def test_without_matplotlib_the_plot_is_skipped_and_said_so(run, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec

    def no_matplotlib(name, *args):
        return None if name == "matplotlib" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_matplotlib)
    written = report.write_report(run, tmp_path)
    assert "matplotlib is not installed" in written["plot_skipped"]
    assert not (tmp_path / "cpu.png").exists()
    assert "The plot was skipped: matplotlib is not installed" in (tmp_path / "cpu.md").read_text()
    assert json.loads((tmp_path / "cpu.json").read_text())["plot_skipped"]


def test_a_json_of_another_suite_is_refused(run):
    del run["fastdelta"]
    with pytest.raises(ValueError, match=r"not a run of this suite"):
        report.build_report(run)


def test_sweeps_of_a_benchmark_merge_into_one_row_over_all_their_rounds():
    def swept(provider, index, data, memory):
        benchmark = step(provider, min(data), memory)
        benchmark["name"] = f"bench_training_step[h256-L4-b4-s128-sweep{index}-{provider}]"
        benchmark["stats"].update(rounds=len(data), data=data)
        benchmark["extra_info"]["sweep"] = index
        return benchmark

    built = report.build_report(
        run_json(
            [
                swept("fastdelta", 0, [0.9, 1.0], memory=90),
                swept("peft", 0, [1.2, 1.3], memory=100),
                swept("fastdelta", 1, [0.8, 0.95, 1.1], memory=91),
                swept("peft", 1, [1.05, 1.25], memory=100),
            ]
        )
    )
    rows = [row for row in built["results"] if row["op"] == "training_step"]
    assert [row["provider"] for row in rows] == ["fastdelta", "peft"]
    fastdelta = rows[0]
    assert fastdelta["name"] == "bench_training_step[h256-L4-b4-s128-fastdelta]"
    assert (fastdelta["time_s"], fastdelta["rounds"], fastdelta["sweeps"]) == (0.8, 5, 2)
    assert "sweep" not in fastdelta
    assert fastdelta["memory_bytes"] == 91  # the largest of its sweeps
    assert fastdelta["speedup_vs_peft"] == pytest.approx(1.05 / 0.8)
    median = report.build_report(
        run_json([swept("peft", 0, [1.2, 1.3], 1), swept("peft", 1, [1.0], 1)]), "median"
    )
    assert median["results"][0]["time_s"] == pytest.approx(1.2)
    assert "timed in 2 sweeps" in report.render_markdown(built)
