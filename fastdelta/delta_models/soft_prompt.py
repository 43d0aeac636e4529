"""SoftPromptModel: OpenDelta's prompt tuning, learned embeddings prepended to the input."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fastdelta.delta_models.base import DeltaBase, config_arguments
from fastdelta.delta_models.config import BaseDeltaConfig, _require_bool, _require_finite
from fastdelta.injection import original_class
from fastdelta.layers.soft_prompt import (
    OTHER_EXPAND_IDS,
    PROMPT_ARGUMENTS,
    SoftPromptEncoderMask,
    SoftPromptLayer,
    positional_names,
)

# OpenDelta's name for the backbone itself, the modified_modules its SoftPromptModel records.
ROOT = "root"


@dataclass
class SoftPromptConfig(BaseDeltaConfig):
    """SoftPromptModel's arguments, with OpenDelta 0.3.2's names and defaults.

    `other_expand_ids` maps each argument of the model's forward that grows with the input to
    the value of the prompt's positions in it; None means OpenDelta's default,
    {"attention_mask": 1, "token_type_ids": 0}. `modified_modules` is None or OpenDelta's
    ["root"] (the prompt's place is the architecture's: see SoftPromptModel), stored as None.
    """

    delta_type: ClassVar[str] = "soft_prompt"

    soft_token_num: int = 100
    init_range: float = 0.5
    token_init: bool = True
    other_expand_ids: dict[str, float] | None = field(
        default_factory=lambda: dict(OTHER_EXPAND_IDS)
    )

    def __post_init__(self):
        super().__post_init__()
        if self.modified_modules == [ROOT]:
            self.modified_modules = None
        if self.modified_modules is not None:
            raise ValueError(
                f"modified_modules={self.modified_modules!r}: SoftPromptModel puts its prompt in "
                "front of the backbone's input (its encoder's, for an encoder-decoder model), as "
                "OpenDelta does, and modifies no named module: leave modified_modules out"
            )
        if self.interactive_modify:
            raise ValueError(
                "interactive_modify chooses modified modules, and SoftPromptModel modifies no "
                "named module (its prompt goes in front of the backbone's input): leave "
                "interactive_modify out"
            )
        soft_token_num = self.soft_token_num
        if isinstance(soft_token_num, bool) or not isinstance(soft_token_num, int):
            raise ValueError(f"soft_token_num must be a positive integer, got {soft_token_num!r}")
        if soft_token_num <= 0:
            raise ValueError(f"soft_token_num must be a positive integer, got {soft_token_num}")
        _require_finite(self.init_range, "init_range")
        if self.init_range < 0:
            raise ValueError(
                "init_range is the half-width of the uniform initialisation "
                f"(token_init=False) and must be >= 0, got {self.init_range}"
            )
        _require_bool(self.token_init, "token_init")
        if self.other_expand_ids is None:
            self.other_expand_ids = dict(OTHER_EXPAND_IDS)
        _check_other_expand_ids(self.other_expand_ids)


def _check_other_expand_ids(other_expand_ids) -> None:
    example = "such as {'attention_mask': 1, 'token_type_ids': 0}"
    if not isinstance(other_expand_ids, dict):
        raise TypeError(
            f"other_expand_ids must be a dict {{argument name: value}} {example}, got "
            f"{other_expand_ids!r}"
        )
    for name, value in other_expand_ids.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"other_expand_ids keys are argument names {example}, got {name!r}")
        if name in PROMPT_ARGUMENTS:
            raise ValueError(
                f"other_expand_ids names {name!r}, which the soft prompt extends itself: leave "
                f"it out (other_expand_ids are the other tensors that grow with the input, "
                f"{example})"
            )
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ValueError(
                f"other_expand_ids[{name!r}] is the value of the prompt's positions in {name} "
                f"and must be a finite number, got {value!r}"
            )


class SoftPromptModel(DeltaBase):
    """Prompt tuning (Lester et al., 2021), as OpenDelta applies it: soft_token_num learned
    embeddings, `soft_embeds` [soft_token_num, hidden], in front of the input embeddings of the
    backbone, or of its encoder for an encoder-decoder model (T5, BART). token_init=True
    starts them as the input embeddings of the vocabulary's first soft_token_num tokens;
    token_init=False, uniform(-init_range, init_range).

    The backbone is called as before, with input_ids or inputs_embeds; the masks, token type
    ids, position ids and labels given are those of the caller's tokens, and the prompt's
    positions are added to each (`fastdelta.layers.soft_prompt` says how), in new tensors.
    A causal LM's token `labels` get -100 at the prompt's positions, so its loss is the loss
    of the caller's tokens. The outputs keep the prompt's positions, as PEFT's prompt tuning
    does: a decoder-only or encoder-only model's logits and hidden states, and an
    encoder-decoder model's encoder output, are [batch, soft_token_num + length, ...]; take
    `[:, soft_token_num:]` for the caller's tokens. `generate()` works: the prompt enters the
    cache at the first step, and later steps only extend the attention mask and position ids
    (a static cache needs soft_token_num positions more than the caller's tokens). A call
    without an attention mask gets none (OpenDelta made one from input_ids != 0). A
    decoder-only *ForSequenceClassification model reads the last position when it gets
    inputs_embeds, as in PEFT: give it left-padded batches.

    OpenDelta records modified_modules=["root"], which is taken; the prompt's place is the
    architecture's, so `exclude_modules` and `common_structure` have nothing to select and
    change nothing, as in OpenDelta. The tensor is OpenDelta's:
    `soft_prompt_layer.soft_embeds` on the backbone, `encoder.soft_prompt_layer.soft_embeds` on
    T5, `model.encoder.soft_prompt_layer.soft_embeds` on BART's task models.
    """

    config_class = SoftPromptConfig
    # Not switched off by name: the prompt extends the inputs, masks and labels together.
    switchable = False

    def __init__(
        self,
        backbone_model: nn.Module,
        soft_token_num: int = 100,
        init_range: float = 0.5,
        token_init: bool = True,
        other_expand_ids: dict[str, float] | None = None,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool = False,
        backend: str = "hf",
        *,
        delta_dtype: torch.dtype | str | None = None,
        name: str = "default",
    ):
        super().__init__(backbone_model, self.config_class(**config_arguments(locals())))

    def _targets(self) -> list[str]:
        """The module whose input gets the prompt: the backbone itself, or an encoder-decoder
        model's encoder (OpenDelta's choice); then the decoder whose cross-attention reads that
        encoder's output through the caller's attention mask, when the mask is extended."""
        backbone = self.backbone_model
        if not getattr(getattr(backbone, "config", None), "is_encoder_decoder", False):
            return [""]
        encoder = backbone.get_encoder()
        targets = [self._name_of(encoder)]
        decoder = backbone.get_decoder()
        if (
            "attention_mask" in self.config.other_expand_ids
            and decoder is not None
            and decoder is not encoder
            and decoder is not backbone
        ):
            targets.append(self._name_of(decoder))
        return targets

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        config = self.config
        embedding = self.input_embedding()
        prompt_host = self.backbone_model.get_submodule(targets[0])
        layer = SoftPromptLayer(
            config.soft_token_num,
            embedding,
            positional_names(original_class(prompt_host).forward),
            config.other_expand_ids,
            init_range=config.init_range,
            token_init=config.token_init,
            **self.factory_kwargs(embedding),
        )
        self.insert_sequential_module(targets[0], layer, layer.delta_name)
        for decoder_name in targets[1:]:
            decoder = self.backbone_model.get_submodule(decoder_name)
            mask = SoftPromptEncoderMask(
                config.soft_token_num,
                positional_names(original_class(decoder).forward),
                config.other_expand_ids["attention_mask"],
            )
            self.insert_sequential_module(decoder_name, mask, mask.delta_name)

    def input_embedding(self) -> nn.Embedding:
        """The backbone's input embedding (`get_input_embeddings()`), which embeds input_ids and,
        with token_init, gives the prompt's first values."""
        backbone = self.backbone_model
        getter = getattr(backbone, "get_input_embeddings", None)
        try:
            embedding = getter() if callable(getter) else None
        except NotImplementedError:
            embedding = None
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"SoftPromptModel embeds input_ids with the backbone's get_input_embeddings(), "
                f"and this {type(backbone).__name__} gives "
                f"{type(embedding).__name__ if embedding is not None else 'none'}, not an "
                "nn.Embedding: give a transformers model with a token embedding"
            )
        count, vocabulary = self.config.soft_token_num, embedding.num_embeddings
        if self.config.token_init and count > vocabulary:
            raise ValueError(
                f"token_init=True starts the soft_token_num={count} prompt embeddings as the "
                f"input embeddings of the vocabulary's first {count} tokens, but this "
                f"{type(backbone).__name__} has {vocabulary}: choose soft_token_num <= "
                f"{vocabulary}, or token_init=False (uniform(-init_range, init_range))"
            )
        return embedding
