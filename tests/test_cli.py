"""The `fastdelta` command: `inspect` builds a model from a local config only, `bench` finds the
repository's benchmark suite or says why not."""

from __future__ import annotations

import json
import re

import pytest
from tiny_models import tiny_config

from fastdelta import cli


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
    assert "lora(LoraDelta) lora_A:[8, 36] lora_B:[36, 8]" in output


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
        ("meta-llama/Llama-2-7b-hf", r"downloads nothing.*huggingface-cli download"),
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
