"""LoRA's initialisations, with PEFT's name and values (init_lora_weights): True, "gaussian"
and False, against PEFT's own; the ones that change the base weight are refused by name."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
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
        ("pissa", "changes the base layer's weight"),
        ("pissa_niter_4", "changes the base layer's weight"),
        ("olora", "changes the base layer's weight"),
        ("Gaussian", "must be True, False or 'gaussian'"),
        (1, "must be True, False or 'gaussian'"),
    ],
)
def test_other_initialisations_are_refused_by_name(init, match):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=match):
        LoraModel(model, modified_modules=["0"], init_lora_weights=init)
    assert not hasattr(model[0], "lora")
