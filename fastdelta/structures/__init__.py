"""Common-structure names: one vocabulary for the modules of every supported architecture.

`attn@.q@` is "the query projection of any attention block", whatever a model calls it. The
vocabulary: `embeddings@`, `encoder@`, `decoder@`, `block@`, `attn@` and `crossattn@` with
`q@ k@ v@ proj@ layer_norm@`, `ff@` with `w1@ w2@ w3@ layer_norm@` (w1 the input or gate
projection, w3 the up projection of a gated feed-forward, w2 the output projection),
`layer_norm@` (a final norm), and `lm_head@` with `proj@`.
"""

from __future__ import annotations

from torch import nn

from fastdelta.structures.decoders import DECODER_MAPS
from fastdelta.structures.encoders import ENCODER_MAPS
from fastdelta.structures.mapping import StructureMap, UnsupportedArchitectureError, structure_names
from fastdelta.structures.seq2seq import SEQ2SEQ_MAPS

STRUCTURE_MAPS: dict[str, StructureMap] = {**ENCODER_MAPS, **SEQ2SEQ_MAPS, **DECODER_MAPS}


def supported_architectures() -> list[str]:
    """The `config.model_type`s that have a common-structure map."""
    return sorted(STRUCTURE_MAPS)


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def common_structure_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Module name -> its common-structure names, for every mapped module of `model`.

    A model of no mapped architecture that wraps some (a task module holding a pretrained model
    as `self.plm`, as OpenDelta's examples do) is addressed through them: each outermost mapped
    model inside keeps its names under its path."""
    model_type = model_type_of(model)
    if model_type in STRUCTURE_MAPS:
        return structure_names(model, STRUCTURE_MAPS[model_type])
    inner = _mapped_models_inside(model)
    if not inner:
        described = f"model_type {model_type!r}" if model_type else "no transformers config"
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} ({described}) has no common-structure map and holds no "
            f"model that has one; the supported architectures are "
            f"{', '.join(supported_architectures())}. Name the modules to modify instead, e.g. "
            "modified_modules=['q_proj', 'v_proj'] (suffixes of the names that "
            "Visualization(model).structure_graph() shows), with common_structure=False."
        )
    names = {}
    for prefix, submodel in inner:
        mapped = structure_names(submodel, STRUCTURE_MAPS[model_type_of(submodel)])
        names.update(
            (f"{prefix}.{name}" if name else prefix, common) for name, common in mapped.items()
        )
    return names


def _mapped_models_inside(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each outermost submodule of `model` of a mapped architecture."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside_found = any(name.startswith(prefix + ".") for prefix, _ in found)
        if name and not inside_found and model_type_of(module) in STRUCTURE_MAPS:
            found.append((name, module))
    return found


__all__ = [
    "STRUCTURE_MAPS",
    "StructureMap",
    "UnsupportedArchitectureError",
    "common_structure_names",
    "supported_architectures",
]
