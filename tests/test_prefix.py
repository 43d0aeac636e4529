"""PrefixModel: learned key/value prefixes in every modified attention layer.

The math is checked against transformers itself: a model whose cache is pre-filled with the
prefixes (PEFT's way of prefix tuning, positions counted from the first real token) computes
what the prefix model computes, on causal models with grouped-query attention, padding, and
both attention implementations. The layout of the reparameterized prefixes is checked against
OpenDelta 0.3.2's ReparameterizeFunction.allocate_parameter, written here from its code, and
the parameter names and counts against its prefix.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import HIDDEN, first_output, tiny_inputs, tiny_model
from transformers import DynamicCache

from fastdelta import AutoDeltaConfig, AutoDeltaModel, PrefixConfig, PrefixModel
from fastdelta.checkpoint_io import checkpoint_format

ARCHITECTURES = [
    "bert",
    "roberta",
    "distilbert",
    "gpt2",
    "bart",
    "t5",
    "llama",
    "mistral",
    "qwen2",
    "gemma",
]
CAUSAL = ["gpt2", "llama", "t5"]
# Small networks keep the tests fast; the defaults (512) are checked by the counts test.
SMALL = {"prefix_token_num": 3, "embed_dim": 10, "mid_dim": 7}


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(**inputs))


def randomize(delta_model, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_backward_train_the_prefix_only(architecture):
    model = tiny_model(architecture, "lm")
    inputs = tiny_inputs(architecture, "lm")
    original = outputs(model, inputs)
    delta_model = PrefixModel(model, **SMALL)
    delta_model.freeze_module()
    output = first_output(model(**inputs))
    assert not torch.allclose(output, original, atol=1e-3), "the prefix changes nothing"
    output.square().mean().backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in delta_model.named_parameters()}
    assert all(".reparams." in name for name in trainable)
    for name, parameter in delta_model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def prefilled_cache_outputs(reference, delta_model, inputs) -> torch.Tensor:
    """`reference` (the backbone without prefix) run with its cache holding each layer's
    prefix, the mask widened over it and the positions counted from the first real token."""
    batch, length = inputs["input_ids"].shape
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        for layer, (_, delta) in enumerate(delta_model.prefixes):
            key, value = delta.prefix_states(batch, torch.float32)
            cache.update(key.clone(), value.clone(), layer)
    prefix_mask = torch.ones(batch, SMALL["prefix_token_num"], dtype=torch.long)
    return outputs(
        reference,
        {
            "input_ids": inputs["input_ids"],
            "attention_mask": torch.cat([prefix_mask, inputs["attention_mask"]], dim=1),
            "cache": cache,
            "position_ids": torch.arange(length).expand(batch, length),
        },
    )


@pytest.mark.parametrize(
    ("architecture", "implementation", "reparameterize"),
    [("gpt2", "sdpa", False), ("gpt2", "eager", True), ("llama", "eager", False),
     ("llama", "sdpa", True)],
)  # fmt: skip
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_equal_attention_over_a_cache_prefilled_with_the_prefix(
    architecture, implementation, reparameterize, padded
):
    model = tiny_model(architecture, "lm")
    model.set_attn_implementation(implementation)
    reference = copy.deepcopy(model)
    delta_model = PrefixModel(model, **{**SMALL, "reparameterize": reparameterize})
    randomize(delta_model)
    inputs = tiny_inputs(architecture, "lm")
    if padded:  # a bool (sdpa) or additive (eager) mask; unpadded, sdpa's mask is None
        inputs["attention_mask"][1, -2:] = 0
    expected = prefilled_cache_outputs(reference, delta_model, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(outputs(model, inputs)[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", CAUSAL)
def test_causal_attention_stays_causal_over_the_real_tokens(architecture):
    model = tiny_model(architecture, "lm")
    PrefixModel(model, **SMALL)
    inputs = tiny_inputs(architecture, "lm")
    changed = copy.deepcopy(inputs)
    key = "decoder_input_ids" if "decoder_input_ids" in inputs else "input_ids"
    changed[key][:, -1] = (changed[key][:, -1] + 1) % 90 + 3
    before, after = outputs(model, inputs), outputs(model, changed)
    torch.testing.assert_close(before[:, :-1], after[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(before[:, -1], after[:, -1])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_detach_restores_the_backbone_exactly_and_attach_brings_the_prefix_back(architecture):
    model = tiny_model(architecture, "lm")
    inputs = tiny_inputs(architecture, "lm")
    original = outputs(model, inputs)
    implementation = model.config._attn_implementation
    delta_model = PrefixModel(model, **SMALL)
    with_prefix = outputs(model, inputs)
    delta_model.detach()
    assert torch.equal(outputs(model, inputs), original)
    assert model.config._attn_implementation == implementation
    delta_model.attach()
    assert torch.equal(outputs(model, inputs), with_prefix)
    with delta_model.disable_adapter():
        assert torch.equal(outputs(model, inputs), original)
    assert torch.equal(outputs(model, inputs), with_prefix)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_generate_applies_the_prefix_at_every_step(architecture):
    model = tiny_model(architecture, "lm")
    delta_model = PrefixModel(model, **SMALL)
    randomize(delta_model)
    input_ids = tiny_inputs(architecture, "lm", batch=1)["input_ids"]
    generated = model.generate(
        input_ids,
        max_new_tokens=4,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = generated.sequences
    assert tokens.shape[1] == input_ids.shape[1] + 4
    for step, scores in enumerate(generated.scores):
        # The same step without a cache: the whole sequence so far, prefix on every layer.
        logits = outputs(model, {"input_ids": tokens[:, : input_ids.shape[1] + step]})
        torch.testing.assert_close(scores, logits[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("architecture", "reparameterize"), [("t5", True), ("gpt2", False)])
def test_save_finetuned_and_from_finetuned_give_the_same_outputs(
    tmp_path, architecture, reparameterize
):
    model = tiny_model(architecture, "lm")
    fresh = copy.deepcopy(model)
    delta_model = PrefixModel(model, **{**SMALL, "reparameterize": reparameterize})
    randomize(delta_model)
    delta_model.freeze_module()
    inputs = tiny_inputs(architecture, "lm")
    path = delta_model.save_finetuned(tmp_path / "prefix")
    loaded = AutoDeltaModel.from_finetuned(path, backbone_model=fresh)
    assert isinstance(loaded, PrefixModel) and loaded.config == delta_model.config
    assert torch.equal(outputs(fresh, inputs), outputs(model, inputs))


def test_auto_delta_config_and_model_build_a_prefix_model():
    config = AutoDeltaConfig.from_dict({"delta_type": "prefix", **SMALL, "reparameterize": False})
    assert type(config) is PrefixConfig and config.prefix_token_num == 3
    model = tiny_model("bert")
    delta_model = AutoDeltaModel.from_config(config, model)
    assert type(delta_model) is PrefixModel
    shapes = {name: tuple(p.shape) for name, p in delta_model.named_parameters()}
    assert shapes == {
        f"encoder.layer.{i}.attention.prefix.{kind}": (3, HIDDEN)
        for i in range(2)
        for kind in ("past_key", "past_value")
    }


def test_names_and_counts_are_opendelta_s():
    # OpenDelta's defaults on tiny T5: the network on the first self-attention block; the
    # T5Attention prefixes (there without reparameterization) inside the T5LayerSelfAttention.
    model = tiny_model("t5")
    delta_model = PrefixModel(model)
    layers, width, tokens = 4, HIDDEN, 6  # 2 encoder + 2 decoder self-attention layers
    shapes = {name: tuple(p.shape) for name, p in delta_model.named_parameters()}
    first = "encoder.block.0.layer.0.reparams"
    assert shapes == {
        f"{first}.wte.weight": (tokens, 512),
        f"{first}.control_trans.0.weight": (512, 512),
        f"{first}.control_trans.0.bias": (512,),
        f"{first}.control_trans.2.weight": (2 * layers * width, 512),
        f"{first}.control_trans.2.bias": (2 * layers * width,),
    }
    assert delta_model.num_delta_parameters() == (
        tokens * 512 + 512 * 512 + 512 + 2 * layers * width * 512 + 2 * layers * width
    )
    direct = PrefixModel(tiny_model("t5"), reparameterize=False)
    assert {name for name, _ in direct.named_parameters()} == {
        f"{stack}.block.{i}.layer.0.SelfAttention.prefix.{kind}"
        for stack in ("encoder", "decoder")
        for i in range(2)
        for kind in ("past_key", "past_value")
    }
    assert direct.num_delta_parameters() == 2 * layers * tokens * width


def opendelta_prefixes(tensors: dict, host: str, layers: int, tokens: int, width: int):
    """OpenDelta's ReparameterizeFunction.allocate_parameter: [(past_key, past_value)] per
    layer, from the network's tensors (dropout 0)."""
    hidden = torch.tanh(
        tensors[f"{host}.reparams.wte.weight"]
        @ tensors[f"{host}.reparams.control_trans.0.weight"].T
        + tensors[f"{host}.reparams.control_trans.0.bias"]
    )
    past = hidden @ tensors[f"{host}.reparams.control_trans.2.weight"].T
    past = past + tensors[f"{host}.reparams.control_trans.2.bias"]
    past = past.view(tokens, layers * 2, width).permute([1, 0, 2]).split(2)
    return [(pair[0], pair[1]) for pair in past]


def test_an_opendelta_checkpoint_loads_and_computes_opendelta_s_prefixes(tmp_path):
    backbone = tiny_model("gpt2")
    tokens, embed, mid, layers = 3, 10, 7, 2
    host = "h.0.attn"
    shapes = {
        f"{host}.reparams.wte.weight": (tokens, embed),
        f"{host}.reparams.control_trans.0.weight": (mid, embed),
        f"{host}.reparams.control_trans.0.bias": (mid,),
        f"{host}.reparams.control_trans.2.weight": (2 * layers * HIDDEN, mid),
        f"{host}.reparams.control_trans.2.bias": (2 * layers * HIDDEN,),
    }
    generator = torch.Generator().manual_seed(3)
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    config = {
        "delta_type": "prefix",
        "prefix_token_num": tokens,
        "reparameterize": True,
        "embed_dim": embed,
        "mid_dim": mid,
        "backbone_class": "GPT2Model",
        "backbone_checkpoint_name": "tiny-gpt2",
        "backbone_hash": "0123456789abcdef0123456789abcdef",
        "opendelta_version": "0.3.2",
        "transformers_version": "4.30.2",
    }
    path = tmp_path / "opendelta"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    torch.save(tensors, path / "pytorch_model.bin")
    assert checkpoint_format(path) == "opendelta"

    delta_model = AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    assert type(delta_model) is PrefixModel
    for name, tensor in tensors.items():
        assert torch.equal(backbone.get_parameter(name), tensor), name
    expected = opendelta_prefixes(tensors, host, layers, tokens, HIDDEN)
    for (_, delta), (past_key, past_value) in zip(delta_model.prefixes, expected, strict=True):
        key, value = delta.key_value()
        torch.testing.assert_close(key, past_key, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(value, past_value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"prefix_token_num": 0}, ValueError, "prefix_token_num must be a positive integer"),
        ({"reparameterize": "yes"}, TypeError, "reparameterize must be True or False"),
        ({"embed_dim": None}, ValueError, "embed_dim=None .* reparameterize=False"),
        ({"mid_dim": -2}, ValueError, "mid_dim must be a positive integer"),
        ({"modified_modules": ["intermediate"]}, ValueError, "must compute attention once"),
        ({"modified_modules": ["layer"]}, ValueError, "must compute attention once"),
        (
            {"modified_modules": ["attention", "attention.self"]},
            ValueError,
            "attention of more than one module",
        ),
    ],
)
def test_bad_arguments_are_refused_by_name(arguments, error, message):
    model = tiny_model("bert")
    original = outputs(model, tiny_inputs("bert"))
    with pytest.raises(error, match=message):
        PrefixModel(model, **arguments)
    assert torch.equal(outputs(model, tiny_inputs("bert")), original)
    assert model.config._attn_implementation == "sdpa"


def test_switching_the_attention_implementation_takes_a_detach_first():
    model = tiny_model("gpt2", "lm")
    inputs = tiny_inputs("gpt2", "lm")
    delta_model = PrefixModel(model, **SMALL)
    with_prefix = outputs(model, inputs)
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match=r"switched to 'eager'.*delta_model\.detach\(\)"):
        model(**inputs)
    delta_model.detach()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"set_attn_implementation\('sdpa'\)"):
        delta_model.attach()
    model.set_attn_implementation("eager")
    delta_model.attach()
    assert model.config._attn_implementation == "fastdelta_prefix_eager"
    torch.testing.assert_close(outputs(model, inputs), with_prefix, rtol=1e-5, atol=1e-5)


def test_an_unsupported_attention_implementation_names_the_fix():
    model = tiny_model("bert")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"set_attn_implementation\('sdpa'\)"):
        PrefixModel(model)
    assert model.config._attn_implementation == "flex_attention"
