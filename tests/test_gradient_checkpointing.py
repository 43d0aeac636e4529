"""Gradient checkpointing with every delta type: the layers are recomputed in backward and every
trainable parameter gets the gradient it gets without checkpointing, with reentrant and
non-reentrant checkpoints alike. transformers 5 calls it `activation_checkpointing_enable()`;
`gradient_checkpointing_enable()` is its deprecated name."""

from __future__ import annotations

import pytest
import torch
from tiny_models import first_output, tiny_inputs, tiny_model

from fastdelta import AutoDeltaModel
from fastdelta.layers.base import delta_parameter_names

DELTA_TYPES = ("lora", "adapter", "parallel_adapter", "bitfit")
NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"attention_dropout": 0.0},
}
# A module inside the first checkpointed layer, counted to see that it ran again in backward.
PROBE = {
    "bert": "bert.encoder.layer.0.attention.self.query",
    "gpt2": "transformer.h.0.attn.c_attn",
    "llama": "model.layers.0.self_attn.q_proj",
}


def gradients(
    architecture: str,
    delta_type: str,
    checkpointing: dict | None,
    enable: str = "activation_checkpointing_enable",
):
    """The gradients of every trainable parameter after one backward in train mode, and how
    often the probe module ran."""
    model = tiny_model(architecture, "classification", **NO_DROPOUT[architecture])
    torch.manual_seed(0)
    delta_model = AutoDeltaModel.from_config({"delta_type": delta_type}, model)
    delta_model.freeze_module()
    generator = torch.Generator().manual_seed(0)
    names = delta_parameter_names(model)
    with torch.no_grad():  # trained-looking deltas, so that every one has a gradient
        for name, parameter in model.named_parameters():
            if name in names:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    if checkpointing is not None:
        getattr(model, enable)(checkpointing)
    model.train()
    calls = []
    model.get_submodule(PROBE[architecture]).register_forward_hook(
        lambda module, args, output: calls.append(1)
    )
    inputs = tiny_inputs(architecture, "classification")
    labels = torch.tensor([0, 1])
    model(**inputs, labels=labels).loss.backward()
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert set(names) <= set(trainable)
    return {name: model.get_parameter(name).grad for name in trainable}, len(calls)


def assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        assert gradient is not None, name
        assert actual[name] is not None, f"{name} got no gradient with checkpointing"
        torch.testing.assert_close(actual[name], gradient, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("delta_type", DELTA_TYPES)
@pytest.mark.parametrize("architecture", ["bert", "gpt2", "llama"])
def test_checkpointing_gives_the_same_gradients(architecture, delta_type, use_reentrant):
    expected, plain_calls = gradients(architecture, delta_type, None)
    actual, checkpointed_calls = gradients(
        architecture, delta_type, {"use_reentrant": use_reentrant}
    )
    assert checkpointed_calls == 2 * plain_calls  # the layers ran again in backward
    assert_same_gradients(actual, expected)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("delta_type", DELTA_TYPES)
def test_the_deprecated_gradient_checkpointing_enable_works_too(delta_type):
    expected, plain_calls = gradients("bert", delta_type, None)
    actual, calls = gradients(
        "bert", delta_type, {"use_reentrant": True}, enable="gradient_checkpointing_enable"
    )
    assert calls == 2 * plain_calls
    assert_same_gradients(actual, expected)


def test_checkpointing_recomputes_lora_dropout_with_the_same_mask():
    """LoRA draws its dropout mask from a seed made in forward; the recomputation in backward
    must use the same mask, or the gradients would belong to another forward."""
    results = []
    for checkpointing in (None, {"use_reentrant": False}):
        model = tiny_model("llama", "classification", **NO_DROPOUT["llama"])
        torch.manual_seed(0)
        delta_model = AutoDeltaModel.from_config({"delta_type": "lora", "lora_dropout": 0.5}, model)
        delta_model.freeze_module()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("lora_B"):
                    parameter.normal_(std=0.1)
        if checkpointing is not None:
            model.activation_checkpointing_enable(checkpointing)
        model.train()
        torch.manual_seed(1)
        output = first_output(model(**tiny_inputs("llama", "classification")))
        output.square().sum().backward()
        results.append(
            (output.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        )
    (expected_output, expected), (output, actual) = results
    torch.testing.assert_close(output, expected_output)
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, rtol=1e-5, atol=1e-7)
