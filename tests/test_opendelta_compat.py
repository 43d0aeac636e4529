"""OpenDelta drop-in: checkpoints OpenDelta's save_finetuned wrote load with from_finetuned, the
delta model is used as OpenDelta scripts use an nn.Module, and OpenDelta's utilities import.

The OpenDelta checkpoints here are written as OpenDelta 0.3.2's code writes them: config.json
holds the delta arguments, the base arguments that differ from OpenDelta's defaults, delta_type
and the backbone metadata; pytorch_model.bin is a torch.save'd dict of the trainable tensors under
OpenDelta's names (`<target>.adapter.modulelist.down_proj.weight`, `<target>.compactor....`)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import HIDDEN, first_output, tiny_inputs, tiny_model
from torch import nn

from fastdelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    CompacterModel,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
)
from fastdelta.checkpoint_io import checkpoint_format

BACKBONE_METADATA = {
    "backbone_checkpoint_name": "tiny-bert",
    "backbone_hash": "0123456789abcdef0123456789abcdef",
    "opendelta_version": "0.3.2",
    "transformers_version": "4.30.2",
}
BERT_ATTENTION_OUTPUTS = [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
BERT_QUERIES = [f"encoder.layer.{i}.attention.self.query" for i in range(2)]


def write_opendelta_checkpoint(path: Path, config: dict, tensors: dict) -> Path:
    """The two files OpenDelta's save_finetuned writes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save(tensors, path / "pytorch_model.bin")
    return path


def opendelta_config(delta_type: str, backbone: nn.Module, **arguments) -> dict:
    """config.json as OpenDelta's to_diff_dict writes it after create_config_from_model."""
    return {
        "delta_type": delta_type,
        "backbone_class": type(backbone).__name__,
        "exclude_modules": ["lm_head"],
        **BACKBONE_METADATA,
        **arguments,
    }


def random_tensors(shapes: dict, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.3 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def outputs_of(model: nn.Module, architecture: str = "bert") -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(**tiny_inputs(architecture)))


def set_parameters(backbone: nn.Module, values: dict) -> None:
    with torch.no_grad():
        for name, value in values.items():
            backbone.get_parameter(name).copy_(value)


# The OpenDelta tensors of each delta type on the tiny BERT (hidden 36), and the same tensors
# under fastdelta's names, written out by hand from OpenDelta's layers.


def lora_case():
    shapes = {}
    for host in BERT_QUERIES:
        shapes[f"{host}.lora.lora_A"] = (4, HIDDEN)
        shapes[f"{host}.lora.lora_B"] = (HIDDEN, 4)
    tensors = random_tensors(shapes)
    arguments = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "modified_modules": ["query"]}
    expected = LoraModel, {"lora_r": 4, "lora_alpha": 8, "modified_modules": ["query"]}
    return arguments, tensors, dict(tensors), expected


ADAPTER_NAMES = {
    "modulelist.down_proj.weight": "down_weight",
    "modulelist.down_proj.bias": "down_bias",
    "modulelist.up_proj.weight": "up_weight",
    "modulelist.up_proj.bias": "up_bias",
}


def adapter_case():
    shapes = {}
    for host in BERT_ATTENTION_OUTPUTS:
        shapes[f"{host}.adapter.modulelist.down_proj.weight"] = (6, HIDDEN)
        shapes[f"{host}.adapter.modulelist.down_proj.bias"] = (6,)
        shapes[f"{host}.adapter.modulelist.up_proj.weight"] = (HIDDEN, 6)
        shapes[f"{host}.adapter.modulelist.up_proj.bias"] = (HIDDEN,)
    tensors = random_tensors(shapes, seed=1)
    renamed = {}
    for name, tensor in tensors.items():
        host, _, inner = name.partition(".adapter.")
        renamed[f"{host}.adapter.{ADAPTER_NAMES[inner]}"] = tensor
    arguments = {
        "bottleneck_dim": 6,
        "non_linearity": "gelu_new",
        "modified_modules": ["attention.output.dense"],
    }
    expected = AdapterModel, {"bottleneck_dim": 6, "modified_modules": ["attention.output.dense"]}
    return arguments, tensors, renamed, expected


def low_rank_adapter_case():
    shapes = {}
    for host in BERT_ATTENTION_OUTPUTS:
        # reduction_factor 6: a bottleneck of 36 // 6 = 6; rank 1, OpenDelta's only working one.
        shapes[f"{host}.low_rank_adapter.down_sampler.W_left"] = (HIDDEN, 1)
        shapes[f"{host}.low_rank_adapter.down_sampler.W_right"] = (1, 6)
        shapes[f"{host}.low_rank_adapter.down_sampler.b"] = (6,)
        shapes[f"{host}.low_rank_adapter.up_sampler.W_left"] = (6, 1)
        shapes[f"{host}.low_rank_adapter.up_sampler.W_right"] = (1, HIDDEN)
        shapes[f"{host}.low_rank_adapter.up_sampler.b"] = (HIDDEN,)
    tensors = random_tensors(shapes, seed=2)
    arguments = {
        "reduction_factor": 6,
        "non_linearity": "gelu_new",
        "low_rank_w_init": "glorot-uniform",
        "low_rank_rank": 1,
        "modified_modules": ["attn@.proj@"],
        "common_structure": True,
    }
    expected = LowRankAdapterModel, {"reduction_factor": 6, "modified_modules": ["attn@.proj@"]}
    return arguments, tensors, dict(tensors), expected


COMPACTER_ARGUMENTS = {
    # CompacterConfig's two fields the model never reads, written as null by OpenDelta.
    "bottleneck_dim": None,
    "sequential": None,
    "reduction_factor": 3,
    "non_linearity": "gelu_new",
    "phm_c_init": "normal",
    "hypercomplex_division": 4,
    "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "shared_phm_rule": False,
    "factorized_phm": True,
    "shared_W_phm": False,
    "factorized_phm_rule": False,
    "phm_rank": 1,
    "phm_init_range": 0.0001,
    "kronecker_prod": None,
    "use_bias_up_sampler": True,
    "use_bias_down_sampler": True,
}


def compacter_case():
    shapes = {}
    n, bottleneck = 4, HIDDEN // 3
    for host in BERT_ATTENTION_OUTPUTS:
        for sampler, (rows, columns) in {
            "down_sampler": (HIDDEN, bottleneck),
            "up_sampler": (bottleneck, HIDDEN),
        }.items():
            prefix = f"{host}.compactor.{sampler}"
            shapes[f"{prefix}.phm_rule"] = (n, n, n)
            shapes[f"{prefix}.W_left"] = (n, rows // n, 1)
            shapes[f"{prefix}.W_right"] = (n, 1, columns // n)
            shapes[f"{prefix}.b"] = (columns,)
    tensors = random_tensors(shapes, seed=3)
    renamed = {name.replace(".compactor.", ".compacter."): t for name, t in tensors.items()}
    arguments = {**COMPACTER_ARGUMENTS, "modified_modules": ["attention.output.dense"]}
    expected = (
        CompacterModel,
        {"reduction_factor": 3, "modified_modules": ["attention.output.dense"]},
    )
    return arguments, tensors, renamed, expected


def bitfit_case():
    # BERT's attention blocks: every Linear and LayerNorm inside has a bias, trained in place.
    names = [
        f"encoder.layer.{i}.attention.{layer}.bias"
        for i in range(2)
        for layer in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
    ]
    tensors = random_tensors({name: (HIDDEN,) for name in names}, seed=4)
    arguments = {"modified_modules": ["attention"]}
    return arguments, tensors, dict(tensors), (BitFitModel, {"modified_modules": ["attention"]})


CASES = {
    "lora": lora_case,
    "adapter": adapter_case,
    "low_rank_adapter": low_rank_adapter_case,
    "compacter": compacter_case,
    "bitfit": bitfit_case,
}


@pytest.mark.parametrize("delta_type", sorted(CASES))
def test_an_opendelta_checkpoint_loads_with_auto_delta_model(tmp_path, delta_type):
    backbone = tiny_model("bert")
    arguments, tensors, renamed, (delta_class, fastdelta_arguments) = CASES[delta_type]()
    config = opendelta_config(delta_type, backbone, **arguments)
    path = write_opendelta_checkpoint(tmp_path / "opendelta", config, tensors)
    assert checkpoint_format(path) == "opendelta"

    expected_backbone = copy.deepcopy(backbone)
    expected_model = delta_class(expected_backbone, **fastdelta_arguments)
    set_parameters(expected_backbone, renamed)

    delta_model = AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    assert type(delta_model) is delta_class
    assert set(delta_model.state_dict()) == set(expected_model.state_dict()) == set(renamed)
    torch.testing.assert_close(outputs_of(backbone), outputs_of(expected_backbone), rtol=0, atol=0)
    for name, tensor in renamed.items():
        torch.testing.assert_close(backbone.get_parameter(name), tensor, rtol=0, atol=0)
        assert backbone.get_parameter(name).requires_grad


@pytest.mark.parametrize("delta_type", sorted(CASES))
def test_the_delta_class_loads_its_opendelta_checkpoint(tmp_path, delta_type):
    backbone = tiny_model("bert")
    arguments, tensors, renamed, (delta_class, _) = CASES[delta_type]()
    path = write_opendelta_checkpoint(
        tmp_path / "d", opendelta_config(delta_type, backbone, **arguments), tensors
    )
    delta_model = delta_class.from_finetuned(path, backbone)
    assert set(delta_model.state_dict()) == set(renamed)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return transformers.activations.ACT2FN["gelu_new"](x)


def opendelta_adapter(h, tensors, host):
    """OpenDelta's AdapterLayer.post_forward, from the saved tensors."""
    down = f"{host}.adapter.modulelist.down_proj"
    up = f"{host}.adapter.modulelist.up_proj"
    z = gelu_new(h @ tensors[f"{down}.weight"].T + tensors[f"{down}.bias"])
    return h + z @ tensors[f"{up}.weight"].T + tensors[f"{up}.bias"]


def opendelta_low_rank(h, tensors, host):
    """OpenDelta's LowRankAdapter.post_forward: each weight the broadcast W_left * W_right."""

    def sampler(x, name):
        prefix = f"{host}.low_rank_adapter.{name}"
        weight = tensors[f"{prefix}.W_left"] * tensors[f"{prefix}.W_right"]
        return x @ weight + tensors[f"{prefix}.b"]

    return h + sampler(gelu_new(sampler(h, "down_sampler")), "up_sampler")


def opendelta_compacter(h, tensors, host):
    """OpenDelta's HyperComplexAdapterLayer: each weight sum_i kron(phm_rule[i], W[i])."""

    def sampler(x, name):
        prefix = f"{host}.compactor.{name}"
        blocks = tensors[f"{prefix}.W_left"] @ tensors[f"{prefix}.W_right"]
        rules = tensors[f"{prefix}.phm_rule"]
        weight = sum(torch.kron(rules[i], blocks[i]) for i in range(rules.shape[0]))
        return x @ weight + tensors[f"{prefix}.b"]

    return h + sampler(gelu_new(sampler(h, "down_sampler")), "up_sampler")


@pytest.mark.parametrize(
    "delta_type, delta_name, reference",
    [
        ("adapter", "adapter", opendelta_adapter),
        ("low_rank_adapter", "low_rank_adapter", opendelta_low_rank),
        ("compacter", "compacter", opendelta_compacter),
    ],
)
def test_loaded_adapters_compute_what_opendelta_computed(
    tmp_path, delta_type, delta_name, reference
):
    backbone = tiny_model("bert")
    arguments, tensors, _, _ = CASES[delta_type]()
    path = write_opendelta_checkpoint(
        tmp_path / "d", opendelta_config(delta_type, backbone, **arguments), tensors
    )
    AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    host = BERT_ATTENTION_OUTPUTS[1]
    h = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = getattr(backbone.get_submodule(host), delta_name)(h)
    torch.testing.assert_close(got, reference(h, tensors, host), rtol=1e-5, atol=1e-6)


def test_bitfit_biases_opendelta_added_to_layers_without_one(tmp_path):
    """OpenDelta registers a missing bias of a Linear as the layer's own `bias`, and puts a
    `bitfit` BiasLayer after any other module (RMSNorm)."""
    backbone = tiny_model("llama")
    hosts = [f"layers.{i}.self_attn.q_proj" for i in range(2)]
    norms = [f"layers.{i}.input_layernorm" for i in range(2)]
    shapes = {f"{host}.bias": (HIDDEN,) for host in hosts}
    shapes.update({f"{norm}.bitfit.bias": (HIDDEN,) for norm in norms})
    tensors = random_tensors(shapes, seed=6)
    config = opendelta_config("bitfit", backbone, modified_modules=["q_proj", "input_layernorm"])
    path = write_opendelta_checkpoint(tmp_path / "bitfit", config, tensors)
    delta_model = BitFitModel.from_finetuned(path, backbone)
    expected = {f"{host}.bitfit.bias" for host in hosts} | {f"{n}.bitfit.bias" for n in norms}
    assert set(delta_model.state_dict()) == expected
    for host in hosts:
        loaded = backbone.get_parameter(f"{host}.bitfit.bias")
        torch.testing.assert_close(loaded, tensors[f"{host}.bias"], rtol=0, atol=0)
    reference = tiny_model("llama")
    h = torch.randn(3, HIDDEN)
    with torch.no_grad():
        query = backbone.get_submodule(hosts[0])(h)
        plain = reference.get_submodule(hosts[0])(h)
    torch.testing.assert_close(query, plain + tensors[f"{hosts[0]}.bias"])


def test_a_classifier_head_in_the_checkpoint_loads_and_trains(tmp_path):
    backbone = tiny_model("bert", kind="classification")
    arguments, tensors, _, _ = lora_case()
    tensors = {f"bert.{name}": tensor for name, tensor in tensors.items()}
    head = random_tensors({"classifier.weight": (2, HIDDEN), "classifier.bias": (2,)}, seed=7)
    config = opendelta_config("lora", backbone, **arguments)
    path = write_opendelta_checkpoint(tmp_path / "head", config, {**tensors, **head})
    AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    for name, tensor in head.items():
        torch.testing.assert_close(backbone.get_parameter(name), tensor, rtol=0, atol=0)
        assert backbone.get_parameter(name).requires_grad
    assert not backbone.get_parameter("bert.pooler.dense.weight").requires_grad


def test_a_whole_state_dict_loads_with_the_backbone_frozen(tmp_path):
    """freeze_module(set_state_dict=False) leaves OpenDelta saving every backbone tensor."""
    source = tiny_model("bert", seed=3)
    arguments, tensors, _, _ = lora_case()
    whole = {**source.state_dict(), **tensors}
    path = write_opendelta_checkpoint(
        tmp_path / "whole", opendelta_config("lora", source, **arguments), whole
    )
    backbone = tiny_model("bert", seed=0)
    with pytest.warns(UserWarning, match="holds every tensor of the backbone"):
        AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    weight = "encoder.layer.0.attention.self.key.weight"
    torch.testing.assert_close(backbone.get_parameter(weight), source.get_parameter(weight))
    assert not backbone.get_parameter(weight).requires_grad
    assert backbone.get_parameter(f"{BERT_QUERIES[0]}.lora.lora_A").requires_grad


def test_default_modules_are_opendelta_s(tmp_path):
    """A config.json without modified_modules means OpenDelta's default targets."""
    backbone = tiny_model("bert")
    arguments, tensors, _, _ = adapter_case()
    del arguments["modified_modules"]
    shapes = {
        f"encoder.layer.{i}.output.dense.adapter.{inner}": tensor.shape
        for i in range(2)
        for inner, tensor in (
            (name.partition(".adapter.")[2], tensor)
            for name, tensor in tensors.items()
            if name.startswith(BERT_ATTENTION_OUTPUTS[0])
        )
    }
    tensors.update(random_tensors(shapes, seed=8))
    path = write_opendelta_checkpoint(
        tmp_path / "defaults", opendelta_config("adapter", backbone, **arguments), tensors
    )
    delta_model = AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    assert len(delta_model.attachments) == 4


def test_auto_delta_config_reads_an_opendelta_config(tmp_path):
    backbone = tiny_model("bert")
    arguments, tensors, _, _ = compacter_case()
    path = write_opendelta_checkpoint(
        tmp_path / "c", opendelta_config("compacter", backbone, **arguments), tensors
    )
    config = AutoDeltaConfig.from_finetuned(path)
    assert config.delta_type == "compacter"
    assert config.reduction_factor == 3
    assert config.modified_modules == ["attention.output.dense"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop(f"{BERT_QUERIES[1]}.lora.lora_B"), r"lacks delta tensors.*query\.lora"),
        (
            lambda t: t.update({"encoder.layer.0.attention.self.query.lora.extra": torch.ones(2)}),
            r"no parameter for: encoder\.layer\.0\.attention\.self\.query\.lora\.extra",
        ),
        (
            lambda t: t.update({f"{BERT_QUERIES[0]}.lora.lora_A": torch.zeros(5, HIDDEN)}),
            r"shapes that differ: .*query\.lora\.lora_A \(5, 36\)",
        ),
    ],
)
def test_unknown_missing_and_misshapen_tensors_are_refused_by_name(tmp_path, change, message):
    backbone = tiny_model("bert")
    before = outputs_of(backbone)
    arguments, tensors, _, _ = lora_case()
    change(tensors)
    path = write_opendelta_checkpoint(
        tmp_path / "bad", opendelta_config("lora", backbone, **arguments), tensors
    )
    with pytest.raises(ValueError, match=message):
        AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    torch.testing.assert_close(outputs_of(backbone), before, rtol=0, atol=0)
    assert not any("lora" in name for name, _ in backbone.named_parameters())


def test_opendelta_checkpoint_errors_name_the_file_and_the_fix(tmp_path):
    backbone = tiny_model("bert")
    arguments, tensors, _, _ = lora_case()
    config = opendelta_config("lora", backbone, **arguments)
    path = write_opendelta_checkpoint(tmp_path / "no_bin", config, tensors)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no pytorch_model\.bin"):
        AutoDeltaModel.from_finetuned(path, backbone_model=backbone)

    del config["lora_r"]
    path = write_opendelta_checkpoint(tmp_path / "no_r", config, tensors)
    with pytest.raises(ValueError, match="lacks lora_r"):
        AutoDeltaModel.from_finetuned(path, backbone_model=backbone)

    config = opendelta_config("lora", backbone, **arguments, backbone_class="GPT2Model")
    path = write_opendelta_checkpoint(tmp_path / "gpt2", config, tensors)
    with pytest.raises(ValueError, match="trained on a GPT2Model"):
        AutoDeltaModel.from_finetuned(path, backbone_model=backbone)

    config = opendelta_config("lora", backbone, **arguments)
    path = write_opendelta_checkpoint(tmp_path / "list", config, {"weights": [1, 2]})
    with pytest.raises(ValueError, match="does not hold a dict of tensors"):
        AutoDeltaModel.from_finetuned(path, backbone_model=backbone)


def test_pickled_objects_in_the_weights_file_are_refused(tmp_path):
    backbone = tiny_model("bert")
    arguments, tensors, _, _ = lora_case()
    path = write_opendelta_checkpoint(
        tmp_path / "p", opendelta_config("lora", backbone, **arguments), tensors
    )
    torch.save({"a": torch.ones(1), "b": warnings.WarningMessage}, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot be read"):
        AutoDeltaModel.from_finetuned(path, backbone_model=backbone)


def test_a_parallel_adapter_pair_on_one_module_loads(tmp_path):
    backbone = tiny_model("bert")
    shapes = {}
    for i in range(2):
        host = f"encoder.layer.{i}.attention"
        shapes[f"{host}.parallel_adapter.modulelist.down_proj.weight"] = (5, HIDDEN)
        shapes[f"{host}.parallel_adapter.modulelist.down_proj.bias"] = (5,)
        shapes[f"{host}.parallel_adapter.modulelist.up_proj.weight"] = (HIDDEN, 5)
        shapes[f"{host}.parallel_adapter.modulelist.up_proj.bias"] = (HIDDEN,)
    tensors = random_tensors(shapes, seed=9)
    arguments = {
        "bottleneck_dim": 5,
        "non_linearity": "gelu_new",
        "scaled": 0.5,
        "modified_modules": ["attention", "attention"],
    }
    path = write_opendelta_checkpoint(
        tmp_path / "pa", opendelta_config("parallel_adapter", backbone, **arguments), tensors
    )
    delta_model = ParallelAdapterModel.from_finetuned(path, backbone)
    assert delta_model.config.scaled == 0.5
    assert len(delta_model.state_dict()) == 8


def test_a_parallel_adapter_pair_across_two_modules_loads(tmp_path):
    """OpenDelta registers a cross-module adapter on both modules: its state dict holds the
    tensors under both names, which load into the one adapter on the output module."""
    shapes = {}
    for i in range(2):
        for host in (f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense"):
            shapes[f"{host}.parallel_adapter.modulelist.down_proj.weight"] = (5, HIDDEN)
            shapes[f"{host}.parallel_adapter.modulelist.down_proj.bias"] = (5,)
            shapes[f"{host}.parallel_adapter.modulelist.up_proj.weight"] = (HIDDEN, 5)
            shapes[f"{host}.parallel_adapter.modulelist.up_proj.bias"] = (HIDDEN,)
    tensors = random_tensors(shapes, seed=9)
    for name in list(tensors):  # the two names of one tensor hold one value
        if ".output.dense." in name and "attention" not in name:
            tensors[name] = tensors[name.replace(".output.dense.", ".intermediate.dense.")]
    arguments = {
        "bottleneck_dim": 5,
        "non_linearity": "gelu_new",
        "scaled": 0.5,
        "modified_modules": ["intermediate.dense", "[r]layer\\.\\d+\\.output\\.dense"],
    }
    path = write_opendelta_checkpoint(
        tmp_path / "pair",
        opendelta_config("parallel_adapter", tiny_model("bert"), **arguments),
        tensors,
    )
    delta_model = ParallelAdapterModel.from_finetuned(path, tiny_model("bert"))
    state = delta_model.state_dict()
    assert sorted(state) == sorted(
        f"encoder.layer.{i}.output.dense.parallel_adapter.{name}"
        for i in range(2)
        for name in ("down_weight", "down_bias", "up_weight", "up_bias")
    )
    assert torch.equal(
        state["encoder.layer.1.output.dense.parallel_adapter.down_weight"],
        tensors["encoder.layer.1.intermediate.dense.parallel_adapter.modulelist.down_proj.weight"],
    )

    arguments["modified_modules"] = ["intermediate.dense"]
    path = write_opendelta_checkpoint(
        tmp_path / "odd",
        opendelta_config("parallel_adapter", tiny_model("bert"), **arguments),
        tensors,
    )
    with pytest.raises(ValueError, match="odd number of entries"):
        AutoDeltaModel.from_finetuned(path, backbone_model=tiny_model("bert"))


def test_fastdelta_refuses_to_save_over_an_opendelta_checkpoint(tmp_path):
    backbone = tiny_model("bert")
    arguments, tensors, _, _ = lora_case()
    path = write_opendelta_checkpoint(
        tmp_path / "o", opendelta_config("lora", backbone, **arguments), tensors
    )
    delta_model = LoraModel(tiny_model("bert"), modified_modules=["query"])
    with pytest.raises(FileExistsError, match="holds an OpenDelta checkpoint"):
        delta_model.save_finetuned(path)


# The rest of the surface OpenDelta scripts use


def test_the_delta_model_gives_its_own_parameters_and_state_dict():
    model = tiny_model("bert")
    delta_model = LoraModel(backbone_model=model, modified_modules=["query"], lora_r=4)
    BitFitModel(backbone_model=model, modified_modules=["value"])  # another delta model
    delta_model.freeze_module()
    names = [name for name, _ in delta_model.named_parameters()]
    assert names == [f"{host}.lora.lora_{x}" for host in BERT_QUERIES for x in "AB"]
    assert [p.shape for p in delta_model.parameters()] == [(4, HIDDEN), (HIDDEN, 4)] * 2
    optimizer = torch.optim.AdamW(delta_model.parameters(), lr=1e-3)
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == 2 * 2 * 4 * HIDDEN

    state = delta_model.state_dict()
    assert list(state) == names
    assert not any(tensor.requires_grad for tensor in state.values())
    changed = {name: torch.full_like(tensor, 0.5) for name, tensor in state.items()}
    result = delta_model.load_state_dict(changed)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name in names:
        assert bool((model.get_parameter(name) == 0.5).all())

    with pytest.raises(RuntimeError, match=r"missing keys: .*layer\.1\.attention\.self\.query"):
        delta_model.load_state_dict({names[0]: changed[names[0]], names[1]: changed[names[1]]})
    with pytest.raises(RuntimeError, match=r"unexpected keys: pooler\.dense\.weight"):
        delta_model.load_state_dict({**changed, "pooler.dense.weight": torch.zeros(2)})
    result = delta_model.load_state_dict({"pooler.dense.weight": torch.zeros(2)}, strict=False)
    assert result.missing_keys == names and result.unexpected_keys == ["pooler.dense.weight"]
    with pytest.raises(RuntimeError, match=r"shapes that differ: .*lora_A: \(2, 2\) given"):
        delta_model.load_state_dict({**changed, names[0]: torch.zeros(2, 2)})


def test_bitfit_state_dict_holds_the_biases_it_trains():
    model = tiny_model("bert")
    delta_model = BitFitModel(backbone_model=model, modified_modules=["query"])
    assert list(delta_model.state_dict()) == [f"{host}.bias" for host in BERT_QUERIES]


def test_to_casts_the_deltas_only():
    model = tiny_model("bert")
    delta_model = AdapterModel(backbone_model=model, modified_modules=["output.dense"])
    assert delta_model.to(torch.float64) is delta_model
    assert {p.dtype for p in delta_model.parameters()} == {torch.float64}
    assert model.get_parameter("encoder.layer.0.output.dense.weight").dtype == torch.float32
    delta_model.to("cpu", dtype=torch.float32)
    assert {p.dtype for p in delta_model.parameters()} == {torch.float32}
    bitfit = BitFitModel(backbone_model=model, modified_modules=["query"])
    bitfit.to(torch.float64)
    assert model.get_parameter(f"{BERT_QUERIES[0]}.bias").dtype == torch.float64


def test_the_delta_model_still_refuses_to_be_called():
    delta_model = LoraModel(backbone_model=tiny_model("bert"), modified_modules=["query"])
    with pytest.raises(TypeError, match="is not called itself"):
        delta_model(torch.ones(1))


def test_detach_and_attach_twice_do_nothing_the_second_time():
    model = tiny_model("bert")
    plain = outputs_of(model)
    delta_model = AdapterModel(backbone_model=model, modified_modules=["output.dense"])
    with torch.no_grad():
        for parameter in delta_model.parameters():
            parameter.add_(0.1)
    modified = outputs_of(model)
    delta_model.attach()
    delta_model.detach()
    delta_model.detach()
    torch.testing.assert_close(outputs_of(model), plain, rtol=0, atol=0)
    delta_model.attach()
    delta_model.attach()
    torch.testing.assert_close(outputs_of(model), modified, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Nothing to detach"):
        delta_model.detach(model.get_submodule("embeddings"))


def test_inspect_module_statistics(capsys):
    from fastdelta.utils.inspect import inspect_module_statistics

    model = tiny_model("bert")
    delta_model = LoraModel(backbone_model=model, modified_modules=["query"], lora_r=4)
    delta_model.freeze_module()
    stat = inspect_module_statistics(model)
    total = sum(p.numel() for p in model.parameters())
    delta = 2 * 2 * 4 * HIDDEN
    assert stat["total_parameters"] == total
    assert stat["trainable_parameters"] == delta
    assert stat["delta_parameters"] == delta
    assert stat["trainable_ratio"] == delta / total == stat["delta_ratio"]
    assert stat["cudamem"] == stat["maxcudamem"] == 0.0 or torch.cuda.is_available()
    assert "'delta_parameters': 576" in capsys.readouterr().out
    inspect_module_statistics(model, verbose=False)
    assert capsys.readouterr().out == ""


def test_inspect_optimizer_statistics(capsys):
    from fastdelta.utils.inspect import inspect_optimizer_statistics

    model = tiny_model("bert")
    delta_model = LoraModel(backbone_model=model, modified_modules=["query"], lora_r=4)
    delta_model.freeze_module()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.embeddings.parameters())},
            {"params": list(delta_model.parameters()), "lr": 0.01},
        ],
        lr=1e-3,
    )
    stat = inspect_optimizer_statistics(optimizer)
    assert stat["total_parameters"] == stat["trainable_parameters"] == 576
    assert stat["trainable_ratio"] == "100.000000%"
    assert stat["lr"] == 0.01
    printed = capsys.readouterr().out
    assert printed.startswith("optimizer info: {'param_group_0': {")
    assert "'trainable_ratio': '0.000000%'" in printed


def test_visualization_imports_from_opendelta_s_path():
    from fastdelta import Visualization
    from fastdelta.utils.visualization import Visualization as FromUtils

    assert FromUtils is Visualization


BERT_MAPPING = {
    "encoder": {
        "__name__": "encoder",
        "layer": {
            "__name__": "block",
            "$": {
                "__name__": "$",
                "attention": {
                    "__name__": "attn",
                    "self.query": {"__name__": "q"},
                    "output.dense": {"__name__": "proj"},
                    "output.LayerNorm": {"__name__": ""},
                },
            },
        },
    },
}


def test_structure_graph_takes_opendelta_s_mapping():
    from rich.console import Console

    from fastdelta.utils.visualization import Visualization
    from fastdelta.visualization import mapping_names

    model = tiny_model("bert")
    names = mapping_names(model, BERT_MAPPING)
    assert names["encoder.layer.1.attention.self.query"] == ("encoder@.block@.1.attn@.q@",)
    assert names["encoder.layer.0.attention"] == ("encoder@.block@.0.attn@",)
    assert "encoder.layer.0.attention.output.LayerNorm" not in names
    assert "encoder.layer.0.attention.self" not in names
    tree = Visualization(model).structure_graph(
        common_structure=True, mapping=BERT_MAPPING, only_common=True, printTree=False
    )
    console = Console(width=200, color_system=None)
    with console.capture() as capture:
        console.print(tree)
    text = capture.get()
    assert "q@(Linear)" in text and "proj@(Linear)" in text
    assert "pooler" not in text
    with pytest.raises(ValueError, match="must be a dict with a '__name__'"):
        Visualization(model).structure_graph(
            common_structure=True, mapping={"encoder": {}}, printTree=False
        )


class OpenDeltaStyleAdapter(nn.Module):
    """A custom delta in OpenDelta's protocol: pre_forward reads (and here scales) the input,
    post_forward adds to the output."""

    def __init__(self, features: int):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.shift = nn.Parameter(torch.full((features,), 0.25))

    def pre_forward(self, *args, **kwargs):
        return (args[0] * self.scale, *args[1:]), kwargs

    def post_forward(self, output):
        return output + self.shift


def test_insert_sequential_module_runs_pre_forward_and_post_forward():
    model = tiny_model("bert")
    delta_model = LoraModel(backbone_model=model, modified_modules=["query"])
    host_name = "encoder.layer.0.output.dense"
    host = model.get_submodule(host_name)
    x = torch.randn(3, 52)
    with torch.no_grad():
        plain = host(x)
        delta_model.insert_sequential_module(host, OpenDeltaStyleAdapter(HIDDEN), "custom")
        torch.testing.assert_close(host(x), host.__class__.forward(host, 2 * x) + 0.25)
    assert f"{host_name}.custom.scale" in dict(delta_model.named_parameters())
    assert f"{host_name}.custom.shift" in dict(model.named_parameters())
    copied = copy.deepcopy(model).get_submodule(host_name)
    with torch.no_grad():
        copied.custom.shift.fill_(1.0)
        torch.testing.assert_close(copied(x), host.__class__.forward(host, 2 * x) + 1.0)
        delta_model.detach()
        torch.testing.assert_close(host(x), plain, rtol=0, atol=0)
        delta_model.attach()
        torch.testing.assert_close(host(x), host.__class__.forward(host, 2 * x) + 0.25)
