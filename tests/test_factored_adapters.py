"""LowRankAdapterModel and CompacterModel: OpenDelta's adapters with factored weights.

Each is checked against an eager reference written here in plain PyTorch from OpenDelta 0.3.2's
code (opendelta/delta_models/layers/low_rank_linear.py and hypercomplex_linear.py: y = x @ W + b
with W = W_left * W_right, or W = sum_i kron(C_i, W_i) through OpenDelta's batched Kronecker
product), run by forward hooks on a second copy of the backbone: outputs and every gradient
(the factors' and the backbone's) must agree on tiny BERT, GPT-2 and T5. The parameter counts
are the ones OpenDelta's layer classes give (computed with them for these configs).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
import transformers
from tiny_models import HIDDEN, INTERMEDIATE, first_output, tiny_inputs, tiny_model
from torch import nn

from fastdelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    CompacterConfig,
    CompacterModel,
    LowRankAdapterConfig,
    LowRankAdapterModel,
)
from fastdelta.layers.factored_adapter import FactoredAdapterDelta, LowRankSampler, PHMSampler

H = HIDDEN  # 36
ARCHITECTURES = ["bert", "gpt2", "t5"]
# Tiny models' hidden size 36 with Compacter's default reduction_factor 16 gives a bottleneck of
# 2, which OpenDelta's default hypercomplex_division 4 does not divide: the tests take n = 2.
COMPACTER_TINY = {"hypercomplex_division": 2}
# Delta models and arguments run against the reference: defaults, and every option away from
# its default somewhere.
CASES = {
    "low_rank_default": (LowRankAdapterModel, {}),
    "low_rank_rank2_relu": (
        LowRankAdapterModel,
        {"reduction_factor": 4, "low_rank_rank": 2, "low_rank_w_init": "glorot-normal",
         "non_linearity": "relu"},
    ),
    "compacter_default": (CompacterModel, COMPACTER_TINY),
    "compacter_factorized_rule": (
        CompacterModel,
        {"reduction_factor": 3, "hypercomplex_division": 4, "factorized_phm_rule": True,
         "phm_rank": 2, "use_bias_down_sampler": False, "kronecker_prod": True},
    ),
    "compacter_full_blocks": (
        CompacterModel,
        {"reduction_factor": 6, "hypercomplex_division": 3, "factorized_phm": False,
         "hypercomplex_nonlinearity": "normal", "phm_c_init": "uniform",
         "use_bias_up_sampler": False, "non_linearity": "silu"},
    ),
}  # fmt: skip
MODELS = {"low_rank_adapter": LowRankAdapterModel, "compacter": CompacterModel}
TINY_ARGUMENTS = {"low_rank_adapter": {}, "compacter": COMPACTER_TINY}


# --------------------------------------------------------------------------------------------
# OpenDelta's math, in plain PyTorch


def opendelta_activation(name: str):
    """OpenDelta's Activations(name).f for the names used here."""
    return {
        "gelu_new": lambda x: (
            0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
        ),
        "relu": torch.relu,
        "silu": lambda x: x * torch.sigmoid(x),
    }[name]


def opendelta_low_rank_linear(x, p: dict) -> torch.Tensor:
    """LowRankLinear.forward. OpenDelta forms W by broadcasting W_left * W_right, the outer
    product at rank 1; at a higher rank (where its broadcast fails) the reference takes the
    product of the factors, the rank-r weight it documents."""
    W_left, W_right = p["W_left"], p["W_right"]
    W = W_left * W_right if W_left.shape[1] == 1 else W_left @ W_right
    return torch.matmul(x, W) + p["b"]


def opendelta_kronecker_product(a, b) -> torch.Tensor:
    """hypercomplex_linear.kronecker_product: batched Kronecker products of matrices."""
    size = torch.Size(torch.tensor(a.shape[-2:]) * torch.tensor(b.shape[-2:]))
    result = a.unsqueeze(-1).unsqueeze(-3) * b.unsqueeze(-2).unsqueeze(-4)
    return result.reshape(result.shape[:-4] + size)


def opendelta_phm_linear(x, p: dict) -> torch.Tensor:
    """PHMLinear.forward with matvec_product: y = x @ sum_i kron(C_i, W_i) + b."""
    if "phm_rule_left" in p:
        rule = torch.bmm(p["phm_rule_left"], p["phm_rule_right"])
    else:
        rule = p["phm_rule"]
    W = torch.bmm(p["W_left"], p["W_right"]) if "W_left" in p else p["W"]
    H = opendelta_kronecker_product(rule, W).sum(0)
    y = torch.matmul(x, H)
    return y + p["b"] if "b" in p else y


def opendelta_adapter(hiddens, p: dict, linear, activation) -> torch.Tensor:
    """post_forward of OpenDelta's LowRankAdapter / HyperComplexAdapterLayer."""
    down = {name.split(".")[1]: v for name, v in p.items() if name.startswith("down_sampler.")}
    up = {name.split(".")[1]: v for name, v in p.items() if name.startswith("up_sampler.")}
    z = activation(linear(hiddens, down))
    return linear(z, up) + hiddens


def reference_model(architecture: str, delta_model, activation: str):
    """A second copy of the backbone with OpenDelta's adapters run by forward hooks on the same
    targets, from leaf copies of the delta model's factors: (model, {parameter name: copy})."""
    reference = tiny_model(architecture)
    act = opendelta_activation(activation)
    copies = {}
    for attachment in delta_model.attachments:
        delta = attachment.delta
        own = {
            name: parameter.detach().clone().requires_grad_()
            for name, parameter in delta.named_parameters()
        }
        prefix = f"{attachment.host_name}.{attachment.delta_name}."
        copies.update({prefix + name: copy for name, copy in own.items()})
        linear = (
            opendelta_low_rank_linear
            if isinstance(delta.down_sampler, LowRankSampler)
            else opendelta_phm_linear
        )
        reference.get_submodule(attachment.host_name).register_forward_hook(
            lambda module, args, output, own=own, linear=linear: opendelta_adapter(
                output, own, linear, act
            )
        )
    return reference, copies


def randomize_deltas(model: nn.Module, seed: int = 17) -> None:
    """Give every factor and bias a random value far from the initialisation (zero biases,
    small PHM rules), so every term of the adapters shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FactoredAdapterDelta):
                for parameter in module.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def forward_backward(model, inputs, seed: int = 18):
    output = first_output(model(**inputs))
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    (output * weights).sum().backward()
    return output.detach()


def assert_close_grad(got, expected, name):
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(
        got, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"grad of {name}: {m}"
    )


def delta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if ".low_rank_adapter." in name or ".compacter." in name
    }


# --------------------------------------------------------------------------------------------
# 1. The math: OpenDelta's reference, on every backend


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_output_and_every_gradient_match_opendelta_math(architecture, case):
    delta_class, arguments = CASES[case]
    model = tiny_model(architecture)  # in eval mode, as the reference: no dropout
    delta_model = delta_class(model, **arguments)
    randomize_deltas(model)
    activation = delta_model.config.non_linearity
    reference, copies = reference_model(architecture, delta_model, activation)
    inputs = tiny_inputs(architecture)
    output = forward_backward(model, inputs)
    expected = forward_backward(reference, inputs)

    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    deltas = delta_tensors(model)
    assert deltas.keys() == copies.keys()
    parameters = dict(model.named_parameters())
    for name, copy in copies.items():
        assert_close_grad(parameters[name].grad, copy.grad, name)
    for name, parameter in reference.named_parameters():
        if parameter.grad is not None:
            assert_close_grad(parameters[name].grad, parameter.grad, name)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("fast", ["triton", "cpp"])
@pytest.mark.parametrize("delta_type", MODELS)
def test_every_backend_runs_them_alike(use_backend, delta_type, fast):
    use_backend(fast)  # skips where the backend cannot run on CPU tensors
    model = tiny_model("bert")
    delta_model = MODELS[delta_type](model, **TINY_ARGUMENTS[delta_type])
    delta_model.freeze_module()
    randomize_deltas(model)
    inputs = tiny_inputs("bert")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def run_on(name):
        use_backend(name)
        assert delta_model.backends() == {name}
        model.zero_grad(set_to_none=True)
        output = forward_backward(model, inputs)
        return output, {name: p.grad.clone() for name, p in trainable}

    torch_output, torch_grads = run_on("torch")
    fast_output, fast_grads = run_on(fast)
    torch.testing.assert_close(fast_output, torch_output, rtol=1e-5, atol=1e-5)
    for name, grad in torch_grads.items():
        assert_close_grad(fast_grads[name], grad, name)


def test_the_fused_adapter_op_runs_them(monkeypatch):
    """The weights built from the factors go through ops.adapter_bottleneck, once per delta."""
    from fastdelta.layers import factored_adapter

    model = tiny_model("bert")
    delta_model = CompacterModel(model, **COMPACTER_TINY)
    calls = []
    original = factored_adapter.ops.adapter_bottleneck

    def spy(h, down_weight, down_bias, up_weight, *rest):
        calls.append((tuple(down_weight.shape), tuple(up_weight.shape)))
        return original(h, down_weight, down_bias, up_weight, *rest)

    monkeypatch.setattr(factored_adapter.ops, "adapter_bottleneck", spy)
    model(**tiny_inputs("bert"))
    assert calls == [((H // 16, H), (H, H // 16))] * len(delta_model.attachments)


@pytest.mark.parametrize("delta_type", MODELS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_zero_up_weight_leaves_the_backbone_output_exactly(architecture, delta_type):
    model = tiny_model(architecture)
    inputs = tiny_inputs(architecture)
    before = first_output(model(**inputs))
    MODELS[delta_type](model, **TINY_ARGUMENTS[delta_type])
    randomize_deltas(model)
    assert not torch.equal(first_output(model(**inputs)), before)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FactoredAdapterDelta):
                up = module.up_sampler
                # Zeroing one factor zeroes the whole product.
                (up.W_right if delta_type == "low_rank_adapter" else up.phm_rule).zero_()
                up.b.zero_()
    assert torch.equal(first_output(model(**inputs)), before)


# --------------------------------------------------------------------------------------------
# 2. Names, initialisation, counts


def test_parameter_names_and_shapes_are_opendeltas():
    model = tiny_model("bert")
    LowRankAdapterModel(model, reduction_factor=4, low_rank_rank=2)
    CompacterModel(model, reduction_factor=3, factorized_phm_rule=True)
    host = "encoder.layer.0.output.dense"
    shapes = {
        name.removeprefix(host + "."): tuple(parameter.shape)
        for name, parameter in model.named_parameters()
        if name.startswith(host + ".")
    }
    n, bottleneck = 4, H // 3
    assert shapes == {
        "weight": (H, INTERMEDIATE),
        "bias": (H,),
        "low_rank_adapter.down_sampler.W_left": (H, 2),
        "low_rank_adapter.down_sampler.W_right": (2, H // 4),
        "low_rank_adapter.down_sampler.b": (H // 4,),
        "low_rank_adapter.up_sampler.W_left": (H // 4, 2),
        "low_rank_adapter.up_sampler.W_right": (2, H),
        "low_rank_adapter.up_sampler.b": (H,),
        "compacter.down_sampler.phm_rule_left": (n, n, 1),
        "compacter.down_sampler.phm_rule_right": (n, 1, n),
        "compacter.down_sampler.W_left": (n, H // n, 1),
        "compacter.down_sampler.W_right": (n, 1, bottleneck // n),
        "compacter.down_sampler.b": (bottleneck,),
        "compacter.up_sampler.phm_rule_left": (n, n, 1),
        "compacter.up_sampler.phm_rule_right": (n, 1, n),
        "compacter.up_sampler.W_left": (n, bottleneck // n, 1),
        "compacter.up_sampler.W_right": (n, 1, H // n),
        "compacter.up_sampler.b": (H,),
    }


def test_initialisation_follows_opendelta():
    model = tiny_model("bert")
    LowRankAdapterModel(model)
    CompacterModel(model, **COMPACTER_TINY)
    for name, parameter in model.named_parameters():
        if name.endswith(".b"):
            assert not parameter.any(), name
        elif "phm_rule" in name:  # normal(0, 0.01)
            assert 0 < parameter.abs().max() < 0.05, name
        elif name.endswith((".W_left", ".W_right")):  # glorot-uniform, gain sqrt(2), per block
            block = parameter if parameter.dim() == 2 else parameter[0]
            bound = math.sqrt(2) * math.sqrt(6 / sum(block.shape))
            assert 0 < parameter.abs().max() <= bound, name


def low_rank_count(features: int, reduction_factor: int = 32, rank: int = 1) -> int:
    """Parameters of OpenDelta's LowRankAdapter: two LowRankLinear (factors and bias)."""
    m = features // reduction_factor
    return rank * (features + m) + m + rank * (m + features) + features


def compacter_count(features: int, reduction_factor: int = 16, n: int = 4) -> int:
    """Parameters of OpenDelta's default HyperComplexAdapterLayer: two PHMLinear, each with a
    rule [n, n, n], factorized rank-1 blocks and a bias."""
    m = features // reduction_factor
    return 2 * n**3 + (features + m) + m + (m + features) + features


@pytest.fixture
def bert_base():
    with torch.device("meta"):
        return transformers.BertModel(transformers.BertConfig())


@pytest.fixture
def t5_small():
    with torch.device("meta"):
        return transformers.T5Model(transformers.T5Config())


def test_opendelta_parameter_counts_on_bert_base(bert_base):
    low_rank = LowRankAdapterModel(bert_base)
    assert len(low_rank.attachments) == 24
    assert low_rank.num_delta_parameters() == 24 * low_rank_count(768) == 57_024
    low_rank.detach()
    compacter = CompacterModel(bert_base)
    assert compacter.num_delta_parameters() == 24 * compacter_count(768) == 61_824


def test_opendelta_parameter_counts_on_t5_small(t5_small):
    low_rank = LowRankAdapterModel(t5_small)
    assert len(low_rank.attachments) == 24  # self-attention o and FF wo, encoder and decoder
    assert low_rank.num_delta_parameters() == 24 * low_rank_count(512) == 38_016
    low_rank.detach()
    compacter = CompacterModel(t5_small)
    assert compacter.num_delta_parameters() == 24 * compacter_count(512) == 42_240


@pytest.mark.parametrize(
    ("architecture", "targets"), [("bert", 4), ("gpt2", 4), ("t5", 8)], ids=["bert", "gpt2", "t5"]
)
def test_trainable_counts_on_tiny_models(architecture, targets):
    model = tiny_model(architecture)
    low_rank = LowRankAdapterModel(model)
    low_rank.freeze_module()
    assert low_rank.num_trainable_parameters() == targets * low_rank_count(H) == targets * 111
    low_rank.detach()
    compacter = CompacterModel(model, **COMPACTER_TINY)
    compacter.freeze_module()
    expected = targets * compacter_count(H, n=2)
    assert compacter.num_trainable_parameters() == expected == targets * 130


def test_options_change_the_counts_as_in_opendelta():
    # Counts of OpenDelta's PHMLinear pairs on 36 -> 12 -> 36 features, n = 4.
    for arguments, per_delta in [
        ({}, 272),
        ({"phm_rank": 2, "factorized_phm_rule": True}, 304),
        ({"factorized_phm": False}, 392),
        ({"use_bias_down_sampler": False, "use_bias_up_sampler": False}, 272 - 12 - H),
    ]:
        model = tiny_model("bert")
        delta_model = CompacterModel(model, reduction_factor=3, **arguments)
        assert delta_model.num_delta_parameters() == 4 * per_delta, arguments


def test_learn_phm_false_keeps_the_rules_frozen_as_opendelta():
    model = tiny_model("bert")
    delta_model = CompacterModel(model, learn_phm=False, **COMPACTER_TINY)
    delta_model.freeze_module()
    rules = {name for name, _ in model.named_parameters() if "phm_rule" in name}
    trainable = set(delta_model.trainable_parameters_names())
    assert rules and not rules & trainable
    assert delta_model.num_trainable_parameters() == 4 * (130 - 2 * 2**3)
    first_output(model(**tiny_inputs("bert"))).sum().backward()
    assert all(model.get_parameter(name).grad is None for name in rules)


# --------------------------------------------------------------------------------------------
# 3. The delta-model contract


@pytest.mark.parametrize("delta_type", MODELS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_detach_and_attach_are_exact(architecture, delta_type):
    model = tiny_model(architecture)
    inputs = tiny_inputs(architecture)
    plain = first_output(model(**inputs))
    delta_model = MODELS[delta_type](model, **TINY_ARGUMENTS[delta_type])
    randomize_deltas(model)
    modified = first_output(model(**inputs))
    for _ in range(2):
        delta_model.detach()
        assert torch.equal(first_output(model(**inputs)), plain)
        delta_model.attach()
        assert torch.equal(first_output(model(**inputs)), modified)


def test_they_compose_with_a_plain_adapter_on_the_same_modules():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    adapter = AdapterModel(model)
    low_rank = LowRankAdapterModel(model)
    compacter = CompacterModel(model, **COMPACTER_TINY)
    assert {a.host_name for a in adapter.attachments} == {
        a.host_name for a in compacter.attachments
    }
    with_all = first_output(model(**inputs))
    low_rank.detach()
    assert not torch.equal(first_output(model(**inputs)), with_all)
    low_rank.attach()
    assert torch.equal(first_output(model(**inputs)), with_all)


@pytest.mark.parametrize("delta_type", MODELS)
def test_they_take_the_backbone_dtype_or_delta_dtype(delta_type):
    model = tiny_model("bert").to(torch.bfloat16)
    MODELS[delta_type](model, **TINY_ARGUMENTS[delta_type])
    deltas = delta_tensors(model)
    assert {tensor.dtype for tensor in deltas.values()} == {torch.bfloat16}
    assert first_output(model(**tiny_inputs("bert"))).dtype == torch.bfloat16
    model = tiny_model("bert").to(torch.bfloat16)
    MODELS[delta_type](model, delta_dtype=torch.float32, **TINY_ARGUMENTS[delta_type])
    assert {tensor.dtype for tensor in delta_tensors(model).values()} == {torch.float32}
    assert first_output(model(**tiny_inputs("bert"))).dtype == torch.bfloat16


@pytest.mark.parametrize("config_class", [LowRankAdapterConfig, CompacterConfig])
def test_config_defaults_equal_the_constructor_defaults(config_class):
    model_class = MODELS[config_class.delta_type]
    parameters = inspect.signature(model_class.__init__).parameters
    fields = {field.name: field.default for field in dataclasses.fields(config_class)}
    assert set(fields) == set(parameters) - {"self", "backbone_model"}
    for name, default in fields.items():
        assert parameters[name].default == default, name


def test_opendelta_defaults():
    expected = {
        "reduction_factor": 32,
        "non_linearity": "gelu_new",
        "low_rank_w_init": "glorot-uniform",
        "low_rank_rank": 1,
    }
    config = dataclasses.asdict(LowRankAdapterConfig())
    assert {name: config[name] for name in expected} == expected
    expected = {
        "reduction_factor": 16,
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
    config = dataclasses.asdict(CompacterConfig())
    assert {name: config[name] for name in expected} == expected
    # OpenDelta's positional order: the common arguments come first in CompacterModel.
    names = list(inspect.signature(CompacterModel.__init__).parameters)
    assert names[:9] == [
        "self",
        "backbone_model",
        "modified_modules",
        "exclude_modules",
        "unfrozen_modules",
        "common_structure",
        "interactive_modify",
        "backend",
        "reduction_factor",
    ]
    assert LowRankAdapterModel.default_modified_modules == ("attn@.proj@", "ff@.w2@")
    assert CompacterModel.default_modified_modules == ("attn@.proj@", "ff@.w2@")


@pytest.mark.parametrize("config_class", [LowRankAdapterConfig, CompacterConfig])
def test_config_round_trips_through_json(config_class):
    config = config_class(reduction_factor=4, modified_modules=["output.dense"])
    again = config_class.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.to_dict()["delta_type"] == config_class.delta_type


def test_auto_delta_config_and_model_build_them():
    config = AutoDeltaConfig.from_dict({"delta_type": "compacter", "hypercomplex_division": 2})
    assert isinstance(config, CompacterConfig)
    assert config.hypercomplex_division == 2
    delta_model = AutoDeltaModel.from_config(config, tiny_model("bert"))
    assert type(delta_model) is CompacterModel
    config = AutoDeltaConfig.from_dict({"delta_type": "low_rank_adapter", "low_rank_rank": 2})
    assert isinstance(config, LowRankAdapterConfig)
    delta_model = AutoDeltaModel.from_config(config.to_dict(), tiny_model("bert"))
    assert type(delta_model) is LowRankAdapterModel


@pytest.mark.parametrize("delta_type", MODELS)
def test_save_and_load_round_trip(delta_type, tmp_path):
    arguments = {**TINY_ARGUMENTS[delta_type], "modified_modules": ["output.dense"]}
    if delta_type == "compacter":
        arguments["learn_phm"] = False
    model = tiny_model("bert", "classification")
    delta_model = MODELS[delta_type](model, **arguments)
    delta_model.freeze_module()
    randomize_deltas(model)
    inputs = tiny_inputs("bert", "classification")
    expected = first_output(model(**inputs))
    path = delta_model.save_finetuned(tmp_path / "checkpoint")
    config = json.loads((path / "config.json").read_text())
    saved = set(delta_tensors(model))
    # With learn_phm=False the rules are saved as frozen tensors, the rest as trainable ones.
    rules = {name for name in saved if "phm_rule" in name}
    assert rules or delta_type == "low_rank_adapter"
    assert config["frozen_tensors"] == sorted(rules)

    fresh = tiny_model("bert", "classification")
    loaded = AutoDeltaModel.from_finetuned(path, backbone_model=fresh)
    assert type(loaded) is MODELS[delta_type]
    assert loaded.config == delta_model.config
    assert torch.equal(first_output(fresh(**inputs)), expected)
    reloaded = delta_tensors(fresh)
    assert reloaded.keys() == saved
    trainable = {name for name, p in fresh.named_parameters() if p.requires_grad}
    assert saved & trainable == saved - rules


# --------------------------------------------------------------------------------------------
# 4. Bad arguments, refused by name


@pytest.mark.parametrize(
    ("delta_class", "arguments", "message"),
    [
        (LowRankAdapterModel, {"reduction_factor": 0}, "reduction_factor"),
        (LowRankAdapterModel, {"reduction_factor": 2.5}, "reduction_factor"),
        (LowRankAdapterModel, {"low_rank_rank": 0}, "low_rank_rank"),
        (LowRankAdapterModel, {"low_rank_w_init": "xavier"}, "low_rank_w_init"),
        (LowRankAdapterModel, {"non_linearity": "tanhh"}, "non_linearity"),
        (LowRankAdapterModel, {"reduction_factor": 64}, r"reduction_factor=64 .*at most 36"),
        (CompacterModel, {}, r"hypercomplex_division=4: choose a reduction_factor such as 9"),
        (CompacterModel, {"hypercomplex_division": 5}, r"hypercomplex_division that divides 36"),
        (CompacterModel, {"hypercomplex_division": 0}, "hypercomplex_division"),
        (CompacterModel, {"phm_rank": -1}, "phm_rank"),
        (CompacterModel, {"phm_c_init": "zeros"}, "phm_c_init"),
        (CompacterModel, {"hypercomplex_nonlinearity": "phm"}, "hypercomplex_nonlinearity"),
        (CompacterModel, {"hypercomplex_nonlinearity": "he"}, "hypercomplex_nonlinearity"),
        (CompacterModel, {"shared_phm_rule": True}, "shared_phm_rule"),
        (CompacterModel, {"shared_W_phm": True}, "shared_W_phm"),
        (CompacterModel, {"learn_phm": "false"}, "learn_phm"),
        (CompacterModel, {"factorized_phm": 1}, "factorized_phm"),
        (CompacterModel, {"kronecker_prod": "yes"}, "kronecker_prod"),
        (CompacterModel, {"phm_init_range": -0.1}, "phm_init_range"),
        (CompacterModel, {"phm_init_range": float("nan")}, "phm_init_range"),
    ],
)
def test_bad_arguments_are_refused_by_name(delta_class, arguments, message):
    model = tiny_model("bert")
    before = [name for name, _ in model.named_parameters()]
    with pytest.raises((ValueError, TypeError), match=message):
        delta_class(model, **arguments)
    assert [name for name, _ in model.named_parameters()] == before


def test_samplers_refuse_sizes_that_do_not_split():
    with pytest.raises(ValueError, match="hypercomplex_division=4"):
        PHMSampler(
            36, 6, 4, bias=True, w_init="glorot-uniform", c_init="normal", learn_phm=True,
            factorized_phm=True, factorized_phm_rule=False, phm_rank=1, phm_init_range=1e-4,
        )  # fmt: skip
