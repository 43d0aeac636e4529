"""Delta models: default targets on every architecture, parameter counts, the LoRA math, addressing,
OpenDelta parity on BERT-base, configs, errors with their fixes, the pseudo forward and logging."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_models import (
    ARCHITECTURES,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    VOCAB,
    first_output,
    tiny_config,
    tiny_inputs,
    tiny_model,
)
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
    Visualization,
)
from fastdelta.layers.adapter import AdapterDelta, InputTap, SpanningAdapterDelta
from fastdelta.layers.base import delta_parameter_names
from fastdelta.ops import _extension
from fastdelta.ops import backend as backend_module

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
RANK = 8  # LoraModel's default lora_r
BOTTLENECK = 24  # the adapters' default bottleneck_dim
H, FF, L = HIDDEN, INTERMEDIATE, LAYERS
KV = HIDDEN // HEADS  # one key/value head (num_key_value_heads=1) of HIDDEN // HEADS features


def lora_count(in_features: int, out_features: int) -> int:
    return RANK * (in_features + out_features)


def adapter_count(features: int) -> int:
    return 2 * features * BOTTLENECK + BOTTLENECK + features


def parallel_adapter_count(in_features: int, out_features: int) -> int:
    return in_features * BOTTLENECK + BOTTLENECK + BOTTLENECK * out_features + out_features


# BitFit biases of one layer: q, k, v, o (4H) + attention norm (H) + FF in (FF) + FF out (H) +
# FF norm (H). Seq2seq decoder layers also train the cross-attention's norm (H).
BITFIT_LAYER = 7 * H + FF
BITFIT_SEQ2SEQ = L * BITFIT_LAYER + L * (BITFIT_LAYER + H) + 2 * H  # + two final norms
BERT_LIKE = {
    "lora": L * 2 * lora_count(H, H),
    "adapter": L * 2 * adapter_count(H),
    # OpenDelta's pairs: attention's input -> its output, and ff.w1's input (intermediate.dense,
    # H) -> ff.w2's output (output.dense, H)
    "parallel_adapter": L * 2 * parallel_adapter_count(H, H),
    "bitfit": L * BITFIT_LAYER,
}
LLAMA_LIKE = {
    "lora": L * (lora_count(H, H) + lora_count(H, KV)),
    "adapter": L * 2 * adapter_count(H),
    "parallel_adapter": L * 2 * parallel_adapter_count(H, H),
    # bias-free q (H), k (KV), v (KV), o (H), gate and up (FF each), down (H), two norms; final norm
    "bitfit": L * (2 * H + 2 * KV + 2 * FF + H + 2 * H) + H,
}
SEQ2SEQ = {
    "lora": 2 * L * 2 * lora_count(H, H),
    "adapter": 2 * L * 2 * adapter_count(H),
}
# Delta parameters of each architecture's base model with each delta model's default targets.
EXPECTED_DELTA_PARAMETERS = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    # + the relative-position projections pos_key_proj and pos_query_proj inside attn@
    "deberta-v2": {**BERT_LIKE, "bitfit": L * (BITFIT_LAYER + 2 * H)},
    "distilbert": BERT_LIKE,
    # c_attn holds q, k and v (H -> 3H): selected once per layer; + final norm ln_f
    "gpt2": {
        "lora": L * lora_count(H, 3 * H),
        "adapter": L * 2 * adapter_count(H),
        "parallel_adapter": L * 2 * parallel_adapter_count(H, H),
        "bitfit": L * BITFIT_LAYER + H,
    },
    "opt": {
        "lora": L * 2 * lora_count(H, H),
        "adapter": L * 2 * adapter_count(H),
        "parallel_adapter": L * 2 * parallel_adapter_count(H, H),
        "bitfit": L * BITFIT_LAYER + H,
    },
    "bart": {
        **SEQ2SEQ,
        "parallel_adapter": 2 * L * 2 * parallel_adapter_count(H, H),
        "bitfit": BITFIT_SEQ2SEQ,
    },
    "t5": {
        **SEQ2SEQ,
        "parallel_adapter": 2 * L * 2 * parallel_adapter_count(H, H),
        "bitfit": BITFIT_SEQ2SEQ,
    },
    # gated FF: wi_0 and wi_1 (FF each)
    "t5-v1_1": {
        **SEQ2SEQ,
        "parallel_adapter": 2 * L * 2 * parallel_adapter_count(H, H),
        "bitfit": BITFIT_SEQ2SEQ + 2 * L * FF,
    },
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
}


def delta_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    names = delta_parameter_names(model)
    return {
        name: parameter
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if name in names
    }


def hosts(delta_model) -> list[str]:
    return [attachment.host_name for attachment in delta_model.attachments]


# 1. Default targets on every architecture


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_default_targets_have_the_expected_delta_parameter_count(architecture, delta_type):
    model = tiny_model(architecture)
    delta_model = DELTA_MODELS[delta_type](model)
    expected = EXPECTED_DELTA_PARAMETERS[architecture][delta_type]
    assert delta_model.num_delta_parameters() == expected
    assert sum(p.numel() for p in delta_parameters(model).values()) == expected


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_default_deltas_run_and_get_gradients_after_freezing(architecture, delta_type):
    model = tiny_model(architecture)
    DELTA_MODELS[delta_type](model).freeze_module()
    first_output(model(**tiny_inputs(architecture))).sum().backward()
    deltas = delta_parameters(model)
    assert deltas
    assert [name for name, parameter in deltas.items() if parameter.grad is None] == []


# A causal/masked/seq2seq LM also has its vocabulary projection (lm_head@.proj@) trained by BitFit:
# VOCAB more delta parameters. BERT-style MLM heads tie the decoder's bias to `predictions.bias`.
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bitfit_counts_the_lm_head_bias(architecture):
    model = tiny_model(architecture, "lm")
    delta_model = BitFitModel(model)
    expected = EXPECTED_DELTA_PARAMETERS[architecture]["bitfit"] + VOCAB
    assert sum(p.numel() for p in set(delta_parameters(model).values())) == expected
    assert delta_model.num_delta_parameters() == expected


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
@pytest.mark.parametrize("architecture", ["bert", "gpt2", "llama", "t5"])
def test_delta_parameters_take_the_backbone_dtype(architecture, delta_type):
    model = tiny_model(architecture).to(torch.bfloat16)
    DELTA_MODELS[delta_type](model)
    assert {p.dtype for p in delta_parameters(model).values()} == {torch.bfloat16}
    assert first_output(model(**tiny_inputs(architecture))).dtype == torch.bfloat16


# 2. A fresh delta's effect on the outputs


@pytest.mark.parametrize("delta_type", ["lora", "bitfit"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fresh_lora_and_bitfit_leave_outputs_unchanged(architecture, delta_type):
    model = tiny_model(architecture)
    inputs = tiny_inputs(architecture)
    before = first_output(model(**inputs))
    DELTA_MODELS[delta_type](model)
    assert torch.equal(first_output(model(**inputs)), before)


@pytest.mark.parametrize("delta_type", ["adapter", "parallel_adapter"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fresh_adapters_change_outputs_only_slightly(architecture, delta_type):
    model = tiny_model(architecture)
    inputs = tiny_inputs(architecture)
    before = first_output(model(**inputs))
    DELTA_MODELS[delta_type](model)
    calls = []
    inputs_kept = {}
    for module in model.modules():
        if isinstance(module, InputTap):
            module.register_forward_hook(lambda tap, args, _: inputs_kept.update({tap: args[0]}))
        if isinstance(module, SpanningAdapterDelta):
            module.register_forward_hook(
                lambda delta, args, output: calls.append(
                    (inputs_kept[delta.input_tap], args[0], output)
                )
            )
        elif isinstance(module, AdapterDelta):
            module.register_forward_hook(
                lambda _, args, output: calls.append((args[0], args[-1], output))
            )
    after = first_output(model(**inputs))

    assert not torch.equal(after, before)
    assert calls
    # Weights normal(0, 0.01): each adapter adds well under 2% of its input's scale to its
    # residual. (Measured per adapter: end to end, the tiny random backbones' small residual
    # streams amplify it after the final norm.)
    for hidden, residual, output in calls:
        added = (output - residual).abs().max()
        assert 0 < added < 0.02 * hidden.abs().max()


# 3. LoRA's parameters and math


LORA_LAYERS = {  # architecture -> (a targeted layer, in_features, out_features, is Conv1D)
    "bert": ("encoder.layer.1.attention.self.query", H, H, False),
    "gpt2": ("h.1.attn.c_attn", H, 3 * H, True),
    "llama": ("layers.1.self_attn.v_proj", H, KV, False),
    "qwen2": ("layers.1.self_attn.q_proj", H, H, False),  # a biased projection
}


@pytest.mark.parametrize("architecture", LORA_LAYERS)
def test_lora_parameter_names_shapes_and_init(architecture):
    layer, in_features, out_features, _ = LORA_LAYERS[architecture]
    model = tiny_model(architecture)
    LoraModel(model, lora_r=4)
    lora = model.get_submodule(layer).lora
    names = delta_parameters(model)

    assert all(re.fullmatch(r".+\.lora\.lora_[AB]", name) for name in names)
    assert f"{layer}.lora.lora_A" in names
    assert lora.lora_A.shape == (4, in_features)
    assert lora.lora_B.shape == (out_features, 4)
    assert torch.equal(lora.lora_B, torch.zeros_like(lora.lora_B))
    # kaiming_uniform_(a=sqrt(5)): uniform(-bound, bound), bound = sqrt(6 / ((1 + 5) * fan_in))
    bound = math.sqrt(6 / ((1 + 5) * in_features))
    largest = lora.lora_A.abs().max().item()
    assert 0.8 * bound < largest <= bound


@pytest.mark.parametrize(("rank", "alpha"), [(8, 16), (4, 32), (16, 8)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_scaling_is_alpha_over_rank_or_its_square_root(rank, alpha, use_rslora):
    model = tiny_model("bert")
    LoraModel(model, lora_r=rank, lora_alpha=alpha, use_rslora=use_rslora)
    expected = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    assert model.encoder.layer[0].attention.self.value.lora.scaling == pytest.approx(expected)


@pytest.mark.parametrize("architecture", LORA_LAYERS)
def test_lora_fan_in_fan_out_is_set_for_conv1d_only(architecture):
    layer, _, _, conv1d = LORA_LAYERS[architecture]
    model = tiny_model(architecture)
    LoraModel(model)
    assert model.get_submodule(layer).lora.fan_in_fan_out is conv1d


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("architecture", LORA_LAYERS)
def test_lora_forward_equals_the_hand_computed_update(architecture, use_rslora):
    layer_name, in_features, _, conv1d = LORA_LAYERS[architecture]
    model = tiny_model(architecture)
    LoraModel(model, lora_r=4, lora_alpha=12, use_rslora=use_rslora)
    layer = model.get_submodule(layer_name)
    with torch.no_grad():
        layer.lora.lora_B.normal_()
    x = torch.randn(2, 5, in_features, generator=torch.Generator().manual_seed(0))

    weight = layer.weight.t() if conv1d else layer.weight
    base = F.linear(x, weight, layer.bias)
    scaling = 12 / math.sqrt(4) if use_rslora else 12 / 4
    expected = base + scaling * x @ layer.lora.lora_A.T @ layer.lora.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_lora_dropout_applies_in_train_mode_only():
    model = tiny_model("bert")
    LoraModel(model, modified_modules=["query"], lora_dropout=0.5)
    query = model.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.lora.lora_B.normal_()
    x = torch.randn(3, H)

    query.eval()
    assert torch.equal(query(x), query(x))
    query.train()
    assert not torch.equal(query(x), query(x))
    with torch.no_grad():  # only LoRA's input is dropped, not the base layer's
        query.lora.lora_B.zero_()
    assert torch.equal(query(x), F.linear(x, query.weight, query.bias))


# 4. and 5. Which modules the entries select


def test_lora_honours_exclude_modules():
    model = tiny_model("bert")
    delta_model = LoraModel(
        model,
        modified_modules=["query", "value"],
        exclude_modules=[r"[r]encoder\.layer\.0\..*"],
    )
    assert hosts(delta_model) == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]
    layer_0 = model.encoder.layer[0]
    assert not any("lora" in name for name, _ in layer_0.named_parameters())
    assert type(layer_0.attention.self.query) is nn.Linear


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_exclude_modules_applies_to_default_targets(delta_type):
    model = tiny_model("bert")
    delta_model = DELTA_MODELS[delta_type](model, exclude_modules=[r"[r]encoder\.layer\.0\..*"])
    assert hosts(delta_model)
    assert all(name.startswith("encoder.layer.1.") for name in hosts(delta_model))
    assert not any(name.startswith("encoder.layer.0.") for name in delta_parameters(model))


SELECTIONS = [
    # (architecture, delta type, modified_modules, hosts selected)
    ("gpt2", "parallel_adapter", ["attn", "attn"], ["h.0.attn", "h.1.attn"]),  # not c_attn
    ("gpt2", "lora", ["c_attn"], ["h.0.attn.c_attn", "h.1.attn.c_attn"]),
    (
        "bert",
        "lora",
        [r"[r][0-1]\.attention\.self\.query"],
        ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"],
    ),
    (
        "bert",
        "lora",
        [r"[r]1\.attention\.self\.(query|value)"],
        [
            "encoder.layer.1.attention.self.query",
            "encoder.layer.1.attention.self.value",
        ],
    ),
    ("bert", "lora", ["layer.0.attention.self.key"], ["encoder.layer.0.attention.self.key"]),
    (
        "bert",
        "lora",
        ["attn@.k@"],
        [
            "encoder.layer.0.attention.self.key",
            "encoder.layer.1.attention.self.key",
        ],
    ),
    (
        "bert",
        "adapter",
        ["output"],
        [  # both BertSelfOutput and BertOutput, whole segments only
            "encoder.layer.0.attention.output",
            "encoder.layer.0.output",
            "encoder.layer.1.attention.output",
            "encoder.layer.1.output",
        ],
    ),
]


@pytest.mark.parametrize(("architecture", "delta_type", "entries", "expected"), SELECTIONS)
def test_plain_and_regex_entries_select_as_documented(architecture, delta_type, entries, expected):
    model = tiny_model(architecture)
    delta_model = DELTA_MODELS[delta_type](model, modified_modules=entries)
    assert hosts(delta_model) == expected


@pytest.mark.parametrize(
    "entry",
    [
        r"[r]uery",  # a regex match must start at the start of a dot-segment
        r"[r]attention\.self\.quer",  # ... and end at the end of the name
        "ttention.self.query",  # plain entries cover whole segments
    ],
)
def test_entries_do_not_match_parts_of_segments(entry):
    with pytest.raises(ValueError, match="select no module of BertModel"):
        LoraModel(tiny_model("bert"), modified_modules=[entry])


# 6. The same modules and counts as OpenDelta 0.3.2 on BERT-base


@pytest.fixture
def bert_base():
    """A 12-layer, hidden-768 BertModel from BertConfig() defaults, on the meta device: counts and
    names need no memory or initialisation (0.04 s instead of 1.5 s per build)."""
    with torch.device("meta"):
        return transformers.BertModel(transformers.BertConfig())


def test_opendelta_lora_on_bert_base(bert_base):
    delta_model = LoraModel(bert_base, modified_modules=["query", "value"])
    assert delta_model.num_delta_parameters() == 294_912 == 12 * 2 * 8 * (768 + 768)
    assert hosts(delta_model) == [
        f"encoder.layer.{i}.attention.self.{name}" for i in range(12) for name in ("query", "value")
    ]


def test_opendelta_default_adapter_on_bert_base(bert_base):
    delta_model = AdapterModel(bert_base)
    assert delta_model.num_delta_parameters() == 903_744 == 12 * 2 * (2 * 768 * 24 + 24 + 768)
    assert hosts(delta_model) == [
        f"encoder.layer.{i}.{name}.dense"
        for i in range(12)
        for name in ("attention.output", "output")
    ]


def test_opendelta_default_parallel_adapter_on_bert_base(bert_base):
    # Two adapters per layer: attention's input -> its output (768 -> 768), and ff.w1's input
    # (intermediate.dense, 768) -> ff.w2's output (output.dense, 768).
    delta_model = ParallelAdapterModel(bert_base)
    assert delta_model.num_delta_parameters() == 903_744 == 12 * 2 * (2 * 768 * 24 + 24 + 768)
    assert [a.target for a in delta_model.attachments if a.role != "before"] == [
        f"encoder.layer.{i}.attention" for i in range(12)
    ] + [
        f"encoder.layer.{i}.intermediate.dense -> encoder.layer.{i}.output.dense" for i in range(12)
    ]


def test_opendelta_default_bitfit_on_bert_base(bert_base):
    every_encoder_layer_bias = sum(
        parameter.numel()
        for name, parameter in bert_base.named_parameters()
        if name.startswith("encoder.layer.") and name.endswith(".bias")
    )
    delta_model = BitFitModel(bert_base)
    assert every_encoder_layer_bias == 12 * (3 * 768 + 768 + 768 + 3072 + 768 + 768) == 101_376
    assert delta_model.num_delta_parameters() == every_encoder_layer_bias


# 7. Configs and the Auto classes

NON_DEFAULT_ARGUMENTS = {
    "lora": {"lora_r": 4, "lora_alpha": 8, "modified_modules": ["query", "value"]},
    "adapter": {"bottleneck_dim": 6, "non_linearity": "relu"},
    "parallel_adapter": {"bottleneck_dim": 6, "scaled": 0.5},
    "bitfit": {"exclude_modules": [r"[r]encoder\.layer\.0\..*"]},
}


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_auto_delta_config_from_dict_builds_the_config_class(delta_type):
    config = AutoDeltaConfig.from_dict(
        {"delta_type": delta_type, **NON_DEFAULT_ARGUMENTS[delta_type]}
    )
    assert type(config) is CONFIGS[delta_type]
    for argument, value in NON_DEFAULT_ARGUMENTS[delta_type].items():
        assert getattr(config, argument) == value


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_auto_delta_model_builds_the_matching_model(delta_type, as_dict):
    arguments = NON_DEFAULT_ARGUMENTS[delta_type]
    config_dict = {"delta_type": delta_type, **arguments}
    config = config_dict if as_dict else AutoDeltaConfig.from_dict(config_dict)
    built = AutoDeltaModel.from_config(config, tiny_model("bert"))
    direct = DELTA_MODELS[delta_type](tiny_model("bert"), **arguments)

    assert type(built) is DELTA_MODELS[delta_type]
    assert built.config == direct.config
    assert hosts(built) == hosts(direct)
    assert built.num_delta_parameters() == direct.num_delta_parameters()


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_config_round_trips_through_json(delta_type):
    config = AutoDeltaConfig.from_dict(
        {"delta_type": delta_type, **NON_DEFAULT_ARGUMENTS[delta_type]}
    )
    loaded = AutoDeltaConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("delta_type", DELTA_MODELS)
def test_config_defaults_equal_the_constructor_defaults(delta_type):
    model_class = DELTA_MODELS[delta_type]
    parameters = inspect.signature(model_class.__init__).parameters
    fields = {field.name: field.default for field in dataclasses.fields(model_class.config_class)}
    peft_names = set(model_class.config_class.peft_names)  # taken, stored under fastdelta's
    assert set(fields) == set(parameters) - {"self", "backbone_model"} - peft_names
    for name, default in fields.items():
        assert parameters[name].default == default, name


def test_unknown_delta_type_lists_the_supported_ones():
    with pytest.raises(
        ValueError, match=r"'foo'.*adapter, bitfit, compacter, lora, low_rank_adapter, parallel_"
    ):
        AutoDeltaConfig.from_dict({"delta_type": "foo"})


def test_unknown_argument_in_from_dict_is_named():
    with pytest.raises(ValueError, match="lora_rank"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_rank": 4})


# 8. Bad input: clear errors that say the fix


@pytest.mark.parametrize(
    ("architecture", "entry", "closest"),
    [("bert", "querry", "query"), ("llama", "q_prj", "q_proj"), ("gpt2", "c_atn", "c_attn")],
)
def test_unmatched_modified_modules_suggest_the_closest_names(architecture, entry, closest):
    with pytest.raises(ValueError, match=rf"'{entry}' \(closest names: .*\b{closest}\b"):
        LoraModel(tiny_model(architecture), modified_modules=[entry])


def test_unmatched_exclude_modules_suggest_the_closest_names():
    with pytest.warns(UserWarning, match=r"exclude_modules.*'vlaue' \(closest names: .*\bvalue\b"):
        LoraModel(
            tiny_model("bert"), modified_modules=["query", "value"], exclude_modules=["vlaue"]
        )


def test_lora_on_a_non_linear_module_names_it_and_its_linear_children():
    with pytest.raises(TypeError) as error:
        LoraModel(tiny_model("bert"), modified_modules=["attention"])
    message = str(error.value)
    assert "encoder.layer.0.attention is a BertAttention" in message
    assert "self.query" in message
    assert "output.dense" in message


# A module of each delta's kind in BERT; the first delta model takes layer 1's, the second both.
SECOND_DELTA_TARGETS = {
    "lora": "attention.self.value",
    "adapter": "attention.output.dense",
    "parallel_adapter": "attention",
    "bitfit": "attention.output.LayerNorm",
}


# A module takes one BitFit delta (a second would share the first one's biases); a second LoRA
# or adapter stacks (test_composition.py).
@pytest.mark.parametrize("delta_type", ["bitfit"])
def test_second_delta_of_the_same_kind_fails_and_rolls_back(delta_type):
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    target = SECOND_DELTA_TARGETS[delta_type]
    copies = 2 if delta_type == "parallel_adapter" else 1  # a pair: one module's input to output
    DELTA_MODELS[delta_type](model, modified_modules=[f"layer.1.{target}"] * copies)
    with torch.no_grad():
        for parameter in delta_parameters(model).values():
            parameter.normal_()
    parameters_before = dict(model.named_parameters())
    deltas_before = delta_parameter_names(model)
    classes_before = {name: type(module) for name, module in model.named_modules()}
    output_before = first_output(model(**inputs))
    assert not torch.equal(output_before, first_output(tiny_model("bert")(**inputs)))

    # layer 0's module gets its delta before layer 1's fails: it must be taken off again
    with pytest.raises(ValueError, match=f"already has a '{delta_type}'"):
        DELTA_MODELS[delta_type](model, modified_modules=[target] * copies)

    assert dict(model.named_parameters()) == parameters_before
    assert delta_parameter_names(model) == deltas_before
    assert {name: type(module) for name, module in model.named_modules()} == classes_before
    assert torch.equal(first_output(model(**inputs)), output_before)


def test_bitfit_trains_the_bias_of_a_layer_that_carries_lora():
    model = tiny_model("bert")
    LoraModel(model, modified_modules=["query"])
    BitFitModel(model, modified_modules=["query"])
    assert {name for name in delta_parameter_names(model) if "layer.0" in name} == {
        "encoder.layer.0.attention.self.query.bias",
        "encoder.layer.0.attention.self.query.lora.lora_A",
        "encoder.layer.0.attention.self.query.lora.lora_B",
    }


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_lora_r_must_be_a_positive_integer(rank):
    with pytest.raises(ValueError, match="lora_r must be a positive integer"):
        LoraModel(tiny_model("bert"), lora_r=rank)


@pytest.mark.parametrize("bottleneck_dim", [0, -1, 2.5, True])
@pytest.mark.parametrize("delta_class", [AdapterModel, ParallelAdapterModel])
def test_bottleneck_dim_must_be_a_positive_integer(delta_class, bottleneck_dim):
    with pytest.raises(ValueError, match="bottleneck_dim must be a positive integer"):
        delta_class(tiny_model("bert"), bottleneck_dim=bottleneck_dim)


def test_unknown_non_linearity_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'tanhh'.*gelu, gelu_new.*relu.*silu"):
        AdapterModel(tiny_model("bert"), non_linearity="tanhh")


def test_lora_dropout_of_one_is_refused():
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        LoraModel(tiny_model("bert"), lora_dropout=1.0)


@pytest.fixture
def backend_setting(monkeypatch):
    """No set_backend() choice and no $FASTDELTA_BACKEND (unread yet, as in a fresh process);
    monkeypatch restores both afterwards."""
    monkeypatch.setattr(backend_module, "_setting", None)
    monkeypatch.delenv(backend_module.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backend_module, "_environment", None)


def test_unknown_backend_name_is_refused_by_set_backend(backend_setting):
    with pytest.raises(ValueError, match=r"'cuda'.*auto, triton, cpp, torch"):
        fastdelta.set_backend("cuda")
    assert fastdelta.get_backend() == "auto"


def test_unknown_backend_name_in_the_environment_is_refused(backend_setting, monkeypatch):
    model = tiny_model("bert")
    LoraModel(model)
    monkeypatch.setenv("FASTDELTA_BACKEND", "foo")  # before the process's first op reads it
    monkeypatch.setattr(backend_module, "_environment", None)
    with pytest.raises(ValueError, match=r"'foo' \(from \$FASTDELTA_BACKEND\)"):
        fastdelta.get_backend()
    with pytest.raises(ValueError, match="'foo'"):
        model(**tiny_inputs("bert"))


def test_forcing_an_unavailable_backend_says_why(backend_setting, monkeypatch):
    # The C++ extension as a machine without a compiler sees it (here it may well build).
    monkeypatch.setattr(_extension, "_state", "the C++ extension is unavailable: no compiler")
    with pytest.raises(RuntimeError, match=r"'cpp' backend cannot run here: \w+"):
        fastdelta.set_backend("cpp")
    assert fastdelta.get_backend() == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton may run where there is a GPU")
def test_triton_on_the_cpu_without_the_interpreter_says_how_to_enable_it():
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    code = "import fastdelta; fastdelta.set_backend('triton')"
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1" in result.stderr


def test_the_bmtrain_backend_is_refused():
    with pytest.raises(ValueError, match="backend='bmt' is not supported"):
        LoraModel(tiny_model("bert"), backend="bmt")


@pytest.mark.parametrize("argument", ["modified_modules", "exclude_modules", "unfrozen_modules"])
def test_a_string_instead_of_a_list_suggests_the_list(argument):
    with pytest.raises(TypeError, match=re.escape("write ['query']")):
        LoraModel(tiny_model("bert"), **{argument: "query"})


def test_an_invalid_regex_is_refused():
    with pytest.raises(
        ValueError, match=re.escape("'[r]query(' is not a valid regular expression")
    ):
        LoraModel(tiny_model("bert"), modified_modules=["[r]query("])


def tiny_gpt_neox() -> nn.Module:
    """An architecture without a common-structure map."""
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        num_hidden_layers=L,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        max_position_embeddings=64,
    )
    return transformers.GPTNeoXModel(config).eval()


@pytest.mark.parametrize("build", [tiny_gpt_neox, lambda: nn.Sequential(nn.Linear(H, H))])
@pytest.mark.parametrize("delta_class", DELTA_MODELS.values())
def test_default_targets_on_an_unmapped_architecture_say_what_to_do(build, delta_class):
    with pytest.raises(ValueError, match=r"supported architectures are .*bert.*modified_modules="):
        delta_class(build())


@pytest.mark.parametrize(
    ("build", "delta_type", "entries", "expected"),
    [
        (tiny_gpt_neox, "lora", ["query_key_value"], L * lora_count(H, 3 * H)),
        # sizes of GPTNeoXAttention blocks come from a pseudo forward on its dummy inputs
        (tiny_gpt_neox, "parallel_adapter", ["attention"] * 2, L * parallel_adapter_count(H, H)),
        (lambda: nn.Sequential(nn.Linear(H, H), nn.ReLU()), "lora", ["0"], lora_count(H, H)),
    ],
)
def test_explicit_modules_on_an_unmapped_architecture_work(build, delta_type, entries, expected):
    model = build()
    delta_model = DELTA_MODELS[delta_type](model, modified_modules=entries)
    assert delta_model.num_delta_parameters() == expected
    if isinstance(model, nn.Sequential):
        model(torch.randn(2, H))
    else:
        model(input_ids=tiny_inputs("gpt2")["input_ids"])


def test_calling_the_delta_model_says_to_call_the_backbone():
    delta_model = LoraModel(tiny_model("bert"))
    with pytest.raises(TypeError, match="call the backbone model"):
        delta_model(tiny_inputs("bert")["input_ids"])


# 9. The pseudo forward that finds the feature sizes of blocks


class Block(nn.Module):
    """A block whose feature sizes its type does not tell: found by the pseudo forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, hidden):
        return torch.tanh(self.linear(hidden))


class Custom(nn.Module):
    """A model with no dummy_inputs: the pseudo forward feeds it tensor([[0, 0, 0]])."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail
        self.embedding = nn.Embedding(8, 6)
        self.dropout = nn.Dropout(0.1)
        self.block = Block(6, 5)
        self.unused = Block(5, 5)

    def forward(self, input_ids):
        if self.fail:
            raise ValueError("boom")
        return self.block(self.dropout(self.embedding(input_ids)))


def test_pseudo_forward_finds_block_sizes():
    model = Custom()
    ParallelAdapterModel(model, modified_modules=["block", "block"], bottleneck_dim=3)
    adapter = model.block.parallel_adapter
    assert adapter.down_weight.shape == (3, 6)
    assert adapter.up_weight.shape == (5, 3)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 5)


def test_pseudo_forward_failure_names_the_module_and_input_and_chains_the_error():
    model = Custom(fail=True)
    with pytest.raises(
        RuntimeError, match=r"block.*failed on the input tensor\[\[0, 0, 0\]\]"
    ) as error:
        ParallelAdapterModel(model, modified_modules=["block", "block"])
    assert isinstance(error.value.__cause__, ValueError)
    assert str(error.value.__cause__) == "boom"
    assert not any(name.endswith("parallel_adapter") for name, _ in model.named_modules())


def test_pseudo_forward_runs_without_grad_in_eval_mode_and_restores_training_flags():
    model = Custom().train()
    model.unused.eval()  # a mixed map of flags comes back as it was
    flags = {name: module.training for name, module in model.named_modules()}
    seen = []
    model.block.register_forward_hook(
        lambda module, args, output: seen.append(
            (torch.is_grad_enabled(), module.training, model.dropout.training)
        )
    )
    ParallelAdapterModel(model, modified_modules=["block", "block"])
    assert seen == [(False, False, False)]
    assert {
        name: module.training
        for name, module in model.named_modules()
        if not name.endswith("parallel_adapter")
    } == flags


def test_pseudo_forward_that_never_reaches_a_target_names_it():
    with pytest.raises(RuntimeError, match="never called unused"):
        ParallelAdapterModel(Custom(), modified_modules=["block", "block", "unused", "unused"])


# 10. log() and the counters


def test_log_prints_the_graph_counts_ratios_and_backend(capsys):
    model = tiny_model("bert")
    delta_model = LoraModel(model)
    delta_model.freeze_module()
    delta_model.log()
    printed = capsys.readouterr().out

    total = delta_model.num_total_parameters()
    delta = EXPECTED_DELTA_PARAMETERS["bert"]["lora"]
    assert "BertLayer" in printed  # the structure graph
    assert "lora_A" in printed
    assert re.search(rf"trainable parameters\W+{delta:,} \({100 * delta / total:.4f}%\)", printed)
    assert re.search(rf"delta parameters\W+{delta:,} \({100 * delta / total:.4f}%\)", printed)
    runs = backend_module.resolve_backend(torch.device("cpu"), torch.float32)  # cpp once built
    assert re.search(rf"compute backend\W+{runs}", printed)


def test_parameter_counters_are_consistent():
    model = tiny_model("bert", "classification")
    delta_model = AdapterModel(model)
    delta_model.freeze_module()
    trainable = delta_model.trainable_parameters()

    assert delta_model.num_total_parameters() == sum(p.numel() for p in model.parameters())
    assert delta_model.num_trainable_parameters() == sum(p.numel() for p in trainable)
    assert trainable == [p for p in model.parameters() if p.requires_grad]
    head = sum(p.numel() for p in model.classifier.parameters())
    assert delta_model.num_trainable_parameters() == delta_model.num_delta_parameters() + head


# 11. OpenDelta's basic-usage walk-through, as written


def test_basic_usage_walkthrough_trains_only_the_unfrozen_parameters(capsys):
    model = tiny_model("bart", "classification")
    Visualization(model).structure_graph()
    delta_model = AdapterModel(backbone_model=model, modified_modules=["fc2"], bottleneck_dim=12)
    delta_model.log()
    delta_model.freeze_module(exclude=["deltas", "layernorm_embedding"], set_state_dict=True)
    delta_model.log()
    assert "fc2" in capsys.readouterr().out

    inputs = {**tiny_inputs("bart", "classification"), "labels": torch.tensor([0, 1])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(delta_parameters(model)) | {
        f"model.{stack}.layernorm_embedding.{parameter}"
        for stack in ("encoder", "decoder")
        for parameter in ("weight", "bias")
    }
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(delta_model.trainable_parameters(), lr=1e-2)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    assert model(**inputs).loss < loss


def test_second_walkthrough_default_adapters_on_a_masked_lm():
    model = tiny_model("bert", "lm")
    delta_model = AdapterModel(model)
    delta_model.freeze_module()
    inputs = tiny_inputs("bert", "lm")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()

    assert hosts(delta_model) == [
        f"bert.encoder.layer.{i}.{name}.dense"
        for i in range(L)
        for name in ("attention.output", "output")
    ]
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(delta_parameters(model))


def test_tiny_models_match_the_expected_sizes():
    """The expected-count table above assumes these tiny-model sizes."""
    config = tiny_config("llama")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (H, FF, L)
    assert config.num_key_value_heads == 1
    assert tiny_config("gemma").head_dim == KV
    assert tiny_config("t5").d_kv * HEADS == H
