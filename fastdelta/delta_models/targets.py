"""Targets on which a delta would silently do nothing, or the wrong thing: refused by name.

- A module whose parent reads its weights instead of calling it: `nn.MultiheadAttention` computes
  with `out_proj.weight` and `out_proj.bias` directly, so a delta in `out_proj`'s forward would
  never run (training its existing bias in place, as BitFit does, works). An
  `nn.TransformerEncoderLayer` does so for all its children in evaluation without gradients (its
  fast path), so a delta there would run in training and vanish at inference.
- An `nn.Linear` (or `Conv1D`) subclass with a forward of its own: LoRA computes the layer itself
  (x W^T + b with the low-rank term), so the subclass's forward would be dropped.
- A LoRA weight tied to another parameter (a language model head tied to the embeddings): merging
  the delta into it would change the other module too.
"""

from __future__ import annotations

from torch import nn

from fastdelta.injection import original_class
from fastdelta.pseudo_input import linear_sizes, plain_linear_layout

# Modules whose forward reads the weights of a child instead of calling it, and when.
WEIGHT_READING_PARENTS = {
    nn.MultiheadAttention: "always",
    nn.TransformerEncoderLayer: (
        "in evaluation without gradients (its fast path, torch._transformer_encoder_layer_fwd), "
        "so a delta there would train and then vanish at inference"
    ),
}


def check_target_runs(backbone: nn.Module, host_name: str, role: str | None) -> None:
    """Refuse a delta in the forward of a module that its parent never calls."""
    if role is None or not host_name:
        return
    segments = host_name.split(".")
    for depth in range(len(segments)):
        parent_name = ".".join(segments[:depth])
        parent = backbone.get_submodule(parent_name)
        when = next(
            (when for kind, when in WEIGHT_READING_PARENTS.items() if isinstance(parent, kind)),
            None,
        )
        if when is None:
            continue
        child = ".".join(segments[depth:])
        skips = (
            "never calls its forward, so a delta there would never run"
            if when == "always"
            else f"calls no forward inside it {when}"
        )
        raise TypeError(
            f"{host_name} is inside {parent_name or 'the backbone'}, a {type(parent).__name__}, "
            f"which reads {child}'s weights directly and {skips}: target "
            f"{parent_name or 'the backbone'} itself (adapters), or exclude {host_name} "
            "(exclude_modules)"
        )


def check_forward_replaceable(module: nn.Module, name: str) -> None:
    """Refuse LoRA on a linear layer whose class has its own forward, which LoRA would drop."""
    if linear_sizes(module) is not None and plain_linear_layout(module) is None:
        kind = "nn.Linear" if isinstance(module, nn.Linear) else "Conv1D"
        raise TypeError(
            f"{name} is a {original_class(module).__name__}, a {kind} subclass with a forward "
            f"of its own, which LoRA would replace (it computes x W^T + b itself), changing the "
            f"output even with a zero delta: exclude {name} (exclude_modules), or give LoRA "
            f"plain {kind} layers"
        )


def tied_names(backbone: nn.Module) -> dict[int, list[str]]:
    """For each parameter of `backbone` known under more than one name: id -> its names."""
    names: dict[int, list[str]] = {}
    for name, parameter in backbone.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {key: value for key, value in names.items() if len(value) > 1}


def check_mergeable(backbone: nn.Module, host_names: list[str]) -> None:
    """Refuse merging LoRA into a weight that another module shares."""
    tied = tied_names(backbone)
    for host_name in host_names:
        weight = backbone.get_submodule(host_name).weight
        if id(weight) in tied:
            own = f"{host_name}.weight"
            others = [name for name in tied[id(weight)] if name != own]
            raise ValueError(
                f"{own} is tied to {', '.join(others)} (one tensor), so merging the LoRA delta "
                f"of {host_name} would change {', '.join(others)} too. Keep that delta unmerged "
                f"(merge(module=...) the others), exclude {host_name} from the LoRA targets, or "
                f"untie the weight first: {host_name}.weight = "
                f"nn.Parameter({host_name}.weight.detach().clone()), and set "
                "model.config.tie_word_embeddings = False so that transformers does not retie it"
            )
