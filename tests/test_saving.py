"""Delta checkpoints: save_finetuned / from_finetuned round trips for every delta type, bf16, what
config.json and delta.safetensors hold, every loading error (with the backbone left untouched),
the saving errors, merge_and_unload, and training a loaded model further."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn

import fastdelta
from fastdelta import (
    AdapterConfig,
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitConfig,
    BitFitModel,
    LoraConfig,
    LoraModel,
    ParallelAdapterConfig,
    ParallelAdapterModel,
)
from fastdelta.layers.base import ATTACHED_DELTAS, delta_parameter_names
from fastdelta.saving import CONFIG_NAME, FORMAT_VERSION, METADATA_KEYS, WEIGHTS_NAME

DELTA_MODELS = {
    "lora": LoraModel,
    "adapter": AdapterModel,
    "parallel_adapter": ParallelAdapterModel,
    "bitfit": BitFitModel,
}
CONFIGS = {
    "lora": LoraConfig,
    "adapter": AdapterConfig,
    "parallel_adapter": ParallelAdapterConfig,
    "bitfit": BitFitConfig,
}
# Every argument away from its default (where the tiny BERT allows), so a dropped or renamed
# argument shows in the round trip.
ARGUMENTS = {
    "lora": {
        "lora_r": 4,
        "lora_alpha": 7.5,
        "lora_dropout": 0.25,
        "use_rslora": True,
        "rank_pattern": {"value": 2},
        "alpha_pattern": {"query": 3.0},
        "modified_modules": ["query", "value"],
        "exclude_modules": ["bert.encoder.layer.1.attention.self.value"],
        "unfrozen_modules": ["deltas", "classifier"],
    },
    "adapter": {
        "bottleneck_dim": 5,
        "non_linearity": "relu",
        "modified_modules": ["attention.output.dense"],
        "unfrozen_modules": ["deltas"],
    },
    "parallel_adapter": {
        "bottleneck_dim": 5,
        "non_linearity": "relu",
        "scaled": 0.5,
        "modified_modules": ["intermediate", "intermediate"],
        "exclude_modules": ["bert.encoder.layer.0.intermediate"],
    },
    "bitfit": {"modified_modules": ["attention"], "unfrozen_modules": ["deltas", "classifier"]},
}
ARCH = "bert"
KIND = "classification"
# The LoRA checkpoint the loading-error tests start from (lora_B random, head trained).
LORA_KEY = "bert.encoder.layer.1.attention.self.value.lora.lora_B"


# Helpers


def randomize_trainable(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Fill every trainable parameter with random values, as training would leave them (LoRA's
    B starts at zero and BitFit's added biases too, so untrained deltas would change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator) * std
                parameter.add_(noise.to(parameter.dtype))


def forward(model: nn.Module, architecture: str = ARCH, kind: str = KIND) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(**tiny_inputs(architecture, kind)))


def reinitialise_head(model: nn.Module, seed: int = 1234) -> None:
    """Give the classifier head of `model` other values than the pretrained copy's."""
    torch.manual_seed(seed)
    model.classifier.reset_parameters()


def trained(delta_type: str, architecture: str = ARCH, kind: str = KIND, **arguments):
    """(pristine copy of the backbone, backbone with trained deltas, delta model)."""
    model = tiny_model(architecture, kind)
    pristine = copy.deepcopy(model)
    delta_model = DELTA_MODELS[delta_type](model, **arguments)
    delta_model.freeze_module()  # deltas trainable, and the classifier head of a task model
    randomize_trainable(model)
    model.eval()
    return pristine, model, delta_model


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / WEIGHTS_NAME)


def file_dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(path / WEIGHTS_NAME, framework="pt") as handle:
        return {key: handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118


def read_json(path: Path) -> dict:
    return json.loads((path / CONFIG_NAME).read_text())


def write_json(path: Path, config: dict) -> None:
    (path / CONFIG_NAME).write_text(json.dumps(config))


def snapshot(model: nn.Module) -> dict:
    """What a failed load must leave as it was."""
    return {
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "classes": {name: type(module) for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def assert_unmodified(model: nn.Module, before: dict, reference: nn.Module) -> None:
    """`model` has no delta attached and computes what `reference` (a copy of it taken before
    the load) does, with the same state_dict, module classes and requires_grad flags."""
    assert delta_parameter_names(model) == set()
    assert not any(ATTACHED_DELTAS in module.__dict__ for module in model.modules())
    after = snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert torch.equal(forward(model), forward(reference))


@pytest.fixture(scope="module")
def pristine_backbone():
    """The tiny BERT classifier every checkpoint of the error tests was trained on."""
    return tiny_model(ARCH, KIND)


@pytest.fixture(scope="module")
def checkpoints(pristine_backbone, tmp_path_factory):
    """A saved checkpoint of each delta type, trained on `pristine_backbone`."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for delta_type, delta_class in DELTA_MODELS.items():
        model = copy.deepcopy(pristine_backbone)
        delta_model = delta_class(model)
        delta_model.freeze_module()
        randomize_trainable(model)
        paths[delta_type] = delta_model.save_finetuned(root / delta_type)
    return paths


@pytest.fixture
def lora_checkpoint(checkpoints, tmp_path):
    """A private copy of the LoRA checkpoint, for a test to damage."""
    return Path(shutil.copytree(checkpoints["lora"], tmp_path / "lora"))


# 1. Round trips


@pytest.mark.parametrize("loader", ["auto", "class"])
@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_round_trip_onto_a_fresh_backbone(delta_type, loader, tmp_path):
    pristine, model, delta_model = trained(delta_type)
    expected = forward(model)
    path = delta_model.save_finetuned(tmp_path / "checkpoint")
    assert path == tmp_path / "checkpoint"
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    # The same pretrained weights, but a classifier head that differs from the trained one and
    # from the pretrained copy: only loading the checkpoint can make the outputs equal.
    fresh = copy.deepcopy(pristine)
    reinitialise_head(fresh)
    assert not torch.equal(fresh.classifier.weight, pristine.classifier.weight)
    assert not torch.equal(forward(fresh), expected)

    if loader == "auto":
        loaded = AutoDeltaModel.from_finetuned(path, fresh)
    else:
        loaded = DELTA_MODELS[delta_type].from_finetuned(str(path), fresh)
    assert type(loaded) is DELTA_MODELS[delta_type]
    assert loaded.backbone_model is fresh
    assert loaded.config.to_dict() == delta_model.config.to_dict()
    fresh.eval()
    assert torch.equal(forward(fresh), expected)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)

    # Saving the loaded model again writes the same checkpoint.
    again = loaded.save_finetuned(tmp_path / "again")
    assert read_json(again) == read_json(path)
    first, second = file_tensors(path), file_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)

    # Loading wrote the deltas and the head only: without the deltas, the backbone is the
    # pretrained one with the trained head.
    loaded.detach()
    reference = copy.deepcopy(pristine)
    reference.classifier.load_state_dict(model.classifier.state_dict())
    assert torch.equal(forward(fresh), forward(reference))


@pytest.mark.parametrize(
    ("architecture", "delta_type"),
    [("gpt2", "lora"), ("llama", "lora"), ("llama", "bitfit")],
)
def test_round_trip_on_decoders(architecture, delta_type, tmp_path):
    # GPT-2's LoRA targets are Conv1D layers (weight [in, out]); Llama's layers have no biases,
    # so BitFit adds new ones there instead of training existing ones.
    pristine, model, delta_model = trained(delta_type, architecture, "lm")
    expected = forward(model, architecture, "lm")
    assert not torch.equal(expected, forward(pristine, architecture, "lm"))
    path = delta_model.save_finetuned(tmp_path / "checkpoint")

    fresh = copy.deepcopy(pristine)
    loaded = DELTA_MODELS[delta_type].from_finetuned(path, fresh)
    assert sorted(loaded.trainable_parameters_names()) == sorted(file_tensors(path))
    fresh.eval()
    assert torch.equal(forward(fresh, architecture, "lm"), expected)


def test_round_trip_with_per_module_ranks(tmp_path):
    pristine, model, delta_model = trained(
        "lora", lora_r=4, rank_pattern={"value": 2}, alpha_pattern={"query": 3.0}
    )
    expected = forward(model)
    path = delta_model.save_finetuned(tmp_path / "checkpoint")
    shapes = {key: tuple(tensor.shape) for key, tensor in file_tensors(path).items()}
    assert shapes["bert.encoder.layer.0.attention.self.query.lora.lora_A"] == (4, 36)
    assert shapes["bert.encoder.layer.0.attention.self.value.lora.lora_A"] == (2, 36)

    fresh = copy.deepcopy(pristine)
    reinitialise_head(fresh)
    LoraModel.from_finetuned(path, fresh)
    fresh.eval()
    assert torch.equal(forward(fresh), expected)


def test_tied_trainable_weight_is_saved_once_and_loads_into_both_names(tmp_path):
    # GPT-2's lm_head shares its weight with the token embeddings.
    pristine, model, delta_model = trained("lora", "gpt2", "lm")
    delta_model.freeze_module(exclude=["deltas", "lm_head"])
    randomize_trainable(model, seed=3)
    assert model.lm_head.weight is model.transformer.wte.weight
    expected = forward(model, "gpt2", "lm")
    path = delta_model.save_finetuned(tmp_path / "checkpoint")
    keys = set(file_tensors(path))
    assert "transformer.wte.weight" in keys
    assert "lm_head.weight" not in keys

    fresh = copy.deepcopy(pristine)
    LoraModel.from_finetuned(path, fresh)
    fresh.eval()
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert torch.equal(forward(fresh, "gpt2", "lm"), expected)


def test_lora_dropout_is_off_in_a_loaded_model_in_eval_mode(tmp_path):
    # from_pretrained returns models in eval mode: loading deltas onto one must not switch
    # LoRA's dropout on for inference.
    pristine, model, delta_model = trained("lora", lora_dropout=0.5)
    path = delta_model.save_finetuned(tmp_path / "checkpoint")
    fresh = copy.deepcopy(pristine)
    assert not fresh.training
    LoraModel.from_finetuned(path, fresh)
    assert not any(module.training for module in fresh.modules())
    assert torch.equal(forward(fresh), forward(fresh))
    assert torch.equal(forward(fresh), forward(model.eval()))


def test_save_finetuned_writes_to_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, delta_model = trained("lora")
    path = delta_model.save_finetuned()
    assert (tmp_path / "delta_checkpoints" / CONFIG_NAME).is_file()
    assert (tmp_path / "delta_checkpoints" / WEIGHTS_NAME).is_file()
    assert Path(path).resolve() == (tmp_path / "delta_checkpoints").resolve()


# 2. bf16: dtype kept, trainable tensors only


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_bf16_round_trip_keeps_the_dtype_and_saves_trainable_tensors_only(delta_type, tmp_path):
    model = tiny_model(ARCH, KIND).to(torch.bfloat16)
    pristine = copy.deepcopy(model)
    delta_model = DELTA_MODELS[delta_type](model)
    delta_model.freeze_module()
    randomize_trainable(model)
    model.eval()
    expected = forward(model)
    path = delta_model.save_finetuned(tmp_path / "checkpoint")

    trainable = delta_model.trainable_parameters_names()
    dtypes = file_dtypes(path)
    assert set(dtypes) == set(trainable)
    assert len(dtypes) == len(trainable)
    assert set(dtypes.values()) == {torch.bfloat16}
    assert any(key.startswith("classifier.") for key in dtypes)  # the trainable head
    assert not any(key.startswith("bert.embeddings.") for key in dtypes)  # frozen: not saved
    assert set(dtypes) - {"classifier.weight", "classifier.bias"} == delta_parameter_names(model)

    fresh = copy.deepcopy(pristine)
    reinitialise_head(fresh)
    AutoDeltaModel.from_finetuned(path, fresh)
    fresh.eval()
    assert {p.dtype for p in fresh.parameters()} == {torch.bfloat16}
    assert torch.equal(forward(fresh), expected)


# 3. config.json


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_config_json_holds_every_argument_and_the_metadata(delta_type, tmp_path):
    arguments = ARGUMENTS[delta_type]
    model = tiny_model(ARCH, KIND)
    model.config._name_or_path = "org/tiny-bert"
    delta_model = DELTA_MODELS[delta_type](model, **arguments)
    delta_model.freeze_module()
    config = read_json(delta_model.save_finetuned(tmp_path / "checkpoint"))

    constructor = inspect.signature(DELTA_MODELS[delta_type].__init__).parameters
    peft_names = set(DELTA_MODELS[delta_type].config_class.peft_names)
    argument_names = set(constructor) - {"self", "backbone_model"} - peft_names
    assert set(config) == {"delta_type", *argument_names, *METADATA_KEYS}
    assert config["delta_type"] == delta_type
    for name in argument_names:
        expected = arguments.get(name, constructor[name].default)
        assert config[name] == expected, name
    assert config["format_version"] == FORMAT_VERSION
    assert config["backbone_class"] == "BertForSequenceClassification"
    assert config["backbone_checkpoint_name"] == "org/tiny-bert"
    assert config["targets"] == [attachment.host_name for attachment in delta_model.attachments]
    assert config["targets"]
    assert config["fastdelta_version"] == fastdelta.__version__
    assert config["torch_version"] == torch.__version__
    assert config["transformers_version"] == transformers.__version__


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_config_arguments_round_trip(delta_type, tmp_path):
    arguments = ARGUMENTS[delta_type]
    by_constructor = DELTA_MODELS[delta_type](tiny_model(ARCH, KIND), **arguments)
    by_constructor.freeze_module()
    path = by_constructor.save_finetuned(tmp_path / "constructor")

    config = AutoDeltaConfig.from_finetuned(path)
    assert type(config) is CONFIGS[delta_type]
    assert config.to_dict() == by_constructor.config.to_dict()

    by_auto = AutoDeltaModel.from_config(
        AutoDeltaConfig.from_dict({"delta_type": delta_type, **arguments}), tiny_model(ARCH, KIND)
    )
    assert type(by_auto) is DELTA_MODELS[delta_type]
    by_auto.freeze_module()
    auto_path = by_auto.save_finetuned(tmp_path / "auto")
    assert (auto_path / CONFIG_NAME).read_text() == (path / CONFIG_NAME).read_text()

    # The config read back builds the same delta model again.
    rebuilt = AutoDeltaModel.from_config(config, tiny_model(ARCH, KIND))
    assert [a.host_name for a in rebuilt.attachments] == read_json(path)["targets"]


def test_auto_config_from_finetuned_errors(tmp_path, lora_checkpoint):
    with pytest.raises(FileNotFoundError, match=r"No delta checkpoint directory"):
        AutoDeltaConfig.from_finetuned(tmp_path / "nowhere")
    config = read_json(lora_checkpoint)
    write_json(lora_checkpoint, {**config, "delta_type": "prefix"})
    with pytest.raises(ValueError, match=r"lacks embed_dim, mid_dim, prefix_token_num, reparam"):
        AutoDeltaConfig.from_finetuned(lora_checkpoint)
    write_json(lora_checkpoint, {**config, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match=r"upgrade fastdelta"):
        AutoDeltaConfig.from_finetuned(lora_checkpoint)


# 4. Loading errors: each names what differs, and leaves the backbone as it was


def drop_tensor(path: Path) -> None:
    tensors = file_tensors(path)
    del tensors[LORA_KEY]
    save_file(tensors, path / WEIGHTS_NAME)


def add_tensor(path: Path) -> None:
    tensors = file_tensors(path)
    tensors["bert.encoder.layer.0.attention.self.key.lora.lora_A"] = torch.zeros(8, 36)
    save_file(tensors, path / WEIGHTS_NAME)


def set_config(**changes):
    def change(path: Path) -> None:
        write_json(path, {**read_json(path), **changes})

    return change


def remove(name: str):
    def change(path: Path) -> None:
        (path / name).unlink()

    return change


def write_bytes(data):
    def change(path: Path) -> None:
        (path / WEIGHTS_NAME).write_bytes(data(path))

    return change


def truncate(path: Path) -> bytes:
    return (path / WEIGHTS_NAME).read_bytes()[:-4]


LOADING_ERRORS = {
    "missing tensor": (
        drop_tensor,
        ValueError,
        r"missing tensors: bert\.encoder\.layer\.1\.attention\.self\.value\.lora\.lora_B",
    ),
    "unexpected tensor": (
        add_tensor,
        ValueError,
        r"no parameter for: bert\.encoder\.layer\.0\.attention\.self\.key\.lora\.lora_A",
    ),
    "shape mismatch": (
        set_config(lora_r=4),
        ValueError,
        r"shapes that differ: bert\.encoder\.layer\.0\.attention\.self\.query\.lora\.lora_A "
        r"\(8, 36\) in the checkpoint, \(4, 36\) here",
    ),
    "unknown delta_type": (
        set_config(delta_type="telepathy"),
        ValueError,
        r"Unknown delta_type 'telepathy'; the supported types are adapter, bitfit, compacter",
    ),
    "another delta_type's arguments missing": (
        set_config(delta_type="prefix"),
        ValueError,
        r"lacks embed_dim, mid_dim, prefix_token_num, reparameterize, which the saved prefix",
    ),
    "newer format": (
        set_config(format_version=FORMAT_VERSION + 1, fastdelta_version="99.0"),
        ValueError,
        rf"checkpoint format {FORMAT_VERSION + 1} by fastdelta 99\.0.*upgrade fastdelta",
    ),
    "misspelt argument": (
        set_config(lora_rank=4),
        ValueError,
        r"'lora_rank' is no lora argument: did you mean 'lora_r'\?",
    ),
    "targets not in the backbone": (
        set_config(modified_modules=["no_such_module"]),
        ValueError,
        r"select no module of BertForSequenceClassification; 'no_such_module'",
    ),
    "no delta_type": (
        lambda path: write_json(path, {"lora_r": 8}),
        ValueError,
        r"config\.json has no 'delta_type'",
    ),
    "no config.json": (remove(CONFIG_NAME), FileNotFoundError, r"has no config\.json"),
    "no delta.safetensors": (
        remove(WEIGHTS_NAME),
        FileNotFoundError,
        r"has no delta\.safetensors",
    ),
    "invalid JSON": (
        lambda path: (path / CONFIG_NAME).write_text('{"delta_type": "lora",'),
        ValueError,
        r"config\.json is not valid JSON",
    ),
    "truncated safetensors": (
        write_bytes(truncate),
        ValueError,
        r"delta\.safetensors is corrupt or truncated",
    ),
    "garbage safetensors": (
        write_bytes(lambda path: b"\x07\x00\x00\x00\x00\x00\x00\x00not json"),
        ValueError,
        r"delta\.safetensors is corrupt or truncated",
    ),
    "empty safetensors": (
        write_bytes(lambda path: b""),
        ValueError,
        r"delta\.safetensors is corrupt or truncated",
    ),
}


@pytest.mark.parametrize("loader", ["auto", "class"])
@pytest.mark.parametrize("case", LOADING_ERRORS)
def test_loading_error_leaves_the_backbone_unmodified(
    case, loader, lora_checkpoint, pristine_backbone
):
    damage, error, message = LOADING_ERRORS[case]
    damage(lora_checkpoint)
    backbone = copy.deepcopy(pristine_backbone)
    before = snapshot(backbone)
    load = AutoDeltaModel.from_finetuned if loader == "auto" else LoraModel.from_finetuned
    with pytest.raises(error, match=message):
        load(lora_checkpoint, backbone)
    assert_unmodified(backbone, before, pristine_backbone)


def test_missing_directory(tmp_path, pristine_backbone):
    backbone = copy.deepcopy(pristine_backbone)
    before = snapshot(backbone)
    with pytest.raises(FileNotFoundError, match=r"No delta checkpoint directory at .*nowhere"):
        AutoDeltaModel.from_finetuned(tmp_path / "nowhere", backbone)
    with pytest.raises(FileNotFoundError, match=r"No delta checkpoint directory"):
        LoraModel.from_finetuned(str(tmp_path / "nowhere"), backbone)
    assert_unmodified(backbone, before, pristine_backbone)


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_backbone_class_mismatch(delta_type, checkpoints):
    backbone = tiny_model(ARCH, "base")  # a BertModel: the checkpoints are for a classifier
    reference = copy.deepcopy(backbone)
    before = snapshot(backbone)
    with pytest.raises(
        ValueError,
        match=r"trained on a BertForSequenceClassification .*but the backbone_model given is "
        r"a BertModel",
    ):
        AutoDeltaModel.from_finetuned(checkpoints[delta_type], backbone)
    assert delta_parameter_names(backbone) == set()
    assert snapshot(backbone)["classes"] == before["classes"]
    assert backbone.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        inputs = tiny_inputs(ARCH)
        assert torch.equal(first_output(backbone(**inputs)), first_output(reference(**inputs)))


def test_head_shape_mismatch_names_the_head(checkpoints):
    backbone = tiny_model(ARCH, KIND, num_labels=3)
    reference = copy.deepcopy(backbone)
    before = snapshot(backbone)
    with pytest.raises(
        ValueError,
        match=r"shapes that differ: .*classifier\.weight \(2, 36\) in the checkpoint, "
        r"\(3, 36\) here",
    ) as error:
        AutoDeltaModel.from_finetuned(checkpoints["lora"], backbone)
    assert "classifier.bias (2,) in the checkpoint, (3,) here" in str(error.value)
    assert_unmodified(backbone, before, reference)


@pytest.mark.parametrize("delta_type", ["adapter", "parallel_adapter", "bitfit"])
def test_missing_tensor_of_each_delta_type_leaves_the_backbone_unmodified(
    delta_type, checkpoints, tmp_path, pristine_backbone
):
    # BitFit trains the backbone's own biases in place: a failed load must put none of them in.
    path = Path(shutil.copytree(checkpoints[delta_type], tmp_path / delta_type))
    tensors = file_tensors(path)
    dropped = sorted(key for key in tensors if not key.startswith("classifier."))[0]
    del tensors[dropped]
    save_file(tensors, path / WEIGHTS_NAME)
    backbone = copy.deepcopy(pristine_backbone)
    before = snapshot(backbone)
    with pytest.raises(ValueError, match=rf"missing tensors: {re.escape(dropped)}$"):
        DELTA_MODELS[delta_type].from_finetuned(path, backbone)
    assert_unmodified(backbone, before, pristine_backbone)


def test_failed_load_leaves_a_backbone_that_loads_the_right_checkpoint(
    lora_checkpoint, checkpoints, pristine_backbone
):
    drop_tensor(lora_checkpoint)
    backbone = copy.deepcopy(pristine_backbone)
    with pytest.raises(ValueError, match=r"missing tensors"):
        AutoDeltaModel.from_finetuned(lora_checkpoint, backbone)
    loaded = AutoDeltaModel.from_finetuned(checkpoints["lora"], backbone)
    assert sorted(loaded.trainable_parameters_names()) == sorted(file_tensors(checkpoints["lora"]))


@pytest.mark.parametrize(
    ("delta_type", "other"),
    [
        ("lora", "adapter"),
        ("adapter", "parallel_adapter"),
        ("parallel_adapter", "bitfit"),
        ("bitfit", "lora"),
    ],
)
def test_class_from_finetuned_refuses_another_delta_type(
    delta_type, other, checkpoints, pristine_backbone
):
    backbone = copy.deepcopy(pristine_backbone)
    before = snapshot(backbone)
    name = DELTA_MODELS[delta_type].__name__
    with pytest.raises(
        ValueError,
        match=rf"holds delta_type '{other}', which {name} cannot load: use "
        r"AutoDeltaModel\.from_finetuned",
    ):
        DELTA_MODELS[delta_type].from_finetuned(checkpoints[other], backbone)
    assert_unmodified(backbone, before, pristine_backbone)


def test_config_json_that_is_not_utf8(lora_checkpoint, pristine_backbone):
    (lora_checkpoint / CONFIG_NAME).write_bytes(b'{"delta_type": "lora\xff"}')
    backbone = copy.deepcopy(pristine_backbone)
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        AutoDeltaModel.from_finetuned(lora_checkpoint, backbone)


# 5. Saving errors


def test_saving_merged_lora_raises_until_unmerged(tmp_path):
    _, _, delta_model = trained("lora")
    delta_model.merge()
    with pytest.raises(RuntimeError, match=r"merged into the backbone's weights: call unmerge"):
        delta_model.save_finetuned(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    delta_model.unmerge()
    assert (delta_model.save_finetuned(tmp_path / "unmerged") / WEIGHTS_NAME).is_file()


def test_saving_with_everything_frozen_keeps_the_deltas_frozen(tmp_path):
    pristine, model, delta_model = trained("lora")
    delta_model.freeze_module(exclude=[])  # the head is frozen too, so it is not saved
    assert delta_model.trainable_parameters_names() == []
    path = delta_model.save_finetuned(tmp_path / "checkpoint")
    fresh = copy.deepcopy(pristine)
    loaded = AutoDeltaModel.from_finetuned(path, fresh)
    assert loaded.trainable_parameters_names() == []
    saved = {name: p for name, p in model.named_parameters() if ".lora." in name}
    restored = {name: p for name, p in fresh.named_parameters() if ".lora." in name}
    assert saved.keys() == restored.keys() and saved
    assert all(torch.equal(saved[name], restored[name]) for name in saved)


def test_saving_with_every_delta_detached_raises(tmp_path):
    _, _, delta_model = trained("lora")
    delta_model.detach()
    with pytest.raises(RuntimeError, match=r"every delta is detached; call attach\(\)"):
        delta_model.save_finetuned(tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()


def test_saving_with_unknown_arguments_raises(tmp_path):
    _, _, delta_model = trained("adapter")
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) push_to_hub, save_to: it"):
        delta_model.save_finetuned(tmp_path / "checkpoint", push_to_hub=True, save_to="x")
    assert not (tmp_path / "checkpoint").exists()


OPENDELTA_SAVE_REFUSALS = {
    "push_to_dc": (True, "push_to_dc=True uploads to OpenDelta's DeltaCenter"),
    "save_config": (False, "save_config=False would write a checkpoint that cannot be loaded"),
    "state_dict": ({}, "leave state_dict out"),
    "save_function": (print, "a save_function other than torch.save"),
}


@pytest.mark.parametrize("argument", OPENDELTA_SAVE_REFUSALS)
def test_opendelta_save_arguments_other_than_their_defaults_are_refused(argument, tmp_path):
    _, _, delta_model = trained("lora")
    value, message = OPENDELTA_SAVE_REFUSALS[argument]
    with pytest.raises(ValueError, match=re.escape(message)):
        delta_model.save_finetuned(tmp_path / "checkpoint", **{argument: value})
    assert not (tmp_path / "checkpoint").exists()


def test_opendelta_save_and_load_arguments_at_their_defaults_work(tmp_path, pristine_backbone):
    # As OpenDelta's scripts write them: every argument spelt out with the value that works.
    _, model, delta_model = trained("lora")
    expected = forward(model)
    path = delta_model.save_finetuned(
        tmp_path / "checkpoint",
        save_config=True,
        state_dict=None,
        save_function=torch.save,
        push_to_dc=False,
        center_args={},
        center_args_pool={},
        list_tags=[],
        dict_tags={},
        delay_push=False,
        test_result=None,
        usage="",
    )
    loaded = AutoDeltaModel.from_finetuned(
        path,
        copy.deepcopy(pristine_backbone),
        delta_config=delta_model.config,
        cache_dir=None,
        force_download=False,
        local_files_only=True,
        check_hash=True,
    )
    assert torch.equal(forward(loaded.backbone_model), expected)


def test_a_delta_config_other_than_the_saved_one_is_refused(tmp_path, pristine_backbone):
    _, _, delta_model = trained("lora")
    path = delta_model.save_finetuned(tmp_path / "checkpoint")
    other = dataclasses.replace(delta_model.config, lora_alpha=delta_model.config.lora_alpha + 1)
    backbone = copy.deepcopy(pristine_backbone)
    with pytest.raises(ValueError, match=r"delta_config differs from the config saved in .*"):
        LoraModel.from_finetuned(path, backbone, delta_config=other)
    assert delta_parameter_names(backbone) == set()


def test_frozen_delta_tensors_are_saved_and_stay_frozen(tmp_path):
    pristine, model, delta_model = trained("lora")
    delta_model.freeze_module(exclude=["lora_B", "classifier"])  # LoRA-FA: lora_A frozen
    trainable = delta_model.trainable_parameters_names()
    expected = forward(model)
    path = delta_model.save_finetuned(tmp_path / "checkpoint")
    fresh = copy.deepcopy(pristine)
    loaded = AutoDeltaModel.from_finetuned(path, fresh)
    fresh.eval()
    assert torch.equal(forward(fresh), expected)
    assert loaded.trainable_parameters_names() == trainable


# 6. merge_and_unload


MERGE_TARGETS = {
    "bert": ["query", "value", "attention.output.dense", "intermediate.dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D, weight [in, out]
}


@pytest.mark.parametrize("architecture", MERGE_TARGETS)
def test_merge_and_unload_returns_the_plain_model(architecture, tmp_path):
    model = tiny_model(architecture)
    pristine = copy.deepcopy(model)
    delta_model = LoraModel(model, lora_r=4, modified_modules=MERGE_TARGETS[architecture])
    delta_model.freeze_module()  # its state_dict hook must go too
    randomize_trainable(model)
    model.eval()
    expected = forward(model, architecture, "base")
    assert not torch.allclose(expected, forward(pristine, architecture, "base"), atol=1e-3)

    plain = delta_model.merge_and_unload()
    assert plain is model
    assert delta_model.attachments == []
    for (name, module), (_, original) in zip(
        plain.named_modules(), pristine.named_modules(), strict=True
    ):
        assert type(module) is type(original), name
        assert not type(module).__module__.startswith("fastdelta"), name
        assert not hasattr(type(module), "_fastdelta_original_class"), name
        assert ATTACHED_DELTAS not in module.__dict__, name
    assert delta_parameter_names(plain) == set()
    state = plain.state_dict()
    assert state.keys() == pristine.state_dict().keys()
    assert not any("lora" in key for key in state)
    assert [name for name, _ in plain.named_parameters()] == [
        name for name, _ in pristine.named_parameters()
    ]

    merged = forward(plain, architecture, "base")
    # float32: W + s B A rounded once against x W^T + s (x A^T) B^T
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)

    # The plain model exports with transformers and reloads without fastdelta.
    plain.save_pretrained(tmp_path / "export")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "export").eval()
    assert torch.equal(forward(reloaded, architecture, "base"), merged)


# 7. A loaded model trains on


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_loaded_model_keeps_training(delta_type, checkpoints, pristine_backbone):
    backbone = copy.deepcopy(pristine_backbone)
    loaded = DELTA_MODELS[delta_type].from_finetuned(checkpoints[delta_type], backbone)
    saved = file_tensors(checkpoints[delta_type])
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == set(saved)
    assert set(loaded.trainable_parameters_names()) == set(saved)
    parameters = dict(backbone.named_parameters())
    assert all(torch.equal(parameters[key], tensor) for key, tensor in saved.items())

    inputs = tiny_inputs(ARCH, KIND)
    loss = backbone(**inputs, labels=torch.tensor([0, 1])).loss
    loss.backward()
    for name, parameter in parameters.items():
        if name in saved:
            assert parameter.grad is not None, name
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name

    before = forward(backbone)
    optimizer = torch.optim.SGD(loaded.trainable_parameters(), lr=0.5)
    optimizer.step()
    assert not torch.equal(forward(backbone), before)
    frozen = {name: p for name, p in pristine_backbone.named_parameters() if name not in saved}
    assert all(torch.equal(parameters[name], p) for name, p in frozen.items())
