"""Injection: the three operations, and what a backbone keeps and survives with deltas in it.

Covers name-addressed injection: the host keeps its class name, forward signature
and docstring; the backbone's own parameter names never change; deltas survive dtype casts,
deepcopy, pickling, DataParallel replication, gradient checkpointing and torch.compile; and
detach()/attach() restore the backbone exactly.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import pickle
from collections import namedtuple

import pytest
import torch
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from fastdelta import (
    AdapterModel,
    BaseDeltaConfig,
    BitFitModel,
    DeltaBase,
    LoraModel,
    ParallelAdapterModel,
)
from fastdelta.layers.base import (
    ATTACHED_DELTAS,
    DeltaLayer,
    attached_deltas,
    delta_parameter_names,
)
from fastdelta.layers.lora import LoraDelta

ARCHITECTURES = ("bert", "gpt2", "llama", "t5")
DELTA_MODELS = (LoraModel, AdapterModel, ParallelAdapterModel, BitFitModel)
DELTA_NAMES = {
    LoraModel: "lora",
    AdapterModel: "adapter",
    ParallelAdapterModel: "parallel_adapter",
    BitFitModel: "bitfit",
}
FIRST_LAYER = {
    "bert": "encoder.layer.0",
    "gpt2": "h.0",
    "llama": "layers.0",
    "t5": "encoder.block.0",
}
IN_FEATURES, OUT_FEATURES = 5, 7

by_architecture = pytest.mark.parametrize("architecture", ARCHITECTURES)
by_delta_model = pytest.mark.parametrize("delta_class", DELTA_MODELS, ids=lambda cls: cls.__name__)


class ManualDeltas(DeltaBase):
    """A delta model that attaches nothing itself: the tests call its three operations."""

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        pass


def manual_deltas(backbone: nn.Module, host_name: str) -> ManualDeltas:
    return ManualDeltas(backbone, BaseDeltaConfig(modified_modules=[host_name]))


ATTACH = {
    "replace": lambda deltas, host, delta: deltas.replace_module(host, delta),
    "after": lambda deltas, host, delta: deltas.insert_sequential_module(host, delta),
    "before": lambda deltas, host, delta: deltas.insert_sequential_module(
        host, delta, position="before"
    ),
    "parallel": lambda deltas, host, delta: deltas.insert_parallel_module(host, delta),
}


def attach_to(host: nn.Module, role: str, delta: nn.Module) -> ManualDeltas:
    """Attach `delta` to `host` (the only module of a one-module backbone) in `role`."""
    backbone = nn.ModuleDict({"host": host})
    deltas = manual_deltas(backbone, "host")
    ATTACH[role](deltas, host, delta)
    return deltas


class ResidualMix(DeltaLayer):
    """A DeltaLayer in parallel: gets the host's input and output, returns the new output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, OUT_FEATURES)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return 0.5 * residual + self.proj(h)


def outputs_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(**inputs))


def perturb_deltas(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every delta parameter (LoRA's zero lora_B, BitFit's biases) a random nudge in place,
    as training would, so that every delta changes the output."""
    generator = torch.Generator().manual_seed(seed)
    names = delta_parameter_names(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in names:
                noise = torch.randn(parameter.shape, generator=generator) * std
                parameter.add_(noise.to(parameter.dtype))


def injected(architecture: str, delta_class: type[DeltaBase], **kwargs):
    model = tiny_model(architecture)
    return model, delta_class(model, **kwargs)


def assert_differs(actual: torch.Tensor, other: torch.Tensor, margin: float = 1e-3) -> None:
    difference = (actual.float() - other.float()).abs().max().item()
    assert difference > margin, f"outputs differ by only {difference:g}"


# 1. The three operations, on a small custom model


def _expect_replace(base, delta, x):
    return delta(x)


def _expect_after(base, delta, x):
    return delta(base(x))


def _expect_before(base, delta, x):
    return base(delta(x))


def _expect_parallel(base, delta, x):
    return base(x) + delta(x)


def _expect_parallel_delta_layer(base, delta, x):
    return delta(x, base(x))


OPERATIONS = {
    "replace": ("replace", lambda: nn.Linear(IN_FEATURES, OUT_FEATURES), _expect_replace),
    "after": ("after", lambda: nn.Linear(OUT_FEATURES, OUT_FEATURES), _expect_after),
    "before": ("before", lambda: nn.Linear(IN_FEATURES, IN_FEATURES), _expect_before),
    "parallel": ("parallel", lambda: nn.Linear(IN_FEATURES, OUT_FEATURES), _expect_parallel),
    "parallel-delta-layer": ("parallel", ResidualMix, _expect_parallel_delta_layer),
}


@pytest.mark.parametrize("host_given_as", ["object", "name"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_operation_computes_its_formula(operation, host_given_as):
    role, make_delta, expected_output = OPERATIONS[operation]
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(IN_FEATURES, OUT_FEATURES), nn.Tanh())
    base = copy.deepcopy(backbone[0])
    delta = make_delta()
    deltas = manual_deltas(backbone, "0")
    ATTACH[role](deltas, backbone[0] if host_given_as == "object" else "0", delta)
    x = torch.randn(3, IN_FEATURES)

    with torch.no_grad():
        expected = torch.tanh(expected_output(base, delta, x))
        torch.testing.assert_close(backbone(x), expected, rtol=0, atol=0)
    assert backbone[0]._modules["delta"] is delta


# 2. The host keeps its class name, signature and docstring


@by_delta_model
@by_architecture
def test_host_keeps_class_name_signature_and_docstring(architecture, delta_class):
    model = tiny_model(architecture)
    original_classes = {name: type(module) for name, module in model.named_modules()}
    delta_model = delta_class(model)

    for attachment in delta_model.attachments:
        host = model.get_submodule(attachment.host_name)
        original = original_classes[attachment.host_name]
        assert type(host).__name__ == original.__name__
        assert type(host).__qualname__ == original.__qualname__
        assert isinstance(host, original)
        assert inspect.signature(host.forward) == inspect.signature(original.forward.__get__(host))
        assert type(host).forward.__doc__ == original.forward.__doc__
        assert type(host).__doc__ == original.__doc__


@by_delta_model
@by_architecture
def test_detaching_every_delta_restores_the_original_classes(architecture, delta_class):
    model = tiny_model(architecture)
    original_classes = {name: type(module) for name, module in model.named_modules()}
    delta_class(model).detach()

    assert {name: type(module) for name, module in model.named_modules()} == original_classes
    for module in model.modules():
        assert ATTACHED_DELTAS not in vars(module)
        assert not hasattr(module, ATTACHED_DELTAS)


# 3. The backbone's own parameter and buffer names never change


@by_delta_model
@by_architecture
def test_backbone_parameter_and_buffer_names_never_change(architecture, delta_class):
    model = tiny_model(architecture)
    keys_before = set(model.state_dict())
    parameters_before = {name for name, _ in model.named_parameters()}
    buffers_before = {name for name, _ in model.named_buffers()}
    delta_class(model)

    keys_after = set(model.state_dict())
    assert keys_before <= keys_after
    assert parameters_before <= {name for name, _ in model.named_parameters()}
    assert buffers_before <= {name for name, _ in model.named_buffers()}
    delta_segment = f".{DELTA_NAMES[delta_class]}."
    assert all(delta_segment in key for key in keys_after - keys_before)


@by_delta_model
@by_architecture
def test_state_dict_saved_before_injection_loads_after_it(architecture, delta_class):
    model = tiny_model(architecture)
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    delta_class(model)
    delta_keys = set(model.state_dict()) - set(saved)

    result = model.load_state_dict(saved, strict=False)

    assert sorted(result.missing_keys) == sorted(delta_keys)
    assert result.unexpected_keys == []


# 4. Surviving dtype casts, deepcopy, pickling and DataParallel replication

# Absolute tolerance of each cast's output against the float32 one; each is below the smallest
# change the perturbed deltas make to an output (0.13, BERT with LoRA), which the test checks.
DTYPE_CASTS = {
    "float64": (torch.float64, lambda model: model.to(torch.float64), 1e-5),
    "half": (torch.float16, nn.Module.half, 1e-2),
    "bfloat16": (torch.bfloat16, nn.Module.bfloat16, 8e-2),
}


@pytest.mark.parametrize("cast", DTYPE_CASTS)
@by_delta_model
@by_architecture
def test_deltas_follow_dtype_casts(architecture, delta_class, cast):
    dtype, convert, tolerance = DTYPE_CASTS[cast]
    model, _ = injected(architecture, delta_class)
    perturb_deltas(model)
    inputs = tiny_inputs(architecture)
    expected = outputs_of(model, inputs)
    assert_differs(expected, outputs_of(tiny_model(architecture), inputs), margin=tolerance)

    convert(model)

    parameters = dict(model.named_parameters())
    assert {parameters[name].dtype for name in delta_parameter_names(model)} == {dtype}
    output = outputs_of(model, inputs)
    assert output.dtype == dtype
    torch.testing.assert_close(output.float(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("cast", DTYPE_CASTS)
@by_architecture
def test_lora_changes_the_output_after_dtype_casts(architecture, cast):
    _, convert, _ = DTYPE_CASTS[cast]
    model, _ = injected(architecture, LoraModel)
    for module in model.modules():
        if isinstance(module, LoraDelta):
            nn.init.normal_(module.lora_B)
    inputs = tiny_inputs(architecture)

    base_output = outputs_of(convert(tiny_model(architecture)), inputs)
    assert_differs(outputs_of(convert(model), inputs), base_output, margin=0.1)


@by_delta_model
@by_architecture
def test_deepcopy_has_its_own_deltas(architecture, delta_class):
    model, delta_model = injected(architecture, delta_class)
    perturb_deltas(model)
    inputs = tiny_inputs(architecture)
    original_output = outputs_of(model, inputs)

    duplicate = copy.deepcopy(model)
    for attachment in delta_model.attachments:
        copied_delta = duplicate.get_submodule(attachment.host_name)._modules[attachment.delta_name]
        assert copied_delta is not attachment.delta
    torch.testing.assert_close(outputs_of(duplicate, inputs), original_output, rtol=0, atol=0)
    copied_parameters = dict(duplicate.named_parameters())
    with torch.no_grad():
        for name in delta_parameter_names(model):
            copied_parameters[name].mul_(2)

    assert_differs(outputs_of(duplicate, inputs), original_output)
    torch.testing.assert_close(outputs_of(model, inputs), original_output, rtol=0, atol=0)


@by_delta_model
@by_architecture
def test_pickle_round_trip_gives_identical_outputs(architecture, delta_class):
    model, _ = injected(architecture, delta_class)
    perturb_deltas(model)
    inputs = tiny_inputs(architecture)

    restored = pickle.loads(pickle.dumps(model))

    assert_differs(outputs_of(model, inputs), outputs_of(tiny_model(architecture), inputs))
    torch.testing.assert_close(
        outputs_of(restored, inputs), outputs_of(model, inputs), rtol=0, atol=0
    )


def _broadcast_by_cloning(tensors, devices, detach=False):
    """CPU stand-in for the broadcast in `replicate`: one clone of each tensor per device."""
    return [
        [tensor.detach().clone() if detach else tensor.clone() for tensor in tensors]
        for _ in devices
    ]


@pytest.fixture
def replicate_on_cpu(monkeypatch):
    """torch.nn.parallel.replicate, its own code run as is, with the CUDA broadcast of the
    parameters and buffers replaced by clones on the CPU."""
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", _broadcast_by_cloning)
    # Device 0 only names the one replica: the clones stay on the CPU.
    return lambda network: replicate_module.replicate(network, [0])[0]


def _scale_in_replica(replica: nn.Module, parameter_name: str, factor: float) -> None:
    # A replica holds its parameters as plain tensors (broadcast copies), set as attributes.
    owner_name, _, attribute = parameter_name.rpartition(".")
    owner = replica.get_submodule(owner_name)
    setattr(owner, attribute, getattr(owner, attribute) * factor)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@by_delta_model
@by_architecture
def test_data_parallel_replica_runs_its_own_delta_parameters(
    architecture, delta_class, replicate_on_cpu
):
    model, _ = injected(architecture, delta_class)
    perturb_deltas(model)
    inputs = tiny_inputs(architecture)
    original_output = outputs_of(model, inputs)
    names = delta_parameter_names(model)

    replica = replicate_on_cpu(model)
    torch.testing.assert_close(outputs_of(replica, inputs), original_output, rtol=0, atol=0)
    for name in names:
        _scale_in_replica(replica, name, 2.0)
    reference = copy.deepcopy(model)
    reference_parameters = dict(reference.named_parameters())
    with torch.no_grad():
        for name in names:
            reference_parameters[name].mul_(2.0)

    replica_output = outputs_of(replica, inputs)
    assert_differs(replica_output, original_output)
    torch.testing.assert_close(replica_output, outputs_of(reference, inputs), rtol=0, atol=0)
    torch.testing.assert_close(outputs_of(model, inputs), original_output, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@by_delta_model
def test_data_parallel_on_gpus_matches_the_single_module(delta_class):
    devices = list(range(torch.cuda.device_count()))
    model, delta_model = injected("llama", delta_class)
    perturb_deltas(model)
    delta_model.freeze_module()
    model.cuda()
    inputs = {
        key: value.cuda() for key, value in tiny_inputs("llama", batch=2 * len(devices)).items()
    }
    inputs["use_cache"] = False  # DataParallel cannot gather a key-value cache
    expected = first_output(model(**inputs))
    expected.square().mean().backward()
    expected_gradients = {
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    model.zero_grad()

    # One GPU: DataParallel calls the module itself, so replicate explicitly as well.
    for replica in torch.nn.parallel.replicate(model, devices):
        torch.testing.assert_close(outputs_of(replica, inputs), expected.detach())
    output = first_output(nn.DataParallel(model, device_ids=devices)(**inputs))
    torch.testing.assert_close(output, expected)
    output.square().mean().backward()
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(model.get_parameter(name).grad, gradient)


# 5. detach() and attach() restore exactly


@by_delta_model
@by_architecture
def test_detach_and_attach_round_trip_exactly(architecture, delta_class):
    model = tiny_model(architecture)
    inputs = tiny_inputs(architecture)
    backbone_output = outputs_of(model, inputs)
    backbone_names = {name for name, _ in model.named_parameters()}
    delta_model = delta_class(model)
    perturb_deltas(model)
    delta_output = outputs_of(model, inputs)
    delta_names = {name for name, _ in model.named_parameters()} - backbone_names
    assert_differs(delta_output, backbone_output)

    delta_model.detach()
    torch.testing.assert_close(outputs_of(model, inputs), backbone_output, rtol=0, atol=0)
    assert {name for name, _ in model.named_parameters()} == backbone_names

    delta_model.attach()
    torch.testing.assert_close(outputs_of(model, inputs), delta_output, rtol=0, atol=0)
    assert {name for name, _ in model.named_parameters()} == backbone_names | delta_names


@by_delta_model
def test_detaching_twice_does_nothing_the_second_time(delta_class):
    model, delta_model = injected("llama", delta_class)
    delta_model.detach()
    names = {name for name, _ in model.named_parameters()}
    delta_model.detach()
    assert {name for name, _ in model.named_parameters()} == names
    with pytest.raises(RuntimeError, match=f"Nothing to detach.*{delta_class.__name__}"):
        delta_model.detach(model.get_submodule("embed_tokens"))


@by_delta_model
@by_architecture
def test_detach_of_a_submodule_detaches_only_the_deltas_inside_it(architecture, delta_class):
    model, delta_model = injected(architecture, delta_class)
    layer_name = FIRST_LAYER[architecture]
    inside = {a.host_name for a in delta_model.attachments if a.host_name.startswith(layer_name)}
    assert inside
    assert inside != {a.host_name for a in delta_model.attachments}

    delta_model.detach(module=model.get_submodule(layer_name))

    for attachment in delta_model.attachments:
        names = [name for name, _ in attached_deltas(model.get_submodule(attachment.host_name))]
        assert (attachment.delta_name in names) == (attachment.host_name not in inside)
        assert attachment.attached == (attachment.host_name not in inside)


@pytest.mark.parametrize("architecture", ["bert", "gpt2"])  # llama and t5 have no biases
def test_bitfit_detach_restores_the_original_biases_and_attach_the_trained_ones(architecture):
    model, delta_model = injected(architecture, BitFitModel)
    trained_in_place = {
        a.host_name + ".bias" for a in delta_model.attachments if a.delta.host_parameter_names
    }
    assert trained_in_place
    original = {name: model.get_parameter(name).detach().clone() for name in trained_in_place}
    perturb_deltas(model)
    trained = {name: model.get_parameter(name).detach().clone() for name in trained_in_place}

    delta_model.detach()
    for name in trained_in_place:
        assert torch.equal(model.get_parameter(name), original[name])
    delta_model.attach()
    for name in trained_in_place:
        assert torch.equal(model.get_parameter(name), trained[name])


# 6. Host outputs and inputs

Result = namedtuple("Result", ["hidden", "extra"])
OUTPUT_PACKERS = {
    "tuple": lambda hidden, extra: (hidden, extra),
    "list": lambda hidden, extra: [hidden, extra],
    "namedtuple": Result,
    "model_output": lambda hidden, extra: BaseModelOutput(
        last_hidden_state=hidden, attentions=extra
    ),
    "dict_of_non_tensors": lambda hidden, extra: {"count": 3, "extra": extra},
    "int": lambda hidden, extra: 3,
}


class PackedOutput(nn.Module):
    """A host whose output is its hidden state packed with an extra item."""

    def __init__(self, packing: str):
        super().__init__()
        self.dense = nn.Linear(IN_FEATURES, IN_FEATURES)
        self.packing = packing
        self.extra = (torch.arange(3.0),)

    def forward(self, x: torch.Tensor):
        return OUTPUT_PACKERS[self.packing](self.dense(x), self.extra)


@pytest.mark.parametrize("role", ["after", "parallel"])
@pytest.mark.parametrize("packing", ["tuple", "list", "namedtuple", "model_output"])
def test_host_output_keeps_its_type_and_extra_items(packing, role):
    torch.manual_seed(0)
    host = PackedOutput(packing)
    base = copy.deepcopy(host)
    delta = nn.Linear(IN_FEATURES, IN_FEATURES)
    attach_to(host, role, delta)
    x = torch.randn(3, IN_FEATURES)

    with torch.no_grad():
        output, base_output = host(x), base(x)
        expected = _expect_after(base.dense, delta, x) if role == "after" else base(x)[0] + delta(x)
    assert type(output) is type(base_output)
    assert len(output) == len(base_output)
    torch.testing.assert_close(output[0], expected, rtol=0, atol=0)
    assert output[1] is host.extra


@pytest.mark.parametrize("role", ["after", "parallel"])
@pytest.mark.parametrize(
    "packing",
    [
        "dict_of_non_tensors",
        "int",
    ],
)
def test_host_output_a_delta_cannot_modify_raises_naming_the_host(packing, role):
    host = PackedOutput(packing)
    attach_to(host, role, nn.Linear(IN_FEATURES, IN_FEATURES))
    with pytest.raises(TypeError, match="PackedOutput returned"):
        host(torch.randn(3, IN_FEATURES))


class KeywordInput(nn.Module):
    """A host with a named first input and a second, optional one (as attention modules)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(IN_FEATURES, OUT_FEATURES)

    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.dense(hidden_states) * scale


@pytest.mark.parametrize("operation", ["before", "parallel", "parallel-delta-layer", "replace"])
def test_first_input_given_by_keyword_reaches_the_deltas(operation):
    role, make_delta, expected_output = OPERATIONS[operation]
    torch.manual_seed(0)
    host = KeywordInput()
    base = copy.deepcopy(host)
    delta = make_delta()
    attach_to(host, role, delta)
    x = torch.randn(3, IN_FEATURES)

    with torch.no_grad():
        expected = expected_output(base, delta, x)
        torch.testing.assert_close(host(hidden_states=x), expected, rtol=0, atol=0)
        if role != "replace":
            scaled = expected_output(functools.partial(base, scale=2.0), delta, x)
            torch.testing.assert_close(host(hidden_states=x, scale=2.0), scaled, rtol=0, atol=0)


def test_llama_attention_called_by_keyword_feeds_its_parallel_adapter():
    model, _ = injected("llama", ParallelAdapterModel, modified_modules=["attn@", "attn@"])
    perturb_deltas(model)
    inputs = tiny_inputs("llama")
    attention = model.get_submodule("layers.0.self_attn")
    seen = {}
    attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(args=args, hidden_states=kwargs["hidden_states"]),
        with_kwargs=True,
    )
    attention.parallel_adapter.register_forward_hook(
        lambda module, args, output: seen.update(adapter_input=args[0])
    )

    output = outputs_of(model, inputs)

    assert seen["args"] == ()
    assert seen["adapter_input"] is seen["hidden_states"]
    assert_differs(output, outputs_of(tiny_model("llama"), inputs))


def test_replaced_host_called_with_extra_arguments_raises():
    host = KeywordInput()
    attach_to(host, "replace", nn.Linear(IN_FEATURES, OUT_FEATURES))
    x = torch.randn(3, IN_FEATURES)
    with pytest.raises(TypeError, match=r"KeywordInput.*more arguments"):
        host(x, 2.0)
    with pytest.raises(TypeError, match=r"KeywordInput.*more arguments"):
        host(hidden_states=x, scale=2.0)


# 7. A forward set on the instance (accelerate's hooks) is refused, and nothing is left attached


@by_delta_model
def test_instance_forward_is_refused_and_the_backbone_rolled_back(delta_class):
    attachments = delta_class(tiny_model("llama")).attachments
    assert len(attachments) > 2 and all(a.role is not None for a in attachments[:2])
    model = tiny_model("llama")
    dispatched = model.get_submodule(attachments[1].host_name)
    # What accelerate's add_hook_to_module does to every module of a dispatched model.
    dispatched.forward = functools.partial(type(dispatched).forward, dispatched)
    original_classes = {name: type(module) for name, module in model.named_modules()}
    original_keys = set(model.state_dict())

    with pytest.raises(RuntimeError, match="accelerate") as error:
        delta_class(model)

    assert "dispatch" in str(error.value)
    assert {name: type(module) for name, module in model.named_modules()} == original_classes
    assert all(ATTACHED_DELTAS not in vars(module) for module in model.modules())
    assert set(model.state_dict()) == original_keys


# 8. Gradient checkpointing

NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "llama": {"attention_dropout": 0.0},
}


def _lora_gradients(architecture: str, checkpointing: dict | None):
    """Gradients of the LoRA parameters in train mode, and how often a LoRA host ran."""
    model = tiny_model(architecture, **NO_DROPOUT[architecture])
    delta_model = LoraModel(model)
    delta_model.freeze_module()
    perturb_deltas(model)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    calls = []
    host = model.get_submodule(delta_model.attachments[0].host_name)
    host.register_forward_hook(lambda module, args, output: calls.append(1))

    first_output(model(**tiny_inputs(architecture))).square().mean().backward()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == delta_parameter_names(model)
    return {name: model.get_parameter(name).grad for name in trainable}, len(calls)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_gradient_checkpointing_gives_the_same_delta_gradients(architecture, use_reentrant):
    expected, plain_calls = _lora_gradients(architecture, None)
    gradients, checkpointed_calls = _lora_gradients(architecture, {"use_reentrant": use_reentrant})

    assert checkpointed_calls == 2 * plain_calls  # the layer was recomputed in backward
    assert gradients.keys() == expected.keys()
    for name, gradient in expected.items():
        assert gradients[name] is not None, name
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-5, atol=1e-7)


# 9. torch.compile


def _output_and_delta_gradients(model: nn.Module, runner: nn.Module, inputs: dict):
    model.zero_grad()
    output = first_output(runner(**inputs))
    output.square().mean().backward()
    gradients = {
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    return output.detach(), gradients


@pytest.mark.parametrize(
    "backend",
    ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("delta_class", [LoraModel, AdapterModel], ids=lambda cls: cls.__name__)
def test_compiled_model_matches_eager(delta_class, backend):
    torch._dynamo.reset()
    # One layer: inductor compiles it in half the time of two.
    model = tiny_model("llama", num_hidden_layers=1)
    delta_model = delta_class(model)
    delta_model.freeze_module()
    perturb_deltas(model)
    inputs = tiny_inputs("llama")
    expected_output, expected_gradients = _output_and_delta_gradients(model, model, inputs)

    compiled = torch.compile(model, backend=backend)
    output, gradients = _output_and_delta_gradients(model, compiled, inputs)

    torch.testing.assert_close(output, expected_output)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(gradients[name], gradient)


@pytest.mark.parametrize(
    "backend, input_shape",
    [
        pytest.param("eager", (3,), id="eager"),
        pytest.param("aot_eager", (3,), id="aot_eager"),
        pytest.param("inductor", (2, 3), id="inductor-3d", marks=pytest.mark.slow),
        pytest.param("inductor", (3,), id="inductor-2d", marks=pytest.mark.slow),
    ],
)
def test_linear_host_with_lora_compiles_as_one_graph(backend, input_shape):
    torch._dynamo.reset()
    torch.manual_seed(0)
    host = nn.Linear(IN_FEATURES, OUT_FEATURES)
    delta = LoraDelta(IN_FEATURES, OUT_FEATURES, r=2, alpha=4)
    nn.init.normal_(delta.lora_B)
    attach_to(host, "replace", delta)
    x = torch.randn(*input_shape, IN_FEATURES)
    expected = host(x)
    expected.square().sum().backward()
    expected_gradients = [delta.lora_A.grad.clone(), delta.lora_B.grad.clone()]
    delta.zero_grad()

    output = torch.compile(host, backend=backend, fullgraph=True)(x)
    output.square().sum().backward()

    torch.testing.assert_close(output, expected)
    torch.testing.assert_close([delta.lora_A.grad, delta.lora_B.grad], expected_gradients)


def test_a_trial_forward_runs_on_a_meta_device_backbone():
    # A parallel adapter on attention needs a trial forward to find the sizes; on the meta
    # device (how `fastdelta inspect` builds a model without memory) it must still work.
    with torch.device("meta"):
        model = tiny_model("llama")
    delta_model = ParallelAdapterModel(backbone_model=model, modified_modules=["attn@", "attn@"])
    assert delta_model.num_trainable_parameters() > 0
    assert all(p.is_meta for p in delta_model.trainable_parameters())
