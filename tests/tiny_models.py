"""Tiny transformers models built from configs (no downloads), one per supported architecture.

Sizes are odd on purpose (hidden 36, intermediate 52) so shape bugs cannot hide behind powers
of two; two layers so layer indices and folding show.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 96
HIDDEN = 36
INTERMEDIATE = 52
LAYERS = 2
HEADS = 2

# The tiny sizes in each family's argument names.
BERT_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": 64,
}
DECODER_SIZES = {**BERT_SIZES, "num_key_value_heads": 1}  # Llama and its kin, with GQA
GPT2_SIZES = {
    "vocab_size": VOCAB,
    "n_embd": HIDDEN,
    "n_layer": LAYERS,
    "n_head": HEADS,
    "n_inner": INTERMEDIATE,
    "n_positions": 64,
    "bos_token_id": VOCAB - 1,
    "eos_token_id": VOCAB - 1,
}
T5_SIZES = {
    "vocab_size": VOCAB,
    "d_model": HIDDEN,
    "d_kv": 18,
    "d_ff": INTERMEDIATE,
    "num_layers": LAYERS,
    "num_heads": HEADS,
    "decoder_start_token_id": 0,
}
BART_SIZES = {
    "vocab_size": VOCAB,
    "d_model": HIDDEN,
    "encoder_layers": LAYERS,
    "decoder_layers": LAYERS,
    "encoder_ffn_dim": INTERMEDIATE,
    "decoder_ffn_dim": INTERMEDIATE,
    "max_position_embeddings": 64,
}
IMAGE_SIZES = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": INTERMEDIATE,
    "image_size": 32,
    "patch_size": 8,
}

CONFIGS = {
    "bert": lambda: transformers.BertConfig(**BERT_SIZES),
    "roberta": lambda: transformers.RobertaConfig(**BERT_SIZES),
    "distilbert": lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=INTERMEDIATE,
        max_position_embeddings=64,
    ),
    "deberta-v2": lambda: transformers.DebertaV2Config(
        **BERT_SIZES, relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=16
    ),
    "t5": lambda: transformers.T5Config(**T5_SIZES, feed_forward_proj="relu"),
    "t5-v1_1": lambda: transformers.T5Config(
        **T5_SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False
    ),
    "bart": lambda: transformers.BartConfig(
        **BART_SIZES, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS
    ),
    "gpt2": lambda: transformers.GPT2Config(**GPT2_SIZES),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=INTERMEDIATE,
        max_position_embeddings=64,
        word_embed_proj_dim=HIDDEN,
    ),
    "llama": lambda: transformers.LlamaConfig(**DECODER_SIZES),
    "mistral": lambda: transformers.MistralConfig(**DECODER_SIZES),
    "qwen2": lambda: transformers.Qwen2Config(**DECODER_SIZES),
    "gemma": lambda: transformers.GemmaConfig(**DECODER_SIZES, head_dim=18),
}
ARCHITECTURES = sorted(CONFIGS)

# Architectures fastdelta has no common-structure map for (deltas go where modified_modules
# names), used by the tests of OpenDelta's material; not in ARCHITECTURES.
UNMAPPED_CONFIGS = {
    "clip": lambda: transformers.CLIPConfig(
        text_config={**BERT_SIZES, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        vision_config={**IMAGE_SIZES},
        projection_dim=20,
    ),
    "vit": lambda: transformers.ViTConfig(**IMAGE_SIZES),
    "beit": lambda: transformers.BeitConfig(**IMAGE_SIZES, use_relative_position_bias=True),
    "gptj": lambda: transformers.GPTJConfig(**GPT2_SIZES, rotary_dim=8),
    "longt5": lambda: transformers.LongT5Config(
        **T5_SIZES,
        encoder_attention_type="transient-global",
        local_radius=4,
        global_block_size=4,
    ),
    "blenderbot": lambda: transformers.BlenderbotConfig(
        **BART_SIZES, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS
    ),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(**BERT_SIZES),
}

# The head class of each architecture used for "a model with a head" in tests.
HEADS_BY_KIND = {
    "base": transformers.AutoModel,
    "lm": None,  # causal LM, masked LM or seq2seq LM, whichever the architecture has
    "classification": transformers.AutoModelForSequenceClassification,
}
ENCODER_ONLY = {"bert", "roberta", "distilbert", "deberta-v2"}
SEQ2SEQ = {"t5", "t5-v1_1", "bart"}


def tiny_config(architecture: str, **overrides):
    config = {**CONFIGS, **UNMAPPED_CONFIGS}[architecture]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(architecture: str, kind: str = "base", seed: int = 0, **overrides):
    """A tiny model of `architecture` in eval mode; `kind` is "base", "lm" or "classification"."""
    config = tiny_config(architecture, **overrides)
    if kind == "classification" and architecture in {
        "gpt2",
        "opt",
        "llama",
        "mistral",
        "qwen2",
        "gemma",
    }:
        config.pad_token_id = 0
    if kind == "lm":
        if architecture in ENCODER_ONLY:
            auto = transformers.AutoModelForMaskedLM
        elif architecture in SEQ2SEQ:
            auto = transformers.AutoModelForSeq2SeqLM
        else:
            auto = transformers.AutoModelForCausalLM
    else:
        auto = HEADS_BY_KIND[kind]
    torch.manual_seed(seed)
    return auto.from_config(config).eval()


def tiny_inputs(
    architecture: str, kind: str = "base", batch: int = 2, length: int = 7, seed: int = 1
) -> dict:
    """Keyword inputs for a forward pass of a tiny model of `architecture` and head `kind`."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB - 1, (batch, length), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if architecture in SEQ2SEQ:
        if kind == "classification":
            # The classification head reads the hidden state at the end-of-sequence token.
            input_ids[:, -1] = tiny_config(architecture).eos_token_id
        else:
            inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=generator)
    return inputs


def first_output(outputs) -> torch.Tensor:
    """The first tensor of a model's outputs (logits or last hidden state)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    return outputs[0]
