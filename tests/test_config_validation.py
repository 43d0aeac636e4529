"""Arguments are validated where a config is built: a value of the wrong type or out of range is
an error that names the argument and what it takes (never a Python internal error or a truthy
string read as True); rank_pattern / alpha_pattern keys must match a target; suspicious values
warn. `fastdelta inspect` reports an invalid model config as one line naming the field."""

from __future__ import annotations

import json
import warnings

import pytest
from tiny_models import tiny_config, tiny_model

from fastdelta import (
    AdapterConfig,
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    LoraConfig,
    LoraModel,
    ParallelAdapterModel,
)
from fastdelta.cli import main

# (delta model, argument, value, error, message): each bad value as a user would pass it.
BAD_ARGUMENTS = [
    (LoraModel, "use_rslora", "false", TypeError, "use_rslora must be True or False, got 'false'"),
    (LoraModel, "use_rslora", 1, TypeError, "use_rslora must be True or False, got 1"),
    (LoraModel, "common_structure", "yes", TypeError, "common_structure must be True or False"),
    (AdapterModel, "interactive_modify", None, TypeError, "interactive_modify must be True"),
    (LoraModel, "modified_modules", 42, TypeError, "modified_modules must be a list of module"),
    (AdapterModel, "exclude_modules", {"a": 1}, TypeError, "exclude_modules must be a list"),
    (LoraModel, "unfrozen_modules", 3.5, TypeError, "unfrozen_modules must be a list"),
    (LoraModel, "rank_pattern", ["query"], TypeError, "rank_pattern must be a dict"),
    (LoraModel, "alpha_pattern", {1: 2.0}, TypeError, "alpha_pattern must be a dict"),
    (LoraModel, "lora_r", 2**40, ValueError, "lora_r=1099511627776 is wider than any layer"),
    (LoraModel, "lora_r", "8", ValueError, "lora_r must be a positive integer, got '8'"),
    (LoraModel, "rank_pattern", {"value": 2**20}, ValueError, "rank_pattern['value']=1048576"),
    (AdapterModel, "bottleneck_dim", 2**40, ValueError, "bottleneck_dim=1099511627776 is wider"),
    (ParallelAdapterModel, "scaled", "1", ValueError, "scaled must be a finite number"),
    (LoraModel, "lora_alpha", float("nan"), ValueError, "lora_alpha must be a finite number"),
    (LoraModel, "lora_alpha", 10**400, ValueError, "lora_alpha must be a finite number"),
    (LoraModel, "alpha_pattern", {"value": 10**400}, ValueError, "alpha_pattern['value'] must"),
    (LoraModel, "backend", 5, ValueError, "backend=5 is not supported"),
    (AdapterModel, "non_linearity", 5, TypeError, "non_linearity must be a string"),
]


@pytest.mark.parametrize(
    ("delta_class", "argument", "value", "error", "message"),
    BAD_ARGUMENTS,
    ids=[f"{argument}={value!r}"[:60] for _, argument, value, _, _ in BAD_ARGUMENTS],
)
def test_a_bad_argument_is_refused_naming_it(delta_class, argument, value, error, message):
    with pytest.raises(error) as raised:
        delta_class(tiny_model("bert"), **{argument: value})
    assert message in str(raised.value)
    config = {"delta_type": delta_class.config_class.delta_type, argument: value}
    with pytest.raises(error) as raised:
        AutoDeltaConfig.from_dict(config)
    assert message in str(raised.value)


@pytest.mark.parametrize("value", [None, ["lora"], "lora", 3])
@pytest.mark.parametrize(
    "build", [AutoDeltaConfig.from_dict, LoraConfig.from_dict, AdapterConfig.from_dict]
)
def test_a_config_that_is_not_a_dict_is_refused(build, value):
    with pytest.raises(TypeError, match=r"from_dict takes a dict of arguments such as"):
        build(value)


def test_auto_delta_model_from_a_config_that_is_not_a_dict_is_refused():
    with pytest.raises(TypeError, match="config must be a delta config or its dict, got list"):
        AutoDeltaModel.from_config(["lora"], tiny_model("bert"))


@pytest.mark.parametrize("argument", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key", ["valu", "proj", "_proj", r"layer\.7\.attention\.self\.query"])
def test_a_pattern_key_matching_no_target_is_refused(argument, key):
    model = tiny_model("bert")
    with pytest.raises(ValueError) as error:
        LoraModel(model, modified_modules=["query", "value"], **{argument: {key: 2}})
    message = str(error.value)
    assert f"{argument} key(s) {key!r} match none of the LoRA targets" in message
    assert "encoder.layer.0.attention.self.query" in message
    assert not any(".lora." in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    "arguments", [{"lora_alpha": 0}, {"lora_alpha": 16, "alpha_pattern": {"value": 0}}]
)
def test_a_zero_alpha_warns(arguments):
    with pytest.warns(UserWarning, match=r"= 0 scales the LoRA deltas it applies to by 0"):
        LoraModel(tiny_model("bert"), **arguments)


def test_a_rank_above_the_layers_features_warns_naming_the_layer():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoraModel(tiny_model("bert"), lora_r=40)
    assert [str(warning.message).split(":")[0] for warning in caught] == [
        "The LoRA rank 40 exceeds min(in_features, out_features) = 36 of "
        "encoder.layer.0.attention.self.query and 3 more layers"
    ]
    assert caught[0].filename == __file__  # it points at the caller's line


def test_ordinary_arguments_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraModel(tiny_model("bert"), lora_r=4, lora_alpha=8, rank_pattern={"value": 2})


# fastdelta inspect on an invalid model config


@pytest.mark.parametrize(
    ("architecture", "field", "value"),
    [("bert", "hidden_size", -36), ("llama", "num_hidden_layers", -2), ("gpt2", "n_embd", -4)],
)
def test_inspect_names_a_negative_size_in_one_line(architecture, field, value, tmp_path, capsys):
    config = tiny_config(architecture).to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"fastdelta inspect: error: {tmp_path}: {field}={value} is negative; sizes and counts "
        "must be positive"
    )


def test_inspect_reports_a_config_transformers_cannot_build_in_one_line(tmp_path, capsys):
    config = tiny_config("bert").to_dict()
    config["hidden_size"] = 35  # not a multiple of num_attention_heads
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fastdelta inspect: error: transformers cannot build a bert model")
    assert "35" in error
    assert "\n" not in error


@pytest.mark.parametrize(("field", "value"), [("hidden_size", "36"), ("num_hidden_layers", None)])
def test_inspect_names_a_field_of_the_wrong_type_in_one_line(field, value, tmp_path, capsys):
    config = tiny_config("bert").to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fastdelta inspect: error: ")
    assert field in error
    assert "\n" not in error


# OpenDelta's training example builds its config from its whole argument dataclass
# (AutoDeltaConfig.from_dict(asdict(delta_args))): these are the keys of one of its job configs.
OPENDELTA_JOB_KEYS = {
    "backbone_model": "t5-large",
    "dataset_config_name": ["en"],
    "do_eval": True,
    "eval_steps": 100,
    "evaluation_strategy": "steps",
    "learning_rate": 0.0003,
    "model_name_or_path": "t5-large",
    "num_train_epochs": 20,
    "output_dir": "outputs/bitfit/t5-large/rte",
    "per_device_train_batch_size": 16,
    "push_to_dc": True,
    "push_to_hub": False,
    "save_steps": 100,
    "seed": 42,
    "task_name": "rte",
    "tokenizer_name": "t5-large",
    "warmup_steps": 0,
}


@pytest.mark.parametrize("delta_type", ["lora", "adapter", "parallel_adapter", "bitfit"])
def test_keys_that_are_no_argument_are_left_out_with_a_warning(delta_type):
    values = {"delta_type": delta_type, "unfrozen_modules": ["deltas"], **OPENDELTA_JOB_KEYS}
    with pytest.warns(UserWarning, match=r"ignores 'backbone_model', 'dataset_config_name'"):
        config = AutoDeltaConfig.from_dict(values)
    assert config.unfrozen_modules == ["deltas"]
    assert not hasattr(config, "learning_rate")


@pytest.mark.parametrize(("key", "meant"), [("lora_rr", "lora_r"), ("lora_alpah", "lora_alpha")])
def test_a_near_miss_of_an_argument_is_an_error_naming_it(key, meant):
    with pytest.raises(ValueError, match=rf"'{key}' is no lora argument: did you mean '{meant}'"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", key: 4})


def test_from_dict_keyword_arguments_override_and_unused_ones_come_back():
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4}, lora_r=16)
    assert config.lora_r == 16
    config, unused = LoraConfig.from_dict(
        {"lora_r": 4}, lora_alpha=8, cache_dir="x", return_unused_kwargs=True
    )
    assert (config.lora_r, config.lora_alpha, unused) == (4, 8, {"cache_dir": "x"})


def test_each_config_class_reads_a_checkpoint_with_overrides(tmp_path):
    delta_model = LoraModel(tiny_model("bert"), lora_r=4)
    path = delta_model.save_finetuned(tmp_path / "lora")
    config = LoraConfig.from_finetuned(path, lora_dropout=0.1, cache_dir="unused")
    assert (type(config), config.lora_r, config.lora_dropout) == (LoraConfig, 4, 0.1)
    assert AutoDeltaConfig.from_finetuned(path, local_files_only=True).lora_r == 4
    with pytest.raises(ValueError, match=r"holds delta_type 'lora', which AdapterConfig cannot"):
        AdapterConfig.from_finetuned(path)
