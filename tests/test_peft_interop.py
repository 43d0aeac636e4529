"""PEFT interop: PEFT LoRA adapters load into fastdelta with PEFT's outputs, fastdelta's LoRA
saves in PEFT's layout for `peft.PeftModel.from_pretrained`, unsupported PEFT options are refused
by name, and `rank_pattern` / `alpha_pattern` follow PEFT's rule.

Every model here (PEFT's and fastdelta's) is a deepcopy of one pristine tiny backbone, since
`peft.get_peft_model` and the delta models both modify the model they are given.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import first_output, tiny_inputs, tiny_model

from fastdelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    LoraConfig,
    LoraModel,
)
from fastdelta.delta_models.config import pattern_value
from fastdelta.layers.lora import LoraDelta

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PEFT_PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
LOADERS = {"auto": AutoDeltaModel.from_finetuned, "lora": LoraModel.from_finetuned}


# Models


@functools.cache
def _pristine(arch: str, kind: str) -> torch.nn.Module:
    return tiny_model(arch, kind)


def fresh(arch: str, kind: str = "base") -> torch.nn.Module:
    """A deepcopy of the pristine tiny backbone (never the cached model itself)."""
    return copy.deepcopy(_pristine(arch, kind)).eval()


@torch.no_grad()
def output(model: torch.nn.Module, arch: str, kind: str) -> torch.Tensor:
    return first_output(model(**tiny_inputs(arch, kind)))


def assert_same_output(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def assert_changed(actual: torch.Tensor, base: torch.Tensor) -> None:
    """The adapter makes a difference (so an equal output is not vacuous)."""
    assert (actual - base).abs().max() > 1e-3


# PEFT adapters


def peft_adapter(path, arch: str, kind: str, perturb_head: bool = False, **lora_kwargs):
    """Save a PEFT LoRA adapter (non-zero B) of the pristine (arch, kind) model at `path`;
    returns the PEFT model in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
        model = peft.get_peft_model(fresh(arch, kind), config)
    if perturb_head:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            heads = [p for n, p in model.named_parameters() if ".modules_to_save." in n]
            assert heads
            for parameter in heads:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(str(path))
    return model.eval()


def peft_lora_modules(peft_model) -> list[str]:
    """Backbone names of the modules PEFT gave a LoRA layer."""
    return sorted(
        name[len(PEFT_PREFIX) :]
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    )


def edit_config(path, **changes) -> None:
    config_file = path / CONFIG
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def peft_load(path, arch: str, kind: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(fresh(arch, kind), str(path)).eval()


def hosts(delta_model) -> list[str]:
    return sorted(a.host_name for a in delta_model.attachments if a.attached)


def lora_deltas(delta_model) -> dict[str, LoraDelta]:
    return {a.host_name: a.delta for a in delta_model.attachments if a.attached}


def randomize_lora(delta_model, seed: int = 3) -> None:
    """Give every LoRA delta a non-zero B (a fresh one computes the plain model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in lora_deltas(delta_model).values():
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=generator))


# 1. PEFT -> fastdelta

PEFT_TO_FASTDELTA = {
    "llama-list": ("llama", "base", {"target_modules": ["q_proj", "v_proj"]}),
    "llama-regex": (
        "llama",
        "base",
        {"target_modules": r"layers\.\d+\.self_attn\.(q|o)_proj|layers\.1\.mlp\.down_proj"},
    ),
    "llama-lm-resolved-all-linear": ("llama", "lm", {"target_modules": "all-linear"}),
    "gpt2-conv1d": ("gpt2", "lm", {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "gpt2-conv1d-mlp": (
        "gpt2",
        "base",
        {"target_modules": ["c_fc", "c_proj"], "fan_in_fan_out": True, "r": 3},
    ),
    "llama-rslora": (
        "llama",
        "base",
        {"target_modules": ["k_proj", "up_proj"], "use_rslora": True, "r": 4, "lora_alpha": 6},
    ),
    "bert-exclude-list": (
        "bert",
        "base",
        {
            "target_modules": ["query", "value", "dense"],
            "exclude_modules": ["encoder.layer.0.attention.self.query", "pooler.dense"],
        },
    ),
    "bert-exclude-regex": (
        "bert",
        "base",
        {"target_modules": ["query", "key", "value"], "exclude_modules": r".*layer\.1\..*"},
    ),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(PEFT_TO_FASTDELTA))
def test_peft_adapter_loads_with_peft_outputs(tmp_path, case, loader):
    arch, kind, lora_kwargs = PEFT_TO_FASTDELTA[case]
    peft_model = peft_adapter(tmp_path, arch, kind, **lora_kwargs)
    expected = output(peft_model, arch, kind)
    assert_changed(expected, output(fresh(arch, kind), arch, kind))

    backbone = fresh(arch, kind)
    delta_model = LOADERS[loader](tmp_path, backbone)
    assert isinstance(delta_model, LoraModel)
    assert hosts(delta_model) == peft_lora_modules(peft_model)
    assert_same_output(output(backbone, arch, kind), expected)
    # The loaded deltas are the trainable parameters; the backbone stays frozen.
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {f"{h}.lora.lora_{ab}" for h in hosts(delta_model) for ab in "AB"}


def test_fan_in_fan_out_marks_gpt2_conv1d_deltas(tmp_path):
    peft_adapter(tmp_path, "gpt2", "lm", target_modules=["c_attn"], fan_in_fan_out=True)
    delta_model = AutoDeltaModel.from_finetuned(tmp_path, fresh("gpt2", "lm"))
    deltas = lora_deltas(delta_model)
    assert sorted(deltas) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(delta.fan_in_fan_out for delta in deltas.values())


def test_all_linear_string_resolves_like_peft(tmp_path):
    """A config that says "all-linear" (PEFT itself saves the resolved names): every linear
    layer but the output embedding (lm_head)."""
    peft_model = peft_adapter(tmp_path, "llama", "lm", target_modules="all-linear")
    edit_config(tmp_path, target_modules="all-linear")
    backbone = fresh("llama", "lm")
    delta_model = AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert hosts(delta_model) == peft_lora_modules(peft_model)
    assert "lm_head" not in hosts(delta_model)
    assert len(hosts(delta_model)) == 2 * 7
    assert_same_output(output(backbone, "llama", "lm"), output(peft_model, "llama", "lm"))


def test_all_linear_string_skips_classification_head_like_peft(tmp_path):
    peft_model = peft_adapter(
        tmp_path, "llama", "classification", task_type="SEQ_CLS", target_modules="all-linear"
    )
    edit_config(tmp_path, target_modules="all-linear")
    backbone = fresh("llama", "classification")
    delta_model = AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert hosts(delta_model) == peft_lora_modules(peft_model)
    assert_same_output(
        output(backbone, "llama", "classification"),
        output(peft_model, "llama", "classification"),
    )


BERT_FULL = {
    "target_modules": ["query", "key", "value", "dense"],
    "exclude_modules": ["pooler.dense"],
    "modules_to_save": ["classifier"],
    "r": 4,
    "lora_alpha": 8,
    "use_rslora": True,
    "rank_pattern": {r"layer\.0\.attention\.self\.query": 2, "value": 6},
    "alpha_pattern": {"key": 3, r"layer\.1\.output\.dense": 11},
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_bert_classification_head_patterns_rslora_exclude(tmp_path, loader):
    peft_model = peft_adapter(tmp_path, "bert", "classification", perturb_head=True, **BERT_FULL)
    expected = output(peft_model, "bert", "classification")
    assert_changed(expected, output(fresh("bert", "classification"), "bert", "classification"))

    backbone = fresh("bert", "classification")
    delta_model = LOADERS[loader](tmp_path, backbone)
    assert hosts(delta_model) == peft_lora_modules(peft_model)
    assert "bert.pooler.dense" not in hosts(delta_model)
    assert_same_output(output(backbone, "bert", "classification"), expected)

    # The trained head was loaded (not the backbone's initial one) and is trainable.
    peft_head = peft_model.base_model.model.classifier.modules_to_save["default"]
    for name in ("weight", "bias"):
        loaded = getattr(backbone.classifier, name)
        torch.testing.assert_close(loaded, getattr(peft_head, name), rtol=0, atol=0)
        assert loaded.requires_grad
        assert not torch.equal(loaded, getattr(fresh("bert", "classification").classifier, name))
    assert not backbone.bert.embeddings.word_embeddings.weight.requires_grad

    # Ranks and scalings are PEFT's, module by module.
    peft_layers = {
        name[len(PEFT_PREFIX) :]: module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    deltas = lora_deltas(delta_model)
    assert sorted(deltas) == sorted(peft_layers)
    for name, delta in deltas.items():
        assert delta.r == peft_layers[name].r["default"], name
        assert delta.scaling == pytest.approx(peft_layers[name].scaling["default"]), name
    assert deltas["bert.encoder.layer.0.attention.self.query"].r == 2
    assert deltas["bert.encoder.layer.1.attention.self.query"].r == 4
    assert deltas["bert.encoder.layer.1.attention.self.value"].r == 6
    assert deltas["bert.encoder.layer.0.attention.self.key"].scaling == pytest.approx(3 / 2)
    assert deltas["bert.encoder.layer.1.output.dense"].scaling == pytest.approx(11 / 2)


# 2. fastdelta -> PEFT

FASTDELTA_TO_PEFT = {
    "llama": ("llama", "base", {}),
    "llama-patterns": (
        "llama",
        "base",
        {
            "modified_modules": ["q_proj", "v_proj", "down_proj"],
            "lora_r": 4,
            "lora_alpha": 6,
            "use_rslora": True,
            "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 5},
            "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 9},
        },
    ),
    "gpt2": ("gpt2", "lm", {}),
    "gpt2-mlp": ("gpt2", "base", {"modified_modules": ["c_fc", "mlp.c_proj"], "lora_r": 3}),
    "bert-classification": ("bert", "classification", {}),
}


@pytest.mark.parametrize("case", sorted(FASTDELTA_TO_PEFT))
def test_saved_peft_format_loads_in_peft(tmp_path, case):
    arch, kind, lora_kwargs = FASTDELTA_TO_PEFT[case]
    backbone = fresh(arch, kind)
    delta_model = LoraModel(backbone, **lora_kwargs)
    delta_model.freeze_module()
    randomize_lora(delta_model)
    head = kind == "classification"
    if head:
        assert backbone.classifier.weight.requires_grad
        with torch.no_grad():
            backbone.classifier.weight.add_(1.0)
            backbone.classifier.bias.sub_(0.5)
    expected = output(backbone, arch, kind)
    assert_changed(expected, output(fresh(arch, kind), arch, kind))

    saved = delta_model.save_finetuned(tmp_path, format="peft")
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG, SAFETENSORS]
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    assert config["modules_to_save"] == (["classifier"] if head else None)
    assert config["fan_in_fan_out"] == (arch == "gpt2")

    peft_model = peft_load(tmp_path, arch, kind)
    assert peft_lora_modules(peft_model) == hosts(delta_model)
    assert_same_output(output(peft_model, arch, kind), expected)

    # ... and back into fastdelta.
    reloaded_backbone = fresh(arch, kind)
    reloaded = AutoDeltaModel.from_finetuned(tmp_path, reloaded_backbone)
    assert hosts(reloaded) == hosts(delta_model)
    assert_same_output(output(reloaded_backbone, arch, kind), expected)


def test_peft_format_keys_and_shapes(tmp_path):
    backbone = fresh("llama")
    delta_model = LoraModel(backbone, lora_r=4, rank_pattern={"v_proj": 2})
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path, format="peft")
    tensors = load_file(tmp_path / SAFETENSORS)
    expected = {}
    for layer in range(2):
        for proj, r, out in (("q_proj", 4, 36), ("v_proj", 2, 18)):
            name = f"{PEFT_PREFIX}layers.{layer}.self_attn.{proj}"
            expected[f"{name}.lora_A.weight"] = (r, 36)
            expected[f"{name}.lora_B.weight"] = (out, r)
    assert {key: tuple(t.shape) for key, t in tensors.items()} == expected


# 3. Round trip


def test_peft_fastdelta_peft_round_trip_keeps_tensors(tmp_path):
    first, second = tmp_path / "peft", tmp_path / "fastdelta"
    peft_model = peft_adapter(
        first,
        "llama",
        "base",
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"],
        r=4,
        lora_alpha=7,
        rank_pattern={"gate_proj": 3},
        alpha_pattern={r"layers\.1\.self_attn\.k_proj": 2},
    )
    delta_model = AutoDeltaModel.from_finetuned(first, fresh("llama"))
    delta_model.save_finetuned(second, format="peft")

    original, round_tripped = load_file(first / SAFETENSORS), load_file(second / SAFETENSORS)
    assert sorted(round_tripped) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(round_tripped[key], tensor), key

    config_in = json.loads((first / CONFIG).read_text())
    config_out = json.loads((second / CONFIG).read_text())
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert config_out[field] == config_in[field], field
    again = peft_load(second, "llama", "base")
    assert peft_lora_modules(again) == peft_lora_modules(peft_model)
    assert_same_output(output(again, "llama", "base"), output(peft_model, "llama", "base"))


# 4. adapter_model.bin


def test_adapter_model_bin_loads(tmp_path):
    peft_model = peft_adapter(
        tmp_path, "bert", "classification", perturb_head=True, **{**BERT_FULL, "r": 3}
    )
    torch.save(load_file(tmp_path / SAFETENSORS), tmp_path / "adapter_model.bin")
    (tmp_path / SAFETENSORS).unlink()
    backbone = fresh("bert", "classification")
    delta_model = AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert hosts(delta_model) == peft_lora_modules(peft_model)
    assert_same_output(
        output(backbone, "bert", "classification"), output(peft_model, "bert", "classification")
    )


def test_adapter_without_weights_is_an_error(tmp_path):
    peft_adapter(tmp_path, "llama", "base", target_modules=["q_proj"])
    (tmp_path / SAFETENSORS).unlink()
    backbone = fresh("llama")
    with pytest.raises(FileNotFoundError, match=r"adapter_model"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert_backbone_untouched(backbone, "llama", "base")


# 5. Unsupported PEFT options


def message_without_path(error: pytest.ExceptionInfo, path) -> str:
    """The error's message with the checkpoint directory taken out (pytest names tmp_path after
    the test, so a field name could otherwise be found in the path)."""
    return str(error.value).replace(str(path), "<dir>")


def assert_backbone_untouched(backbone, arch: str, kind: str) -> None:
    pristine = _pristine(arch, kind)
    assert list(backbone.state_dict()) == list(pristine.state_dict())
    assert [n for n, _ in backbone.named_modules()] == [n for n, _ in pristine.named_modules()]
    assert_same_output(output(backbone, arch, kind), output(fresh(arch, kind), arch, kind))


UNSUPPORTED = [
    ("lora_bias", True, "lora_bias"),
    ("layers_to_transform", [0], "layers_to_transform"),
    ("layers_pattern", "layers", "layers_pattern"),
    ("layer_replication", [[0, 2]], "layer_replication"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "target_parameters"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices"),
    ("use_qalora", True, "use_qalora"),
    ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "megatron_config"),
    ("use_bdlora", {"block_size": 2}, "use_bdlora"),
    ("arrow_config", {"top_k": 2}, "arrow_config"),
    ("bias", "all", "bias"),
    ("bias", "lora_only", "bias"),
    ("peft_type", "IA3", "peft_type"),
    ("peft_type", None, "peft_type"),
]


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize(
    ("field", "value", "named"), UNSUPPORTED, ids=[f"{f}={v}" for f, v, _ in UNSUPPORTED]
)
def test_unsupported_peft_option_is_refused_by_name(tmp_path, field, value, named, loader):
    peft_adapter(tmp_path, "llama", "base", target_modules=["q_proj", "v_proj"])
    edit_config(tmp_path, **{field: value})
    backbone = fresh("llama")
    with pytest.raises(ValueError) as error:
        LOADERS[loader](tmp_path, backbone)
    assert named in message_without_path(error, tmp_path)
    assert_backbone_untouched(backbone, "llama", "base")
    with pytest.raises(ValueError) as error:
        AutoDeltaConfig.from_finetuned(tmp_path)
    assert named in message_without_path(error, tmp_path)


def test_layers_to_transform_zero_is_refused_by_name(tmp_path):
    peft_adapter(tmp_path, "llama", "lm", target_modules=["q_proj"], layers_to_transform=0)
    backbone = fresh("llama", "lm")
    with pytest.raises(ValueError) as error:
        AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert "layers_to_transform" in message_without_path(error, tmp_path)


def test_disabled_options_at_their_defaults_load(tmp_path):
    """PEFT writes every field; the unsupported ones at their off values are no obstacle."""
    peft_model = peft_adapter(tmp_path, "llama", "base", target_modules=["q_proj"])
    edit_config(
        tmp_path,
        use_dora=False,
        lora_bias=False,
        layers_to_transform=None,
        layers_pattern=None,
        target_parameters=None,
        bias="none",
    )
    backbone = fresh("llama")
    AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert_same_output(output(backbone, "llama", "base"), output(peft_model, "llama", "base"))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"r": 3}, r"shapes that differ"),
        ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, r"missing tensors"),
        ({"target_modules": ["no_such_proj"]}, r"match no module"),
        ({"target_modules": None}, r"target_modules"),
        ({"target_modules": []}, r"target_modules"),
    ],
)
def test_mismatched_adapter_is_an_error_and_leaves_backbone(tmp_path, changes, match):
    peft_adapter(tmp_path, "llama", "base", target_modules=["q_proj", "v_proj"])
    edit_config(tmp_path, **changes)
    backbone = fresh("llama")
    with pytest.raises(ValueError, match=match):
        AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert_backbone_untouched(backbone, "llama", "base")


def test_invalid_json_config_is_a_value_error(tmp_path):
    peft_adapter(tmp_path, "llama", "base", target_modules=["q_proj"])
    (tmp_path / CONFIG).write_text("{not json")
    backbone = fresh("llama")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert_backbone_untouched(backbone, "llama", "base")


# save_finetuned(format=...) errors


def test_peft_format_refuses_non_lora_delta_models(tmp_path):
    for model_class in (AdapterModel, BitFitModel):
        delta_model = model_class(fresh("bert"))
        delta_model.freeze_module()
        with pytest.raises(ValueError, match=r"LoRA"):
            delta_model.save_finetuned(tmp_path / model_class.__name__, format="peft")


@pytest.mark.parametrize("bad", ["PEFT", "safetensors", "", None])
def test_unknown_format_is_a_value_error(tmp_path, bad):
    delta_model = LoraModel(fresh("llama"))
    delta_model.freeze_module()
    with pytest.raises(ValueError, match=r"format"):
        delta_model.save_finetuned(tmp_path, format=bad)
    assert not (tmp_path / CONFIG).exists()


def test_peft_format_refuses_merged_and_mixed_conv1d_linear(tmp_path):
    delta_model = LoraModel(fresh("llama"))
    delta_model.freeze_module()
    delta_model.merge()
    with pytest.raises(RuntimeError, match=r"unmerge"):
        delta_model.save_finetuned(tmp_path / "merged", format="peft")
    delta_model.unmerge()
    delta_model.save_finetuned(tmp_path / "unmerged", format="peft")

    mixed = LoraModel(fresh("gpt2", "lm"), modified_modules=["c_attn", "lm_head"])
    mixed.freeze_module()
    with pytest.raises(ValueError, match=r"fan_in_fan_out"):
        mixed.save_finetuned(tmp_path / "mixed", format="peft")


# 6. AutoDeltaConfig.from_finetuned on a PEFT directory


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 12},
        {
            "target_modules": r".*\.(k|o)_proj",
            "r": 6,
            "lora_alpha": 3,
            "lora_dropout": 0.1,
            "use_rslora": True,
            "rank_pattern": {r"layers\.1\.self_attn\.k_proj": 2, "o_proj": 5},
            "alpha_pattern": {"o_proj": 1.5},
        },
    ],
    ids=["list", "regex-patterns"],
)
def test_auto_delta_config_from_peft_dir(tmp_path, lora_kwargs):
    peft_model = peft_adapter(tmp_path, "llama", "base", **lora_kwargs)
    peft_config = peft_model.peft_config["default"]
    config = AutoDeltaConfig.from_finetuned(tmp_path)
    assert isinstance(config, LoraConfig)
    assert config.delta_type == "lora"
    assert config.lora_r == peft_config.r
    assert config.lora_alpha == peft_config.lora_alpha
    assert config.lora_dropout == peft_config.lora_dropout
    assert config.use_rslora == peft_config.use_rslora
    assert (config.rank_pattern or {}) == peft_config.rank_pattern
    assert (config.alpha_pattern or {}) == peft_config.alpha_pattern

    # A fresh delta model built from it modifies the modules PEFT modified, with PEFT's ranks.
    delta_model = AutoDeltaModel.from_config(config, fresh("llama"))
    assert hosts(delta_model) == peft_lora_modules(peft_model)
    peft_ranks = {
        name[len(PEFT_PREFIX) :]: module.r["default"]
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert {name: delta.r for name, delta in lora_deltas(delta_model).items()} == peft_ranks


def test_auto_delta_config_keeps_exclude_modules(tmp_path):
    peft_model = peft_adapter(
        tmp_path,
        "llama",
        "base",
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["layers.0.self_attn.q_proj"],
    )
    config = AutoDeltaConfig.from_finetuned(tmp_path)
    delta_model = AutoDeltaModel.from_config(config, fresh("llama"))
    assert hosts(delta_model) == peft_lora_modules(peft_model)


def test_auto_delta_config_all_linear_needs_the_backbone(tmp_path):
    peft_model = peft_adapter(tmp_path, "llama", "lm", target_modules="all-linear")
    edit_config(tmp_path, target_modules="all-linear")
    with pytest.raises(ValueError, match=r"'all-linear' names modules only on a backbone"):
        AutoDeltaConfig.from_finetuned(tmp_path)
    delta_model = AutoDeltaModel.from_finetuned(tmp_path, fresh("llama", "lm"))
    assert hosts(delta_model) == peft_lora_modules(peft_model)


def test_auto_delta_config_modules_to_save_keeps_deltas_trainable(tmp_path):
    peft_model = peft_adapter(
        tmp_path, "bert", "classification", target_modules=["query"], modules_to_save=["classifier"]
    )
    # PEFT trains the LoRA deltas and the head.
    peft_trainable = sorted(
        [f"{host}.lora.lora_{ab}" for host in peft_lora_modules(peft_model) for ab in "AB"]
        + ["classifier.bias", "classifier.weight"]
    )
    config = AutoDeltaConfig.from_finetuned(tmp_path)
    backbone = fresh("bert", "classification")
    delta_model = AutoDeltaModel.from_config(config, backbone)
    delta_model.freeze_module()
    trainable = sorted(name for name, p in backbone.named_parameters() if p.requires_grad)
    assert trainable == peft_trainable


def test_seq_cls_adapter_can_be_refrozen(tmp_path):
    peft_adapter(tmp_path, "bert", "classification", task_type="SEQ_CLS", target_modules=["query"])
    backbone = fresh("bert", "classification")
    delta_model = AutoDeltaModel.from_finetuned(tmp_path, backbone)
    before = sorted(name for name, p in backbone.named_parameters() if p.requires_grad)
    delta_model.freeze_module()
    assert sorted(name for name, p in backbone.named_parameters() if p.requires_grad) == before


def test_seq_cls_adapter_loads_head(tmp_path):
    peft_model = peft_adapter(
        tmp_path,
        "bert",
        "classification",
        perturb_head=True,
        task_type="SEQ_CLS",
        target_modules=["query", "value"],
    )
    backbone = fresh("bert", "classification")
    AutoDeltaModel.from_finetuned(tmp_path, backbone)
    assert backbone.classifier.weight.requires_grad
    assert_same_output(
        output(backbone, "bert", "classification"), output(peft_model, "bert", "classification")
    )


# 7. rank_pattern / alpha_pattern on LoraModel


def test_rank_and_alpha_patterns_on_lora_model():
    backbone = fresh("llama")
    delta_model = LoraModel(
        backbone,
        modified_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
        lora_r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"o_proj": 3, r"\d\.mlp\.up_proj": 12},
    )
    deltas = lora_deltas(delta_model)
    for layer in range(2):
        prefix = f"layers.{layer}."
        q, v = deltas[prefix + "self_attn.q_proj"], deltas[prefix + "self_attn.v_proj"]
        o, up = deltas[prefix + "self_attn.o_proj"], deltas[prefix + "mlp.up_proj"]
        assert q.r == (6 if layer == 1 else 4)
        assert q.lora_A.shape == (q.r, 36)
        assert q.lora_B.shape == (36, q.r)
        assert q.scaling == pytest.approx(8 / q.r)
        assert v.r == 2
        assert v.scaling == pytest.approx(8 / 2)
        assert o.r == 4
        assert o.scaling == pytest.approx(3 / 4)
        assert up.r == 4
        assert up.scaling == pytest.approx(12 / 4)


def test_patterns_with_rslora():
    delta_model = LoraModel(
        fresh("llama"),
        modified_modules=["q_proj", "v_proj"],
        lora_r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"v_proj": 9},
        alpha_pattern={"q_proj": 5},
    )
    for name, delta in lora_deltas(delta_model).items():
        if name.endswith("v_proj"):
            assert (delta.r, delta.scaling) == (9, pytest.approx(8 / 3))
        else:
            assert (delta.r, delta.scaling) == (4, pytest.approx(5 / 2))


def test_first_matching_pattern_wins():
    ordered = {r"layers\.0\.self_attn\.q_proj": 3, "q_proj": 5}
    deltas = lora_deltas(LoraModel(fresh("llama"), rank_pattern=ordered))
    assert deltas["layers.0.self_attn.q_proj"].r == 3
    assert deltas["layers.1.self_attn.q_proj"].r == 5
    reversed_order = dict(reversed(ordered.items()))
    deltas = lora_deltas(LoraModel(fresh("llama"), rank_pattern=reversed_order))
    assert deltas["layers.0.self_attn.q_proj"].r == 5


NAMES = [
    "layers.0.self_attn.q_proj",
    "layers.10.self_attn.q_proj",
    "model.layers.1.mlp.up_proj",
    "q_proj",
    "encoder.layer.0.attention.self.query",
    "transformer.h.1.attn.c_attn",
]
PATTERNS = [
    {"q_proj": 1},
    {"proj": 1},
    {r"layers\.1\d*\.self_attn\.q_proj": 1},
    {r".*\.self_attn\..*": 1},
    {"self": 1},
    {r"self\.query": 1},
    {"attn": 1, "c_attn": 2},
    {r"(up|q)_proj": 1},
    {r"h\.1\.attn\.c_attn|layer\.0\..*": 1},
    {"mlp.up_proj": 1, "up_proj": 2},
]


@pytest.mark.parametrize("patterns", PATTERNS, ids=[next(iter(p)) for p in PATTERNS])
def test_pattern_rule_is_peft_rule(patterns):
    for name in NAMES:
        peft_value = patterns.get(get_pattern_key(list(patterns), name), 0)
        assert pattern_value(patterns, name, 0) == peft_value, name


@pytest.mark.parametrize("argument", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key", ["q_proj(", "[v", "*proj", "(?P<x"])
def test_invalid_regex_key_is_a_value_error(argument, key):
    backbone = fresh("llama")
    with pytest.raises(ValueError, match=argument):
        LoraModel(backbone, **{argument: {key: 2}})
    assert_backbone_untouched(backbone, "llama", "base")
    with pytest.raises(ValueError, match=argument):
        LoraConfig(**{argument: {key: 2}})


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "4", None])
def test_bad_pattern_rank_is_a_value_error(rank):
    backbone = fresh("llama")
    with pytest.raises(ValueError, match=r"rank_pattern"):
        LoraModel(backbone, rank_pattern={"v_proj": rank})
    assert_backbone_untouched(backbone, "llama", "base")


@pytest.mark.parametrize("alpha", [math.inf, math.nan, "8", None])
def test_bad_pattern_alpha_is_a_value_error(alpha):
    with pytest.raises(ValueError, match=r"alpha_pattern"):
        LoraModel(fresh("llama"), alpha_pattern={"v_proj": alpha})


def test_patterns_survive_config_round_trip():
    config = LoraConfig(rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\..*": 4.5})
    again = AutoDeltaConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    model = AutoDeltaModel.from_config(config.to_dict(), fresh("llama"))
    assert lora_deltas(model)["layers.1.self_attn.v_proj"].r == 2
    assert lora_deltas(model)["layers.0.self_attn.q_proj"].scaling == pytest.approx(4.5 / 8)


def test_peft_format_needs_a_frozen_backbone(tmp_path):
    delta_model = LoraModel(fresh("llama", "lm"), lora_r=4)  # everything still trainable
    with pytest.raises(ValueError, match=r"call delta_model\.freeze_module\(\) before"):
        delta_model.save_finetuned(tmp_path / "adapter", format="peft")
    assert not (tmp_path / "adapter").exists()
