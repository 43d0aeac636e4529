"""Checkpoint I/O that the formats share: which format a directory holds, where a checkpoint
may be written, reading weight files, and checking tensors before they are copied in.

fastdelta.saving (fastdelta's format), fastdelta.peft_format (PEFT's) and
fastdelta.opendelta_checkpoint (OpenDelta's, read only) build on it. Like them, it reads and
writes plain dicts and tensors and never imports a delta model.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

# fastdelta's config file; PEFT's layout (fastdelta.peft_format reads and writes its contents).
CONFIG_NAME = "config.json"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# OpenDelta's save_finetuned writes config.json (its delta config, with these keys, which
# fastdelta never writes) beside its weights file, a torch.save'd state dict.
OPENDELTA_WEIGHTS_NAME = "pytorch_model.bin"
OPENDELTA_CONFIG_KEYS = ("opendelta_version", "backbone_hash")


# Which format a directory holds


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _is_delta_config(path: Path) -> bool:
    """Whether `path` is a config.json written by fastdelta (it names a delta_type)."""
    config = _json_file(path)
    return isinstance(config, dict) and "delta_type" in config


def _is_opendelta_config(path: Path) -> bool:
    """Whether the delta config.json `path` was written by OpenDelta: it holds a key only
    OpenDelta writes and none of the metadata every fastdelta checkpoint holds."""
    config = _json_file(path)
    return (
        isinstance(config, dict)
        and any(key in config for key in OPENDELTA_CONFIG_KEYS)
        and "format_version" not in config
        and "fastdelta_version" not in config
    )


def _what_config_is(path: Path) -> str:
    config = _json_file(path)
    if isinstance(config, dict) and "model_type" in config:
        return (
            "not a fastdelta delta config (it is the config of a transformers "
            f"{config['model_type']!r} model)"
        )
    return "not a fastdelta delta config"


def directory_path(path) -> Path:
    """`path` (a str or os.PathLike) as a Path; anything else is refused by name."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            "A delta checkpoint is a directory: give its path as a str or pathlib.Path, got "
            f"{path!r} ({type(path).__name__})"
        )
    return Path(path)


def checkpoint_format(path: str | Path) -> str:
    """The format of the checkpoint directory `path`, "fastdelta", "peft" or "opendelta" (a
    config.json written by OpenDelta's save_finetuned, with its opendelta_version or
    backbone_hash, beside pytorch_model.bin), read from its files' contents. A directory
    holding both a delta config.json and a PEFT adapter is ambiguous and refused."""
    path = directory_path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"No delta checkpoint directory at {str(path)!r} (fastdelta loads local directories "
            "and does not download)"
        )
    config, peft_config = path / CONFIG_NAME, path / PEFT_CONFIG_NAME
    fastdelta = config.is_file() and _is_delta_config(config)
    peft = peft_config.is_file()
    if fastdelta and peft:
        raise ValueError(
            f"{str(path)!r} holds both a fastdelta checkpoint ({CONFIG_NAME} with a delta_type) "
            f"and a PEFT adapter ({PEFT_CONFIG_NAME}), so which one to load is ambiguous (one "
            "may be stale, saved over by the other): move one of them to its own directory"
        )
    if peft:
        return "peft"
    if fastdelta and _is_opendelta_config(config):
        if not (path / OPENDELTA_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{config} was written by OpenDelta (it holds "
                f"{' or '.join(OPENDELTA_CONFIG_KEYS)}), but {str(path)!r} has no "
                f"{OPENDELTA_WEIGHTS_NAME}, the file OpenDelta saves the delta tensors to: "
                "copy it from the directory OpenDelta saved"
            )
        return "opendelta"
    if fastdelta:
        return "fastdelta"
    if config.is_file():
        raise ValueError(
            f"{config} has no 'delta_type': it is {_what_config_is(config)}, and there is no "
            f"{PEFT_CONFIG_NAME} beside it: not a delta checkpoint"
        )
    raise FileNotFoundError(
        f"{str(path)!r} has no {CONFIG_NAME} (nor a PEFT {PEFT_CONFIG_NAME}): it is not a delta "
        "checkpoint"
    )


def _top_name(path: Path) -> str | None:
    """The delta model name of the checkpoint directly in `path` (a PEFT adapter's is
    "default", as PEFT names the one it saves at the top), or None where there is none."""
    if (path / PEFT_CONFIG_NAME).is_file():
        return "default"
    config = path / CONFIG_NAME
    if config.is_file() and _is_delta_config(config):
        name = _json_file(config).get("name", "default")
        return name if isinstance(name, str) else "default"
    return None


def named_directory(path, name: str | None) -> Path:
    """The directory holding the checkpoint of the delta model `name` in the directory `path`:
    `<path>/<name>` when that holds a checkpoint (PEFT's `save_pretrained` writes every adapter
    but "default" to such a subdirectory), else `path` itself, whose checkpoint then loads
    under that name. Where `path` holds checkpoints in subdirectories and `name` is neither one
    of them nor the name of the one at the top, which one is meant is unclear: refused, listing
    them. `name` None (or not a valid name, which the config refuses) is `path`."""
    path = directory_path(path)
    if not isinstance(name, str) or not name.isidentifier() or not path.is_dir():
        return path
    if _top_name(path / name) is not None:
        return path / name
    top = _top_name(path)
    children = sorted(
        child.name for child in path.iterdir() if child.is_dir() and _top_name(child) is not None
    )
    if children and name != top:
        held = ([f"{top!r} (at the top)"] if top else []) + [
            f"{child!r} (in {child}/)" for child in children
        ]
        raise ValueError(
            f"{str(path)!r} holds the checkpoints of several delta models, {', '.join(held)}, "
            f"and none named {name!r}: give one of those names"
        )
    return path


def prepare_directory(path: str | Path, format: str) -> Path:
    """Create the directory `path` for a checkpoint in `format`, refusing to overwrite a file
    that is not a checkpoint of that format or to leave two formats in one directory."""
    path = directory_path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{str(path)!r} is a file: save_finetuned writes a directory")
    config, peft_config = path / CONFIG_NAME, path / PEFT_CONFIG_NAME
    if format == "fastdelta":
        if config.is_file() and not _is_delta_config(config):
            raise FileExistsError(
                f"{config} is {_what_config_is(config)}, which save_finetuned would overwrite: "
                "save the delta checkpoint to a directory of its own"
            )
        if config.is_file() and _is_opendelta_config(config):
            raise FileExistsError(
                f"{str(path)!r} holds an OpenDelta checkpoint ({CONFIG_NAME} with "
                f"{' or '.join(OPENDELTA_CONFIG_KEYS)}), which save_finetuned would overwrite: "
                "save the fastdelta checkpoint to a directory of its own"
            )
        if peft_config.is_file():
            raise FileExistsError(
                f"{str(path)!r} holds a PEFT adapter ({PEFT_CONFIG_NAME}); a fastdelta "
                "checkpoint beside it would make the directory ambiguous: save to another "
                "directory, or remove the PEFT files first"
            )
    elif config.is_file() and _is_delta_config(config):
        raise FileExistsError(
            f"{str(path)!r} holds a fastdelta checkpoint ({CONFIG_NAME} with a delta_type); a "
            "PEFT adapter beside it would make the directory ambiguous: save to another "
            "directory, or remove the fastdelta files first"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def follow_umask(*paths: Path) -> None:
    """Give the files `paths` the mode a new file gets under the process umask (0644 under
    the usual 022), as config.json has: safetensors' save_file creates its file 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


# Reading and checking tensors


def load_weights_file(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors (or PyTorch .bin) file; an unreadable one is an error."""
    try:
        if weights.suffix == ".bin":
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            tensors = load_file(weights)
    except pickle.UnpicklingError as error:
        message = (
            f"{weights} holds objects other than tensors, which fastdelta does not unpickle "
            "(it reads weight files with torch.load(weights_only=True), so that loading a "
            "checkpoint cannot run code), and cannot be read: save a dict of tensors instead"
        )
        raise ValueError(message) from error
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as error:
        message = f"{weights} is corrupt or truncated and cannot be read: {error}"
        raise ValueError(message) from error
    if not isinstance(tensors, dict) or not all(
        isinstance(tensor, torch.Tensor) for tensor in tensors.values()
    ):
        raise ValueError(f"{weights} does not hold a dict of tensors: it is not a checkpoint")
    return tensors


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_tensor_values(
    tensors: dict[str, torch.Tensor], source: str | Path, allow_non_finite: bool = False
) -> None:
    """Refuse tensors that are not floating point (a cast would silently make them so) and,
    unless `allow_non_finite`, tensors holding NaN or Inf (a diverged run)."""
    not_floating = {
        name: tensor.dtype for name, tensor in tensors.items() if not tensor.is_floating_point()
    }
    if not_floating:
        listed = "; ".join(f"{name} is {dtype}" for name, dtype in sorted(not_floating.items())[:5])
        raise ValueError(
            f"The delta checkpoint {str(source)!r} holds tensors that are not floating point "
            f"({listed}), but every delta and head parameter is: the file was damaged or not "
            "written for this model"
        )
    if allow_non_finite:
        return
    non_finite = {
        name: int((~torch.isfinite(tensor)).sum())
        for name, tensor in tensors.items()
        if not bool(torch.isfinite(tensor).all())
    }
    if non_finite:
        listed = ", ".join(
            f"{name} ({count} of {tensors[name].numel()} values)"
            for name, count in sorted(non_finite.items())[:5]
        )
        raise ValueError(
            f"The delta checkpoint {str(source)!r} holds NaN or Inf in {listed}"
            + (f" and {len(non_finite) - 5} more tensors" if len(non_finite) > 5 else "")
            + ": the run that saved it diverged. Pass allow_non_finite=True to load it anyway"
        )


def load_tensors(
    backbone: nn.Module,
    tensors: dict[str, torch.Tensor],
    source: str | Path,
    *,
    description: str,
    owned: set[str],
    foreign: set[str],
    head: list[str] | None,
    frozen: list[str] = (),
) -> None:
    """Copy `tensors` into `backbone` after checking that they are exactly what one delta model
    owns: its delta parameters `owned` (all required), the backbone tensors `head` (all
    required; None accepts any backbone parameter besides the deltas, as format 1 did), and
    nothing of `foreign`, the deltas of other delta models on the backbone. Missing, unexpected
    and misshapen tensors are errors that name them, and then nothing is copied.

    The loaded tensors other than `frozen` become trainable; the backbone's other parameters are
    frozen, and the foreign deltas are left as they are."""
    parameters = dict(backbone.named_parameters())
    required = owned | set(head or ())
    allowed = (required if head is not None else set(parameters) - foreign) & parameters.keys()
    missing = sorted(required - set(tensors))
    foreign_hits = sorted(set(tensors) & foreign)
    unexpected = sorted(set(tensors) - allowed - foreign)
    misshapen = [
        f"{name} {tuple(tensor.shape)} in the checkpoint, {tuple(parameters[name].shape)} here"
        for name, tensor in tensors.items()
        if name in parameters and tensor.shape != parameters[name].shape
    ]
    not_held = sorted(set(frozen) - set(tensors))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"tensors this model has no parameter for: {_listing(unexpected)}")
    if foreign_hits:
        problems.append(
            "tensors of the deltas of another delta model on this backbone (a checkpoint holds "
            f"one delta model's): {_listing(foreign_hits)}"
        )
    if misshapen:
        more = f" and {len(misshapen) - 5} more" if len(misshapen) > 5 else ""
        problems.append("shapes that differ: " + "; ".join(misshapen[:5]) + more)
    if not_held:
        problems.append(f"frozen_tensors it does not hold: {_listing(not_held)}")
    if problems:
        raise ValueError(
            f"The delta checkpoint {str(source)!r} does not fit this {description} on a "
            f"{type(backbone).__name__}: " + "; ".join(problems)
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            if name in foreign:
                continue
            if name in tensors:
                parameter.copy_(tensors[name])
            parameter.requires_grad_(name in tensors and name not in frozen)
