"""DoRA on nn.Embedding (LoraModel(use_dora=True) on embed_tokens / word_embeddings): PEFT's
DoraEmbeddingLayer, y = k * embed(ids) + k * s * A^T[ids] B^T (times embed_scale), k = m /
||W + s (B A)^T|| per embedding column, the norm over the vocabulary. The same outputs and every
gradient as PEFT's, padding rows included; the float64 form with the norm constant or
differentiated (dora_exact_norm); the magnitude's start; merge / unmerge; adapters both ways.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from test_lora_embedding import ScaledEmbedding
from tiny_models import tiny_inputs, tiny_model
from torch import nn

from fastdelta import AutoDeltaModel, LoraModel

RANK, ALPHA = 4, 8
PAD = 0


def scaled_model() -> nn.Module:
    """An embedding with Gemma 3's embed_scale and a padding row, under a linear layer."""
    torch.manual_seed(0)
    return nn.Sequential(ScaledEmbedding(50, 12, padding_idx=PAD), nn.Linear(12, 5))


# kind: (the model, its embedding's name)
MODELS = {
    "llama": (lambda: tiny_model("llama", pad_token_id=PAD), "embed_tokens"),
    "bert": (lambda: tiny_model("bert"), "word_embeddings"),
    "scaled": (scaled_model, "0"),
}


def inputs(kind: str) -> dict:
    """Token ids with the padding id among them."""
    if kind == "scaled":
        return {"input": torch.tensor([[PAD, 3, 7, 3], [9, PAD, 49, 1]])}
    found = tiny_inputs(kind)
    found["input_ids"][:, 1] = PAD
    return found


def run(model: nn.Module, kind: str, **options) -> torch.Tensor:
    output = model(**inputs(kind), **options)
    return output if kind == "scaled" else output.last_hidden_state


def both(kind: str, exact_norm: bool = False):
    """(fastdelta's delta model, its embedding delta, PEFT's model, PEFT's layer): DoRA on the
    embedding of copies of one base, with the same random A, B and perturbed magnitude."""
    build, target = MODELS[kind]
    model = build()
    theirs = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(target_modules=[target], r=RANK, lora_alpha=ALPHA, use_dora=True),
    )
    ours = LoraModel(
        model, modified_modules=[target], lora_r=RANK, lora_alpha=ALPHA, use_dora=True,
        dora_exact_norm=exact_norm,
    )  # fmt: skip
    ours.freeze_module()
    (attachment,) = ours.attachments
    delta = attachment.delta
    layer = theirs.base_model.model.get_submodule(attachment.host_name)
    torch.manual_seed(1)
    with torch.no_grad():
        delta.lora_embedding_A.normal_(0, 0.3)
        delta.lora_embedding_B.normal_(0, 0.3)
        delta.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(delta.lora_magnitude_vector))
        layer.lora_embedding_A["default"].copy_(delta.lora_embedding_A)
        layer.lora_embedding_B["default"].copy_(delta.lora_embedding_B)
        layer.lora_magnitude_vector["default"].weight.copy_(delta.lora_magnitude_vector)
    return ours, delta, theirs, layer


def fastdelta_parameters(model: nn.Module, host_name: str) -> list[nn.Parameter]:
    host = model.get_submodule(host_name)
    delta = host.lora
    return [delta.lora_embedding_A, delta.lora_embedding_B, delta.lora_magnitude_vector]


def peft_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [
        layer.lora_embedding_A["default"],
        layer.lora_embedding_B["default"],
        layer.lora_magnitude_vector["default"].weight,
    ]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_outputs_and_every_gradient_equal_peft_s(kind):
    ours, _, theirs, layer = both(kind)
    host_name = ours.attachments[0].host_name
    host = ours.backbone_model.get_submodule(host_name)
    for weight in (host.weight, layer.base_layer.weight):  # the table's gradient too
        weight.requires_grad_(True)
    output, expected = run(ours.backbone_model, kind), run(theirs, kind)
    torch.testing.assert_close(output, expected)
    grad = torch.randn_like(output)
    mine = torch.autograd.grad(
        output, [*fastdelta_parameters(ours.backbone_model, host_name), host.weight], grad
    )
    reference = torch.autograd.grad(
        expected, [*peft_parameters(layer), layer.base_layer.weight], grad
    )
    for a, b in zip(mine, reference, strict=True):
        torch.testing.assert_close(a, b)
    # padding_idx: the padding row gets no gradient through the lookup (A's column, W's row).
    assert not mine[0][:, PAD].any() and not mine[3][PAD].any()


@pytest.mark.parametrize("exact_norm", [False, True], ids=["constnorm", "exact"])
def test_equals_the_float64_form_that_builds_the_table_with_its_update(exact_norm):
    """The norm from W + s (B A)^T formed in float64, over the vocabulary (dim 0), a constant of
    the backward or (dora_exact_norm) differentiated through A, B and a trainable W."""
    ours, delta, _, _ = both("scaled", exact_norm=exact_norm)
    host = ours.backbone_model[0]
    host.weight.requires_grad_(True)
    ids = inputs("scaled")["input"]
    leaves = [
        p.detach().double().requires_grad_()
        for p in (delta.lora_embedding_A, delta.lora_embedding_B, delta.lora_magnitude_vector,
                  host.weight)
    ]  # fmt: skip
    lora_A, lora_B, magnitude, weight = leaves
    norm = torch.linalg.vector_norm(weight + delta.scaling * (lora_B @ lora_A).t(), dim=0)
    k = magnitude / (norm if exact_norm else norm.detach())
    after_A = F.embedding(ids, lora_A.t(), padding_idx=PAD)
    expected = k * (
        F.embedding(ids, weight, padding_idx=PAD) + delta.scaling * after_A @ lora_B.t()
    )
    expected = expected * host.embed_scale
    output = host(ids)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(output)
    parameters = [delta.lora_embedding_A, delta.lora_embedding_B, delta.lora_magnitude_vector]
    mine = torch.autograd.grad(output, [*parameters, host.weight], grad)
    for a, b in zip(mine, torch.autograd.grad(expected, leaves, grad.double()), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", [True, False])
def test_the_magnitude_starts_at_the_column_norms_as_peft_s(init):
    model = scaled_model()
    ids = inputs("scaled")["input"]
    before = model(ids)
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(target_modules=["0"], r=RANK, use_dora=True)
    )
    LoraModel(model, modified_modules=["0"], lora_r=RANK, use_dora=True, init_lora_weights=init)
    host, delta = model[0], model[0].lora
    combined = host.weight + delta.scaling * (delta.lora_embedding_B @ delta.lora_embedding_A).t()
    norms = torch.linalg.vector_norm(combined, dim=0)
    torch.testing.assert_close(delta.lora_magnitude_vector, norms.detach())
    if init is True:  # A zeros: nothing changes, and PEFT starts at the same magnitude
        torch.testing.assert_close(model(ids), before)
        peft_magnitude = theirs.base_model.model[0].lora_magnitude_vector["default"].weight
        torch.testing.assert_close(delta.lora_magnitude_vector, peft_magnitude)


@pytest.mark.parametrize("kind", ["llama", "scaled"])
def test_merge_and_unmerge_equal_peft_s_merge_and_round_trip(kind):
    ours, _, theirs, layer = both(kind)
    host = ours.backbone_model.get_submodule(ours.attachments[0].host_name)
    weight = host.weight.detach().clone()
    with torch.no_grad():
        expected = run(ours.backbone_model, kind)
        ours.merge()
        torch.testing.assert_close(run(ours.backbone_model, kind), expected)
        theirs.merge_adapter()
        torch.testing.assert_close(host.weight, layer.base_layer.weight)
        ours.unmerge()
    torch.testing.assert_close(host.weight, weight)


def peft_trained(kind: str, targets: list[str]):
    """(the base model, PEFT's DoRA model on `targets` with random A, B and magnitudes)."""
    base = MODELS[kind][0]()
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            target_modules=targets, r=RANK, lora_alpha=ALPHA, use_dora=True,
            init_lora_weights=False,
        ),
    )  # fmt: skip
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn_like(parameter))
    return base, theirs


@pytest.mark.parametrize(
    ("kind", "targets"), [("llama", ["embed_tokens", "q_proj"]), ("bert", ["word_embeddings"])]
)
def test_adapters_load_both_ways_and_round_trip(tmp_path, kind, targets):
    """PEFT's adapter (for Llama's embed_tokens PEFT saves the table too) loads with PEFT's
    outputs and gradients; the export loads in PEFT; fastdelta's checkpoint loads again."""
    base, theirs = peft_trained(kind, targets)
    expected = run(theirs, kind)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "theirs", copy.deepcopy(base))
    output = run(loaded.backbone_model, kind)
    torch.testing.assert_close(output, expected)
    host_name = next(a.host_name for a in loaded.attachments if a.host_name.endswith(targets[0]))
    grad = torch.randn_like(output)
    layer = theirs.base_model.model.get_submodule(host_name)
    mine = torch.autograd.grad(output, fastdelta_parameters(loaded.backbone_model, host_name), grad)
    for a, b in zip(mine, torch.autograd.grad(expected, peft_parameters(layer), grad), strict=True):
        torch.testing.assert_close(a, b)

    loaded.save_finetuned(tmp_path / "ours", format="peft")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(run(in_peft, kind), expected)
    loaded.save_finetuned(tmp_path / "fastdelta")
    again = AutoDeltaModel.from_finetuned(tmp_path / "fastdelta", copy.deepcopy(base))
    assert again.config.use_dora
    torch.testing.assert_close(run(again.backbone_model, kind), expected)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_table_a_peft_adapter_saved_loads_into_the_host_frozen(tmp_path, use_dora):
    """PEFT saves a targeted embed_tokens' table with the adapter and loads it into the base
    layer (which also takes a resized or trained table): so does fastdelta, leaving it frozen."""
    base = MODELS["llama"][0]()
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            target_modules=["embed_tokens"], r=RANK, use_dora=use_dora, init_lora_weights=False
        ),
    )
    table = theirs.base_model.model.embed_tokens.base_layer.weight
    with torch.no_grad():
        table.add_(0.1 * torch.randn_like(table))
    theirs.save_pretrained(tmp_path)
    loaded = AutoDeltaModel.from_finetuned(tmp_path, copy.deepcopy(base))
    host = loaded.backbone_model.embed_tokens
    assert torch.equal(host.weight, table) and not host.weight.requires_grad
    torch.testing.assert_close(run(loaded.backbone_model, "llama"), run(theirs, "llama"))
