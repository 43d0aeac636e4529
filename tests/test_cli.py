"""The `fastdelta` command: `inspect` builds a model from a local config only, `bench` finds the
repository's benchmark suite or says why not, `doctor` reports the machine (devices, backends
and why, the kernels' checks, a short benchmark) and `build-ext` builds the C++ extension."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config

import fastdelta.kernels
from fastdelta import cli
from fastdelta.doctor import bench, checks, machine
from fastdelta.ops import _extension, verdicts, verification
from fastdelta.ops import backend as backend_selection


@pytest.fixture
def llama_dir(tmp_path):
    """A folder holding only the config.json of a tiny Llama causal LM."""
    config = tiny_config("llama")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("as_file", [False, True], ids=["directory", "config-file"])
def test_inspect_prints_the_structure_graph_of_the_configured_model(llama_dir, as_file, capsys):
    location = llama_dir / "config.json" if as_file else llama_dir
    assert cli.main(["inspect", str(location)]) == 0
    output = capsys.readouterr().out
    assert "LlamaForCausalLM" in output
    assert "lm_head(Linear)" in output  # the class `architectures` names, head included
    assert "q_proj" in output and "weight:[36, 36]" in output


def test_inspect_shows_the_deltas_it_is_asked_to_attach(llama_dir, capsys):
    arguments = ["inspect", str(llama_dir), "--delta", "lora", "--modified-modules", "q_proj"]
    assert cli.main(arguments) == 0
    output = capsys.readouterr().out
    assert "lora(LoraDelta) lora_A:[8, 36](delta) lora_B:[36, 8](delta)" in output


def test_inspect_builds_no_weights(llama_dir, monkeypatch):
    built = []
    build_model = cli.build_model

    def recording_build_model(config, device):
        built.append(build_model(config, device))
        return built[-1]

    monkeypatch.setattr(cli, "build_model", recording_build_model)
    cli.main(["inspect", str(llama_dir)])
    assert {p.device.type for p in built[0].parameters()} == {"meta"}


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("meta-llama/Llama-2-7b-hf", r"downloads nothing.*`hf download meta-llama/"),
        ("{tmp}", r"holds no config\.json"),
        ("{tmp}/config.json", r"has no 'model_type'"),
        ("{tmp}/weights.bin", r"is not a JSON config file"),
    ],
    ids=["hub-name", "folder-without-config", "config-without-model-type", "not-json"],
)
def test_inspect_refuses_what_it_cannot_read_locally(tmp_path, location, message, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\x80\x81")
    location = location.format(tmp=tmp_path)
    if location.endswith("config.json"):
        (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    else:
        (tmp_path / "config.json").unlink(missing_ok=True)
    assert cli.main(["inspect", location]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastdelta inspect: error: ")
    assert re.search(message, error)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--modified-modules", "q_proj"], "add --delta TYPE"),
        (["--delta", "lora", "--modified-modules", "no_such_layer"], "cannot attach the lora"),
    ],
    ids=["targets-without-delta", "targets-that-match-nothing"],
)
def test_inspect_reports_delta_errors(llama_dir, arguments, message, capsys):
    assert cli.main(["inspect", str(llama_dir), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_a_misspelled_module_gets_no_meta_device_hint(llama_dir, capsys):
    arguments = ["inspect", str(llama_dir), "--delta", "lora", "--modified-modules", "q_prj"]
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert "q_prj" in error
    assert "meta" not in error
    assert "huggingface-cli" not in error


def test_the_delta_types_of_inspect_are_the_delta_models():
    from fastdelta.delta_models.auto import DELTA_MODELS

    assert sorted(cli.DELTA_TYPES) == sorted(DELTA_MODELS)


def test_help_is_answered_before_torch_is_imported(tmp_path):
    """`fastdelta --help` (the console script imports fastdelta.cli, so the package too) parses
    its arguments before importing torch, transformers or the delta models: the package loads
    its names on first use."""
    script = (
        "import sys\n"
        "from fastdelta.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [name for name in ('torch', 'transformers') if name in sys.modules]\n"
        "print('imported:', heavy)\n"
    )
    root = str(Path(cli.__file__).parents[1])
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert "inspect" in completed.stdout
    assert "imported: []" in completed.stdout


def test_the_packages_lazy_names_are_its_public_names():
    import fastdelta

    lazy = set(fastdelta._EXPORTS) - {"DeltaTrainer"}
    assert set(fastdelta.__all__) == lazy | {"__version__"}
    for name in fastdelta.__all__:
        assert getattr(fastdelta, name) is not None


def test_bench_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    for option in ("--quick", "--device", "--dtypes", "--output-dir", "--repository"):
        assert option in output


def test_bench_says_where_it_looked_for_the_suite(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--repository", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"found no benchmarks/ folder of a fastdelta repository in {tmp_path}" in error
    assert "clone the fastdelta repository" in error


def test_bench_forwards_its_options_to_the_suite(monkeypatch, tmp_path):
    calls = []

    def run(command, cwd, check):
        calls.append((command, cwd))
        return type("Completed", (), {"returncode": 0})()

    monkeypatch.setattr(cli.subprocess, "run", run)
    arguments = ["bench", "--quick", "--dtypes", "float32", "--output-dir", str(tmp_path)]
    assert cli.main([*arguments, "--", "-k", "peft"]) == 0
    (command, cwd), *_ = calls
    assert command[1:3] == ["-m", "benchmarks.run"]
    assert "--grid=quick" in command and "--dtypes=float32" in command
    assert f"--output-dir={tmp_path}" in command
    assert command[-3:] == ["--", "-k", "peft"]
    assert (cwd / "benchmarks" / "run.py").is_file()


# --------------------------------------------------------------------------------------------
# doctor and build-ext


@pytest.fixture
def small_doctor(monkeypatch, tmp_path):
    """The doctor on one LoRA, one DoRA and one adapter variant, in float32, with its own cache
    directory and no verdicts known (as in a new process)."""
    monkeypatch.setenv("FASTDELTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checks, "DTYPES", (torch.float32,))
    monkeypatch.setattr(checks, "CPU_LORA", [(24, 20, 4, True, True, False, 9)])
    monkeypatch.setattr(checks, "CPU_DORA", [(24, 20, 4, True, True, True, True, 9)])
    monkeypatch.setattr(checks, "CPU_ADAPTER", [(24, 24, 8, "gelu_new", True, True, 9)])
    monkeypatch.setattr(verification, "_routes", {})
    monkeypatch.setattr(verdicts, "_verdicts", {})
    monkeypatch.setattr(verdicts, "_environments", {})
    return tmp_path


def run_doctor(arguments, capsys):
    status = cli.main(["doctor", *arguments])
    return status, capsys.readouterr()


def interpreted_triton() -> bool:
    return backend_selection.unavailable_reason("triton", "cpu") is None


def test_doctor_reports_the_machine_and_writes_its_json(small_doctor, capsys):
    path = small_doctor / "report" / "doctor.json"
    status, output = run_doctor(["--no-bench", "--json", str(path)], capsys)
    assert status == 0, output.out
    report = json.loads(path.read_text())
    assert {"versions", "settings", "devices", "backends", "verification", "parity"} <= set(report)
    assert report["versions"]["torch"] == torch.__version__
    assert report["devices"][0]["device"] == "cpu"
    assert set(report["backends"]["cpu"]) == {"triton", "cpp", "torch", "runs_on"}
    assert report["backends"]["cpu"]["torch"] == {"available": True, "reason": None}
    assert report["backends"]["cpu"]["runs_on"] == {"float32": cpu_auto_backend()}
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in output.out and report["no_gpu"]
    checked = report["verification"]
    assert [r["variant"]["op"] for r in checked if r["backend"] == "triton"] == (
        ["lora", "dora", "adapter"] if interpreted_triton() else []
    )
    assert all(r["result"] == "passed" and r["error"] is None for r in checked)
    assert [(r["op"], r["result"]) for r in report["parity"]] == [
        ("lora", "passed"),
        ("adapter", "passed"),
    ]
    assert report["benchmark"] == [] and "skipped (--no-bench)" in output.out
    assert "summary: all passed" in output.out
    assert f"The report is in {path}" in output.out


def test_doctor_says_why_a_backend_cannot_run_without_building_it(small_doctor, monkeypatch):
    def refuse(*arguments):
        pytest.fail("the doctor built the C++ extension")

    monkeypatch.setattr(_extension, "PREBUILT_DIR", small_doctor / "package")
    monkeypatch.setattr(_extension, "_state", _extension._NOT_TRIED)
    monkeypatch.setattr(_extension, "_settings", None)
    monkeypatch.setattr(_extension, "_compile", refuse)
    monkeypatch.setattr(backend_selection, "_resolved", {})
    for device in ("cpu", "cuda"):
        cpp = machine.backends(torch.device(device), (torch.float32,))["cpp"]
        assert not cpp["available"] and "not built yet" in cpp["reason"]
        assert "`fastdelta build-ext`" in cpp["reason"]
    if not torch.cuda.is_available():
        triton = machine.backends(torch.device("cuda"), (torch.float32,))["triton"]
        assert not triton["available"] and triton["reason"]


@pytest.mark.skipif(not interpreted_triton(), reason="needs the triton kernels on the CPU")
def test_doctor_shows_a_broken_kernel_as_failed(small_doctor, monkeypatch, capsys):
    lora_forward = fastdelta.kernels.lora_forward

    def wrong_output(*arguments):
        y, xa = lora_forward(*arguments)
        return y + 0.1, xa

    monkeypatch.setattr(fastdelta.kernels, "lora_forward", wrong_output)
    path = small_doctor / "doctor.json"
    status, output = run_doctor(["--no-bench", "--json", str(path)], capsys)
    assert status == 1
    results = {
        r["variant"]["op"]: r
        for r in json.loads(path.read_text())["verification"]
        if r["backend"] == "triton"
    }
    assert results["lora"]["result"] == "FAILED" and "output: max error" in results["lora"]["error"]
    assert results["adapter"]["result"] == "passed"
    assert "FAILED    triton lora on cpu" in output.out and "summary: 1 FAILED" in output.out


def test_doctor_stops_checking_when_out_of_time(small_doctor, capsys):
    path = small_doctor / "doctor.json"
    run_doctor(["--no-bench", "--max-seconds", "1e-9", "--json", str(path)], capsys)
    assert {r["result"] for r in json.loads(path.read_text())["verification"]} <= {"skipped"}


def test_doctor_refuses_a_time_bound_that_is_not_positive(capsys):
    assert cli.main(["doctor", "--bench-seconds", "0"]) == 2
    assert "take a positive number of seconds" in capsys.readouterr().err


def test_the_doctors_benchmark_times_the_floor_fastdelta_and_peft(monkeypatch):
    small = [bench.Case("lora", 32, 4, 8), bench.Case("adapter", 32, 8, 1)]
    monkeypatch.setattr(bench, "cases", lambda device: small)
    records = bench.run([torch.device("cpu")], 0.5, lambda message: None)
    providers = [(r["case"], r["provider"]) for r in records]
    peft = [(small[0].name, "peft")] if importlib.util.find_spec("peft") else []
    assert providers == [
        (small[0].name, "floor"),
        (small[0].name, "fastdelta"),
        *peft,
        (small[1].name, "floor"),
        (small[1].name, "fastdelta"),
    ]
    for record in records:
        assert record["step_ms"] > 0
        expected = cpu_auto_backend() if record["provider"] == "fastdelta" else None
        assert record["backend"] == expected
        assert (record["vs_floor"] == 1.0) == (record["provider"] == "floor")


def test_build_ext_builds_the_extension_or_says_why_not(monkeypatch, tmp_path, capsys):
    library = tmp_path / "fastdelta_C.so"
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "built_library", lambda settings: library)
    assert cli.main(["build-ext"]) == 0
    output = capsys.readouterr().out
    assert "built, with CPU" in output and str(library) in output
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: "no C++ compiler (test)")
    assert cli.main(["build-ext"]) == 1
    assert "fastdelta build-ext: error: no C++ compiler (test)" in capsys.readouterr().err


def cpu_auto_backend() -> str:
    """What `auto` runs float32 on the CPU in this process: the C++ extension once it is built
    (an earlier test may have built it), else torch."""
    import torch

    from fastdelta.ops import backend

    return backend.resolve_backend(torch.device("cpu"), torch.float32)
