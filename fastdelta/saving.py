"""fastdelta's checkpoint format.

A fastdelta checkpoint is `config.json` + `delta.safetensors`. `config.json` holds the delta type
and every constructor argument at its top level (as OpenDelta writes it), plus what loading
checks: the backbone's class and name, the modules the deltas were attached to, which delta
tensors were frozen, which backbone tensors besides the deltas it holds (a task head), the format
version and the library versions. `delta.safetensors` holds the tensors, keyed by their names in
the backbone, in the model's dtype.

This is the layer below the delta models (with fastdelta.checkpoint_io, which both formats
share): it reads and writes plain dicts and tensors; it never imports a delta model. Which
tensors a delta model owns is the delta model's to say (fastdelta.delta_models.checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fastdelta.checkpoint_io import (
    CONFIG_NAME,
    checkpoint_format,
    directory_path,
    follow_umask,
    load_weights_file,
    prepare_directory,
)
from fastdelta.version import __version__

WEIGHTS_NAME = "delta.safetensors"
# Bumped when a checkpoint written by this version cannot be read by an older one. Format 2
# added `head_tensors`. Format 3 reads a parallel adapter's modified_modules as OpenDelta does,
# as (input module, output module) pairs, and records an adapter spanning two modules in
# `targets` as "<input module> -> <output module>"; `upgraded_arguments` reads older ones.
FORMAT_VERSION = 3
# config.json keys that describe the checkpoint rather than the delta model's arguments.
METADATA_KEYS = (
    "format_version",
    "backbone_class",
    "backbone_checkpoint_name",
    "targets",
    "frozen_tensors",
    "head_tensors",
    "fastdelta_version",
    "torch_version",
    "transformers_version",
)
# The metadata loading depends on, by format version, with the type each must have.
REQUIRED_METADATA = {
    1: {"backbone_class": str, "targets": list, "frozen_tensors": list},
    2: {"backbone_class": str, "targets": list, "frozen_tensors": list, "head_tensors": list},
    3: {"backbone_class": str, "targets": list, "frozen_tensors": list, "head_tensors": list},
}
# A parallel adapter's default modified_modules before format 3, one module per adapter.
FORMAT_2_PARALLEL_ADAPTER_MODULES = ("attn@", "ff@")


# Writing


def write_checkpoint(path: str | Path, config: dict[str, Any], tensors: dict) -> Path:
    """Write `config` (the delta arguments and metadata) and `tensors` to the directory `path`.

    With parameters sharded by FSDP2 (`fully_shard`), every rank must call it: the tensors are
    gathered across ranks and rank 0 writes them."""
    path = directory_path(path)
    if any(_is_sharded(tensor) for tensor in tensors.values()):
        # FSDP2 shards parameters across ranks: gathering them is a collective that every rank
        # runs; the first rank writes.
        tensors = {name: _whole(tensor) for name, tensor in tensors.items()}
        if torch.distributed.get_rank() != 0:
            return path
    prepare_directory(path, "fastdelta")
    config = {**config, "format_version": FORMAT_VERSION}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(
        {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
        path / WEIGHTS_NAME,
        metadata={"format": "pt", "fastdelta_version": __version__},
    )
    follow_umask(path / CONFIG_NAME, path / WEIGHTS_NAME)
    return path


def _is_sharded(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered from every rank), or `tensor` itself."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def checkpoint_name(model: nn.Module) -> str | None:
    """The hub name or path the backbone was loaded from, when transformers recorded one."""
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name or None


def backbone_class_name(backbone: nn.Module) -> str:
    """The name of the backbone's model class, not of the class that FSDP2's `fully_shard`
    puts over it (FSDPBertModel over BertModel)."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(backbone, FSDPModule):
            cls = next(c for c in type(backbone).__mro__ if not issubclass(c, FSDPModule))
            return cls.__name__
    return type(backbone).__name__


# Reading


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of the fastdelta checkpoint directory `path`, with its format version
    and the metadata loading depends on checked."""
    found = checkpoint_format(path)
    if found != "fastdelta":
        kind = "a PEFT adapter" if found == "peft" else "an OpenDelta checkpoint"
        raise ValueError(
            f"{str(path)!r} holds {kind}, not a fastdelta checkpoint: load it with "
            "AutoDeltaModel.from_finetuned"
        )
    config_file = Path(path) / CONFIG_NAME
    config = json.loads(config_file.read_text(encoding="utf-8"))  # parsed by checkpoint_format
    if "format_version" not in config:
        raise ValueError(
            f"{config_file} has no 'format_version', which every checkpoint fastdelta writes "
            "holds: the file was edited or truncated; restore it from the saved checkpoint"
        )
    version = config["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{config_file} has format_version {version!r} ({type(version).__name__}); fastdelta "
            f"writes a positive integer (this version writes {FORMAT_VERSION}): the file was "
            "edited or damaged; restore it from the saved checkpoint"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{config_file} was written in checkpoint format {version!r} by fastdelta "
            f"{config.get('fastdelta_version', '?')}; this fastdelta {__version__} reads format "
            f"{FORMAT_VERSION} and older: upgrade fastdelta to load it"
        )
    required = REQUIRED_METADATA[version]
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(
            f"{config_file} lacks {', '.join(missing)}, which loading a format-{version} "
            "checkpoint depends on: the file was edited or truncated; restore it from the saved "
            "checkpoint"
        )
    for key, kind in required.items():
        value = config[key]
        names = value if kind is list else [value]
        if not isinstance(value, kind) or not all(isinstance(name, str) for name in names):
            expected = "a list of names" if kind is list else "a string"
            raise ValueError(
                f"{config_file} has {key}={value!r}, which must be {expected}: the file was "
                "edited or damaged; restore it from the saved checkpoint"
            )
    return config


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(delta arguments with delta_type, checkpoint metadata) of a config.json dict."""
    arguments = {k: v for k, v in config.items() if k not in METADATA_KEYS}
    metadata = {k: v for k, v in config.items() if k in METADATA_KEYS}
    return upgraded_arguments(arguments, metadata["format_version"]), metadata


def upgraded_arguments(arguments: dict[str, Any], version: int) -> dict[str, Any]:
    """The delta arguments of a format-`version` checkpoint as this version reads them.

    Before format 3 a parallel adapter's modified_modules named one module per adapter (by
    default ["attn@", "ff@"]): each entry becomes a pair of itself, an adapter across that
    module, which builds the same deltas on the same modules (the saved targets)."""
    if version >= 3 or arguments.get("delta_type") != "parallel_adapter":
        return arguments
    entries = arguments.get("modified_modules")
    if entries is None:
        entries = FORMAT_2_PARALLEL_ADAPTER_MODULES
    if not isinstance(entries, (list, tuple)):
        return arguments  # the config's own check names the damaged value
    return {**arguments, "modified_modules": [entry for entry in entries for _ in range(2)]}


def check_backbone(metadata: dict[str, Any], backbone: nn.Module, path: str | Path) -> None:
    expected = metadata.get("backbone_class")
    if expected and expected != backbone_class_name(backbone):
        raise ValueError(
            f"The delta checkpoint {str(path)!r} was trained on a {expected} "
            f"({metadata.get('backbone_checkpoint_name') or 'unnamed'}), but the backbone_model "
            f"given is a {backbone_class_name(backbone)}: load it onto a {expected}"
        )


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"The delta checkpoint {str(path)!r} has no {WEIGHTS_NAME}")
    return load_weights_file(weights)
