"""Delta checkpoints: a directory with `config.json` and `delta.safetensors`.

`config.json` holds the delta type and every constructor argument at its top level (as
OpenDelta writes it), plus what loading checks: the backbone's class and name, the modules the
deltas were attached to, the format version and the library versions. `delta.safetensors` holds
the deltas' tensors and any other trainable tensor (a task head), keyed by their names in the
backbone, in the model's dtype; config.json lists the delta tensors that were frozen. Loading
checks every key and shape and names what differs; nothing is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastdelta.version import __version__

if TYPE_CHECKING:
    from fastdelta.delta_models.base import DeltaBase

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "delta.safetensors"
# Bumped when a checkpoint written by this version cannot be read by an older one.
FORMAT_VERSION = 1
# config.json keys that describe the checkpoint rather than the delta model's arguments.
METADATA_KEYS = (
    "format_version",
    "backbone_class",
    "backbone_checkpoint_name",
    "targets",
    "frozen_tensors",
    "fastdelta_version",
    "torch_version",
    "transformers_version",
)


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors to save, names of the frozen ones): every delta parameter, trainable or not,
    and every other trainable parameter (a task head); a tied parameter under its first name."""
    from fastdelta.layers.base import delta_parameter_names

    deltas = delta_parameter_names(model)
    tensors, frozen = {}, []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad or name in deltas:
            tensors[name] = parameter.detach()
            if not parameter.requires_grad:
                frozen.append(name)
    return tensors, frozen


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model` by name; a tied parameter under its first name."""
    tensors, seen = {}, set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            tensors[name] = parameter.detach()
    return tensors


def checkpoint_name(model: nn.Module) -> str | None:
    """The hub name or path the backbone was loaded from, when transformers recorded one."""
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name or None


def save_checkpoint(delta_model: DeltaBase, path: str | Path) -> Path:
    """Write `delta_model`'s config and trainable tensors to the directory `path`.

    With parameters sharded by FSDP2 (`fully_shard`), every rank must call it: the tensors are
    gathered across ranks and rank 0 writes them."""
    import transformers

    if getattr(delta_model, "merged", False):
        raise RuntimeError(
            "The LoRA deltas are merged into the backbone's weights: call unmerge() before "
            "save_finetuned(), so the checkpoint holds the deltas themselves"
        )
    if not any(attachment.attached for attachment in delta_model.attachments):
        raise RuntimeError(
            "Nothing to save: every delta is detached; call attach() before save_finetuned()"
        )
    tensors, frozen = checkpoint_tensors(delta_model.backbone_model)
    path = Path(path)
    if any(_is_sharded(tensor) for tensor in tensors.values()):
        # FSDP2 shards parameters across ranks: gathering them is a collective that every rank
        # runs; the first rank writes.
        tensors = {name: _whole(tensor) for name, tensor in tensors.items()}
        if torch.distributed.get_rank() != 0:
            return path
    path.mkdir(parents=True, exist_ok=True)
    backbone = delta_model.backbone_model
    config = {
        **delta_model.config.to_dict(),
        "format_version": FORMAT_VERSION,
        "backbone_class": backbone_class_name(backbone),
        "backbone_checkpoint_name": checkpoint_name(backbone),
        "targets": [a.host_name for a in delta_model.attachments if a.attached],
        "frozen_tensors": frozen,
        "fastdelta_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(
        {name: tensor.contiguous().cpu() for name, tensor in tensors.items()},
        path / WEIGHTS_NAME,
        metadata={"format": "pt", "fastdelta_version": __version__},
    )
    return path


def _is_sharded(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered from every rank), or `tensor` itself."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def has_config(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of the checkpoint directory `path`, checked for a readable version."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(
            f"No delta checkpoint directory at {str(path)!r} (fastdelta loads local directories "
            "and does not download)"
        )
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}: it is not a delta checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or "delta_type" not in config:
        raise ValueError(f"{config_file} has no 'delta_type': it is not a fastdelta delta config")
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{config_file} was written in checkpoint format {version!r} by fastdelta "
            f"{config.get('fastdelta_version', '?')}; this fastdelta {__version__} reads format "
            f"{FORMAT_VERSION} and older: upgrade fastdelta to load it"
        )
    return config


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(delta arguments with delta_type, checkpoint metadata) of a config.json dict."""
    arguments = {k: v for k, v in config.items() if k not in METADATA_KEYS}
    metadata = {k: v for k, v in config.items() if k in METADATA_KEYS}
    return arguments, metadata


def backbone_class_name(backbone: nn.Module) -> str:
    """The name of the backbone's model class, not of the class that FSDP2's `fully_shard`
    puts over it (FSDPBertModel over BertModel)."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(backbone, FSDPModule):
            cls = next(c for c in type(backbone).__mro__ if not issubclass(c, FSDPModule))
            return cls.__name__
    return type(backbone).__name__


def check_backbone(metadata: dict[str, Any], backbone: nn.Module, path: str | Path) -> None:
    expected = metadata.get("backbone_class")
    if expected and expected != backbone_class_name(backbone):
        raise ValueError(
            f"The delta checkpoint {str(path)!r} was trained on a {expected} "
            f"({metadata.get('backbone_checkpoint_name') or 'unnamed'}), but the backbone_model "
            f"given is a {backbone_class_name(backbone)}: load it onto a {expected}"
        )


def load_weights_file(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors (or PyTorch .bin) file; an unreadable one is an error."""
    try:
        if weights.suffix == ".bin":
            return torch.load(weights, map_location="cpu", weights_only=True)
        return load_file(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as error:
        message = f"{weights} is corrupt or truncated and cannot be read: {error}"
        raise ValueError(message) from error


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"The delta checkpoint {str(path)!r} has no {WEIGHTS_NAME}")
    return load_weights_file(weights)


def _listing(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_tensors(
    delta_model: DeltaBase,
    tensors: dict[str, torch.Tensor],
    source: str | Path,
    frozen: list[str] = (),
) -> None:
    """Copy `tensors` into the backbone after checking that they are exactly the delta's
    parameters (plus any saved head): missing, unexpected and misshapen tensors are errors.
    The loaded tensors other than `frozen` become the trainable ones, as they were when saved."""
    from fastdelta.layers.base import delta_parameter_names

    backbone = delta_model.backbone_model
    parameters = dict(backbone.named_parameters())
    deltas = delta_parameter_names(backbone) & set(parameters)
    missing = sorted(deltas - set(tensors))
    unexpected = sorted(set(tensors) - set(parameters))
    misshapen = [
        f"{name} {tuple(tensor.shape)} in the checkpoint, {tuple(parameters[name].shape)} here"
        for name, tensor in tensors.items()
        if name in parameters and tensor.shape != parameters[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"tensors this model has no parameter for: {_listing(unexpected)}")
    if misshapen:
        more = f" and {len(misshapen) - 5} more" if len(misshapen) > 5 else ""
        problems.append("shapes that differ: " + "; ".join(misshapen[:5]) + more)
    if problems:
        raise ValueError(
            f"The delta checkpoint {str(source)!r} does not fit this {delta_model.delta_type} "
            f"model on a {type(backbone).__name__}: " + "; ".join(problems)
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            if name in tensors:
                parameter.copy_(tensors[name])
            parameter.requires_grad_(name in tensors and name not in frozen)
