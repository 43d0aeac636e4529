"""SoftPromptModel: OpenDelta's prompt tuning on encoders, decoder-only LMs and encoder-decoders.

The reference for every forward is the prompt written by hand: the same backbone with the delta
detached, given the prompt's embeddings in front of the input embeddings, the attention mask
with ones in front and token labels with -100 in front (as PEFT's prompt tuning builds them).
OpenDelta's checkpoints are written as its save_finetuned writes them: config.json with the
delta arguments, OpenDelta's recorded modified_modules ["root"] and exclude_modules ["lm_head"],
and the backbone metadata; pytorch_model.bin with `<host>.soft_prompt_layer.soft_embeds`, the
host being the backbone itself or the module its get_encoder() returns.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json

import pytest
import torch
import transformers
from tiny_models import HIDDEN, SEQ2SEQ, VOCAB, first_output, tiny_config, tiny_inputs, tiny_model

from fastdelta import AutoDeltaConfig, AutoDeltaModel, LoraModel, SoftPromptConfig, SoftPromptModel
from fastdelta.delta_models.auto import DELTA_MODELS

ARCHITECTURES = ["bert", "roberta", "distilbert", "gpt2", "llama", "t5", "bart"]
DECODER_ONLY = ["gpt2", "llama"]
TOKENS = 5  # soft_token_num of the tiny tests (the tiny models have 64 positions)
# Where OpenDelta inserts its SoftPromptLayer on each tiny LM: the backbone itself, or the
# module get_encoder() returns.
PROMPT_HOSTS = {"t5": "encoder.", "bart": "model.encoder."}


def prompt_name(architecture: str) -> str:
    return f"{PROMPT_HOSTS.get(architecture, '')}soft_prompt_layer.soft_embeds"


def padded_inputs(architecture: str) -> dict:
    """The tiny LM's inputs with labels, the first row's first two tokens padded away."""
    inputs = tiny_inputs(architecture, "lm")
    inputs["attention_mask"][0, :2] = 0
    key = "decoder_input_ids" if architecture in SEQ2SEQ else "input_ids"
    inputs["labels"] = inputs[key].clone()
    return inputs


def prompted_model(architecture: str, **arguments):
    """A tiny LM with a soft prompt of random values (far from any initialisation)."""
    model = tiny_model(architecture, "lm")
    delta_model = SoftPromptModel(model, soft_token_num=TOKENS, **arguments)
    with torch.no_grad():
        prompt = model.get_parameter(prompt_name(architecture))
        prompt.copy_(torch.randn(prompt.shape, generator=torch.Generator().manual_seed(3)))
    return model, delta_model


def written_by_hand(model, prompt: torch.Tensor, inputs: dict) -> dict:
    """`inputs` of the detached model that carry `prompt` [tokens, hidden] as PEFT builds them."""
    tokens = prompt.shape[0]
    by_hand = dict(inputs)
    embeds = model.get_input_embeddings()(by_hand.pop("input_ids"))
    batch = embeds.shape[0]
    by_hand["inputs_embeds"] = torch.cat([prompt.expand(batch, -1, -1), embeds], dim=1)
    mask = inputs["attention_mask"]
    by_hand["attention_mask"] = torch.cat([torch.ones(batch, tokens, dtype=mask.dtype), mask], 1)
    if "labels" in inputs and "decoder_input_ids" not in inputs:
        ignored = torch.full((batch, tokens), -100, dtype=inputs["labels"].dtype)
        by_hand["labels"] = torch.cat([ignored, inputs["labels"]], dim=1)
    return by_hand


def snapshot(inputs: dict) -> dict:
    return {name: tensor.clone() for name, tensor in inputs.items()}


# --------------------------------------------------------------------------------------------
# 1. What it computes


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_loss_and_gradient_equal_the_prompt_written_by_hand(architecture):
    model, delta_model = prompted_model(architecture)
    delta_model.freeze_module()
    inputs = padded_inputs(architecture)
    given = snapshot(inputs)
    prompt = model.get_parameter(prompt_name(architecture))
    outputs = model(**inputs)
    outputs.loss.backward()

    for name, tensor in inputs.items():  # the caller's tensors are never changed
        assert torch.equal(tensor, given[name]), name
    length = inputs["input_ids"].shape[1]
    if architecture in SEQ2SEQ:  # the encoder output keeps the prompt's positions
        assert outputs.encoder_last_hidden_state.shape == (2, TOKENS + length, HIDDEN)
    else:  # so do an encoder's and a decoder-only LM's logits
        assert outputs.logits.shape == (2, TOKENS + length, VOCAB)

    copied = prompt.detach().clone().requires_grad_()
    delta_model.detach()
    expected = model(**written_by_hand(model, copied, inputs))
    expected.loss.backward()
    assert torch.equal(outputs.logits, expected.logits)
    assert torch.equal(outputs.loss, expected.loss)
    torch.testing.assert_close(prompt.grad, copied.grad, rtol=1e-5, atol=1e-7)
    assert prompt.grad.abs().sum() > 0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_only_the_prompt_trains_and_counts_as_opendelta(architecture):
    model, delta_model = prompted_model(architecture)
    delta_model.freeze_module()
    assert delta_model.trainable_parameters_names() == [prompt_name(architecture)]
    # OpenDelta 0.3.2's SoftPromptLayer: one [soft_token_num, hidden] parameter.
    assert delta_model.num_delta_parameters() == TOKENS * HIDDEN
    assert delta_model.num_trainable_parameters() == TOKENS * HIDDEN
    model(**padded_inputs(architecture)).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is not None] == [
        prompt_name(architecture)
    ]


@pytest.mark.parametrize(
    ("backbone_class", "config_class", "hidden"),
    [
        (transformers.BertModel, transformers.BertConfig, 768),
        (transformers.T5ForConditionalGeneration, transformers.T5Config, 512),
    ],
    ids=["bert-base", "t5-small"],
)
def test_opendelta_parameter_counts_at_the_defaults(backbone_class, config_class, hidden):
    with torch.device("meta"):
        backbone = backbone_class(config_class())
    delta_model = SoftPromptModel(backbone)
    assert delta_model.num_delta_parameters() == 100 * hidden  # 76,800 and 51,200


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_detach_restores_the_exact_outputs_and_attach_brings_the_prompt_back(architecture):
    model = tiny_model(architecture, "lm")
    inputs = tiny_inputs(architecture, "lm")
    plain = first_output(model(**inputs))
    delta_model = SoftPromptModel(model, soft_token_num=TOKENS, token_init=False)
    prompted = first_output(model(**inputs))
    assert not torch.equal(prompted[:, -plain.shape[1] :], plain)
    for _ in range(2):
        delta_model.detach()
        assert torch.equal(first_output(model(**inputs)), plain)
        delta_model.attach()
        assert torch.equal(first_output(model(**inputs)), prompted)


def test_inputs_embeds_position_ids_and_token_type_ids_take_the_prompt_too():
    model, _ = prompted_model("bert")
    inputs = tiny_inputs("bert", "lm")
    expected = first_output(model(**inputs))
    ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(first_output(model(inputs_embeds=embeds, **inputs)), expected)
    # The caller's position ids and token types: shifted behind, and extended by, the prompt.
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    types = torch.zeros_like(ids)
    given = model(ids, position_ids=positions, token_type_ids=types, **inputs)
    assert torch.equal(first_output(given), expected)
    assert torch.equal(positions, torch.arange(ids.shape[1]).expand_as(ids))
    with pytest.raises(ValueError, match=r"attention_mask has 6 positions.*input has 7"):
        model(ids, attention_mask=inputs["attention_mask"][:, 1:])
    with pytest.raises(ValueError, match="exactly one of them"):
        model(ids, inputs_embeds=embeds)


def test_question_answering_positions_shift_behind_the_prompt():
    model = transformers.BertForQuestionAnswering(tiny_config("bert")).eval()
    delta_model = SoftPromptModel(model, soft_token_num=TOKENS, token_init=False)
    inputs = tiny_inputs("bert")
    starts, ends = torch.tensor([1, 4]), torch.tensor([2, 6])
    loss = model(**inputs, start_positions=starts, end_positions=ends).loss
    prompt = model.soft_prompt_layer.soft_embeds.detach()
    delta_model.detach()
    by_hand = written_by_hand(model, prompt, inputs)
    expected = model(**by_hand, start_positions=starts + TOKENS, end_positions=ends + TOKENS)
    assert torch.equal(loss, expected.loss)


def test_a_float32_prompt_keeps_a_bfloat16_model_bfloat16():
    model = tiny_model("bert").to(torch.bfloat16)
    SoftPromptModel(model, soft_token_num=TOKENS, delta_dtype=torch.float32)
    assert model.soft_prompt_layer.soft_embeds.dtype == torch.float32
    assert first_output(model(**tiny_inputs("bert"))).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# 2. Generation: the prompt enters the cache once


@pytest.mark.parametrize("architecture", [*DECODER_ONLY, "t5", "bart"])
def test_generate_with_a_cache_equals_generate_without_one(architecture):
    model, delta_model = prompted_model(architecture)
    inputs = tiny_inputs(architecture, "lm")
    mask = inputs["attention_mask"]
    mask[0, :2] = 0  # left padding in the first row
    given = mask.clone()
    options = {
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_logits": True,
        "pad_token_id": 0,
    }

    def generate(use_cache: bool):
        out = model.generate(
            inputs["input_ids"], attention_mask=mask, use_cache=use_cache, **options
        )
        return out.sequences, torch.stack(out.logits)

    cached, cached_logits = generate(True)
    uncached, uncached_logits = generate(False)
    assert torch.equal(mask, given)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, rtol=1e-5, atol=1e-5)
    delta_model.detach()
    _, plain_logits = generate(True)
    assert not torch.allclose(cached_logits, plain_logits, atol=1e-3)


@pytest.mark.parametrize("architecture", DECODER_ONLY)
def test_cached_decoding_by_hand_takes_the_callers_mask(architecture):
    model, _ = prompted_model(architecture)
    ids = tiny_inputs(architecture)["input_ids"]
    mask = torch.ones_like(ids)
    first = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    cache = first.cache if "cache" in first else first.past_key_values
    step = model(ids[:, -1:], attention_mask=mask, cache=cache)
    whole = model(ids, attention_mask=mask)
    torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], rtol=1e-5, atol=1e-5)
    too_long = torch.ones(2, TOKENS + ids.shape[1] + 1, dtype=mask.dtype)
    with pytest.raises(ValueError, match=r"attention_mask has 13 positions.*caller's tokens only"):
        model(ids[:, -1:], attention_mask=too_long, cache=step.cache)


def test_generate_with_a_static_cache_too_short_for_the_prompt_is_refused_with_the_fix():
    model, _ = prompted_model("llama")
    inputs = tiny_inputs("llama")
    with pytest.raises(ValueError, match=r"holds 9 positions.*needs 12.*default dynamic cache"):
        model.generate(**inputs, max_new_tokens=3, cache_implementation="static")


# --------------------------------------------------------------------------------------------
# 3. Initialisation, configs, checkpoints


def test_token_init_copies_the_first_token_embeddings_and_otherwise_uniform():
    model = tiny_model("gpt2")
    SoftPromptModel(model, soft_token_num=TOKENS)
    embeddings = model.get_input_embeddings().weight
    assert torch.equal(model.soft_prompt_layer.soft_embeds, embeddings[:TOKENS])
    model = tiny_model("gpt2")
    SoftPromptModel(model, soft_token_num=40, token_init=False, init_range=0.1)
    prompt = model.soft_prompt_layer.soft_embeds
    assert 0.05 < prompt.abs().max() <= 0.1
    with pytest.raises(ValueError, match=r"soft_token_num=97 .* has 96: choose soft_token_num"):
        SoftPromptModel(tiny_model("gpt2"), soft_token_num=VOCAB + 1)
    SoftPromptModel(tiny_model("gpt2"), soft_token_num=VOCAB + 1, token_init=False)


def test_config_defaults_are_opendeltas_and_the_constructors():
    config = SoftPromptConfig()
    assert (config.soft_token_num, config.init_range, config.token_init) == (100, 0.5, True)
    assert config.other_expand_ids == {"attention_mask": 1, "token_type_ids": 0}
    parameters = inspect.signature(SoftPromptModel.__init__).parameters
    fields = {field.name for field in dataclasses.fields(SoftPromptConfig)}
    assert fields == set(parameters) - {"self", "backbone_model"}
    assert list(parameters)[:6] == [
        "self",
        "backbone_model",
        "soft_token_num",
        "init_range",
        "token_init",
        "other_expand_ids",
    ]
    assert parameters["other_expand_ids"].default is None
    assert SoftPromptConfig(other_expand_ids=None) == config
    assert SoftPromptConfig(modified_modules=["root"]) == config  # what OpenDelta records


def test_auto_delta_config_and_model_build_it():
    assert DELTA_MODELS["soft_prompt"] is SoftPromptModel
    config = AutoDeltaConfig.from_dict({"delta_type": "soft_prompt", "soft_token_num": 3})
    assert isinstance(config, SoftPromptConfig)
    assert AutoDeltaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for given in (config, config.to_dict()):
        delta_model = AutoDeltaModel.from_config(given, tiny_model("bert"))
        assert type(delta_model) is SoftPromptModel
        assert delta_model.num_delta_parameters() == 3 * HIDDEN


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_and_load_round_trip(architecture, tmp_path):
    model, delta_model = prompted_model(architecture, token_init=False)
    delta_model.freeze_module()
    inputs = tiny_inputs(architecture, "lm")
    expected = first_output(model(**inputs))
    path = delta_model.save_finetuned(tmp_path / "checkpoint")

    fresh = tiny_model(architecture, "lm")
    loaded = AutoDeltaModel.from_finetuned(path, backbone_model=fresh)
    assert type(loaded) is SoftPromptModel
    assert loaded.config == delta_model.config
    assert torch.equal(first_output(fresh(**inputs)), expected)
    assert loaded.trainable_parameters_names() == [prompt_name(architecture)]
    again = SoftPromptModel.from_finetuned(path, tiny_model(architecture, "lm"))
    assert again.config == delta_model.config


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_an_opendelta_checkpoint_loads(architecture, tmp_path):
    model = tiny_model(architecture, "lm")
    prompt = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(5))
    config = {
        "delta_type": "soft_prompt",
        "soft_token_num": 4,
        "init_range": 0.5,
        "token_init": True,
        "modified_modules": ["root"],
        "exclude_modules": ["lm_head"],
        "backbone_class": type(model).__name__,
        "backbone_checkpoint_name": f"tiny-{architecture}",
        "backbone_hash": "0123456789abcdef0123456789abcdef",
        "opendelta_version": "0.3.2",
        "transformers_version": "4.30.2",
    }
    path = tmp_path / "opendelta"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save({prompt_name(architecture): prompt}, path / "pytorch_model.bin")

    assert isinstance(AutoDeltaConfig.from_finetuned(path), SoftPromptConfig)
    delta_model = AutoDeltaModel.from_finetuned(path, backbone_model=model)
    assert type(delta_model) is SoftPromptModel
    assert delta_model.config.soft_token_num == 4
    assert torch.equal(model.get_parameter(prompt_name(architecture)), prompt)
    assert delta_model.trainable_parameters_names() == [prompt_name(architecture)]
    inputs = tiny_inputs(architecture, "lm")
    loaded = first_output(model(**inputs))
    delta_model.detach()
    expected = first_output(model(**written_by_hand(model, prompt, inputs)))
    assert torch.equal(loaded, expected)


def test_it_composes_with_lora_and_survives_a_deep_copy():
    model = tiny_model("gpt2", "lm")
    LoraModel(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape) * 0.1)
    inputs = tiny_inputs("gpt2", "lm")
    with_lora = first_output(model(**inputs))
    delta_model = SoftPromptModel(model, soft_token_num=TOKENS)
    expected = first_output(model(**inputs))
    assert delta_model.num_delta_parameters() == TOKENS * HIDDEN
    twin = copy.deepcopy(model)
    assert twin.soft_prompt_layer.raw_embedding is twin.get_input_embeddings()
    assert torch.equal(first_output(twin(**inputs)), expected)
    delta_model.detach()
    assert torch.equal(first_output(model(**inputs)), with_lora)
    delta_model.attach()
    assert torch.equal(first_output(model(**inputs)), expected)


# --------------------------------------------------------------------------------------------
# 4. Bad arguments, refused by name


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"soft_token_num": 0}, "soft_token_num"),
        ({"soft_token_num": 2.5}, "soft_token_num"),
        ({"soft_token_num": True}, "soft_token_num"),
        ({"init_range": -0.1}, "init_range"),
        ({"init_range": float("nan")}, "init_range"),
        ({"token_init": "yes"}, "token_init"),
        ({"other_expand_ids": ["attention_mask"]}, "other_expand_ids"),
        ({"other_expand_ids": {"labels": -100}}, r"other_expand_ids names 'labels'"),
        ({"other_expand_ids": {"attention_mask": "1"}}, r"other_expand_ids\['attention_mask'\]"),
        ({"modified_modules": ["query"]}, "leave modified_modules out"),
    ],
)
def test_bad_arguments_are_refused_by_name(arguments, message):
    model = tiny_model("bert")
    before = [name for name, _ in model.named_parameters()]
    with pytest.raises((ValueError, TypeError), match=message):
        SoftPromptModel(model, **arguments)
    assert [name for name, _ in model.named_parameters()] == before
    assert not model._forward_pre_hooks
