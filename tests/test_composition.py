"""Several delta models on one backbone: each saves and loads only what it owns, detach() and
attach() keep the deltas of one module in their order, a failed attach() rolls back, and saving
with some deltas detached is refused. (test_composition_property.py walks random sequences of
these operations.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from composition import DELTA_CLASSES, FIRST_LAYER, output, owned_parameters, trained
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model
from torch import nn

from fastdelta import (
    AdapterModel,
    AutoDeltaModel,
    BaseDeltaConfig,
    BitFitModel,
    DeltaBase,
    LowRankAdapterModel,
)
from fastdelta.layers.base import attached_deltas
from fastdelta.saving import CONFIG_NAME, WEIGHTS_NAME

HEAD = {"classifier.weight", "classifier.bias"}
by_delta_type = pytest.mark.parametrize("delta_type", DELTA_CLASSES)


def four_models(backbone: nn.Module, order=tuple(DELTA_CLASSES)) -> dict:
    """One trained delta model of each type on `backbone`, built in `order`."""
    return {
        delta_type: trained(delta_type, backbone, seed) for seed, delta_type in enumerate(order)
    }


# 1. A checkpoint holds what its delta model owns


@by_delta_type
def test_save_finetuned_writes_only_its_own_deltas_and_the_head(delta_type, tmp_path):
    pristine = tiny_model("bert", "classification")
    model = copy.deepcopy(pristine)
    models = four_models(model)
    path = models[delta_type].save_finetuned(tmp_path / delta_type)
    saved = set(load_file(path / WEIGHTS_NAME))
    assert saved == set(owned_parameters(models[delta_type])) | HEAD
    assert json.loads((path / CONFIG_NAME).read_text())["head_tensors"] == sorted(HEAD)

    # Loaded onto a fresh backbone and detached again, the backbone is the pretrained one with
    # the trained head: no other delta model's tensor (BitFit's biases) went into it.
    fresh = copy.deepcopy(pristine)
    AutoDeltaModel.from_finetuned(path, fresh).detach()
    expected = dict(pristine.named_parameters())
    expected.update({name: model.get_parameter(name) for name in HEAD})
    actual = dict(fresh.named_parameters())
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_a_detached_bitfit_freezes_the_original_biases_so_no_one_saves_them(tmp_path):
    model = tiny_model("bert", "classification")
    lora, bitfit = trained("lora", model, 0), trained("bitfit", model, 1)
    biases = [name for name in owned_parameters(bitfit) if name.endswith(".bias")]
    assert biases
    bitfit.detach()
    assert not any(model.get_parameter(name).requires_grad for name in biases)
    path = lora.save_finetuned(tmp_path / "lora")
    assert set(load_file(path / WEIGHTS_NAME)) == set(owned_parameters(lora)) | HEAD
    bitfit.attach()
    assert all(model.get_parameter(name).requires_grad for name in biases)


@by_delta_type
def test_checkpoint_loads_onto_a_backbone_carrying_the_other_delta_models(delta_type, tmp_path):
    others = [other for other in DELTA_CLASSES if other != delta_type]
    path = trained(delta_type, tiny_model("bert", "classification"), 0).save_finetuned(tmp_path)
    saved = load_file(path / WEIGHTS_NAME)

    backbone = tiny_model("bert", "classification")
    carried = {other: trained(other, backbone, seed) for seed, other in enumerate(others, 1)}
    before = {
        name: (parameter.detach().clone(), parameter.requires_grad)
        for other in carried.values()
        for name, parameter in owned_parameters(other).items()
    }
    loaded = AutoDeltaModel.from_finetuned(path, backbone)
    assert type(loaded) is DELTA_CLASSES[delta_type]
    for name, (value, requires_grad) in before.items():
        assert torch.equal(backbone.get_parameter(name), value), name
        assert backbone.get_parameter(name).requires_grad == requires_grad, name

    # The same deltas rebuilt from scratch: the others, then this type with the saved values.
    reference = tiny_model("bert", "classification")
    for seed, other in enumerate(others, 1):
        trained(other, reference, seed)
    DELTA_CLASSES[delta_type](reference)
    with torch.no_grad():
        for name, tensor in saved.items():
            reference.get_parameter(name).copy_(tensor)
    expected = output(reference, "bert", "classification")
    assert torch.equal(output(backbone, "bert", "classification"), expected)


def test_a_checkpoint_holding_another_models_deltas_is_refused(tmp_path):
    model = tiny_model("bert", "classification")
    models = four_models(model)
    path = models["lora"].save_finetuned(tmp_path / "lora")
    tensors = load_file(path / WEIGHTS_NAME)
    adapter_tensors = {
        k: v.detach().clone() for k, v in owned_parameters(models["adapter"]).items()
    }
    save_file({**tensors, **adapter_tensors}, path / WEIGHTS_NAME)

    backbone = tiny_model("bert", "classification")
    adapter = trained("adapter", backbone, 7)
    adapter_before = {k: v.detach().clone() for k, v in owned_parameters(adapter).items()}
    with pytest.raises(ValueError, match=r"tensors of the deltas of another delta model"):
        AutoDeltaModel.from_finetuned(path, backbone)
    current = owned_parameters(adapter)
    assert all(torch.equal(current[name], value) for name, value in adapter_before.items())
    assert not any(".lora." in name for name, _ in backbone.named_parameters())


@pytest.mark.parametrize("other", ["adapter", "bitfit"])
def test_a_peft_save_refuses_a_head_holding_another_models_delta(other, tmp_path):
    # PEFT's layout saves the head modules whole: with an adapter (or BitFit's bias) of another
    # delta model inside the classifier, the LoRA checkpoint would carry that model's tensors.
    model = tiny_model("bert", "classification")
    lora = trained("lora", model, 0)
    trained(other, model, 1, modified_modules=["classifier"])
    lora.freeze_module()
    with pytest.raises(ValueError, match=r"'classifier' holds classifier\.\S+, a delta of another"):
        lora.save_finetuned(tmp_path / "peft", format="peft")
    lora.save_finetuned(tmp_path / "fastdelta")  # its own deltas and the head only


def test_counts_and_log_cover_the_delta_models_own_deltas(capsys):
    model = tiny_model("bert", "classification")
    models = four_models(model)
    own = {
        delta_type: sum(
            p.numel() for p in {id(p): p for p in owned_parameters(m).values()}.values()
        )
        for delta_type, m in models.items()
    }
    for delta_type, delta_model in models.items():
        assert delta_model.num_delta_parameters() == own[delta_type] > 0
        assert delta_model.num_backbone_delta_parameters() == sum(own.values())
    layer = model.get_submodule(f"bert.{FIRST_LAYER['bert']}")
    assert 0 < models["lora"].num_delta_parameters(layer) < own["lora"]
    models["lora"].log(visualization=False)
    printed = capsys.readouterr().out
    assert f"{own['lora']:,}" in printed and "all deltas on the backbone" in printed
    models["adapter"].detach()
    assert models["adapter"].num_delta_parameters() == 0
    assert models["lora"].num_delta_parameters() == own["lora"]


@by_delta_type
def test_saving_with_some_deltas_detached_is_refused_by_name(delta_type, tmp_path):
    model = tiny_model("bert")
    delta_model = trained(delta_type, model, 0)
    delta_model.detach(module=model.get_submodule(FIRST_LAYER["bert"]))
    detached = [a.host_name for a in delta_model.attachments if not a.attached]
    with pytest.raises(RuntimeError) as error:
        delta_model.save_finetuned(tmp_path / "checkpoint")
    message = str(error.value)
    assert f"{len(detached)} of the {len(delta_model.attachments)} deltas" in message
    assert detached[0] in message
    assert "call attach() before save_finetuned()" in message
    assert not (tmp_path / "checkpoint").exists()
    delta_model.attach()
    assert (delta_model.save_finetuned(tmp_path / "checkpoint") / WEIGHTS_NAME).is_file()


# 2. detach() / attach() keep the order of the deltas of one role


class ManualDeltas(DeltaBase):
    """A delta model whose deltas the test attaches with the three operations."""

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        pass


def nonlinear(features: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, features), nn.Tanh())


HOST = "encoder.layer.0.intermediate.dense"  # 36 -> 52 in the tiny BERT


def _manual(model, role, name, seed) -> ManualDeltas:
    delta_model = ManualDeltas(model, BaseDeltaConfig(modified_modules=[HOST]))
    features = 36 if role == "before" else 52
    delta_model.insert_sequential_module(HOST, nonlinear(features, seed), name, position=role)
    return delta_model


@pytest.mark.parametrize("detached", ["first", "second"])
@pytest.mark.parametrize("role", ["before", "after"])
def test_reattaching_a_custom_delta_restores_its_place(role, detached):
    model = tiny_model("bert")
    models = {"first": _manual(model, role, "one", 1), "second": _manual(model, role, "two", 2)}
    order = attached_deltas(model.get_submodule(HOST))
    expected = output(model, "bert")
    models[detached].detach()
    assert not torch.equal(output(model, "bert"), expected)
    models[detached].attach()
    assert attached_deltas(model.get_submodule(HOST)) == order
    assert torch.equal(output(model, "bert"), expected)


@pytest.mark.parametrize("scope", ["all", "first layer"])
@pytest.mark.parametrize("detached", ["adapter", "bitfit"])
def test_reattaching_restores_an_adapter_and_a_bitfit_bias_on_one_layer(detached, scope):
    # Llama's o_proj and down_proj have no bias: BitFit adds one after them, where the
    # adapter also runs. adapter(h + b) is not adapter(h) + b.
    model = tiny_model("llama")
    models = {"adapter": trained("adapter", model, 0), "bitfit": trained("bitfit", model, 1)}
    hosts = {a.host_name for a in models["adapter"].attachments}
    orders = {host: attached_deltas(model.get_submodule(host)) for host in hosts}
    assert all(len(order) == 2 for order in orders.values())
    expected = output(model, "llama")
    module = None if scope == "all" else model.get_submodule(FIRST_LAYER["llama"])
    models[detached].detach(module=module)
    models[detached].attach(module=module)
    assert {host: attached_deltas(model.get_submodule(host)) for host in hosts} == orders
    assert torch.equal(output(model, "llama"), expected)


# 3. attach() that fails part-way rolls back


@by_delta_type
def test_attach_that_fails_part_way_takes_back_what_it_attached(delta_type):
    model = tiny_model("bert")
    first = trained(delta_type, model, 0)
    first.detach()
    expected = output(model, "bert")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    taken = first.attachments[-1].host_name
    copies = 2 if delta_type == "parallel_adapter" else 1  # a pair: one module's input to output
    second = DELTA_CLASSES[delta_type](model, modified_modules=[taken] * copies)
    with_second = output(model, "bert")

    with pytest.raises(ValueError, match=rf"{taken} \(\w+\) already has a '{delta_type}'"):
        first.attach()
    assert not any(attachment.attached for attachment in first.attachments)
    assert torch.equal(output(model, "bert"), with_second)
    for name, flag in requires_grad.items():
        assert model.get_parameter(name).requires_grad == flag, name
    # Only the second delta model is on the backbone: detaching it gives the plain backbone.
    second.detach()
    assert torch.equal(output(model, "bert"), expected)


# 5. Two delta models of one kind on the same modules (OpenDelta's composition page)

STACKING = ["lora", "adapter", "parallel_adapter"]


@pytest.mark.parametrize("delta_type", STACKING)
def test_a_second_delta_model_of_a_kind_stacks_under_a_suffixed_name(delta_type, tmp_path):
    """The second takes `<kind>_1` on each module, as in OpenDelta, and computes after the
    first. Its checkpoint holds the plain names: loaded onto a bare backbone it is the only
    delta of its kind there, and onto one carrying the first it stacks the same way again."""
    pristine = tiny_model("bert", "classification")
    model = copy.deepcopy(pristine)
    first, second = trained(delta_type, model, 0), trained(delta_type, model, 1)
    hosts = {attachment.host_name for attachment in second.attachments}
    assert hosts == {attachment.host_name for attachment in first.attachments}
    assert all(a.delta_name == a.saved_name for a in first.attachments)
    assert all(a.delta_name == f"{a.saved_name}_1" for a in second.attachments)
    assert {a.saved_name for a in second.attachments} <= {delta_type, f"{delta_type}_input"}
    stacked = output(model, "bert")

    second_path = second.save_finetuned(tmp_path / "second")
    saved = set(load_file(second_path / WEIGHTS_NAME)) - HEAD
    assert saved == {
        name.replace(f".{delta_type}_1.", f".{delta_type}.") for name in owned_parameters(second)
    }
    first_path = first.save_finetuned(tmp_path / "first")

    # The first then the second onto a fresh backbone: the same model.
    rebuilt = copy.deepcopy(pristine)
    AutoDeltaModel.from_finetuned(first_path, rebuilt)
    loaded = AutoDeltaModel.from_finetuned(second_path, rebuilt)
    assert all(a.delta_name == f"{a.saved_name}_1" for a in loaded.attachments)
    torch.testing.assert_close(output(rebuilt, "bert"), stacked, rtol=1e-5, atol=1e-6)

    # Without the first, the second alone computes what it does alone on a bare backbone.
    first.detach()
    alone = copy.deepcopy(pristine)
    AutoDeltaModel.from_finetuned(second_path, alone)
    torch.testing.assert_close(output(model, "bert"), output(alone, "bert"), rtol=1e-5, atol=1e-6)
    assert not torch.equal(output(model, "bert"), output(pristine, "bert"))


def test_opendelta_s_composition_page_three_adapters_on_one_layer():
    """AdapterModel twice and a LowRankAdapterModel on fc2: adapter, adapter_1, then the
    low-rank one, run in that order; each detaches on its own."""
    model = tiny_model("bart")
    first = AdapterModel(model, modified_modules=["fc2"])
    second = AdapterModel(model, modified_modules=["fc2"], bottleneck_dim=12)
    third = LowRankAdapterModel(model, modified_modules=["fc2"], reduction_factor=12)
    host = model.get_submodule(first.attachments[0].host_name)
    assert [name for name, _ in attached_deltas(host)] == [
        "adapter",
        "adapter_1",
        "low_rank_adapter",
    ]
    with torch.no_grad():
        for delta_model in (first, second, third):
            for parameter in delta_model.parameters():
                parameter.normal_(0, 0.1)
    x = torch.randn(2, 3, host.in_features)
    with torch.no_grad():
        composed = host(x)
        for delta_model in (first, second, third):
            delta_model.detach()
        expected = host(x)
        for delta_model in (first, second, third):
            expected = delta_model.attachments[0].delta(expected)
        second.attach()  # back in its place between the other two
        first.attach()
        third.attach()
        assert [name for name, _ in attached_deltas(host)][:2] == ["adapter", "adapter_1"]
        again = host(x)
    torch.testing.assert_close(composed, expected)
    assert torch.equal(again, composed)


def test_a_second_bitfit_on_a_module_is_refused_it_would_share_the_first_ones_biases():
    model = tiny_model("bert")
    BitFitModel(model, modified_modules=["layer.1.attention.output.dense"])
    with pytest.raises(ValueError, match="already has a 'bitfit' attribute"):
        BitFitModel(model, modified_modules=["attention.output.dense"])
    assert "bitfit" not in dict(model.encoder.layer[0].attention.output.dense.named_children())
