"""A weighted merge of LoRA delta models into a new one (PEFT's `add_weighted_adapter`).

On each module that any of the LoRA models modifies, with weights w_i and scalings s_i, the new
delta (scaling 1) holds:
- "cat": A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], rank the sum of the ranks:
  B A = sum_i w_i s_i B_i A_i exactly, the weighted sum of the updates;
- "linear": A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i, for deltas
  of one rank: PEFT's "linear", which is not the weighted sum of the updates (it adds the cross
  products B_i A_j); cheap, and exact for one model;
- "svd": the weighted sum of the updates, truncated to rank `svd_rank` (default the largest
  rank) by its singular value decomposition, B = U S, A = V^T.
These are PEFT's formulas, so the results equal PEFT's for the same adapters.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from fastdelta.delta_models.hot_swap import factor_names
from fastdelta.delta_models.lora import LoraModel
from fastdelta.delta_models.names import check_name, delta_names

COMBINATIONS = ("cat", "linear", "svd")


def add_weighted_lora(
    delta_models: list[LoraModel],
    weights: list[float],
    name: str,
    combination_type: str = "cat",
    svd_rank: int | None = None,
) -> LoraModel:
    """A new LoraModel named `name` on the backbone of `delta_models` (LoRA models of one
    backbone), on every module any of them modifies, whose deltas combine theirs with `weights`
    (see the module's docstring: "cat", exact, ranks summed; "linear", PEFT's, one rank; "svd",
    truncated to `svd_rank`). Its scaling is 1 (lora_alpha = lora_r, per module), its dropout
    and delta dtype the first model's. Like any new delta model it is active, beside the models
    it was made from: `fastdelta.set_active(backbone, name)` runs it alone."""
    models, weights = _checked_arguments(delta_models, weights, name, combination_type, svd_rank)
    backbone = models[0].backbone_model
    by_host: dict[str, list[tuple[nn.Module, float]]] = {}
    for model, weight in zip(models, weights, strict=True):
        for attachment in model.attachments:
            by_host.setdefault(attachment.host_name, []).append((attachment.delta, weight))
    factors = {
        host: _combined(host, deltas, combination_type, svd_rank)
        for host, deltas in by_host.items()
    }
    ranks = {host: A.shape[0] for host, (A, _) in factors.items()}
    rank = max(ranks.values())
    # Exact names (anchored regexes), each module's own rank, and alpha = rank: scaling 1.
    patterns = {f"^{re.escape(host)}": r for host, r in ranks.items() if r != rank}
    first = models[0].config
    merged = LoraModel(
        backbone,
        lora_r=rank,
        lora_alpha=rank,
        lora_dropout=first.lora_dropout,
        modified_modules=[f"[r]^{re.escape(host)}$" for host in factors],
        rank_pattern=patterns or None,
        alpha_pattern=patterns or None,
        delta_dtype=first.delta_dtype,
        name=name,
    )
    with torch.no_grad():
        for attachment in merged.attachments:
            A, B = factors[attachment.host_name]
            names = factor_names(attachment.delta)
            for parameter_name, value in zip(names, (A, B), strict=True):
                parameter = getattr(attachment.delta, parameter_name)
                parameter.copy_(value.to(parameter.dtype))
    return merged


def _checked_arguments(delta_models, weights, name, combination_type, svd_rank):
    if isinstance(delta_models, LoraModel) or not isinstance(delta_models, (list, tuple)):
        raise TypeError("add_weighted_lora takes a list of LoraModel (one or more) to combine")
    models = list(delta_models)
    if not models or not all(isinstance(model, LoraModel) for model in models):
        kinds = ", ".join(type(model).__name__ for model in models) or "none"
        raise TypeError(f"add_weighted_lora combines LoraModel instances, got {kinds}")
    backbone = models[0].backbone_model
    if any(model.backbone_model is not backbone for model in models):
        raise ValueError("add_weighted_lora combines LoRA models of one backbone model")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(models):
        raise ValueError(
            f"add_weighted_lora takes one weight per LoRA model: {len(models)} models, weights "
            f"{weights!r}"
        )
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weights must be numbers, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"weights must be finite, got {weight!r}")
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"combination_type must be one of {', '.join(map(repr, COMBINATIONS))}, got "
            f"{combination_type!r} (PEFT's ties / dare variants are not implemented)"
        )
    if svd_rank is not None and combination_type != "svd":
        raise ValueError("svd_rank is the rank of combination_type='svd'; leave it out")
    if svd_rank is not None and (
        isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0
    ):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    check_name(name)
    if name in delta_names(backbone):
        raise ValueError(
            f"The backbone already carries a delta model named {name!r}: give the merged LoRA "
            "a new name"
        )
    for model in models:
        for attachment in model.attachments:
            delta = attachment.delta
            if getattr(delta, "lora_magnitude_vector", None) is not None:
                raise ValueError(
                    f"{model.name!r} is a DoRA model: its magnitudes do not combine linearly"
                )
            if getattr(delta, "lora_A_init", None) is not None:
                raise ValueError(
                    f"{model.name!r} was initialised from the base weights (PiSSA / OLoRA), "
                    "which it changed: its deltas do not apply to the base weights the others do"
                )
    return models, [float(weight) for weight in weights]


def _combined(host: str, deltas, combination_type: str, svd_rank: int | None):
    """(A, B) in float32 of the combined delta on `host` (scaling 1) from (delta, weight)s."""
    factors = []
    for delta, weight in deltas:
        A, B = (getattr(delta, name).detach().float() for name in factor_names(delta))
        factors.append((A, B, weight * delta.scaling))
    if combination_type == "cat":
        A = torch.cat([scaled * A for A, _, scaled in factors], dim=0)
        B = torch.cat([B for _, B, _ in factors], dim=1)
        return A, B
    if combination_type == "linear":
        ranks = sorted({A.shape[0] for A, _, _ in factors})
        if len(ranks) > 1:
            raise ValueError(
                f"combination_type='linear' adds LoRA factors of one rank, but the deltas on "
                f"{host} have ranks {', '.join(map(str, ranks))}: use 'cat' (exact, ranks summed)"
                " or 'svd'"
            )
        A = sum(math.copysign(math.sqrt(abs(s)), s) * A for A, _, s in factors)
        B = sum(math.sqrt(abs(s)) * B for _, B, s in factors)
        return A, B
    update = sum(scaled * (B @ A) for A, B, scaled in factors)  # [out, in]
    rank = svd_rank or max(A.shape[0] for A, _, _ in factors)
    U, S, Vh = torch.linalg.svd(update, full_matrices=False)
    rank = min(rank, S.shape[0])
    return Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous()
