"""Checkpoints that would load wrong are refused, naming what is wrong and the fix: config
fields missing or of the wrong type, tensors that are not floating point or not finite, a listed
head missing from the file, directories holding two formats, PEFT options fastdelta does not
implement; and save_finetuned never overwrites a file that is not its own. Checkpoint I/O is a
layer below the delta models."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

import fastdelta
from fastdelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    LoraModel,
    peft_format,
)
from fastdelta.checkpoint_io import CONFIG_NAME
from fastdelta.delta_models.checkpoint import ADDED_WITH_OLD_DEFAULTS
from fastdelta.delta_models.config import config_class_for
from fastdelta.layers.base import delta_parameter_names
from fastdelta.saving import REQUIRED_METADATA, WEIGHTS_NAME

PEFT_CONFIG = "adapter_config.json"
DELTA_TYPES = {"lora": LoraModel, "adapter": AdapterModel, "bitfit": BitFitModel}
LORA_KEY = "bert.encoder.layer.0.attention.self.query.lora.lora_A"


@pytest.fixture(scope="module")
def pristine():
    return tiny_model("bert", "classification")


@pytest.fixture(scope="module")
def saved(pristine, tmp_path_factory):
    """A checkpoint of each delta type (with the trained classifier head), and a PEFT one."""
    root = tmp_path_factory.mktemp("saved")
    paths = {}
    for delta_type, delta_class in DELTA_TYPES.items():
        delta_model = delta_class(copy.deepcopy(pristine))
        delta_model.freeze_module()
        paths[delta_type] = delta_model.save_finetuned(root / delta_type)
    lora = LoraModel(copy.deepcopy(pristine))
    lora.freeze_module()
    paths["peft"] = lora.save_finetuned(root / "peft", format="peft")
    return paths


@pytest.fixture
def copy_of(saved, tmp_path):
    """A private copy of one saved checkpoint, for a test to damage."""
    return lambda name: Path(shutil.copytree(saved[name], tmp_path / name))


def edit_json(path: Path, name: str, edit) -> None:
    config = json.loads((path / name).read_text())
    edit(config)
    (path / name).write_text(json.dumps(config))


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


def refused(path: Path, backbone, error=ValueError, **kwargs) -> str:
    """The message of the error loading `path` onto `backbone` raises; the backbone keeps no
    delta. The checkpoint's own directory is taken out of the message (pytest names it after
    the test)."""
    with pytest.raises(error) as raised:
        AutoDeltaModel.from_finetuned(path, backbone, **kwargs)
    assert delta_parameter_names(backbone) == set()
    return str(raised.value).replace(str(path), "<dir>")


# 1. Missing fields and fields of the wrong type


ARGUMENT_FIELDS = [
    (delta_type, field.name)
    for delta_type in DELTA_TYPES
    for field in dataclasses.fields(config_class_for(delta_type))
    if field.name not in ADDED_WITH_OLD_DEFAULTS  # older checkpoints lack them: defaults load
]


@pytest.mark.parametrize(("delta_type", "field"), ARGUMENT_FIELDS)
def test_a_config_missing_an_argument_is_refused_naming_it(delta_type, field, copy_of, pristine):
    path = copy_of(delta_type)
    edit_json(path, CONFIG_NAME, lambda config: config.pop(field))
    message = refused(path, copy.deepcopy(pristine))
    assert f"lacks {field}, which the saved {delta_type} deltas depend on" in message
    with pytest.raises(ValueError, match=f"lacks {field}"):
        AutoDeltaConfig.from_finetuned(path)


@pytest.mark.parametrize("field", [*sorted(REQUIRED_METADATA[2]), "format_version"])
def test_a_config_missing_metadata_is_refused_naming_it(field, copy_of, pristine):
    path = copy_of("lora")
    edit_json(path, CONFIG_NAME, lambda config: config.pop(field))
    message = refused(path, copy.deepcopy(pristine))
    assert field in message
    assert "restore it from the saved checkpoint" in message


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1], 0, -2])
def test_a_format_version_of_the_wrong_type_is_called_damaged_not_new(version, copy_of, pristine):
    path = copy_of("lora")
    edit_json(path, CONFIG_NAME, lambda config: config.update(format_version=version))
    message = refused(path, copy.deepcopy(pristine))
    assert f"format_version {version!r}" in message
    assert "fastdelta writes a positive integer" in message
    assert "upgrade" not in message


def test_a_format_1_checkpoint_without_head_tensors_still_loads(saved, copy_of, pristine):
    path = copy_of("lora")

    def as_format_1(config):
        config.pop("head_tensors")
        config["format_version"] = 1

    edit_json(path, CONFIG_NAME, as_format_1)
    old, new = copy.deepcopy(pristine), copy.deepcopy(pristine)
    AutoDeltaModel.from_finetuned(path, old)
    AutoDeltaModel.from_finetuned(saved["lora"], new)
    assert all(torch.equal(p, new.get_parameter(n)) for n, p in old.named_parameters())


@pytest.mark.parametrize(
    ("field", "value"),
    [("targets", "bert.encoder"), ("frozen_tensors", [3]), ("head_tensors", None)],
)
def test_metadata_of_the_wrong_type_is_refused_naming_it(field, value, copy_of, pristine):
    path = copy_of("lora")
    edit_json(path, CONFIG_NAME, lambda config: config.update({field: value}))
    assert f"{field}={value!r}, which must be a list of names" in refused(
        path, copy.deepcopy(pristine)
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("use_rslora", "false", "use_rslora must be True or False, got 'false'"),
        ("lora_r", "8", "lora_r must be a positive integer, got '8'"),
        ("modified_modules", "query", "must be a list of names, got the string 'query'"),
        ("rank_pattern", ["query"], "rank_pattern must be a dict"),
    ],
)
def test_an_argument_of_the_wrong_type_is_refused_naming_it(
    field, value, message, copy_of, pristine
):
    path = copy_of("lora")
    edit_json(path, CONFIG_NAME, lambda config: config.update({field: value}))
    with pytest.raises((TypeError, ValueError)) as error:
        AutoDeltaModel.from_finetuned(path, copy.deepcopy(pristine))
    assert message in str(error.value)
    assert str(path / CONFIG_NAME) in str(error.value)
    assert "restore it" in str(error.value)


def test_targets_that_differ_from_what_the_config_builds_are_refused(copy_of, pristine):
    path = copy_of("lora")
    edit_json(
        path,
        CONFIG_NAME,
        lambda config: config.update(targets=config["targets"][:-1]),
    )
    message = refused(path, copy.deepcopy(pristine))
    assert "built on bert.encoder.layer.1.attention.self.value but not saved there" in message


# 2. Tensors


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_tensors_that_are_not_floating_point_are_refused(dtype, copy_of, pristine):
    path = copy_of("lora")
    edit_tensors(path, lambda tensors: tensors.update({LORA_KEY: tensors[LORA_KEY].to(dtype)}))
    message = refused(path, copy.deepcopy(pristine))
    assert f"{LORA_KEY} is {dtype}" in message
    assert "not floating point" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("loader", [AutoDeltaModel.from_finetuned, LoraModel.from_finetuned])
def test_non_finite_tensors_are_refused_unless_allowed(value, loader, copy_of, pristine):
    path = copy_of("lora")

    def poison(tensors):
        tensors[LORA_KEY][1, 2] = value

    edit_tensors(path, poison)
    backbone = copy.deepcopy(pristine)
    with pytest.raises(ValueError) as error:
        loader(path, backbone)
    assert f"NaN or Inf in {LORA_KEY} (1 of 288 values)" in str(error.value)
    assert "allow_non_finite=True" in str(error.value)
    assert delta_parameter_names(backbone) == set()
    loader(path, backbone, allow_non_finite=True)
    assert str(backbone.get_parameter(LORA_KEY)[1, 2].item()) == str(value)


@pytest.mark.parametrize("delta_type", DELTA_TYPES)
def test_a_listed_head_missing_from_the_file_is_refused(delta_type, copy_of, pristine):
    path = copy_of(delta_type)
    assert json.loads((path / CONFIG_NAME).read_text())["head_tensors"] == [
        "classifier.bias",
        "classifier.weight",
    ]
    edit_tensors(path, lambda tensors: tensors.pop("classifier.weight"))
    assert "missing tensors: classifier.weight" in refused(path, copy.deepcopy(pristine))


def test_a_backbone_tensor_not_listed_as_head_is_refused(copy_of, pristine):
    # It would overwrite the backbone's pretrained weight without a word.
    path = copy_of("lora")
    name = "bert.pooler.dense.weight"
    edit_tensors(path, lambda tensors: tensors.update({name: torch.zeros(36, 36)}))
    assert f"no parameter for: {name}" in refused(path, copy.deepcopy(pristine))


def test_frozen_tensors_the_file_does_not_hold_are_refused(copy_of, pristine):
    path = copy_of("lora")
    edit_json(path, CONFIG_NAME, lambda config: config.update(frozen_tensors=["nowhere.weight"]))
    assert "frozen_tensors it does not hold: nowhere.weight" in refused(
        path, copy.deepcopy(pristine)
    )


# 3. Which format a directory holds


def test_a_directory_holding_both_formats_is_refused_naming_both(saved, copy_of, pristine):
    path = copy_of("lora")
    shutil.copy(saved["peft"] / PEFT_CONFIG, path / PEFT_CONFIG)
    message = refused(path, copy.deepcopy(pristine))
    assert "holds both a fastdelta checkpoint (config.json" in message
    assert f"and a PEFT adapter ({PEFT_CONFIG})" in message
    assert "move one of them to its own directory" in message
    with pytest.raises(ValueError, match="ambiguous"):
        AutoDeltaConfig.from_finetuned(path)


def test_a_peft_adapter_beside_its_base_models_config_loads(copy_of, pristine):
    path = copy_of("peft")
    copy.deepcopy(pristine).config.save_pretrained(path)  # config.json with model_type "bert"
    backbone = copy.deepcopy(pristine)
    assert isinstance(AutoDeltaModel.from_finetuned(path, backbone), LoraModel)
    assert isinstance(AutoDeltaConfig.from_finetuned(path), fastdelta.LoraConfig)


def test_a_transformers_model_directory_is_not_a_delta_checkpoint(tmp_path, pristine):
    pristine.config.save_pretrained(tmp_path)
    message = refused(tmp_path, copy.deepcopy(pristine))
    assert "it is not a fastdelta delta config (it is the config of a transformers 'bert'" in (
        message
    )


# 4. save_finetuned never overwrites what is not its own


def test_save_finetuned_refuses_a_transformers_model_directory(tmp_path, pristine):
    pristine.save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_bytes()
    delta_model = LoraModel(copy.deepcopy(pristine))
    delta_model.freeze_module()
    with pytest.raises(FileExistsError) as error:
        delta_model.save_finetuned(tmp_path)
    assert "config of a transformers 'bert' model" in str(error.value)
    assert "which save_finetuned would overwrite" in str(error.value)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before
    assert not (tmp_path / WEIGHTS_NAME).exists()
    # PEFT's layout writes adapter files only, as PEFT itself does next to a model.
    delta_model.save_finetuned(tmp_path, format="peft")
    assert (tmp_path / CONFIG_NAME).read_bytes() == before


@pytest.mark.parametrize(
    ("existing", "format", "message"),
    [
        ("lora", "peft", "holds a fastdelta checkpoint"),
        ("peft", "fastdelta", "holds a PEFT adapter"),
    ],
)
def test_save_finetuned_refuses_to_mix_two_formats_in_a_directory(
    existing, format, message, copy_of, pristine
):
    path = copy_of(existing)
    before = sorted(path.iterdir())
    delta_model = LoraModel(copy.deepcopy(pristine))
    delta_model.freeze_module()
    with pytest.raises(FileExistsError, match=message):
        delta_model.save_finetuned(path, format=format)
    assert sorted(path.iterdir()) == before


def test_save_finetuned_refuses_a_path_that_is_a_file(tmp_path, pristine):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="is a file: save_finetuned writes a directory"):
        LoraModel(copy.deepcopy(pristine)).save_finetuned(target)


# 5. PEFT options: everything that changes the math is implemented or refused by name


def test_every_field_of_peft_lora_config_is_classified():
    peft = pytest.importorskip("peft")
    known = {
        *peft_format.IMPLEMENTED_FIELDS,
        *peft_format.WITHOUT_EFFECT_FIELDS,
        *peft_format.UNSUPPORTED_FIELDS,
    }
    fields = {field.name for field in dataclasses.fields(peft.LoraConfig)}
    assert fields - known == set(), "classify these PEFT fields in fastdelta.peft_format"


# PiSSA / OLoRA adapters saved unconverted load, with a warning (tests/test_lora_init.py).
PEFT_REFUSED = [
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "mica"),
    ("init_lora_weights", "something_new"),
    ("kasa_config", {"k": 1}),
    ("monteclora_config", {"n": 2}),
    ("velora_config", {"rank": 1}),
    ("loftq_config", {"loftq_bits": 4}),
    ("a_future_option", 3),
    ("a_future_option", "on"),
]


@pytest.mark.parametrize(
    ("field", "value"), PEFT_REFUSED, ids=[f"{f}={v}" for f, v in PEFT_REFUSED]
)
def test_a_peft_option_that_changes_the_math_is_refused_by_name(field, value, copy_of, pristine):
    path = copy_of("peft")
    edit_json(path, PEFT_CONFIG, lambda config: config.update({field: value}))
    message = refused(path, copy.deepcopy(pristine))
    assert "PEFT LoRA options fastdelta does not implement" in message
    assert field in message
    with pytest.raises(ValueError, match=field):
        AutoDeltaConfig.from_finetuned(path)


PEFT_ACCEPTED = [
    ("init_lora_weights", True),
    ("init_lora_weights", False),
    ("init_lora_weights", "gaussian"),
    ("init_lora_weights", "eva"),
    ("init_lora_weights", "orthogonal"),
    ("eva_config", {"rho": 2.0}),
    ("a_future_option", None),
    ("a_future_option", False),
    ("a_future_option", []),
]


@pytest.mark.parametrize(
    ("field", "value"), PEFT_ACCEPTED, ids=[f"{f}={v}" for f, v in PEFT_ACCEPTED]
)
def test_peft_options_without_effect_on_a_trained_adapter_load(field, value, copy_of, pristine):
    path = copy_of("peft")
    edit_json(path, PEFT_CONFIG, lambda config: config.update({field: value}))
    assert isinstance(AutoDeltaModel.from_finetuned(path, copy.deepcopy(pristine)), LoraModel)


@pytest.mark.parametrize("field", ["r", "lora_alpha"])
def test_a_peft_config_missing_its_scaling_is_refused(field, copy_of, pristine):
    path = copy_of("peft")
    edit_json(path, PEFT_CONFIG, lambda config: config.pop(field))
    assert f"has no {field!r}, which the adapter's scaling depends on" in refused(
        path, copy.deepcopy(pristine)
    )


@pytest.mark.parametrize("content", [[1, 2], "LORA", None, 3])
def test_a_peft_config_that_is_not_an_object_is_refused(content, copy_of, pristine):
    path = copy_of("peft")
    (path / PEFT_CONFIG).write_text(json.dumps(content))
    assert "not a JSON object" in refused(path, copy.deepcopy(pristine))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("target_modules", "q_proj(", "is not a valid regex"),
        ("exclude_modules", "((", "is not a valid regex"),
        ("target_modules", 5, "must be a list of module names or a regex"),
        ("target_modules", ["query", 1], "must be a list of module names or a regex"),
        ("modules_to_save", "classifier", "must be a list of module names"),
    ],
)
def test_malformed_peft_module_names_are_refused(field, value, message, copy_of, pristine):
    path = copy_of("peft")
    edit_json(path, PEFT_CONFIG, lambda config: config.update({field: value}))
    assert f"{field}={value!r}, which {message}" in refused(path, copy.deepcopy(pristine))


@pytest.mark.parametrize("path", [123, None, b"bytes"])
def test_a_checkpoint_path_that_is_not_a_path_is_refused(path, pristine):
    delta_model = LoraModel(copy.deepcopy(pristine))
    delta_model.freeze_module()
    message = "give its path as a str or pathlib.Path"
    with pytest.raises(TypeError, match=message):
        delta_model.save_finetuned(path)
    with pytest.raises(TypeError, match=message):
        AutoDeltaModel.from_finetuned(path, copy.deepcopy(pristine))
    with pytest.raises(TypeError, match=message):
        AutoDeltaConfig.from_finetuned(path)


# 6. Checkpoint I/O is a layer below the delta models


def _imported_modules(path: Path) -> set[str]:
    """The fastdelta modules a source file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdelta"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("fastdelta"))
    return names


def _source_of(module: str) -> Path | None:
    root = Path(fastdelta.__file__).parent.parent
    candidates = [root / (module.replace(".", "/") + ".py"), root / module.replace(".", "/")]
    if candidates[1].is_dir():
        return candidates[1] / "__init__.py"
    return candidates[0] if candidates[0].is_file() else None


@pytest.mark.parametrize(
    "module", ["fastdelta.checkpoint_io", "fastdelta.saving", "fastdelta.peft_format"]
)
def test_checkpoint_io_never_imports_a_delta_model(module):
    seen, pending = set(), [module]
    while pending:
        current = pending.pop()
        source = _source_of(current)
        if current in seen or source is None:
            continue
        seen.add(current)
        pending.extend(_imported_modules(source))
    assert not {name for name in seen if name.startswith("fastdelta.delta_models")}
    assert "fastdelta" not in seen  # the package's __init__ imports the delta models
