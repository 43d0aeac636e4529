"""Hot-swapping LoRA weights: another checkpoint's A and B copied into the deltas in place.

A LoraModel built with `max_rank=R` has its A [R, in] and B [out, R] padded with zeros past
each delta's rank. The padding changes nothing, in the forward or in training: the rows of A
past the rank meet zero columns of B, so B A is the rank-r product, and their gradients are
zero (dB's padded columns are s dY^T (x A_pad^T) = 0, dA's padded rows s B_pad^T dY x = 0), so
they stay zero under any optimizer that leaves a zero gradient's parameter alone (SGD, Adam and
AdamW, weight decay of zero included).

`hot_swap` then copies an adapter of any rank r' <= R into those tensors: A' into A's first r'
rows, B' into B's first r' columns, zeros after. Nothing is re-attached and no module attribute
changes, so a torch.compile'd model runs on without recompiling. The layer's scaling s stays
what it was built with (it is a Python number in the op's call, which a compiled graph holds as a
constant): the checkpoint's own scaling s' (its lora_alpha / r, per layer) is folded into B,
which holds s'/s B'. The layer then computes exactly the checkpoint's update, s (s'/s B') A' =
s' B' A'. Saving it writes those tensors with this model's config, which loads back to the same
outputs; training it goes on at this model's scaling (the learning rate acts on s'/s B').
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fastdelta.checkpoint_io import check_tensor_values
from fastdelta.delta_models.checkpoint import (
    read_named_checkpoint,
    saved_config,
    saved_names,
)
from fastdelta.delta_models.config import LoraConfig, pattern_value
from fastdelta.layers.lora import LoraEmbeddingDelta


def factor_names(delta: nn.Module) -> tuple[str, str]:
    """The names of a LoRA delta's A [r, in] and B [out, r] parameters."""
    if isinstance(delta, LoraEmbeddingDelta):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A", "lora_B"


def pad_rank(delta: nn.Module, max_rank: int | None) -> nn.Module:
    """`delta` with its A and B padded with zeros to rank `max_rank` (None: as it is)."""
    if max_rank is None:
        return delta
    for name, dim in zip(factor_names(delta), (0, 1), strict=True):
        factor = getattr(delta, name)
        shape = list(factor.shape)
        shape[dim] = max_rank
        padded = factor.new_zeros(shape)
        padded.narrow(dim, 0, factor.shape[dim]).copy_(factor.detach())
        setattr(delta, name, nn.Parameter(padded, requires_grad=factor.requires_grad))
    return delta


def scaling(config: LoraConfig, host_name: str) -> float:
    """The scaling a LoRA delta of `config` has on the module `host_name`."""
    rank = pattern_value(config.rank_pattern, host_name, config.lora_r)
    alpha = pattern_value(config.alpha_pattern, host_name, config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def hot_swap(delta_model, source, name: str | None = None) -> None:
    """Copy the LoRA weights of `source` into `delta_model`'s deltas in place (see the module's
    docstring): a checkpoint directory (fastdelta or PEFT; `name` picks a subdirectory as in
    from_finetuned), or a state dict keyed as `delta_model.state_dict()` whose tensors are
    taken at this model's own scaling. Every key, shape and rank is checked before anything is
    copied."""
    deltas = _swappable(delta_model)
    if isinstance(source, Mapping):
        tensors, described = dict(source), "the state dict given"
        scalings = {attachment.host_name: attachment.delta.scaling for attachment in deltas}
    elif isinstance(source, (str, Path)):
        tensors, scalings = _read(delta_model, source, name)
        described = f"the checkpoint {str(source)!r}"
    else:
        raise TypeError(
            "hot_swap takes a checkpoint directory (a str or pathlib.Path) or a state dict keyed "
            f"as delta_model.state_dict() keys it, got {type(source).__name__}"
        )
    copies = _checked_copies(deltas, tensors, scalings, described)
    with torch.no_grad():
        for target, incoming, rank_dim, factor in copies:
            value = incoming.float().mul(factor).to(target.dtype)  # a copy, before zeroing
            target.zero_()
            target.narrow(rank_dim, 0, value.shape[rank_dim]).copy_(value)


def _swappable(delta_model) -> list:
    """`delta_model`'s attachments, each a plain LoRA delta that a checkpoint can be swapped
    into (not DoRA, not merged, not PiSSA / OLoRA)."""
    problems = []
    for attachment in delta_model.attachments:
        delta = attachment.delta
        where = f"{attachment.host_name}.{attachment.delta_name}"
        if getattr(delta, "lora_magnitude_vector", None) is not None:
            problems.append(f"{where} is a DoRA delta (its magnitude fits its own A and B)")
        elif getattr(delta, "merged", False):
            problems.append(f"{where} is merged into its layer (call unmerge() first)")
        elif getattr(delta, "lora_A_init", None) is not None:
            problems.append(
                f"{where} was initialised from its layer's weight (PiSSA / OLoRA), which it "
                "changed: another adapter does not fit that weight"
            )
    if problems:
        raise ValueError("hot_swap cannot swap weights into this LoraModel: " + "; ".join(problems))
    if not delta_model.attachments:
        raise RuntimeError("hot_swap: this LoraModel has no deltas (merge_and_unload took them)")
    return delta_model.attachments


def _read(delta_model, path, name) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The LoRA tensors of the checkpoint at `path`, keyed by `delta_model`'s parameter names,
    and the checkpoint's scaling on each of its modules."""
    checkpoint = read_named_checkpoint(path, delta_model.backbone_model, name)
    if checkpoint.delta_type != "lora":
        raise ValueError(
            f"{str(path)!r} holds a {checkpoint.delta_type!r} checkpoint: hot_swap swaps LoRA "
            "weights into a LoraModel"
        )
    config = saved_config(LoraConfig, checkpoint)
    if config.use_dora:
        raise ValueError(
            f"{str(path)!r} holds DoRA deltas, whose magnitudes a plain LoRA delta has no place "
            "for: load it with AutoDeltaModel.from_finetuned"
        )
    check_tensor_values(checkpoint.tensors, checkpoint.source)
    actual = {saved: current for current, saved in saved_names(delta_model).items()}
    tensors = {actual.get(key, key): tensor for key, tensor in checkpoint.tensors.items()}
    hosts = {attachment.host_name for attachment in delta_model.attachments}
    return tensors, {host: scaling(config, host) for host in hosts}


def _checked_copies(attachments, tensors, scalings, described) -> list:
    """(parameter, incoming tensor, its rank dimension, factor) for A and B of each delta, after
    checking keys, shapes and ranks: an error names every problem, and nothing is copied."""
    copies, problems, expected = [], [], set()
    for attachment in attachments:
        delta, prefix = attachment.delta, f"{attachment.host_name}.{attachment.delta_name}."
        prefix = prefix.lstrip(".")
        names = [prefix + name for name in factor_names(delta)]
        expected.update(names)
        if not all(name in tensors for name in names):
            continue
        ranks = {tensors[names[0]].shape[0], tensors[names[1]].shape[-1]}
        own_rank = getattr(delta, factor_names(delta)[0]).shape[0]
        rank = next(iter(ranks)) if len(ranks) == 1 else None
        for name, dim in zip(names, (0, 1), strict=True):
            target, incoming = getattr(delta, name.rsplit(".", 1)[1]), tensors[name]
            other = 1 - dim
            if incoming.dim() != 2 or incoming.shape[other] != target.shape[other]:
                problems.append(
                    f"{name} {tuple(incoming.shape)} in {described}, {tuple(target.shape)} here"
                )
        if rank is None:
            problems.append(f"{names[0]} and {names[1]} have different ranks in {described}")
        elif rank > own_rank:
            problems.append(
                f"{prefix.rstrip('.')} has rank {rank} in {described}, more than the {own_rank} "
                "it was built with (build the LoraModel with a max_rank as large as the largest "
                "rank to swap in)"
            )
        own, theirs = delta.scaling, scalings[attachment.host_name]
        if own == 0 and theirs != 0:
            problems.append(f"{prefix.rstrip('.')} has scaling 0 here (lora_alpha=0)")
        if problems:
            continue
        ratio = theirs / own if own else 0.0
        for name, dim in zip(names, (0, 1), strict=True):
            target = getattr(delta, name.rsplit(".", 1)[1])
            copies.append((target, tensors[name], dim, ratio if dim == 1 else 1.0))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing:
        problems.append(f"{described} lacks {', '.join(missing[:4])}")
    if unexpected:
        problems.append(
            f"{described} holds tensors that are not this LoraModel's LoRA weights (a "
            f"trained head, or deltas on other modules): {', '.join(unexpected[:4])}; load it "
            "with AutoDeltaModel.from_finetuned instead"
        )
    if problems:
        raise ValueError(
            f"hot_swap: {described} does not fit this LoraModel: " + "; ".join(problems)
        )
    return copies
