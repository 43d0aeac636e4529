"""Mixed precision: every delta type under torch.autocast, and float32 deltas on a bfloat16
backbone (`delta_dtype=torch.float32`).

The yardstick for a low-precision result is the backbone itself: with its deltas, a model may
be off its float32 result by at most twice what the same backbone without deltas is off by in
the same precision (plus a small floor), so a delta that computed in the wrong dtype, or lost
its update, fails while bfloat16's own rounding passes.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import first_output, tiny_inputs, tiny_model

from fastdelta import AutoDeltaModel
from fastdelta.layers.base import delta_parameter_names

ARCHITECTURES = ("bert", "llama")
DELTA_TYPES = ("lora", "adapter", "parallel_adapter", "bitfit")
NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "llama": {"attention_dropout": 0.0},
}
# Relative error, in norm, of gradients in bfloat16 against float32: a gradient summed over
# tokens can lose a few bits to cancellation (a LLaMA query bias: 10%).
GRADIENT_RTOL = 0.15

by_architecture = pytest.mark.parametrize("architecture", ARCHITECTURES)
by_delta_type = pytest.mark.parametrize("delta_type", DELTA_TYPES)


def delta_model_of(architecture, delta_type, dtype=torch.float32, device="cpu", **arguments):
    """A tiny model in `dtype` with deltas added to it and nudged as training would."""
    model = tiny_model(architecture, **NO_DROPOUT[architecture]).to(device, dtype)
    delta_model = AutoDeltaModel.from_config({"delta_type": delta_type, **arguments}, model)
    delta_model.freeze_module()
    generator = torch.Generator().manual_seed(0)
    names = delta_parameter_names(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in names:
                noise = torch.randn(parameter.shape, generator=generator) * 0.1
                parameter.add_(noise.to(parameter))
    return model, delta_model


def output_and_gradients(model, inputs, autocast_dtype=None, device="cpu"):
    """The model's first output and the gradients of its trainable parameters for a loss that
    weighs each output element by a fixed random number (a square loss after LayerNorm would
    have next to no gradient)."""
    model.zero_grad()
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output = first_output(model(**inputs))
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    (output.float() * weights.to(output.device)).sum().backward()
    gradients = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return output, gradients


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()


def tolerance(architecture, inputs, expected, dtype=None, autocast_dtype=None, device="cpu"):
    """How far a model with deltas may be off `expected`, its float32 output, in the low
    precision: twice as far as the backbone without deltas is off its own float32 output, plus
    1% of how much the deltas change the output (bfloat16 keeps 8 bits)."""
    model = tiny_model(architecture, **NO_DROPOUT[architecture]).to(device)
    with torch.no_grad():
        plain = first_output(model(**inputs))
        model.to(dtype or torch.float32)
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            plain_error = max_error(first_output(model(**inputs)), plain)
    return 2 * plain_error + 0.01 * max_error(expected, plain)


def host_output_dtypes(model, hosts, inputs, autocast_dtype, device="cpu") -> dict:
    """The dtype of each of the modules named `hosts` of `model` under autocast."""
    dtypes = {}

    def record(name):
        def hook(module, args, output):
            dtypes.setdefault(name, first_output(output).dtype)

        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in hosts]
    with torch.no_grad(), torch.autocast(device, dtype=autocast_dtype):
        model(**inputs)
    for handle in handles:
        handle.remove()
    return dtypes


def assert_gradients_close(actual: dict, expected: dict) -> None:
    """Each gradient within GRADIENT_RTOL of the float32 one, relative to its norm, or to 1% of
    the largest gradient's where it is smaller (a key bias has next to no gradient)."""
    assert actual.keys() == expected.keys()
    floor = 0.01 * max(gradient.norm() for gradient in expected.values())
    for name, gradient in expected.items():
        assert actual[name] is not None, f"{name} got no gradient"
        assert torch.isfinite(actual[name]).all(), name
        error = (actual[name].float() - gradient).norm() / max(gradient.norm(), floor)
        assert error < GRADIENT_RTOL, f"{name}: relative error {error:.3g}"


@by_delta_type
@by_architecture
def test_autocast_bfloat16_is_as_close_to_float32_as_the_backbone(architecture, delta_type):
    model, _ = delta_model_of(architecture, delta_type)
    inputs = tiny_inputs(architecture)
    expected, expected_gradients = output_and_gradients(model, inputs)
    output, gradients = output_and_gradients(model, inputs, torch.bfloat16)

    assert max_error(output, expected) <= tolerance(
        architecture, inputs, expected, autocast_dtype=torch.bfloat16
    )
    # The deltas stay float32: autocast casts copies, the gradients arrive in float32.
    assert {gradient.dtype for gradient in gradients.values()} == {torch.float32}
    assert_gradients_close(gradients, expected_gradients)


@by_delta_type
@by_architecture
def test_autocast_keeps_the_output_dtype_of_each_modified_module(architecture, delta_type):
    model, delta_model = delta_model_of(architecture, delta_type)
    hosts = [attachment.host_name for attachment in delta_model.attachments]
    inputs = tiny_inputs(architecture)
    with_deltas = host_output_dtypes(model, hosts, inputs, torch.bfloat16)
    plain = tiny_model(architecture, **NO_DROPOUT[architecture])
    assert with_deltas == host_output_dtypes(plain, hosts, inputs, torch.bfloat16)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16-autocast"])
@by_delta_type
@by_architecture
def test_float32_deltas_on_a_bfloat16_backbone(architecture, delta_type, autocast):
    model, delta_model = delta_model_of(
        architecture, delta_type, torch.bfloat16, delta_dtype=torch.float32
    )
    for attachment in delta_model.attachments:
        for parameter in attachment.delta.parameters():
            assert parameter.dtype == torch.float32
    # The float32 model with the same deltas.
    reference, _ = delta_model_of(architecture, delta_type)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                reference.get_parameter(name).copy_(parameter)
    inputs = tiny_inputs(architecture)
    expected, expected_gradients = output_and_gradients(reference, inputs)
    output, gradients = output_and_gradients(model, inputs, torch.bfloat16 if autocast else None)

    if not autocast:
        assert output.dtype == torch.bfloat16  # the activations stay in the backbone's dtype
    limit = tolerance(architecture, inputs, expected, dtype=torch.bfloat16)
    assert max_error(output, expected) <= limit
    for name, gradient in gradients.items():
        assert gradient.dtype == model.get_parameter(name).dtype, name
    assert_gradients_close(gradients, expected_gradients)


@pytest.mark.parametrize("delta_type", ["lora", "adapter", "parallel_adapter"])
def test_float32_deltas_keep_updates_that_bfloat16_deltas_lose(delta_type):
    """The reason for float32 deltas: an optimizer step of 1e-5 vanishes in bfloat16 weights
    of magnitude 0.01 and more (their spacing is 2**-7 of their magnitude)."""
    unchanged = {}
    for delta_dtype in (None, torch.float32):
        model, delta_model = delta_model_of(
            "llama", delta_type, torch.bfloat16, delta_dtype=delta_dtype
        )
        deltas = [p for a in delta_model.attachments for p in a.delta.parameters()]
        before = [p.detach().clone() for p in deltas]
        optimizer = torch.optim.Adam(deltas, lr=1e-5)
        output_and_gradients(model, tiny_inputs("llama"))
        optimizer.step()
        changed = sum(p.ne(b).sum().item() for p, b in zip(deltas, before, strict=True))
        unchanged[delta_dtype] = 1 - changed / sum(p.numel() for p in deltas)
    assert unchanged[None] > 0.9
    assert unchanged[torch.float32] < 0.01


def test_delta_dtype_is_saved_and_restored(tmp_path):
    model, delta_model = delta_model_of("llama", "lora", torch.bfloat16, delta_dtype=torch.float32)
    delta_model.save_finetuned(tmp_path)
    fresh = tiny_model("llama").to(torch.bfloat16)
    reloaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)

    assert reloaded.config.delta_dtype == "float32"
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert fresh.get_parameter(name).dtype == parameter.dtype, name
            assert torch.equal(fresh.get_parameter(name), parameter), name


@pytest.mark.parametrize(
    "delta_dtype, name",
    [(torch.float32, "float32"), ("bfloat16", "bfloat16"), (torch.float, "float32")],
)
def test_delta_dtype_is_stored_by_name(delta_dtype, name):
    model = tiny_model("bert")
    delta_model = AutoDeltaModel.from_config(
        {"delta_type": "lora", "delta_dtype": delta_dtype}, model
    )
    assert delta_model.config.delta_dtype == name
    assert delta_model.attachments[0].delta.lora_A.dtype == getattr(torch, name)


@pytest.mark.parametrize("delta_dtype", [torch.int8, "float33"])
def test_delta_dtype_must_be_floating_point(delta_dtype):
    with pytest.raises(ValueError, match=r"delta_dtype must be a floating-point torch dtype"):
        AutoDeltaModel.from_config(
            {"delta_type": "lora", "delta_dtype": delta_dtype}, tiny_model("bert")
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=str)
@by_delta_type
def test_gpu_autocast_is_as_close_to_float32_as_the_backbone(delta_type, autocast_dtype):
    model, _ = delta_model_of("llama", delta_type, device="cuda")
    inputs = {name: tensor.cuda() for name, tensor in tiny_inputs("llama").items()}
    expected, expected_gradients = output_and_gradients(model, inputs, device="cuda")
    output, gradients = output_and_gradients(model, inputs, autocast_dtype, "cuda")

    limit = tolerance("llama", inputs, expected, autocast_dtype=autocast_dtype, device="cuda")
    assert max_error(output, expected) <= limit
    assert {gradient.dtype for gradient in gradients.values()} == {torch.float32}
    assert_gradients_close(gradients, expected_gradients)
