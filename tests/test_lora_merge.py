"""LoRA merge and unmerge: merged outputs, weights restored to within rounding, the merged forward
skipping the LoRA op, training while merged, detach, scope, state dicts and rsLoRA scaling."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn

from fastdelta import LoraModel
from fastdelta.layers import lora as lora_layer
from fastdelta.layers.lora import LoraDelta

RANK = 4
# Every linear layer of the two layers, so square and non-square hosts both merge:
# BERT's nn.Linear (intermediate 36 -> 52, output 52 -> 36) and GPT-2's Conv1D, whose weight is
# [in, out] (c_attn 36 -> 108, c_fc 36 -> 52, mlp.c_proj 52 -> 36).
TARGETS = {
    "bert": ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
CONV1D = {"bert": False, "gpt2": True}
# lora_B ~ normal(0, 0.1): with scaling 4 the update B A is a few times the tiny models' weights
# (std 0.02), so it changes the outputs far beyond the tolerances below without swamping them.
B_STD = 0.1
# Merged and unmerged forwards round differently (W + s B A rounded once vs x W^T + s (x A^T) B^T),
# and two layers of attention and norms carry that along: measured up to ~6 eps of the output's
# magnitude over ten seeds, in float32 and bfloat16 alike.
OUTPUT_EPS = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lora_model(architecture: str, dtype: torch.dtype = torch.float32, **arguments):
    """A tiny model of `architecture` in `dtype` with LoRA on every linear layer, lora_B random."""
    model = tiny_model(architecture).to(dtype)
    return model, add_lora(model, architecture, **arguments)


def add_lora(model: nn.Module, architecture: str, **arguments) -> LoraModel:
    arguments = {"lora_r": RANK, "modified_modules": TARGETS[architecture], **arguments}
    delta_model = LoraModel(model, **arguments)
    fill_lora_B(delta_model)
    return delta_model


def fill_lora_B(delta_model: LoraModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in deltas(delta_model):
            nn.init.normal_(delta.lora_B, std=B_STD, generator=generator)


def deltas(delta_model: LoraModel) -> list[LoraDelta]:
    return [attachment.delta for attachment in delta_model.attachments]


def host_weight_names(delta_model: LoraModel) -> set[str]:
    return {f"{attachment.host_name}.weight" for attachment in delta_model.attachments}


def forward(model: nn.Module, architecture: str) -> torch.Tensor:
    """The model's first output on the tiny inputs (with grad enabled: eval mode must run)."""
    return first_output(model(**tiny_inputs(architecture))).detach()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def ulp(tensor: torch.Tensor) -> torch.Tensor:
    """The spacing of `tensor`'s dtype at each element's magnitude (as float32)."""
    info = torch.finfo(tensor.dtype)
    magnitude = tensor.detach().float().abs().clamp_min(info.tiny)
    return info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def output_tolerance(reference: torch.Tensor) -> float:
    return OUTPUT_EPS * torch.finfo(reference.dtype).eps * reference.float().abs().max().item()


def assert_outputs_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = output_tolerance(expected)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tolerance)


def assert_weights_restored(
    model: nn.Module,
    original: dict[str, torch.Tensor],
    merged: dict[str, torch.Tensor],
    hosts: set[str],
) -> None:
    """Host weights within rounding of the originals, every other parameter bit-identical.

    merge rounds W + d once and unmerge rounds (that - d) once: half an ulp at the merged
    weight's magnitude plus half an ulp at the original's, so one ulp of each bounds it.
    """
    now = snapshot(model)
    assert now.keys() == original.keys()
    for name, value in now.items():
        assert value.dtype == original[name].dtype, name
        if name not in hosts:
            assert torch.equal(value, original[name]), name
            continue
        error = (value.float() - original[name].float()).abs()
        bound = ulp(original[name]) + ulp(merged[name])
        assert (error <= bound).all(), f"{name}: {(error / bound).max().item():.2f} of the bound"


# 1. Merged outputs equal unmerged ones; unmerge restores the weights


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("architecture", TARGETS)
def test_merged_output_matches_and_unmerge_restores_weights(architecture, dtype):
    dtype = DTYPES[dtype]
    model = tiny_model(architecture).to(dtype)
    base = forward(model, architecture)
    delta_model = add_lora(model, architecture)
    original = snapshot(model)
    hosts = host_weight_names(delta_model)
    unmerged = forward(model, architecture)
    # The deltas matter: a merge that did nothing could not pass the comparisons below.
    assert (unmerged.float() - base.float()).abs().max() > 4 * output_tolerance(unmerged)

    delta_model.merge()
    assert delta_model.merged
    assert all(delta.merged for delta in deltas(delta_model))
    merged_weights = snapshot(model)
    for name, value in merged_weights.items():
        assert value.dtype == dtype
        # merge changes the host weights only: not the biases, nor lora_A and lora_B
        assert torch.equal(value, original[name]) is (name not in hosts), name
    merged = forward(model, architecture)
    assert merged.dtype == dtype
    assert_outputs_match(merged, unmerged)

    delta_model.unmerge()
    assert not delta_model.merged
    assert not any(delta.merged for delta in deltas(delta_model))
    assert_weights_restored(model, original, merged_weights, hosts)
    assert_outputs_match(forward(model, architecture), unmerged)


# 2. The merged forward is a plain linear layer


@pytest.mark.parametrize("architecture", TARGETS)
def test_merged_forward_does_not_call_the_lora_op(architecture, monkeypatch):
    model, delta_model = lora_model(architecture)
    unmerged = forward(model, architecture)
    delta_model.merge()

    def refuse(*args, **kwargs):
        raise AssertionError("the LoRA op ran in a merged forward")

    monkeypatch.setattr(lora_layer.ops, "lora_linear", refuse)
    assert_outputs_match(forward(model, architecture), unmerged)  # eval mode, grad enabled
    model.train()
    with torch.no_grad():
        assert first_output(model(**tiny_inputs(architecture))).shape == unmerged.shape
    model.eval()

    # The patch is in effect: unmerged, the same forward goes through it.
    delta_model.unmerge()
    with pytest.raises(AssertionError, match="LoRA op ran"):
        forward(model, architecture)


# 3. Training while merged


@pytest.mark.parametrize("architecture", TARGETS)
def test_training_while_merged_raises_until_unmerged(architecture):
    model, delta_model = lora_model(architecture)
    unmerged = forward(model, architecture)
    delta_model.merge()
    model.train()
    inputs = tiny_inputs(architecture)

    with pytest.raises(RuntimeError, match=r"unmerge\(\)"):
        model(**inputs)
    with torch.no_grad():  # inference in train mode runs
        assert first_output(model(**inputs)).shape == unmerged.shape

    delta_model.unmerge()
    first_output(model(**inputs)).sum().backward()
    for delta in deltas(delta_model):
        for parameter in (delta.lora_A, delta.lora_B):
            assert parameter.grad is not None
            assert parameter.grad.abs().sum() > 0


def test_merged_model_with_frozen_deltas_trains_the_rest():
    model, delta_model = lora_model("bert")
    delta_model.merge()
    for delta in deltas(delta_model):
        delta.requires_grad_(False)
    model.train()
    first_output(model(**tiny_inputs("bert"))).sum().backward()
    assert model.embeddings.word_embeddings.weight.grad is not None
    assert all(delta.lora_A.grad is None for delta in deltas(delta_model))


# 4. detach() while merged


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("architecture", TARGETS)
def test_detach_while_merged_unmerges_and_attach_brings_the_delta_back(architecture, dtype):
    dtype = DTYPES[dtype]
    model = tiny_model(architecture).to(dtype)
    base = forward(model, architecture)
    backbone = snapshot(model)
    delta_model = add_lora(model, architecture)
    hosts = host_weight_names(delta_model)
    unmerged = forward(model, architecture)
    delta_model.merge()
    merged_weights = snapshot(model)

    delta_model.detach()
    assert not delta_model.merged
    assert not any(delta.merged for delta in deltas(delta_model))
    assert not any("lora" in name for name, _ in model.named_modules())
    merged_weights = {name: merged_weights[name] for name in backbone}
    assert_weights_restored(model, backbone, merged_weights, hosts)
    assert_outputs_match(forward(model, architecture), base)

    delta_model.attach()
    assert not delta_model.merged  # attach() puts the deltas back unmerged
    assert "merged" not in delta_model.backends()
    assert_outputs_match(forward(model, architecture), unmerged)


# 5. Scope: merge(module) and unmerge(module)


def layer_of(host_name: str) -> int:
    return int(host_name.split(".")[2])  # encoder.layer.<i>.…


def test_merge_and_unmerge_a_submodule_touch_only_its_deltas():
    model, delta_model = lora_model("bert")
    unmerged = forward(model, "bert")
    layers = model.encoder.layer

    delta_model.merge(layers[0])
    assert {a.host_name: a.delta.merged for a in delta_model.attachments} == {
        a.host_name: layer_of(a.host_name) == 0 for a in delta_model.attachments
    }
    assert not delta_model.merged
    assert "merged" in delta_model.backends()
    assert len(delta_model.backends()) == 2  # merged deltas and the LoRA op's backend
    assert_outputs_match(forward(model, "bert"), unmerged)  # half merged, half not

    delta_model.merge(layers[1])
    assert delta_model.merged
    assert delta_model.backends() == {"merged"}
    merged_weights = snapshot(model)
    delta_model.merge()  # merging merged deltas changes nothing
    delta_model.merge(layers[0])
    assert all(torch.equal(value, merged_weights[name]) for name, value in snapshot(model).items())

    delta_model.unmerge(layers[1])
    assert {a.host_name: a.delta.merged for a in delta_model.attachments} == {
        a.host_name: layer_of(a.host_name) == 0 for a in delta_model.attachments
    }
    after_unmerge = snapshot(model)
    delta_model.unmerge(layers[1])  # nothing merged in scope: a no-op, not an error
    assert all(torch.equal(value, after_unmerge[name]) for name, value in snapshot(model).items())

    delta_model.unmerge()
    value = layers[1].attention.self.value
    delta_model.merge(value)  # a host layer itself is a scope
    assert [a.host_name for a in delta_model.attachments if a.delta.merged] == [
        "encoder.layer.1.attention.self.value"
    ]
    assert_outputs_match(forward(model, "bert"), unmerged)


def test_merge_or_unmerge_with_no_delta_in_scope_raises():
    model, delta_model = lora_model("bert")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"Nothing to merge.*inside embeddings"):
        delta_model.merge(model.embeddings)
    with pytest.raises(RuntimeError, match=r"Nothing to unmerge.*inside embeddings"):
        delta_model.unmerge(model.embeddings)
    assert all(torch.equal(value, before[name]) for name, value in snapshot(model).items())

    delta_model.detach()
    assert not delta_model.merged  # no attached delta: not merged
    with pytest.raises(RuntimeError, match="Nothing to merge"):
        delta_model.merge()
    with pytest.raises(RuntimeError, match="Nothing to unmerge"):
        delta_model.unmerge()


def test_backends_and_repr_show_merged_deltas():
    model, delta_model = lora_model("bert")  # GPT-2's Conv1D repr does not show its children
    query = model.encoder.layer[0].attention.self.query
    unmerged_backends = delta_model.backends()
    assert "merged" not in unmerged_backends
    assert "merged" not in repr(query.lora)

    delta_model.merge(query)
    assert repr(query.lora).endswith(", merged)")
    assert repr(model).count("merged") == 1
    assert delta_model.backends() == unmerged_backends | {"merged"}

    delta_model.unmerge()
    assert "merged" not in repr(model)
    assert delta_model.backends() == unmerged_backends


# 6. Merging adds and removes nothing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("architecture", TARGETS)
def test_merge_keeps_the_state_dict_keys_and_the_parameters(architecture, dtype):
    model, delta_model = lora_model(architecture, DTYPES[dtype])

    def layout():
        state = model.state_dict()
        return {name: (tensor.shape, tensor.dtype) for name, tensor in state.items()}

    before = layout()
    parameters = dict(model.named_parameters())
    assert any(name.endswith("lora.lora_A") for name in before)

    delta_model.merge()
    assert layout() == before
    # merged in place: an optimizer's references to the parameters stay valid
    assert dict(model.named_parameters()) == parameters
    delta_model.unmerge()
    assert layout() == before

    delta_model.freeze_module()  # state_dict() now holds the trainable tensors only
    trainable = model.state_dict().keys()
    assert trainable == {name for name in before if ".lora.lora_" in name}
    delta_model.merge()
    assert model.state_dict().keys() == trainable


# 7. rsLoRA and other alphas; merged weights are W + scaling B A, rounded once


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lora_alpha", "use_rslora"), [(16, True), (7, False), (7, True)])
@pytest.mark.parametrize("architecture", TARGETS)
def test_merge_adds_the_scaled_update_rounded_once(architecture, lora_alpha, use_rslora, dtype):
    model, delta_model = lora_model(
        architecture, DTYPES[dtype], lora_alpha=lora_alpha, use_rslora=use_rslora
    )
    scaling = lora_alpha / math.sqrt(RANK) if use_rslora else lora_alpha / RANK
    original = snapshot(model)
    unmerged = forward(model, architecture)
    delta_model.merge()
    assert_outputs_match(forward(model, architecture), unmerged)

    float32_eps = torch.finfo(torch.float32).eps
    for attachment in delta_model.attachments:
        weight = model.get_submodule(attachment.host_name).weight
        lora_A, lora_B = attachment.delta.lora_A.double(), attachment.delta.lora_B.double()
        update = scaling * lora_B @ lora_A
        # float32 sums of r products: within r eps of the sum of their magnitudes
        update_error = RANK * float32_eps * scaling * lora_B.abs() @ lora_A.abs()
        if CONV1D[architecture]:
            update, update_error = update.t(), update_error.t()
        expected = original[f"{attachment.host_name}.weight"].double() + update
        error = (weight.double() - expected).abs()
        # One rounding to the weight's dtype: half an ulp (the float32 sum adds an eps more).
        # Rounding the update to bfloat16 first, then the sum, would exceed it.
        bound = ulp(weight) / 2 + float32_eps * expected.abs() + update_error
        assert (error <= bound).all(), attachment.host_name


# 8. Deltas added to a model in eval mode are in eval mode


def test_merged_model_put_in_eval_mode_before_the_deltas_runs():
    model = tiny_model("bert")  # in eval mode
    assert not model.training
    delta_model = LoraModel(model, lora_r=RANK, modified_modules=TARGETS["bert"])
    delta_model.merge()
    forward(model, "bert")


def test_lora_dropout_is_off_in_a_model_put_in_eval_mode_before_the_deltas():
    model = tiny_model("bert")  # in eval mode
    delta_model = LoraModel(model, lora_r=RANK, lora_dropout=0.5)
    fill_lora_B(delta_model)
    with torch.no_grad():
        assert torch.equal(forward(model, "bert"), forward(model, "bert"))
