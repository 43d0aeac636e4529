"""LoRA on nn.Embedding, as PEFT computes it (lora_embedding_A / lora_embedding_B): the same
outputs and gradients as PEFT's layer, PEFT adapters load and exports load in PEFT, merge."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import tiny_inputs, tiny_model
from torch import nn

from fastdelta import AutoDeltaModel, LoraModel
from fastdelta.layers.lora import LoraEmbeddingDelta

RANK = 4


class ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output, as Gemma 3's does (`embed_scale`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = 3.0

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def embedding_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "scaled":
        return nn.Sequential(ScaledEmbedding(50, 12, padding_idx=0), nn.Linear(12, 5))
    return nn.Sequential(nn.Embedding(50, 12, padding_idx=0, max_norm=None), nn.Linear(12, 5))


def both(kind: str):
    """(fastdelta's model, PEFT's) with the same random LoRA weights on the embedding."""
    ours = embedding_model(kind)
    theirs = copy.deepcopy(ours)
    delta_model = LoraModel(ours, modified_modules=["0"], lora_r=RANK, lora_alpha=8)
    delta_model.freeze_module()
    config = peft.LoraConfig(target_modules=["0"], r=RANK, lora_alpha=8)
    peft_model = peft.get_peft_model(theirs, config)
    layer = peft_model.base_model.model[0]
    delta = ours[0].lora
    with torch.no_grad():
        delta.lora_embedding_A.normal_()
        delta.lora_embedding_B.normal_()
        layer.lora_embedding_A["default"].copy_(delta.lora_embedding_A)
        layer.lora_embedding_B["default"].copy_(delta.lora_embedding_B)
    return ours, delta, peft_model, layer


@pytest.mark.parametrize("kind", ["plain", "scaled"])
def test_outputs_and_gradients_equal_peft_s(kind):
    ours, delta, peft_model, layer = both(kind)
    ids = torch.tensor([[0, 3, 7, 3], [9, 0, 49, 1]])  # the padding index too
    expected = peft_model(ids)
    output = ours(ids)
    torch.testing.assert_close(output, expected)
    assert not torch.equal(output, embedding_model(kind)(ids))
    grad_out = torch.randn_like(output)
    ours_grads = torch.autograd.grad(
        output, [delta.lora_embedding_A, delta.lora_embedding_B], grad_out
    )
    peft_grads = torch.autograd.grad(
        expected,
        [layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]],
        grad_out,
    )
    for mine, theirs in zip(ours_grads, peft_grads, strict=True):
        torch.testing.assert_close(mine, theirs)
    # padding_idx: the padding row of A gets no gradient, as nn.Embedding's own.
    assert not ours_grads[0][:, 0].any()


@pytest.mark.parametrize(("init", "changes"), [(True, False), ("gaussian", False), (False, True)])
def test_peft_s_initialisations(init, changes):
    model = embedding_model("plain")
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids)
    LoraModel(model, modified_modules=["0"], lora_r=RANK, init_lora_weights=init)
    assert torch.equal(model(ids), before) != changes
    delta = model[0].lora
    assert delta.lora_embedding_B.std().item() == pytest.approx(1.0, rel=0.35)


def test_peft_adapters_load_and_exports_load_in_peft(tmp_path):
    model = tiny_model("llama", "lm")
    pristine = copy.deepcopy(model)
    delta_model = LoraModel(model, modified_modules=["embed_tokens", "q_proj"], lora_r=RANK)
    delta_model.freeze_module()
    with torch.no_grad():
        for parameter in delta_model.parameters():
            parameter.normal_(0, 0.1)
    inputs = tiny_inputs("llama")
    expected = model(**inputs).logits
    assert not torch.equal(expected, pristine(**inputs).logits)

    delta_model.save_finetuned(tmp_path / "peft", format="peft")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "peft")
    torch.testing.assert_close(in_peft(**inputs).logits, expected)
    in_peft.save_pretrained(tmp_path / "from_peft")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "from_peft", copy.deepcopy(pristine))
    torch.testing.assert_close(loaded.backbone_model(**inputs).logits, expected)
    assert any(isinstance(a.delta, LoraEmbeddingDelta) for a in loaded.attachments)


def test_merge_and_unmerge_an_embedding_delta():
    ours, delta, _, _ = both("scaled")
    ids = torch.tensor([[1, 2, 3, 0]])
    weight = ours[0].weight.detach().clone()
    with torch.no_grad():
        expected = ours(ids)
        delta.merge(ours[0])
        torch.testing.assert_close(ours(ids), expected)
        delta.unmerge(ours[0])
    torch.testing.assert_close(ours[0].weight, weight)


def test_a_second_lora_on_an_embedding_is_refused():
    model = embedding_model("plain")
    LoraModel(model, modified_modules=["0"], lora_r=RANK)
    with pytest.raises(ValueError, match="an embedding takes one"):
        LoraModel(model, modified_modules=["0"], lora_r=RANK)
