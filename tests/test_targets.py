"""Targets on which a delta would silently do nothing or the wrong thing are refused, naming the
module and why: a module whose parent reads its weights (nn.MultiheadAttention's out_proj), a
linear layer whose class has its own forward (LoRA would drop it), and merging LoRA into a
weight tied to another module's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn

from fastdelta import AdapterModel, BitFitModel, LoraModel, ParallelAdapterModel
from fastdelta.layers.base import delta_parameter_names

FEATURES = 8


class AttentionNet(nn.Module):
    """A model built on torch's nn.MultiheadAttention (out_proj: its weights are read directly)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(FEATURES, 2, bias=bias, batch_first=True)
        self.head = nn.Linear(FEATURES, FEATURES)
        # What the pseudo forward that finds a block's sizes feeds it.
        self.dummy_inputs = {"x": torch.zeros(1, 3, FEATURES)}

    def forward(self, x):
        return self.head(self.attention(x, x, x)[0])


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 5, FEATURES, generator=torch.Generator().manual_seed(1)))


def snapshot(model: nn.Module) -> dict:
    return {
        "classes": {name: type(module) for name, module in model.named_modules()},
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["parameters"].keys() == before["parameters"].keys()
    assert all(torch.equal(after["parameters"][n], p) for n, p in before["parameters"].items())
    assert delta_parameter_names(model) == set()


# 1. A module its parent never calls


IN_FORWARD = {
    "lora": lambda model: LoraModel(model, modified_modules=["out_proj"]),
    "adapter": lambda model: AdapterModel(model, modified_modules=["out_proj"]),
    "parallel_adapter": lambda model: ParallelAdapterModel(
        model, modified_modules=["out_proj", "out_proj"]
    ),
    # Without a bias, BitFit would add one after out_proj's forward.
    "bitfit-added-bias": lambda model: BitFitModel(model, modified_modules=["out_proj"]),
}


@pytest.mark.parametrize("delta", IN_FORWARD)
def test_a_delta_in_the_forward_of_multihead_attention_out_proj_is_refused(delta):
    model = AttentionNet(bias=delta != "bitfit-added-bias")
    before = snapshot(model)
    with pytest.raises(TypeError) as error:
        IN_FORWARD[delta](model)
    message = str(error.value)
    assert "attention.out_proj is inside attention, a MultiheadAttention" in message
    assert "never calls its forward, so a delta there would never run" in message
    assert "exclude attention.out_proj" in message
    assert_unchanged(model, before)


def test_training_out_projs_existing_bias_in_place_works():
    # nn.MultiheadAttention reads out_proj.bias itself, so BitFit's in-place bias takes effect.
    model = AttentionNet()
    expected = run(model)
    bitfit = BitFitModel(model, modified_modules=["out_proj"])
    with torch.no_grad():
        model.attention.out_proj.bias.add_(1.0)
    assert not torch.allclose(run(model), expected)
    bitfit.detach()
    assert torch.equal(run(model), expected)


def test_an_adapter_on_the_multihead_attention_itself_runs():
    model = AttentionNet()
    expected = run(model)
    AdapterModel(model, modified_modules=["attention"], bottleneck_dim=3)
    assert not torch.equal(run(model), expected)


class EncoderNet(nn.Module):
    """A model built on nn.TransformerEncoderLayer, whose inference fast path reads its children's
    weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(FEATURES, 2, 16, dropout=0.0, batch_first=True)
        self.dummy_inputs = {"x": torch.zeros(1, 3, FEATURES)}

    def forward(self, x):
        return self.layer(x)


IN_ENCODER_LAYER = {
    "lora-linear1": lambda model: LoraModel(model, modified_modules=["linear1"]),
    "adapter-linear2": lambda model: AdapterModel(model, modified_modules=["linear2"]),
    "adapter-self_attn": lambda model: AdapterModel(model, modified_modules=["self_attn"]),
    "lora-out_proj": lambda model: LoraModel(model, modified_modules=["out_proj"]),
}


@pytest.mark.parametrize("delta", IN_ENCODER_LAYER)
def test_a_delta_inside_a_transformer_encoder_layer_is_refused(delta):
    # In eval under no_grad the layer runs torch._transformer_encoder_layer_fwd on its children's
    # weights: the delta would train, then silently vanish at inference.
    model = EncoderNet().eval()
    before = snapshot(model)
    with pytest.raises(TypeError) as error:
        IN_ENCODER_LAYER[delta](model)
    message = str(error.value)
    assert "is inside layer, a TransformerEncoderLayer, which reads" in message
    assert "in evaluation without gradients (its fast path" in message
    assert "target layer itself (adapters)" in message
    assert_unchanged(model, before)


def test_an_adapter_on_the_transformer_encoder_layer_itself_runs_at_inference():
    model = EncoderNet().eval()
    expected = run(model)
    adapter = AdapterModel(model, modified_modules=["layer"], bottleneck_dim=3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in delta_parameter_names(model):
                parameter.normal_()
    assert not torch.allclose(run(model), expected)
    adapter.detach()
    assert torch.equal(run(model), expected)


# 2. A linear layer with a forward of its own


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward is not x W^T + b."""

    def forward(self, x):
        return 2 * super().forward(x)


class PlainSubclass(nn.Linear):
    """An nn.Linear subclass that keeps nn.Linear's forward."""


class Stack(nn.Module):
    def __init__(self, layer_class):
        super().__init__()
        torch.manual_seed(0)
        self.first = layer_class(FEATURES, FEATURES)
        self.second = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_lora_on_a_linear_subclass_with_its_own_forward_is_refused():
    model = Stack(ScaledLinear)
    before = snapshot(model)
    with pytest.raises(TypeError) as error:
        LoraModel(model, modified_modules=["second", "first"])
    message = str(error.value)
    assert "first is a ScaledLinear, a nn.Linear subclass with a forward of its own" in message
    assert "exclude first (exclude_modules)" in message
    assert_unchanged(model, before)


def test_lora_on_a_linear_subclass_with_its_own_forward_is_refused_after_another_delta():
    # An adapter already gave the layer fastdelta's host class: its own forward still counts.
    model = Stack(ScaledLinear)
    AdapterModel(model, modified_modules=["first"], bottleneck_dim=3)
    with pytest.raises(TypeError, match="first is a ScaledLinear"):
        LoraModel(model, modified_modules=["first"])


def test_lora_on_a_linear_subclass_keeping_linears_forward_works():
    model = Stack(PlainSubclass)
    expected = run(model)
    LoraModel(model, modified_modules=["first"], lora_r=2)
    assert torch.equal(run(model), expected)  # B starts at zero


def test_an_adapter_on_a_linear_subclass_with_its_own_forward_keeps_that_forward():
    model = Stack(ScaledLinear)
    AdapterModel(model, modified_modules=["first"], bottleneck_dim=3)
    with torch.no_grad():
        model.first.adapter.up_weight.zero_()  # the adapter adds nothing
    assert torch.equal(run(model), run(Stack(ScaledLinear)))


# 3. Merging into a tied weight


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("operation", ["merge", "merge_and_unload"])
def test_merging_lora_into_a_tied_weight_is_refused(architecture, operation):
    model = tiny_model(architecture, "lm", tie_word_embeddings=True)
    embeddings = model.get_input_embeddings()
    assert model.lm_head.weight is embeddings.weight
    targets = ["c_attn", "lm_head"] if architecture == "gpt2" else ["q_proj", "lm_head"]
    delta_model = LoraModel(model, modified_modules=targets)
    with torch.no_grad():
        for parameter in delta_model.trainable_parameters():
            if parameter.dim() == 2 and not parameter.any():
                parameter.normal_()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = tiny_inputs(architecture, "lm")
    expected = first_output(model(**inputs)).detach()

    with pytest.raises(ValueError) as error:
        getattr(delta_model, operation)()
    message = str(error.value)
    embedding_name = next(n for n, p in model.named_parameters() if p is embeddings.weight)
    assert f"lm_head.weight is tied to {embedding_name} (one tensor)" in message
    assert "Keep that delta unmerged" in message
    assert "nn.Parameter(lm_head.weight.detach().clone())" in message
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not any(getattr(a.delta, "merged", False) for a in delta_model.attachments)
    assert torch.equal(first_output(model(**inputs)), expected)

    # Untied as the message says, the head merges and the embeddings stay as they were.
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    getattr(delta_model, operation)()
    assert torch.equal(embeddings.weight, weights[embedding_name])
    # float32: W + s B A rounded once, against x W^T + s (x A^T) B^T
    torch.testing.assert_close(first_output(model(**inputs)), expected, rtol=1e-4, atol=1e-4)
