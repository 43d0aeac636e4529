"""DeltaBase.freeze_module: what stays trainable, exclude entries, idempotence and the
trainable-only state dict."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from tiny_models import tiny_config, tiny_model
from torch import nn

from fastdelta import AdapterModel, BitFitModel, LoraModel
from fastdelta.layers.base import delta_parameter_names


def requires_grad_map(model: nn.Module) -> dict[str, bool]:
    return {
        name: parameter.requires_grad
        for name, parameter in model.named_parameters(remove_duplicate=False)
    }


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, trainable in requires_grad_map(model).items() if trainable}


def task_model(architecture: str, auto_class) -> nn.Module:
    config = tiny_config(architecture)
    if architecture == "llama":
        config.pad_token_id = 0
    torch.manual_seed(0)
    return auto_class.from_config(config).eval()


# Default exclude: the deltas, and a freshly initialised task head (OpenDelta issue #73 froze it).
HEADS = [
    # (architecture, model class, prefixes of the parameters that stay trainable besides deltas)
    ("bert", transformers.AutoModelForSequenceClassification, ["classifier."]),
    ("bert", transformers.AutoModelForTokenClassification, ["classifier."]),
    ("bert", transformers.AutoModelForQuestionAnswering, ["qa_outputs."]),
    ("llama", transformers.AutoModelForSequenceClassification, ["score."]),
    ("bart", transformers.AutoModelForSequenceClassification, ["classification_head."]),
    (
        "distilbert",
        transformers.AutoModelForSequenceClassification,
        ["pre_classifier.", "classifier."],
    ),
    ("gpt2", transformers.AutoModelForTokenClassification, ["classifier."]),
    ("t5", transformers.AutoModelForSequenceClassification, ["classification_head."]),
    # DeBERTa's ContextPooler belongs to the classification model, not to the base model.
    ("deberta-v2", transformers.AutoModelForSequenceClassification, ["pooler.", "classifier."]),
    pytest.param(
        "t5",
        transformers.AutoModelForQuestionAnswering,
        ["qa_outputs."],
    ),
    # LM heads are pretrained: they stay frozen.
    ("bert", transformers.AutoModelForMaskedLM, []),
    ("llama", transformers.AutoModelForCausalLM, []),
]


def head_id(case) -> str:
    architecture, auto_class, _ = case.values if hasattr(case, "values") else case
    return f"{architecture}-{auto_class.__name__.removeprefix('AutoModelFor')}"


@pytest.mark.parametrize(("architecture", "auto_class", "heads"), HEADS, ids=map(head_id, HEADS))
def test_default_keeps_deltas_and_a_fresh_task_head_trainable(architecture, auto_class, heads):
    model = task_model(architecture, auto_class)
    LoraModel(model).freeze_module()
    head_names = {
        name for name in requires_grad_map(model) if any(name.startswith(head) for head in heads)
    }
    assert not heads or head_names
    assert trainable_names(model) == delta_parameter_names(model) | head_names


# An explicit exclude is honoured exactly (OpenDelta kept a hidden default exclusion).
EXCLUDES = [
    # (architecture, kind, exclude, full-name pattern of exactly the trainable parameters)
    ("bert", "classification", ["deltas"], r".*\.lora\.lora_[AB]"),
    ("llama", "lm", ["lm_head"], r"lm_head\.weight"),
    ("bert", "classification", ["bias"], r".*\.bias"),
    (
        "bert",
        "base",
        ["attn@.layer_norm@"],
        r"encoder\.layer\.\d\.attention\.output\.LayerNorm\.\w+",
    ),
    ("gpt2", "base", ["attn@.layer_norm@"], r"h\.\d\.ln_1\.\w+"),
    ("bert", "base", ["deltas", "pooler"], r".*\.lora\.lora_[AB]|pooler\.dense\.\w+"),
    ("bert", "base", [r"[r]layer\.1\.attention\.self"], r"encoder\.layer\.1\.attention\.self\..+"),
]


@pytest.mark.parametrize(("architecture", "kind", "exclude", "pattern"), EXCLUDES)
def test_explicit_exclude_is_honoured_exactly(architecture, kind, exclude, pattern):
    model = tiny_model(architecture, kind)
    LoraModel(model).freeze_module(exclude=exclude)
    expected = {name for name in requires_grad_map(model) if re.fullmatch(pattern, name)}
    assert expected
    assert trainable_names(model) == expected


def test_exclude_lm_head_unfreezes_a_tied_lm_head_and_its_embeddings_consistently():
    model = tiny_model("gpt2", "lm")
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter, two names
    LoraModel(model).freeze_module(exclude=["lm_head"])
    assert trainable_names(model) == {"lm_head.weight", "transformer.wte.weight"}


def test_exclude_entry_matching_nothing_suggests_names():
    delta_model = LoraModel(tiny_model("bert", "classification"))
    with pytest.warns(UserWarning, match=r"'clasifier' \(closest names: .*\bclassifier\b"):
        delta_model.freeze_module(exclude=["deltas", "clasifier"])
    assert all(".lora." in name for name in delta_model.trainable_parameters_names())


def test_unfrozen_modules_become_the_default_exclude():
    model = tiny_model("bert", "classification")
    LoraModel(model, unfrozen_modules=["deltas", "pooler"]).freeze_module()
    expected = delta_parameter_names(model) | {
        name for name in requires_grad_map(model) if name.startswith("bert.pooler.")
    }
    assert trainable_names(model) == expected


@pytest.mark.parametrize("delta_class", [LoraModel, AdapterModel, BitFitModel])
def test_freeze_module_is_idempotent(delta_class):
    model = tiny_model("bert", "classification")
    delta_model = delta_class(model)
    delta_model.freeze_module()
    first = requires_grad_map(model)
    state_keys = set(model.state_dict())
    model.bert.pooler.dense.weight.requires_grad_(True)  # the second call re-applies the rule
    delta_model.freeze_module()
    assert requires_grad_map(model) == first
    assert set(model.state_dict()) == state_keys


# set_state_dict: the backbone's state dict holds the trainable tensors only


def test_set_state_dict_keeps_only_trainable_tensors():
    model = tiny_model("bart", "lm")
    full = set(model.state_dict())
    assert full - set(requires_grad_map(model))  # has buffers (final_logits_bias)
    LoraModel(model).freeze_module(set_state_dict=True)
    assert set(model.state_dict()) == trainable_names(model) == delta_parameter_names(model)


def test_freeze_without_set_state_dict_restores_the_full_state_dict():
    model = tiny_model("bart", "lm")
    delta_model = LoraModel(model)
    full = set(model.state_dict())
    delta_model.freeze_module(set_state_dict=True)
    delta_model.freeze_module(set_state_dict=False)
    assert set(model.state_dict()) == full


class Wrapper(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.backbone = backbone


def test_trainable_state_dict_of_a_wrapped_backbone_gets_the_prefix():
    model = tiny_model("bert")
    wrapper = Wrapper(model)
    LoraModel(model).freeze_module(set_state_dict=True)
    expected = {f"backbone.{name}" for name in trainable_names(model)} | {"scale"}
    assert set(wrapper.state_dict()) == expected


def test_detach_restores_the_full_state_dict_and_attach_the_trainable_one():
    model = tiny_model("bert")
    original = set(model.state_dict())
    delta_model = LoraModel(model)
    delta_model.freeze_module(set_state_dict=True)
    trainable = set(model.state_dict())

    delta_model.detach()
    assert set(model.state_dict()) == original
    delta_model.attach()
    assert set(model.state_dict()) == trainable == delta_parameter_names(model)


def test_freeze_module_of_a_submodule_changes_only_its_parameters():
    model = tiny_model("bert")
    delta_model = LoraModel(model)
    layer = model.encoder.layer[0]
    delta_model.freeze_module(module=layer, set_state_dict=False)

    inside = {f"encoder.layer.0.{name}" for name in requires_grad_map(layer)}
    trainable = trainable_names(model)
    assert set(requires_grad_map(model)) - inside <= trainable  # untouched: still trainable
    assert trainable & inside == {
        name for name in delta_parameter_names(model) if name.startswith("encoder.layer.0.")
    }
