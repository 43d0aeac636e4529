"""DoRA (LoraModel(use_dora=True)): the same outputs and gradients as PEFT's DoRA and as an
fp64 reference that forms W + s B A, with and without dropout, on Linear and Conv1D layers;
merge / unmerge; PEFT DoRA adapters load and exports load in PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import tiny_inputs, tiny_model
from torch import nn

from fastdelta import AutoDeltaModel, LoraModel

RANK, ALPHA = 4, 8


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 6))


def both(dropout: float = 0.0, model: nn.Module | None = None, targets=("0", "2")):
    """(fastdelta's delta model, PEFT's model) of DoRA on copies of one base, with the same
    random A, B and magnitude."""
    model = base_model() if model is None else model
    theirs = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(
            target_modules=list(targets), r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
            use_dora=True,
        ),
    )  # fmt: skip
    ours = LoraModel(
        model, modified_modules=list(targets), lora_r=RANK, lora_alpha=ALPHA,
        lora_dropout=dropout, use_dora=True,
    )  # fmt: skip
    ours.freeze_module()
    torch.manual_seed(1)
    with torch.no_grad():
        for attachment in ours.attachments:
            delta = attachment.delta
            peft_layer = theirs.base_model.model.get_submodule(attachment.host_name)
            for parameter in (delta.lora_A, delta.lora_B):
                parameter.normal_(0, 0.2)
            delta.lora_magnitude_vector.mul_(
                1 + 0.1 * torch.randn_like(delta.lora_magnitude_vector)
            )
            peft_layer.lora_A["default"].weight.copy_(delta.lora_A)
            peft_layer.lora_B["default"].weight.copy_(delta.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(delta.lora_magnitude_vector)
    return ours, theirs


def dora_parameters(delta_model) -> list[nn.Parameter]:
    return [
        p
        for a in delta_model.attachments
        for p in (a.delta.lora_A, a.delta.lora_B, a.delta.lora_magnitude_vector)
    ]


def peft_parameters(model, hosts) -> list[nn.Parameter]:
    layers = [model.base_model.model.get_submodule(host) for host in hosts]
    return [
        p
        for layer in layers
        for p in (
            layer.lora_A["default"].weight,
            layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight,
        )
    ]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_outputs_and_every_gradient_equal_peft_s(dropout):
    ours, theirs = both(dropout)
    hosts = [a.host_name for a in ours.attachments]
    x = torch.randn(5, 20, requires_grad=True)
    x_peft = x.detach().clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout mask: both draw it with one F.dropout on x
    y = ours.backbone_model(x)
    torch.manual_seed(7)
    y_peft = theirs(x_peft)
    torch.testing.assert_close(y, y_peft)
    grad = torch.randn_like(y)
    mine = torch.autograd.grad(y, [x, *dora_parameters(ours)], grad)
    reference = torch.autograd.grad(y_peft, [x_peft, *peft_parameters(theirs, hosts)], grad)
    for a, b in zip(mine, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_equals_an_fp64_dora_that_forms_w_plus_s_b_a():
    ours, _ = both()
    layer = ours.backbone_model[0]
    delta = layer.lora
    x = torch.randn(7, 20, dtype=torch.float64)
    weight = layer.weight.double()
    combined = weight + (ALPHA / RANK) * delta.lora_B.double() @ delta.lora_A.double()
    k = delta.lora_magnitude_vector.double() / torch.linalg.norm(combined, dim=1)
    expected = (x @ combined.t()) * k + layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), expected, rtol=1e-5, atol=1e-5)


def test_a_fresh_dora_delta_changes_nothing():
    model = base_model()
    x = torch.randn(3, 20)
    expected = model(x)
    LoraModel(model, modified_modules=["0", "2"], lora_r=RANK, use_dora=True)
    torch.testing.assert_close(model(x), expected)


def test_dora_on_gpt2_s_conv1d_equals_peft_s():
    model = tiny_model("gpt2")
    ours, theirs = both(model=model, targets=("c_attn", "c_fc"))
    inputs = tiny_inputs("gpt2")
    torch.testing.assert_close(
        ours.backbone_model(**inputs).last_hidden_state, theirs(**inputs).last_hidden_state
    )


def test_merge_and_unmerge():
    ours, _ = both()
    model = ours.backbone_model
    x = torch.randn(4, 20)
    weights = [model[i].weight.detach().clone() for i in (0, 2)]
    with torch.no_grad():
        expected = model(x)
        ours.merge()
        torch.testing.assert_close(model(x), expected)
        ours.unmerge()
    for index, weight in zip((0, 2), weights, strict=True):
        torch.testing.assert_close(model[index].weight, weight)


def test_peft_dora_adapters_load_and_exports_load_in_peft(tmp_path):
    ours, theirs = both()
    pristine = base_model()
    x = torch.randn(4, 20)
    expected = ours.backbone_model(x)
    ours.save_finetuned(tmp_path / "ours", format="peft")
    torch.testing.assert_close(
        peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "ours")(x), expected
    )
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "theirs", copy.deepcopy(pristine))
    assert loaded.config.use_dora
    torch.testing.assert_close(loaded.backbone_model(x), expected)
    ours.save_finetuned(tmp_path / "fastdelta")
    again = AutoDeltaModel.from_finetuned(tmp_path / "fastdelta", copy.deepcopy(pristine))
    torch.testing.assert_close(again.backbone_model(x), expected)


def test_dora_on_an_embedding_or_stacked_on_another_lora_is_refused():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6))
    with pytest.raises(ValueError, match="DoRA is for linear layers"):
        LoraModel(model, modified_modules=["0"], use_dora=True)
    LoraModel(model, modified_modules=["1"], lora_r=2)
    with pytest.raises(ValueError, match="takes a layer of its own"):
        LoraModel(model, modified_modules=["1"], lora_r=2, use_dora=True)


def test_dora_with_a_base_changing_initialisation_is_refused():
    with pytest.raises(ValueError, match="use_dora with init_lora_weights='pissa'"):
        LoraModel(base_model(), modified_modules=["0"], use_dora=True, init_lora_weights="pissa")
