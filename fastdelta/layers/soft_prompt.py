"""The soft prompt of prompt tuning: learned embeddings prepended to a model's input.

Both modules here follow OpenDelta's sequential protocol: their `pre_forward` rewrites the
arguments of the module they are attached to before its forward runs (DeltaBase runs it from a
forward pre-hook; no class is patched). The caller's tensors describe the caller's own tokens,
and `SoftPromptLayer` adds the prompt's `soft_token_num` positions to each, always in new tensors
(the caller's are never changed in place):

- on a call without a cache, or with an empty one (a forward, or generation's first step):
  `input_ids` become `inputs_embeds` with the prompt in front (given `inputs_embeds` get it the
  same way); each tensor named in `other_expand_ids` ([batch, length]: attention_mask,
  token_type_ids) gets soft_token_num positions of its value in front; `position_ids` are shifted
  by soft_token_num after positions 0..soft_token_num-1 for the prompt; token `labels` (integers,
  [batch, length]) get -100 in front, so a causal or masked LM's loss skips the prompt; extractive
  QA's `start_positions` / `end_positions` are shifted by soft_token_num;
- on a later call of cached decoding, the prompt is in the cache already: the new tokens pass as
  they are, the attention_mask (which covers every token so far) gets the prompt's positions in
  front, and position_ids are shifted by soft_token_num.

`SoftPromptEncoderMask` sits on the decoder of an encoder-decoder model, whose cross-attention
reads the prompted encoder output through the caller's (unprompted) attention mask.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

# OpenDelta's default: the tensors that grow with the input, and the value of the new positions.
OTHER_EXPAND_IDS = {"attention_mask": 1, "token_type_ids": 0}
# The arguments the prompt itself rewrites, which other_expand_ids cannot name.
PROMPT_ARGUMENTS = ("input_ids", "inputs_embeds", "position_ids", "labels")
# The label transformers' losses skip.
IGNORE_INDEX = -100
# Extractive QA's labels: indices into the sequence, which the prompt shifts.
POSITION_LABELS = ("start_positions", "end_positions")
# The cache argument of a transformers forward: 5.x's name, then 4.x's.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def positional_names(forward) -> tuple[str, ...]:
    """The names, in order, of the parameters (after self) of a module class's `forward` that a
    call may pass positionally and that can be passed by keyword too."""
    names = []
    for parameter in list(inspect.signature(forward).parameters.values())[1:]:
        if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        names.append(parameter.name)
    return tuple(names)


def as_keywords(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """The arguments of a call, `args` named by `names` (a forward's `positional_names`)."""
    if len(args) > len(names):
        raise TypeError(
            f"forward() got {len(args)} positional arguments but takes at most {len(names)} "
            f"({', '.join(names)}): pass the others by keyword"
        )
    named = dict(zip(names, args, strict=False))
    repeated = sorted(named.keys() & kwargs.keys())
    if repeated:
        raise TypeError(f"forward() got multiple values for argument {repeated[0]!r}")
    return {**named, **kwargs}


def cached_length(arguments: dict) -> int:
    """How many positions the cache passed in `arguments` holds (0 without one)."""
    for name in CACHE_ARGUMENTS:
        cache = arguments.get(name)
        if cache is None:
            continue
        if not callable(getattr(cache, "get_seq_length", None)):
            raise TypeError(
                f"{name} is a {type(cache).__name__}; the soft prompt reads how many positions "
                "are cached from a transformers Cache (such as DynamicCache): pass one"
            )
        return int(cache.get_seq_length())
    return 0


def cache_capacity(arguments: dict) -> int | None:
    """The most positions the fixed-size (static) cache passed in `arguments` holds; None for a
    cache that grows (DynamicCache) or none."""
    for name in CACHE_ARGUMENTS:
        cache = arguments.get(name)
        if cache is not None and getattr(cache, "is_compileable", False):
            limit = cache.get_max_length()
            return limit if limit > 0 else None
    return None


def prepended(tensor: torch.Tensor, count: int, value) -> torch.Tensor:
    """A new tensor: `count` positions of `value` in front of `tensor`'s last dimension."""
    front = tensor.new_full((*tensor.shape[:-1], count), value)
    return torch.cat([front, tensor], dim=-1)


class SoftPromptLayer(nn.Module):
    """soft_embeds [soft_token_num, hidden], prepended to the input embeddings of the module it
    is attached to (see the module docstring for how the other arguments follow).

    token_init=True starts the prompt as the input embeddings of the vocabulary's first
    soft_token_num tokens (OpenDelta's choice); token_init=False draws it from
    uniform(-init_range, init_range). `raw_embedding`, the backbone's input embedding, embeds
    `input_ids`; it is not registered as a child, so its weight stays the backbone's alone.
    `argument_names` are the host forward's `positional_names`.
    """

    delta_name = "soft_prompt_layer"

    def __init__(
        self,
        soft_token_num: int,
        raw_embedding: nn.Embedding,
        argument_names: tuple[str, ...],
        other_expand_ids: dict[str, float],
        init_range: float = 0.5,
        token_init: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.__dict__["raw_embedding"] = raw_embedding
        self.argument_names = tuple(argument_names)
        self.other_expand_ids = dict(other_expand_ids)
        if token_init:
            weight = raw_embedding.weight
            with torch.no_grad():
                rows = raw_embedding(torch.arange(soft_token_num, device=weight.device))
            soft_embeds = rows.to(device=device, dtype=dtype, copy=True)
        else:
            hidden = raw_embedding.weight.shape[-1]
            soft_embeds = torch.empty(soft_token_num, hidden, device=device, dtype=dtype)
            soft_embeds.uniform_(-init_range, init_range)
        self.soft_embeds = nn.Parameter(soft_embeds)

    @property
    def soft_token_num(self) -> int:
        return self.soft_embeds.shape[0]

    def extra_repr(self) -> str:
        return f"soft_token_num={self.soft_token_num}, hidden={self.soft_embeds.shape[1]}"

    def pre_forward(self, *args, **kwargs) -> tuple[tuple, dict]:
        """The host's arguments with the prompt's positions added: (no positional ones, all
        by keyword)."""
        arguments = as_keywords(self.argument_names, args, kwargs)
        past = cached_length(arguments)
        length = self._input_length(arguments)
        needed = past + length + (0 if past else self.soft_token_num)
        capacity = cache_capacity(arguments)
        if capacity is not None and needed > capacity:
            raise ValueError(
                f"The cache holds {capacity} positions, and this call needs {needed} with the "
                f"soft prompt's {self.soft_token_num}: a static cache (generate's "
                "cache_implementation='static') is sized for the caller's tokens alone. Generate "
                "with the default dynamic cache, or give a StaticCache with soft_token_num more "
                "positions (max_cache_len)"
            )
        if past:
            return (), self._continued(arguments, past, length)
        return (), self._prompted(arguments, length)

    def _prompted(self, arguments: dict, length: int) -> dict:
        """A call without cached positions: the input, `length` tokens, gets the prompt."""
        count = self.soft_token_num
        inputs_embeds = arguments.get("inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.raw_embedding(arguments["input_ids"])
        batch = inputs_embeds.shape[0]
        # In the activations' dtype, as PEFT's prompt: float32 deltas (delta_dtype) on a
        # bfloat16 model must not turn the model's activations float32.
        prompt = self.soft_embeds.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        prompted = {**arguments, "inputs_embeds": torch.cat([prompt, inputs_embeds], dim=1)}
        if "input_ids" in arguments:
            prompted["input_ids"] = None
        for name, value in self.other_expand_ids.items():
            tensor = arguments.get(name)
            if tensor is not None:
                self._check_expandable(name, tensor, length, "the input has")
                prompted[name] = prepended(tensor, count, value)
        positions = arguments.get("position_ids")
        if positions is not None:
            prompt_positions = torch.arange(count, device=positions.device, dtype=positions.dtype)
            prompted["position_ids"] = torch.cat(
                [prompt_positions.expand(*positions.shape[:-1], count), positions + count], dim=-1
            )
        labels = arguments.get("labels")
        if (
            isinstance(labels, torch.Tensor)
            and not labels.is_floating_point()
            and labels.shape == (batch, length)
        ):
            prompted["labels"] = prepended(labels, count, IGNORE_INDEX)
        for name in POSITION_LABELS:
            if isinstance(arguments.get(name), torch.Tensor):
                prompted[name] = arguments[name] + count
        return prompted

    def _continued(self, arguments: dict, past: int, current: int) -> dict:
        """A call of cached decoding: the cache holds the prompt and `past` - soft_token_num of
        the caller's tokens, and the input `current` more."""
        count = self.soft_token_num
        so_far = past - count + current
        continued = dict(arguments)
        for name, value in self.other_expand_ids.items():
            tensor = arguments.get(name)
            if tensor is None:
                continue
            per_token = isinstance(tensor, torch.Tensor) and tensor.shape[-1] == current
            if name != "attention_mask" and per_token:
                continue  # a tensor of the new tokens only (token_type_ids), as the input
            self._check_expandable(name, tensor, so_far, "the cache and the input hold")
            continued[name] = prepended(tensor, count, value)
        if arguments.get("position_ids") is not None:
            continued["position_ids"] = arguments["position_ids"] + count
        return continued

    def _input_length(self, arguments: dict) -> int:
        input_ids, inputs_embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        if (input_ids is None) == (inputs_embeds is None):
            given = "both" if input_ids is not None else "neither"
            raise ValueError(
                f"The soft prompt goes in front of input_ids or inputs_embeds, and the call "
                f"gave {given}: give exactly one of them"
            )
        return (input_ids if inputs_embeds is None else inputs_embeds).shape[1]

    def _check_expandable(self, name: str, tensor, length: int, holds: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
            raise ValueError(
                f"The soft prompt adds its {self.soft_token_num} positions to {name} [batch, "
                f"length], but {name} is {shape}: pass the 2-D {name} of the caller's tokens "
                "(generate builds a 4-D attention mask only for a static or compiled cache: "
                "generate with the default dynamic cache)"
            )
        if tensor.shape[-1] != length:
            raise ValueError(
                f"{name} has {tensor.shape[-1]} positions, but {holds} {length} of the "
                f"caller's tokens: give {name} for the caller's tokens only; the soft prompt "
                f"adds its own {self.soft_token_num} positions to it"
            )


class SoftPromptEncoderMask(nn.Module):
    """On the decoder of an encoder-decoder model whose encoder carries the SoftPromptLayer.

    The encoder's output holds the prompt's soft_token_num positions in front; the mask of the
    encoder's positions that the decoder's cross-attention reads (`encoder_attention_mask`, the
    model's attention_mask) is the caller's and lacks them: it gets them, with `value`. Masks
    that cover every position already (an encoder output computed without the prompt) pass as
    they are. No parameters.
    """

    delta_name = "soft_prompt_encoder_mask"

    def __init__(self, soft_token_num: int, argument_names: tuple[str, ...], value=1):
        super().__init__()
        self.soft_token_num = soft_token_num
        self.argument_names = tuple(argument_names)
        self.value = value

    def extra_repr(self) -> str:
        return f"soft_token_num={self.soft_token_num}"

    def pre_forward(self, *args, **kwargs) -> tuple[tuple, dict]:
        arguments = as_keywords(self.argument_names, args, kwargs)
        mask = arguments.get("encoder_attention_mask")
        states = arguments.get("encoder_hidden_states")
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and states is not None
            and mask.shape[-1] == states.shape[1] - self.soft_token_num
        ):
            arguments["encoder_attention_mask"] = prepended(mask, self.soft_token_num, self.value)
        return (), arguments
