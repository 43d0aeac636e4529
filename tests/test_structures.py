"""Common-structure maps: every architecture's names resolve to the real modules they stand for."""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import transformers
from tiny_models import ARCHITECTURES, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastdelta.addressing import ModuleAddresses
from fastdelta.structures import (
    STRUCTURE_MAPS,
    UnsupportedArchitectureError,
    common_structure_names,
    supported_architectures,
)
from fastdelta.structures.mapping import map_name

KINDS = ("base", "lm", "classification")


class Stack(NamedTuple):
    layers: str  # the real path of the layer list, relative to the base model
    config_count: str  # the config attribute holding its number of layers
    targets: dict[str, str]  # common suffix (under `<stack>.<i>.`) -> real suffix (under the layer)


class Layout(NamedTuple):
    stacks: dict[str, Stack]  # common name of the layer list -> Stack
    ff_module: bool = True  # False where fc1/fc2 sit in the layer, so no module is `ff@`
    projection: type = nn.Linear


# The expected real module of each common name, per layer.
BERT_LAYER = {
    "attn@.q@": "attention.self.query",
    "attn@.k@": "attention.self.key",
    "attn@.v@": "attention.self.value",
    "attn@.proj@": "attention.output.dense",
    "ff@.w1@": "intermediate.dense",
    "ff@.w2@": "output.dense",
}
DEBERTA_LAYER = {
    **BERT_LAYER,
    "attn@.q@": "attention.self.query_proj",
    "attn@.k@": "attention.self.key_proj",
    "attn@.v@": "attention.self.value_proj",
}
DISTILBERT_LAYER = {
    "attn@.q@": "attention.q_lin",
    "attn@.k@": "attention.k_lin",
    "attn@.v@": "attention.v_lin",
    "attn@.proj@": "attention.out_lin",
    "ff@.w1@": "ffn.lin1",
    "ff@.w2@": "ffn.lin2",
}
T5_SELF = {
    "attn@.q@": "layer.0.SelfAttention.q",
    "attn@.k@": "layer.0.SelfAttention.k",
    "attn@.v@": "layer.0.SelfAttention.v",
    "attn@.proj@": "layer.0.SelfAttention.o",
}
T5_CROSS = {
    "crossattn@.q@": "layer.1.EncDecAttention.q",
    "crossattn@.k@": "layer.1.EncDecAttention.k",
    "crossattn@.v@": "layer.1.EncDecAttention.v",
    "crossattn@.proj@": "layer.1.EncDecAttention.o",
}


def encoder_layout(layers: str, config_count: str, targets: dict[str, str]) -> Layout:
    return Layout({"encoder@.block@": Stack(layers, config_count, targets)})


def t5_ff(layer: int, gated: bool) -> dict[str, str]:
    ff = f"layer.{layer}.DenseReluDense"
    if gated:
        return {"ff@.w1@": f"{ff}.wi_0", "ff@.w3@": f"{ff}.wi_1", "ff@.w2@": f"{ff}.wo"}
    return {"ff@.w1@": f"{ff}.wi", "ff@.w2@": f"{ff}.wo"}


def t5_layout(gated: bool) -> Layout:
    return Layout(
        {
            "encoder@.block@": Stack("encoder.block", "num_layers", {**T5_SELF, **t5_ff(1, gated)}),
            "decoder@.block@": Stack(
                "decoder.block", "num_decoder_layers", {**T5_SELF, **T5_CROSS, **t5_ff(2, gated)}
            ),
        }
    )


BART_ATTENTION = {"q@": "q_proj", "k@": "k_proj", "v@": "v_proj", "proj@": "out_proj"}
BART_SELF = {f"attn@.{common}": f"self_attn.{real}" for common, real in BART_ATTENTION.items()}
BART_CROSS = {
    f"crossattn@.{common}": f"encoder_attn.{real}" for common, real in BART_ATTENTION.items()
}
FC = {"ff@.w1@": "fc1", "ff@.w2@": "fc2"}
OPT_LAYER = {**BART_SELF, **FC}
LLAMA_LAYER = {
    "attn@.q@": "self_attn.q_proj",
    "attn@.k@": "self_attn.k_proj",
    "attn@.v@": "self_attn.v_proj",
    "attn@.proj@": "self_attn.o_proj",
    "ff@.w1@": "mlp.gate_proj",
    "ff@.w3@": "mlp.up_proj",
    "ff@.w2@": "mlp.down_proj",
}
LLAMA_LAYOUT = Layout({"decoder@.block@": Stack("layers", "num_hidden_layers", LLAMA_LAYER)})

LAYOUTS = {
    "bert": encoder_layout("encoder.layer", "num_hidden_layers", BERT_LAYER),
    "roberta": encoder_layout("encoder.layer", "num_hidden_layers", BERT_LAYER),
    "distilbert": encoder_layout("transformer.layer", "n_layers", DISTILBERT_LAYER),
    "deberta-v2": encoder_layout("encoder.layer", "num_hidden_layers", DEBERTA_LAYER),
    "t5": t5_layout(gated=False),
    "t5-v1_1": t5_layout(gated=True),
    "bart": Layout(
        {
            "encoder@.block@": Stack("encoder.layers", "encoder_layers", {**BART_SELF, **FC}),
            "decoder@.block@": Stack(
                "decoder.layers", "decoder_layers", {**BART_SELF, **BART_CROSS, **FC}
            ),
        },
        ff_module=False,
    ),
    "gpt2": Layout(
        {
            "decoder@.block@": Stack(
                "h",
                "n_layer",
                {
                    "attn@.q@": "attn.c_attn",
                    "attn@.k@": "attn.c_attn",
                    "attn@.v@": "attn.c_attn",
                    "attn@.proj@": "attn.c_proj",
                    "ff@.w1@": "mlp.c_fc",
                    "ff@.w2@": "mlp.c_proj",
                },
            ),
        },
        projection=Conv1D,
    ),
    "opt": Layout(
        {"decoder@.block@": Stack("decoder.layers", "num_hidden_layers", OPT_LAYER)},
        ff_module=False,
    ),
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "gemma": LLAMA_LAYOUT,
}

DEFAULT_TARGETS = {
    "lora": ["attn@.q@", "attn@.v@"],
    "adapter": ["attn@.proj@", "ff@.w2@"],
    "parallel_adapter": ["attn@", "attn@", "ff@.w1@", "ff@.w2@"],
    "bitfit": ["attn@", "ff@", "layer_norm@"],
}


@functools.cache
def built(arch: str, kind: str) -> tuple[nn.Module, ModuleAddresses, str]:
    """A tiny model, its addresses and the prefix of its base model's names ("" or "bert.")."""
    model = tiny_model(arch, kind)
    base_name = next(name for name, module in model.named_modules() if module is model.base_model)
    return model, ModuleAddresses(model), base_name + "." if base_name else ""


def selected(addresses: ModuleAddresses, entry: str) -> list[str]:
    return [name for name in addresses.modules if name and addresses.matches(name, entry)]


by_arch_and_kind = pytest.mark.parametrize(
    "arch,kind", [(arch, kind) for arch in ARCHITECTURES for kind in KINDS]
)


def test_layouts_cover_every_architecture():
    assert sorted(LAYOUTS) == ARCHITECTURES
    model_types = {built(arch, "base")[0].config.model_type for arch in ARCHITECTURES}
    assert model_types <= set(STRUCTURE_MAPS)


@by_arch_and_kind
def test_each_layer_target_resolves_to_its_real_module(arch, kind):
    model, addresses, prefix = built(arch, kind)
    layout = LAYOUTS[arch]
    for stack_name, stack in layout.stacks.items():
        count = getattr(model.config, stack.config_count)
        assert len(addresses.modules[prefix + stack.layers]) == count
        for index in range(count):
            for suffix, real in stack.targets.items():
                entry = f"{stack_name}.{index}.{suffix}"
                expected = f"{prefix}{stack.layers}.{index}.{real}"
                assert selected(addresses, entry) == [expected], entry
                assert isinstance(addresses.modules[expected], layout.projection), expected


@by_arch_and_kind
def test_map_covers_every_layer_index(arch, kind):
    model, addresses, prefix = built(arch, kind)
    for stack_name, stack in LAYOUTS[arch].stacks.items():
        count = getattr(model.config, stack.config_count)
        indices = {
            name[len(stack_name) + 1 :]
            for names in addresses.common.values()
            for name in names
            if name.startswith(stack_name + ".") and name.count(".") == stack_name.count(".") + 1
        }
        assert indices == {str(index) for index in range(count)}, stack_name
    # Each suffix matches once per layer of every stack that has it, and nowhere else.
    suffixes = {suffix for stack in LAYOUTS[arch].stacks.values() for suffix in stack.targets}
    for suffix in suffixes:
        expected = {
            f"{prefix}{stack.layers}.{index}.{stack.targets[suffix]}"
            for stack in LAYOUTS[arch].stacks.values()
            if suffix in stack.targets
            for index in range(getattr(model.config, stack.config_count))
        }
        assert set(selected(addresses, suffix)) == expected, suffix


@by_arch_and_kind
def test_default_targets_select_modules(arch, kind):
    _, addresses, _ = built(arch, kind)
    layout = LAYOUTS[arch]
    for delta_type, entries in DEFAULT_TARGETS.items():
        for entry in entries:
            if entry == "ff@" and not layout.ff_module:
                # fc1/fc2 sit directly in the layer: no module stands for the whole FF block.
                assert selected(addresses, "ff@") == []
                for part in ("ff@.w1@", "ff@.w2@"):
                    assert selected(addresses, part), f"{delta_type}: {part}"
            else:
                assert selected(addresses, entry), f"{delta_type}: {entry}"
    lm_heads = selected(addresses, "lm_head@.proj@")
    if kind == "lm":
        assert len(lm_heads) == 1
        assert isinstance(addresses.modules[lm_heads[0]], nn.Linear)
    else:
        assert lm_heads == []


@by_arch_and_kind
def test_attention_targets_are_not_cross_attention(arch, kind):
    """`attn@` (self-attention) and `crossattn@` never select the same module."""
    _, addresses, _ = built(arch, kind)
    cross = set(selected(addresses, "crossattn@"))
    assert cross.isdisjoint(selected(addresses, "attn@"))
    has_cross = any("crossattn@.q@" in stack.targets for stack in LAYOUTS[arch].stacks.values())
    assert bool(cross) == has_cross


def test_gpt2_fused_qkv_matches_q_k_and_v():
    _, addresses, prefix = built("gpt2", "lm")
    for entry in ("attn@.q@", "attn@.k@", "attn@.v@"):
        assert addresses.matches(f"{prefix}h.0.attn.c_attn", entry)
    assert not addresses.matches(f"{prefix}h.0.attn.c_attn", "attn@.proj@")


def test_gpt2_cross_attention():
    addresses = ModuleAddresses(tiny_model("gpt2", "base", add_cross_attention=True))
    assert selected(addresses, "crossattn@.q@") == [
        "h.0.crossattention.q_attn",
        "h.1.crossattention.q_attn",
    ]
    assert (
        selected(addresses, "crossattn@.k@")
        == selected(addresses, "crossattn@.v@")
        == ["h.0.crossattention.c_attn", "h.1.crossattention.c_attn"]
    )
    assert "h.0.crossattention.c_attn" not in selected(addresses, "attn@.k@")
    assert selected(addresses, "crossattn@.layer_norm@") == [
        "h.0.ln_cross_attn",
        "h.1.ln_cross_attn",
    ]


def test_deberta_v2_non_legacy_mlm_head_has_no_projection():
    addresses = ModuleAddresses(tiny_model("deberta-v2", "lm", legacy=False))
    assert selected(addresses, "lm_head@") == ["lm_predictions.lm_head"]
    assert selected(addresses, "lm_head@.proj@") == []


def tiny_gpt_neox() -> nn.Module:
    config = transformers.GPTNeoXConfig(
        vocab_size=96,
        hidden_size=36,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=52,
        max_position_embeddings=64,
    )
    return transformers.AutoModel.from_config(config)


@pytest.mark.parametrize(
    "make_model",
    [tiny_gpt_neox, lambda: nn.Sequential(nn.Linear(2, 2))],
    ids=["gpt_neox", "sequential"],
)
def test_unsupported_architecture_error(make_model):
    model = make_model()
    with pytest.raises(UnsupportedArchitectureError) as raised:
        common_structure_names(model)
    message = str(raised.value)
    assert "modified_modules" in message
    for architecture in supported_architectures():
        assert architecture in message
    addresses = ModuleAddresses(model)
    name = next(name for name in addresses.modules if name)
    assert addresses.matches(name, name)  # plain entries need no map
    with pytest.raises(UnsupportedArchitectureError):
        addresses.matches(name, "attn@")


TREE = {
    "embed": "embeddings",
    "layers": (
        "block",
        {
            "$": {
                "attention": ("attn", {"fused": "q|k|v", "self.out": "proj"}),
                "fc1": "ff.w1",
                "norm": {"inner": "layer_norm"},
            },
        },
    ),
}


@pytest.mark.parametrize(
    "name,expected",
    [
        ("embed", ("embeddings@",)),
        ("layers", ("block@",)),
        ("layers.3", ("block@.3",)),
        ("layers.3.attention", ("block@.3.attn@",)),
        (
            "layers.3.attention.fused",
            ("block@.3.attn@.q@", "block@.3.attn@.k@", "block@.3.attn@.v@"),
        ),
        ("layers.0.attention.self.out", ("block@.0.attn@.proj@",)),
        ("layers.0.fc1", ("block@.0.ff@.w1@",)),
        ("layers.0.norm.inner", ("block@.0.norm.layer_norm@",)),
        ("layers.0.attention.self", ()),  # intermediate of a dotted key
        ("layers.x.attention", ()),  # "$" matches layer indices only
        ("layers.0.attention.fused.extra", ()),  # below a leaf
        ("embedding", ()),  # whole segments only
        ("", ()),
    ],
)
def test_map_name(name, expected):
    assert map_name(name, TREE) == expected


class WrappedPLM(nn.Module):
    """A task module holding the pretrained model as `self.plm`, as OpenDelta's examples do."""

    def __init__(self, architecture: str):
        super().__init__()
        self.plm = tiny_model(architecture)
        self.head = nn.Linear(self.plm.config.hidden_size, 2)

    def forward(self, input_ids):
        return self.head(self.plm(input_ids=input_ids).last_hidden_state[:, 0])


@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_a_model_inside_a_wrapper_is_addressed_through_it(architecture):
    from fastdelta import AdapterModel, LoraModel

    wrapped = WrappedPLM(architecture)
    inner = common_structure_names(tiny_model(architecture))
    names = common_structure_names(wrapped)
    assert names == {f"plm.{name}" if name else "plm": common for name, common in inner.items()}
    lora = LoraModel(wrapped)  # default targets, in common-structure names
    plain = LoraModel(tiny_model(architecture))
    assert [a.host_name for a in lora.attachments] == [
        f"plm.{a.host_name}" for a in plain.attachments
    ]
    adapter = AdapterModel(WrappedPLM(architecture), modified_modules=["attn@.proj@"])
    assert all(a.host_name.startswith("plm.") for a in adapter.attachments)


def test_a_wrapper_holding_no_mapped_model_is_refused_by_name():
    wrapper = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedArchitectureError, match=r"holds no model that has one"):
        common_structure_names(wrapper)
