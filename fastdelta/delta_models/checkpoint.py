"""What a delta model writes to a checkpoint, and how one is rebuilt from a checkpoint.

A checkpoint holds what its delta model owns: the tensors of its own deltas (BitFit's biases
trained in place included) and the backbone's trained tensors outside every delta (a task head),
never the deltas of another delta model on the same backbone. Loading checks every config field
the deltas depend on, and every key, shape and dtype; the delta model is built and loaded whole,
or the backbone is left as it was. The file formats are fastdelta.saving's and
fastdelta.peft_format's (on fastdelta.checkpoint_io), which this module calls, and OpenDelta's
(fastdelta.opendelta_checkpoint, read only); they never import a delta model.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from fastdelta.checkpoint_io import (
    CONFIG_NAME,
    PEFT_CONFIG_NAME,
    check_tensor_values,
    checkpoint_format,
    directory_path,
    load_tensors,
    named_directory,
)
from fastdelta.delta_models.config import config_class_for
from fastdelta.delta_models.names import check_name
from fastdelta.layers.base import delta_parameter_names
from fastdelta.layers.lora import LoraDelta, LoraEmbeddingDelta
from fastdelta.opendelta_checkpoint import (
    opendelta_arguments,
    opendelta_names,
    opendelta_targets,
    read_opendelta_config,
    read_opendelta_tensors,
    rename_tensors,
)
from fastdelta.peft_format import (
    lora_arguments,
    peft_config,
    peft_heads,
    peft_targets,
    peft_task_type,
    read_peft_config,
    read_peft_tensors,
    unpadded_arguments,
    write_peft,
)
from fastdelta.pseudo_input import is_conv1d
from fastdelta.saving import (
    backbone_class_name,
    check_backbone,
    checkpoint_name,
    read_config,
    read_tensors,
    split_config,
    write_checkpoint,
)
from fastdelta.version import __version__

FORMATS = ("fastdelta", "peft")


@dataclass
class Checkpoint:
    """A checkpoint read from disk, in either format, before any delta is built."""

    source: Path
    arguments: dict[str, Any]  # the delta config's arguments, with delta_type
    tensors: dict[str, torch.Tensor]  # keyed by parameter names in the backbone
    targets: list[str] | None  # the modules the deltas were attached to (None: not recorded)
    head: list[str] | None  # the backbone tensors it holds besides the deltas (None: any)
    frozen: list[str]  # the tensors that were frozen when saved
    # "opendelta": `tensors` are keyed by OpenDelta's names, renamed once the deltas are built.
    format: str = "fastdelta"

    @property
    def delta_type(self) -> str:
        return self.arguments["delta_type"]


# What a delta model owns


def owned_parameters(delta_model) -> dict[str, nn.Parameter]:
    """Every parameter of `delta_model`'s deltas by its name in the backbone, with the host
    parameters its deltas train in place (BitFit's biases)."""
    owned = {}
    for attachment in delta_model.attachments:
        owned.update(attachment_parameters(delta_model, attachment))
    return owned


def attachment_parameters(delta_model, attachment) -> dict[str, nn.Parameter]:
    """The parameters of one of `delta_model`'s attachments by their names in the backbone."""
    prefix = f"{attachment.host_name}." if attachment.host_name else ""
    found = {
        f"{prefix}{attachment.delta_name}.{name}": parameter
        for name, parameter in attachment.delta.named_parameters()
    }
    host = delta_model.backbone_model.get_submodule(attachment.host_name)
    for name in getattr(attachment.delta, "host_parameter_names", ()):
        found[prefix + name] = host.get_parameter(name)
    return found


def saved_names(delta_model) -> dict[str, str]:
    """{name in the backbone: name in a checkpoint} of the tensors whose delta took a suffixed
    name (`adapter_1`, the second adapter on its host): a checkpoint holds the name the delta
    takes on a host without another (`adapter`), so it loads the same onto a bare backbone and
    onto one that carries other deltas already."""
    names = {}
    for attachment in delta_model.attachments:
        if attachment.saved_name == attachment.delta_name:
            continue
        prefix = f"{attachment.host_name}." if attachment.host_name else ""
        for name in attachment.delta.state_dict():
            names[f"{prefix}{attachment.delta_name}.{name}"] = (
                f"{prefix}{attachment.saved_name}.{name}"
            )
    return names


def head_parameters(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of `backbone` outside every delta attached to it (a task head),
    a tied one under its first name."""
    deltas = delta_parameter_names(backbone)
    delta_ids = {
        id(parameter)
        for name, parameter in backbone.named_parameters(remove_duplicate=False)
        if name in deltas
    }
    return {
        name: parameter
        for name, parameter in backbone.named_parameters()
        if parameter.requires_grad and id(parameter) not in delta_ids
    }


# Saving


def save_finetuned(delta_model, path: str | Path, format: str) -> Path:
    """Write `delta_model`'s deltas and trained head to the directory `path` in `format`."""
    if format not in FORMATS:
        raise ValueError(f"format must be 'fastdelta' or 'peft', got {format!r}")
    _check_savable(delta_model)
    backbone = delta_model.backbone_model
    owned = owned_parameters(delta_model)
    owned_ids = {id(parameter) for parameter in owned.values()}
    head = {
        name: parameter
        for name, parameter in head_parameters(backbone).items()
        if id(parameter) not in owned_ids
    }
    owned, arguments = as_plain_lora(delta_model, owned)
    if format == "peft":
        scalings = {a.host_name: getattr(a.delta, "scaling", 0) for a in delta_model.attachments}
        arguments = unpadded_arguments(arguments, scalings)  # a max_rank model's padding
        return _save_peft(delta_model, path, owned, head, arguments)
    renamed = saved_names(delta_model)
    tensors = {renamed.get(name, name): tensor for name, tensor in {**owned, **head}.items()}
    config = {
        **arguments,
        "backbone_class": backbone_class_name(backbone),
        "backbone_checkpoint_name": checkpoint_name(backbone),
        "targets": list(dict.fromkeys(attachment.target for attachment in delta_model.attachments)),
        "frozen_tensors": sorted(name for name, p in tensors.items() if not p.requires_grad),
        "head_tensors": sorted(head),
        "fastdelta_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    return write_checkpoint(path, config, tensors)


def as_plain_lora(delta_model, owned: dict) -> tuple[dict, dict[str, Any]]:
    """(the tensors to save, the config arguments to save) of `delta_model`: its own, except
    for PiSSA / OLoRA deltas, which took scaling * B_0 A_0 out of their layer's weight. Those
    are saved as the plain LoRA they amount to on the weight as it was, so a checkpoint loads
    onto the unchanged base model: B A - B_0 A_0 = [B, -B_0] [A; A_0], rank 2r at the same
    scaling (alpha doubled, or times sqrt(2) with rsLoRA), init_lora_weights True. This is
    PEFT's path_initial_model_for_weight_conversion; the outputs are the trained model's to
    float rounding (the base weight is no longer the rounded residual)."""
    arguments = delta_model.config.to_dict()
    changed = [
        attachment
        for attachment in delta_model.attachments
        if getattr(attachment.delta, "lora_A_init", None) is not None
    ]
    if not changed:
        return owned, arguments
    owned = dict(owned)
    with torch.no_grad():
        for attachment in changed:
            delta = attachment.delta
            prefix = f"{attachment.host_name}.{attachment.delta_name}."
            for name, trained, initial, dim in (
                ("lora_A", delta.lora_A, delta.lora_A_init, 0),
                ("lora_B", delta.lora_B, -delta.lora_B_init, 1),
            ):
                joined = torch.cat([trained, initial.to(trained.dtype)], dim=dim)
                owned[prefix + name] = joined.requires_grad_(trained.requires_grad)
    factor = 2**0.5 if arguments["use_rslora"] else 2
    arguments.update(
        lora_r=2 * arguments["lora_r"],
        lora_alpha=factor * arguments["lora_alpha"],
        rank_pattern={k: 2 * v for k, v in (arguments["rank_pattern"] or {}).items()} or None,
        alpha_pattern={k: factor * v for k, v in (arguments["alpha_pattern"] or {}).items()}
        or None,
        init_lora_weights=True,
    )
    return owned, arguments


def _check_savable(delta_model) -> None:
    attachments = delta_model.attachments
    kind = type(delta_model).__name__
    if not attachments:
        raise RuntimeError(
            f"Nothing to save: this {kind} has no deltas (merge_and_unload() took them off)"
        )
    detached = [attachment.host_name for attachment in attachments if not attachment.attached]
    if len(detached) == len(attachments):
        raise RuntimeError(
            "Nothing to save: every delta is detached; call attach() before save_finetuned()"
        )
    if detached:
        shown = ", ".join(detached[:5]) + (f" and {len(detached) - 5} more" if detached[5:] else "")
        raise RuntimeError(
            f"{len(detached)} of the {len(attachments)} deltas of this {kind} are detached "
            f"({shown}), and a checkpoint holds all of a delta model's deltas: call attach() "
            "before save_finetuned()"
        )
    if any(getattr(attachment.delta, "merged", False) for attachment in attachments):
        raise RuntimeError(
            "The LoRA deltas are merged into the backbone's weights: call unmerge() before "
            "save_finetuned(), so the checkpoint holds the deltas themselves"
        )


def _save_peft(delta_model, path, owned: dict, head: dict, arguments: dict[str, Any]) -> Path:
    backbone = delta_model.backbone_model
    attachments = delta_model.attachments
    lora_types = (LoraDelta, LoraEmbeddingDelta)
    if not all(isinstance(attachment.delta, lora_types) for attachment in attachments):
        raise ValueError(
            f"format='peft' saves LoRA deltas, and this {type(delta_model).__name__} has none: "
            "save it with format='fastdelta'"
        )
    # fan_in_fan_out is about the linear layers (an embedding's LoRA has one layout).
    conv1d = {
        is_conv1d(backbone.get_submodule(a.host_name))
        for a in attachments
        if not isinstance(a.delta, LoraEmbeddingDelta)
    } or {False}
    if len(conv1d) > 1:
        raise ValueError(
            "PEFT's fan_in_fan_out is one setting per adapter, but these deltas modify both "
            "Conv1D and Linear layers: save them with format='fastdelta'"
        )
    heads = sorted({name.rpartition(".")[0] for name in head})
    hosts = {attachment.host_name for attachment in attachments}
    tangled = [name for name in heads if any(h == name or h.startswith(name + ".") for h in hosts)]
    if tangled:
        raise ValueError(
            f"PEFT's layout saves whole modules besides the LoRA deltas, but {tangled[0]!r} "
            "holds a LoRA layer and has trainable parameters of its own: call "
            "delta_model.freeze_module() before save_finetuned(format='peft')"
        )
    renamed = saved_names(delta_model)
    tensors = {renamed.get(name, name): parameter for name, parameter in owned.items()}
    others = delta_parameter_names(backbone) - owned.keys()
    for name in heads:
        for parameter_name, parameter in backbone.get_submodule(name).named_parameters():
            if f"{name}.{parameter_name}" in others:
                raise ValueError(
                    f"PEFT's layout saves whole modules besides the LoRA deltas, but {name!r} "
                    f"holds {name}.{parameter_name}, a delta of another delta model on this "
                    "backbone: detach that delta model first, or save with format='fastdelta' "
                    "(which saves only this delta model's deltas and the head)"
                )
            tensors[f"{name}.{parameter_name}"] = parameter
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    config = peft_config(
        arguments,
        [attachment.host_name for attachment in attachments],
        conv1d.pop(),
        heads,
        checkpoint_name(backbone),
        peft_task_type(backbone_class_name(backbone), model_type),
    )
    return write_peft(path, config, tensors)


# Loading


def read_arguments(path: str | Path) -> dict[str, Any]:
    """The delta config arguments (with delta_type) of the checkpoint directory `path`."""
    source = directory_path(path)
    found = checkpoint_format(source)
    if found == "peft":
        return lora_arguments(read_peft_config(source), None)
    if found == "opendelta":
        arguments, _ = opendelta_arguments(read_opendelta_config(source), source)
        return arguments
    arguments, _ = split_config(read_config(source))
    _check_complete(arguments, source)
    return arguments


# Arguments added after checkpoints were written without them, whose defaults are what those
# checkpoints computed: DoRA's dropout form and exact norm (before them, DoRA had PEFT's form and
# a constant norm); a delta model's name ("default") and LoRA's max_rank (None: unpadded).
ADDED_WITH_OLD_DEFAULTS = ("dora_dropout", "dora_exact_norm", "name", "max_rank")


def _check_complete(arguments: dict[str, Any], source: Path) -> None:
    """Every argument the deltas depend on must be in config.json: a default in place of a lost
    value would load other deltas than the ones saved (ADDED_WITH_OLD_DEFAULTS excepted)."""
    config_class = config_class_for(arguments["delta_type"])
    missing = sorted(
        field.name
        for field in dataclasses.fields(config_class)
        if field.name not in arguments and field.name not in ADDED_WITH_OLD_DEFAULTS
    )
    if missing:
        raise ValueError(
            f"{source / CONFIG_NAME} lacks {', '.join(missing)}, which the saved "
            f"{config_class.delta_type} deltas depend on (fastdelta writes every argument): the "
            "file was edited or truncated; restore it, or write the values it was trained with"
        )


def read_checkpoint(path: str | Path, backbone: nn.Module) -> Checkpoint:
    """The checkpoint at `path` (either format), with its config checked for `backbone`."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone).__name__}")
    source = directory_path(path)
    if checkpoint_format(source) == "peft":
        config = read_peft_config(source)
        targets = peft_targets(backbone, config)
        head = [
            f"{name}.{parameter_name}"
            for name in peft_heads(backbone, config)
            for parameter_name, _ in backbone.get_submodule(name).named_parameters()
        ]
        arguments = lora_arguments(config, targets, backbone)
        tensors = read_peft_tensors(source)
        # A target's own tensors PEFT saved (a targeted embedding's table): PEFT loads them into
        # the base layer, so they load here too, frozen.
        base = [
            f"{name}.{parameter_name}"
            for name in targets
            for parameter_name, _ in backbone.get_submodule(name).named_parameters(recurse=False)
            if f"{name}.{parameter_name}" in tensors
        ]
        return Checkpoint(source, arguments, tensors, None, head + base, base)
    if checkpoint_format(source) == "opendelta":
        return _read_opendelta(source, backbone)
    arguments, metadata = split_config(read_config(source))
    _check_complete(arguments, source)
    check_backbone(metadata, backbone, source)
    return Checkpoint(
        source,
        arguments,
        read_tensors(source),
        metadata["targets"],
        metadata.get("head_tensors"),
        metadata["frozen_tensors"],
    )


def read_named_checkpoint(path: str | Path, backbone: nn.Module, name: str | None) -> Checkpoint:
    """`read_checkpoint` of the checkpoint of the delta model `name` in the directory `path`
    (its subdirectory `name` where it has one: `named_directory`), loaded under that name. With
    `name` None, `path` itself under the name saved there ("default" for PEFT and OpenDelta)."""
    if name is None:
        return read_checkpoint(path, backbone)
    check_name(name)
    saved = read_checkpoint(named_directory(path, name), backbone)
    saved.arguments = {**saved.arguments, "name": name}
    return saved


def _read_opendelta(source: Path, backbone: nn.Module) -> Checkpoint:
    """An OpenDelta checkpoint, its config's modified_modules and exclude_modules resolved to the
    modules of `backbone` OpenDelta modified, which the deltas are built on by name."""
    arguments, metadata = opendelta_arguments(read_opendelta_config(source), source)
    check_backbone(metadata, backbone, source)
    targets = opendelta_targets(backbone, arguments)
    arguments = {
        **arguments,
        "modified_modules": targets,
        "exclude_modules": None,
        "common_structure": False,
    }
    tensors = _without_unchanged_buffers(read_opendelta_tensors(source), backbone, source)
    return Checkpoint(source, arguments, tensors, None, None, [], "opendelta")


def _fastdelta_tensors(delta_model, checkpoint: Checkpoint) -> tuple[dict, list[str]]:
    """(the checkpoint's tensors keyed by fastdelta's names, the tensors to leave frozen).

    An OpenDelta checkpoint's delta tensors are renamed (`opendelta_names`); its other tensors
    are the backbone's, a trained head. A file holding every backbone parameter is a whole
    state dict (saved with set_state_dict=False), which does not say what trained: its backbone
    tensors load frozen, with a warning."""
    if checkpoint.format != "opendelta":
        return checkpoint.tensors, checkpoint.frozen
    backbone = delta_model.backbone_model
    names = {}
    for attachment in delta_model.attachments:
        host = backbone.get_submodule(attachment.host_name)
        prefix = f"{attachment.host_name}." if attachment.host_name else ""
        for parameter_name, _ in attachment.delta.named_parameters():
            saved = opendelta_names(
                delta_model.delta_type, host, attachment.saved_name, parameter_name
            )
            names[f"{prefix}{attachment.delta_name}.{parameter_name}"] = tuple(
                other + name
                for other in _opendelta_prefixes(delta_model, attachment)
                for name in saved
            )
        for parameter_name in getattr(attachment.delta, "host_parameter_names", ()):
            names[prefix + parameter_name] = (prefix + parameter_name,)
    tensors = rename_tensors(checkpoint.tensors, names, checkpoint.source)
    head = sorted(set(tensors) - set(names))
    backbone_tensors = {name for name, _ in backbone.named_parameters()}
    backbone_tensors -= delta_parameter_names(backbone)
    if head and backbone_tensors <= set(head):
        warnings.warn(
            f"{checkpoint.source} holds every tensor of the backbone (OpenDelta saved it with "
            "freeze_module(set_state_dict=False)), so which of them trained is not recorded: "
            "they are loaded and left frozen, and the deltas train. Call "
            "delta_model.freeze_module(exclude=['deltas', <head>]) to train a head too",
            stacklevel=4,
        )
        return tensors, head
    return tensors, []


def _opendelta_prefixes(delta_model, attachment) -> list[str]:
    """The prefixes OpenDelta saves `attachment`'s delta under: its host's, then those of the
    other modules of its group (OpenDelta registers an adapter spanning two modules on both)."""
    hosts = [attachment.host_name] + [
        other.host_name
        for other in delta_model.attachments
        if attachment.group and other.group == attachment.group and other is not attachment
    ]
    return [f"{host}." if host else "" for host in hosts]


def _without_unchanged_buffers(tensors: dict, backbone: nn.Module, source: Path) -> dict:
    """`tensors` without the backbone's buffers, which a whole state dict holds: equal to the
    backbone's own, they carry nothing; different ones are refused by name (the backbone is
    not the one the checkpoint was saved from)."""
    buffers = dict(backbone.named_buffers())
    held = [name for name in tensors if name in buffers]
    differing = [
        name
        for name in held
        if tensors[name].shape != buffers[name].shape
        or not torch.equal(tensors[name].to(buffers[name].device), buffers[name])
    ]
    if differing:
        raise ValueError(
            f"The delta checkpoint {str(source)!r} holds buffers of the backbone with other "
            f"values than this {type(backbone).__name__}'s: {', '.join(sorted(differing)[:5])}. "
            "It was saved from another backbone: load it onto the one it was trained on"
        )
    return {name: tensor for name, tensor in tensors.items() if name not in buffers}


def build_from_checkpoint(
    delta_class, checkpoint: Checkpoint, backbone: nn.Module, allow_non_finite: bool = False
):
    """A `delta_class` model on `backbone` with the checkpoint's deltas, or, if anything does
    not fit, an error with the backbone left as it was."""
    config = saved_config(delta_class.config_class, checkpoint)
    check_tensor_values(checkpoint.tensors, checkpoint.source, allow_non_finite)
    delta_model = delta_class.from_config(config, backbone)
    try:
        _check_targets(delta_model, checkpoint)
        _load(delta_model, checkpoint)
    except Exception:
        # Nothing was copied yet (every check comes first): take the new deltas off again.
        delta_model._remove_attachments()
        raise
    return delta_model


def saved_config(config_class, checkpoint: Checkpoint):
    """The `config_class` config of the checkpoint's arguments; a value it refuses is reported
    with the file that holds it."""
    name = PEFT_CONFIG_NAME if checkpoint_format(checkpoint.source) == "peft" else CONFIG_NAME
    try:
        return config_class.from_dict(checkpoint.arguments)
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{checkpoint.source / name}: {error} (the file was edited, or written by other "
            "software: restore it, or write the value the deltas were trained with)"
        ) from error


# OpenDelta's save_finetuned arguments for pushing to its DeltaCenter, which fastdelta (no
# DeltaCenter) accepts with push_to_dc=False, their only working value there too.
DELTA_CENTER_OPTIONS = (
    "center_args",
    "center_args_pool",
    "list_tags",
    "dict_tags",
    "delay_push",
    "test_result",
    "usage",
)


def check_save_options(options: dict[str, Any]) -> None:
    """OpenDelta's save_finetuned arguments: what fastdelta does is the default of each;
    anything else is refused by name."""
    options = dict(options)
    if options.pop("push_to_dc", False) and not options.get("delay_push", False):
        raise ValueError(
            "push_to_dc=True uploads to OpenDelta's DeltaCenter, which fastdelta has no client "
            "for: save locally and share the directory (or push it to the Hugging Face Hub); "
            "with delay_push=True the checkpoint is saved locally, as OpenDelta saved it"
        )
    if not options.pop("save_config", True):
        raise ValueError(
            "save_config=False would write a checkpoint that cannot be loaded: its config.json "
            "holds the arguments and targets that loading checks. Leave save_config out"
        )
    if options.pop("state_dict", None) is not None:
        raise ValueError(
            "save_finetuned saves this delta model's own tensors; a state_dict of your own "
            "cannot be checked against them: leave state_dict out"
        )
    if options.pop("save_function", torch.save) is not torch.save:
        raise ValueError(
            "fastdelta writes delta.safetensors itself, so a save_function other than "
            "torch.save (OpenDelta's default) would not be used: leave save_function out"
        )
    unknown = sorted(set(options) - set(DELTA_CENTER_OPTIONS))
    if unknown:
        raise TypeError(
            f"save_finetuned got unsupported argument(s) {', '.join(unknown)}: it takes "
            "finetuned_delta_path and format, and OpenDelta's arguments with their defaults"
        )


def save_directory(delta_model, path: str | Path, options: dict[str, Any]) -> Path:
    """Where save_finetuned writes: `path`, or, with push_to_dc=True and delay_push=True, the
    subdirectory OpenDelta wrote the checkpoint to for a later DeltaCenter upload, named after
    the card (center_args' "name", else <backbone>_<delta type>_<tasks>_<time>). There is no
    DeltaCenter to upload to: a warning says where the checkpoint is."""
    if not (options.get("push_to_dc") and options.get("delay_push")):
        return path
    path = directory_path(path)
    card = {**(options.get("center_args_pool") or {}), **(options.get("center_args") or {})}
    name = card.get("name")
    if not name:
        tasks = card.get("train_tasks") or card.get("task_name") or card.get("dataset_name")
        tasks = "+".join(tasks) if isinstance(tasks, list) else tasks
        parts = [checkpoint_name(delta_model.backbone_model) or "backbone"]
        parts += [delta_model.delta_type, tasks, time.strftime("%Y%m%d%H%M%S")]
        name = "_".join(str(part).rsplit("/", 1)[-1] for part in parts if part)
    directory = path / name
    warnings.warn(
        f"push_to_dc=True with delay_push=True: the checkpoint is saved in {directory}, where "
        "OpenDelta saved it for a later DeltaCenter upload; there is no DeltaCenter to upload "
        "it to",
        stacklevel=3,
    )
    return directory


def check_load_options(checkpoint: Checkpoint, options: dict[str, Any]) -> None:
    """OpenDelta's from_finetuned arguments: a `delta_config` must be the saved one (the tensors
    were trained with it), `state_dict` must be left out, and the download options have nothing
    to do (fastdelta reads local directories; the backbone is always checked, so `check_hash`
    has nothing to add)."""
    options = dict(options)
    delta_config = options.pop("delta_config", None)
    if options.pop("state_dict", None) is not None:
        raise ValueError(
            "from_finetuned loads the tensors saved in the checkpoint directory; a state_dict "
            "of your own cannot be checked against its config: leave state_dict out"
        )
    from fastdelta.delta_models.config import DOWNLOAD_OPTIONS

    unknown = sorted(set(options) - set(DOWNLOAD_OPTIONS))
    if unknown:
        raise TypeError(f"from_finetuned got unsupported argument(s) {', '.join(unknown)}")
    if delta_config is None:
        return
    config_class = config_class_for(checkpoint.delta_type)
    given = delta_config if isinstance(delta_config, dict) else delta_config.to_dict()
    given = config_class.from_dict(given).to_dict()
    saved = saved_config(config_class, checkpoint).to_dict()
    differences = sorted(key for key in saved if saved[key] != given.get(key))
    if differences:
        raise ValueError(
            f"delta_config differs from the config saved in {checkpoint.source} in "
            + ", ".join(f"{key} ({given.get(key)!r}, saved {saved[key]!r})" for key in differences)
            + ": the saved tensors were trained with the saved config; leave delta_config out"
        )


def load_into(delta_model, path: str | Path, allow_non_finite: bool = False) -> None:
    """Load the fastdelta checkpoint at `path` into `delta_model`, which must have been built
    with the same arguments on the same kind of backbone (resuming a training run)."""
    if not all(attachment.attached for attachment in delta_model.attachments):
        raise RuntimeError("Some deltas are detached: call attach() before loading into them")
    checkpoint = read_checkpoint(path, delta_model.backbone_model)
    saved = saved_config(config_class_for(checkpoint.delta_type), checkpoint).to_dict()
    current = delta_model.config.to_dict()
    differences = sorted(
        key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key)
    )
    if differences:
        raise ValueError(
            f"The delta checkpoint {str(path)!r} was written by a delta model built with other "
            "arguments: "
            + "; ".join(
                f"{key}={saved.get(key)!r} there, {current.get(key)!r} here" for key in differences
            )
            + ". Build it with the checkpoint's arguments (AutoDeltaModel.from_finetuned)"
        )
    check_tensor_values(checkpoint.tensors, checkpoint.source, allow_non_finite)
    _check_targets(delta_model, checkpoint)
    _load(delta_model, checkpoint)


def _check_targets(delta_model, checkpoint: Checkpoint) -> None:
    if checkpoint.targets is None:
        return
    built = {attachment.target for attachment in delta_model.attachments}
    saved = set(checkpoint.targets)
    if built != saved:
        differences = [
            f"saved on {name} but built without it" for name in sorted(saved - built)[:3]
        ] + [f"built on {name} but not saved there" for name in sorted(built - saved)[:3]]
        raise ValueError(
            f"The delta checkpoint {str(checkpoint.source)!r} holds deltas on other modules "
            f"than its config builds on this {type(delta_model.backbone_model).__name__}: "
            + "; ".join(differences)
            + ". Its modified_modules / exclude_modules were edited, or the backbone is not the "
            "one it was trained on"
        )


def _load(delta_model, checkpoint: Checkpoint) -> None:
    backbone = delta_model.backbone_model
    owned = set(owned_parameters(delta_model))
    tensors, frozen = _fastdelta_tensors(delta_model, checkpoint)
    actual = {saved: name for name, saved in saved_names(delta_model).items()}
    tensors = {actual.get(name, name): tensor for name, tensor in tensors.items()}
    frozen = [actual.get(name, name) for name in frozen]
    load_tensors(
        backbone,
        tensors,
        checkpoint.source,
        description=f"{delta_model.delta_type} model",
        owned=owned,
        foreign=delta_parameter_names(backbone) - owned,
        head=checkpoint.head,
        frozen=frozen,
    )
