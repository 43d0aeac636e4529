"""LoRA's initialisations, with PEFT's name and values (init_lora_weights): True, "gaussian"
and False, against PEFT's own; PiSSA and OLoRA, which take B_0 A_0 out of the base weight,
equal to PEFT's, and saved as the plain LoRA they amount to on the unchanged base."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn

from fastdelta import AutoDeltaModel, LoraModel

IN, OUT, RANK = 512, 384, 4


def layers(init, seed=0):
    """(fastdelta's LoRA layer, PEFT's) on copies of one Linear."""
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT)
    ours = nn.Sequential(base)
    LoraModel(ours, modified_modules=["0"], lora_r=RANK, init_lora_weights=init)
    theirs = nn.Sequential(nn.Linear(IN, OUT))
    theirs.load_state_dict({"0.weight": base.weight, "0.bias": base.bias})
    config = peft.LoraConfig(target_modules=["0"], r=RANK, init_lora_weights=init)
    peft_model = peft.get_peft_model(theirs, config)
    layer = peft_model.base_model.model[0]
    return ours[0].lora, (layer.lora_A["default"].weight, layer.lora_B["default"].weight)


def uniform_bound(fan_in: int) -> float:
    """kaiming_uniform_(a=sqrt(5))'s bound, nn.Linear's default: 1 / sqrt(fan_in)."""
    return 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_each_initialisation_draws_what_peft_s_draws(init):
    delta, (peft_A, peft_B) = layers(init)
    for ours, theirs in ((delta.lora_A, peft_A), (delta.lora_B, peft_B)):
        assert ours.shape == theirs.shape
        if not theirs.detach().any():
            assert not ours.detach().any()
            continue
        # Same distribution: same bound (uniform) or spread (gaussian), within sampling error.
        assert ours.abs().max().item() <= theirs.abs().max().item() * 1.05 + 1e-6
        assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.1)
    if init == "gaussian":
        assert delta.lora_A.std().item() == pytest.approx(1 / RANK, rel=0.1)
    else:
        assert delta.lora_A.abs().max().item() <= uniform_bound(IN)
    if init is False:
        assert delta.lora_B.abs().max().item() <= uniform_bound(RANK)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_only_false_changes_the_output_before_training(init):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(IN, OUT))
    x = torch.randn(3, IN)
    expected = base(x)
    LoraModel(base, modified_modules=["0"], lora_r=RANK, init_lora_weights=init)
    assert torch.equal(base(x), expected) != (init is False)


def test_the_initialisation_goes_to_and_comes_from_peft_s_adapter_config(tmp_path):
    model = nn.Sequential(nn.Linear(IN, OUT))
    delta_model = LoraModel(model, modified_modules=["0"], init_lora_weights="gaussian")
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "gaussian"
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "peft", nn.Sequential(nn.Linear(IN, OUT)))
    assert loaded.config.init_lora_weights == "gaussian"

    # An initialisation fastdelta does not have, but that only made the saved tensors, loads.
    config["init_lora_weights"] = "orthogonal"
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "peft", nn.Sequential(nn.Linear(IN, OUT)))
    assert loaded.config.init_lora_weights is True


@pytest.mark.parametrize(
    ("init", "match"),
    [
        ("corda", "PEFT's, which fastdelta does not have"),
        ("loftq", "PEFT's, which fastdelta does not have"),
        ("pissa_niter_0", "must be True, False, 'gaussian', 'pissa'"),
        ("Gaussian", "must be True, False, 'gaussian', 'pissa'"),
        (1, "must be True, False, 'gaussian', 'pissa'"),
    ],
)
def test_other_initialisations_are_refused_by_name(init, match):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=match):
        LoraModel(model, modified_modules=["0"], init_lora_weights=init)
    assert not hasattr(model[0], "lora")


def two_layers(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))


def pissa_pair(init, use_rslora=False):
    """(fastdelta's delta model, PEFT's model, the untouched base) with init on both linear
    layers of copies of one base."""
    base = two_layers()
    arguments = {"lora_alpha": 8, "use_rslora": use_rslora, "init_lora_weights": init}
    delta_model = LoraModel(
        copy.deepcopy(base), modified_modules=["0", "2"], lora_r=RANK, **arguments
    )
    delta_model.freeze_module()
    config = peft.LoraConfig(target_modules=["0", "2"], r=RANK, **arguments)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    return delta_model, theirs, base


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_equal_peft_s_and_leave_the_outputs_as_they_were(init):
    delta_model, theirs, base = pissa_pair(init)
    ours = delta_model.backbone_model
    for index in (0, 2):
        layer = theirs.base_model.model[index]
        assert torch.equal(ours[index].lora.lora_A, layer.lora_A["default"].weight)
        assert torch.equal(ours[index].lora.lora_B, layer.lora_B["default"].weight)
        assert torch.equal(ours[index].weight, layer.base_layer.weight)
        assert not torch.equal(ours[index].weight, base[index].weight)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), base(x))
    # detach() gives the base weight back (to float rounding), attach() takes it out again.
    delta_model.detach()
    torch.testing.assert_close(ours[0].weight, base[0].weight)
    delta_model.attach()
    assert torch.equal(ours[0].weight, theirs.base_model.model[0].base_layer.weight)


def test_pissa_with_a_randomized_svd_leaves_the_outputs_as_they_were():
    delta_model, _, base = pissa_pair("pissa_niter_2")
    x = torch.randn(5, 24)
    torch.testing.assert_close(delta_model.backbone_model(x), base(x))


@torch.no_grad()
def train_a_little(parameters) -> None:
    for parameter in parameters:
        parameter.add_(torch.randn_like(parameter) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_trained_pissa_model_saves_as_plain_lora_on_the_unchanged_base(
    init, use_rslora, tmp_path
):
    delta_model, _, base = pissa_pair(init, use_rslora)
    train_a_little(delta_model.trainable_parameters())
    x = torch.randn(5, 24)
    expected = delta_model.backbone_model(x)
    delta_model.save_finetuned(tmp_path / "fastdelta")
    delta_model.save_finetuned(tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (2 * RANK, True)
    assert config["lora_alpha"] == pytest.approx(8 * (2**0.5 if use_rslora else 2))

    for path in (tmp_path / "fastdelta", tmp_path / "peft"):
        loaded = AutoDeltaModel.from_finetuned(path, copy.deepcopy(base))
        torch.testing.assert_close(loaded.backbone_model(x), expected)
        assert loaded.config.lora_r == 2 * RANK
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(in_peft(x), expected)


def test_peft_s_converted_pissa_adapter_loads_with_peft_s_outputs(tmp_path):
    _, theirs, base = pissa_pair("pissa")
    theirs.save_pretrained(tmp_path / "initial")
    train_a_little(p for p in theirs.parameters() if p.requires_grad)
    x = torch.randn(5, 24)
    expected = theirs(x)
    theirs.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial"
    )
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "converted", copy.deepcopy(base))
    torch.testing.assert_close(loaded.backbone_model(x), expected)


def test_peft_s_unconverted_pissa_adapter_loads_onto_its_residual_base(tmp_path):
    _, theirs, _ = pissa_pair("pissa")
    train_a_little(p for p in theirs.parameters() if p.requires_grad)
    x = torch.randn(5, 24)
    expected = theirs(x)
    theirs.save_pretrained(tmp_path / "unconverted")
    residual = copy.deepcopy(theirs).unload()  # what PEFT's initialisation left of the base
    with pytest.warns(UserWarning, match="residual base model"):
        loaded = AutoDeltaModel.from_finetuned(tmp_path / "unconverted", residual)
    assert loaded.config.init_lora_weights is True  # not initialised again from the weight
    torch.testing.assert_close(loaded.backbone_model(x), expected)


def test_pissa_on_gpt2_s_conv1d_layers_leaves_the_outputs_as_they_were():
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2")
    expected = first_output(model(**inputs))
    LoraModel(model, modified_modules=["c_attn", "c_fc"], lora_r=RANK, init_lora_weights="pissa")
    torch.testing.assert_close(first_output(model(**inputs)), expected, rtol=1e-4, atol=1e-5)
