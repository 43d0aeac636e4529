"""OpenDelta's checkpoint format, read so that its checkpoints load onto fastdelta's delta models.

OpenDelta's `save_finetuned` writes two files:
- `config.json`: the delta config's fields that differ from OpenDelta's defaults (its delta
  arguments always), `delta_type`, and `backbone_class`, `backbone_checkpoint_name`,
  `backbone_hash`, `opendelta_version` and `transformers_version`;
- `pytorch_model.bin`: `torch.save` of the backbone's `state_dict()`, which `freeze_module()`
  (set_state_dict=True, its default) trims to the trainable tensors: the deltas and any unfrozen
  head, under their names in the backbone.

OpenDelta names some delta tensors otherwise than fastdelta: its adapters keep their weights in
an `nn.Sequential` (`<target>.adapter.modulelist.down_proj.weight`), its Compacter is registered
as `compactor`, and its BitFit registers a missing bias of a Linear or LayerNorm as the layer's
own `bias`. `opendelta_names` says, for each fastdelta delta parameter, the names OpenDelta saves
it under. Like fastdelta.saving, this module reads plain dicts and tensors and never imports a
delta model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdelta.addressing import ModuleAddresses
from fastdelta.checkpoint_io import (
    CONFIG_NAME,
    OPENDELTA_WEIGHTS_NAME,
    _json_file,
    load_weights_file,
)

# config.json keys that describe the checkpoint rather than the delta arguments.
METADATA_KEYS = (
    "backbone_class",
    "backbone_checkpoint_name",
    "backbone_hash",
    "opendelta_version",
    "transformers_version",
)
# The delta arguments OpenDelta writes for each delta type, whatever their values (the base
# arguments, modified_modules and the others, it writes only when they differ from its defaults).
DELTA_ARGUMENTS = {
    "lora": ("lora_r", "lora_alpha", "lora_dropout"),
    "adapter": ("bottleneck_dim", "non_linearity"),
    "parallel_adapter": ("bottleneck_dim", "non_linearity", "scaled"),
    "bitfit": (),
    "low_rank_adapter": ("reduction_factor", "non_linearity", "low_rank_w_init", "low_rank_rank"),
    "compacter": (
        "reduction_factor",
        "non_linearity",
        "phm_c_init",
        "hypercomplex_division",
        "learn_phm",
        "hypercomplex_nonlinearity",
        "shared_phm_rule",
        "factorized_phm",
        "shared_W_phm",
        "factorized_phm_rule",
        "phm_rank",
        "phm_init_range",
        "kronecker_prod",
        "use_bias_up_sampler",
        "use_bias_down_sampler",
    ),
    "prefix": ("prefix_token_num", "reparameterize", "embed_dim", "mid_dim"),
    "soft_prompt": ("soft_token_num", "init_range", "token_init"),
}
# Fields of OpenDelta's config classes that its delta models never read (CompacterConfig's
# bottleneck_dim and sequential, written as null): they describe nothing the deltas depend on.
UNREAD_ARGUMENTS = {"compacter": ("bottleneck_dim", "sequential")}
# OpenDelta's default_modified_modules (with common_structure=True), for a config.json that
# does not name the modules.
DEFAULT_MODIFIED_MODULES = {
    "lora": ("attn@.q@", "attn@.v@"),
    "adapter": ("attn@.proj@", "ff@.w2@"),
    "parallel_adapter": ("attn@", "attn@", "ff@.w1@", "ff@.w2@"),
    "bitfit": ("attn@", "ff@", "layer_norm@", "lm_head@.proj@"),
    "low_rank_adapter": ("attn@.proj@", "ff@.w2@"),
    "compacter": ("attn@.proj@", "ff@.w2@"),
    "prefix": ("attn@",),
    # OpenDelta's SoftPromptModel records ["root"]: it modifies the backbone (or its encoder).
    "soft_prompt": ("root",),
}
# The name OpenDelta registers a delta type's module under, where it is not fastdelta's.
DELTA_MODULE_NAMES = {"compacter": "compactor"}
# Where OpenDelta's AdapterLayer and ParallelAdapterLayer keep the tensors of fastdelta's
# AdapterDelta (nn.Linear's layout, as fastdelta's).
ADAPTER_TENSORS = {
    "down_weight": "modulelist.down_proj.weight",
    "down_bias": "modulelist.down_proj.bias",
    "up_weight": "modulelist.up_proj.weight",
    "up_bias": "modulelist.up_proj.bias",
}


# Reading


def read_opendelta_config(path: str | Path) -> dict[str, Any]:
    """The config.json of the OpenDelta checkpoint directory `path`, checked to be a dict with
    a delta_type."""
    config_file = Path(path) / CONFIG_NAME
    config = _json_file(config_file)
    if not isinstance(config, dict) or not isinstance(config.get("delta_type"), str):
        raise ValueError(
            f"{config_file} has no 'delta_type' string, which OpenDelta's save_finetuned "
            "writes: the file was edited or truncated; restore it from the saved checkpoint"
        )
    return config


def read_opendelta_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the OpenDelta checkpoint directory `path`, read with
    torch.load(weights_only=True): a file holding anything but tensors is refused."""
    return load_weights_file(Path(path) / OPENDELTA_WEIGHTS_NAME)


def opendelta_arguments(config: dict[str, Any], source: Path) -> tuple[dict[str, Any], dict]:
    """(fastdelta's delta arguments with delta_type, the checkpoint's metadata) of an OpenDelta
    config.json dict. The arguments keep OpenDelta's `modified_modules` (its defaults where it
    wrote none; a parallel adapter's are pairs) and `exclude_modules`;
    `opendelta_targets` applies them as OpenDelta did."""
    delta_type = config["delta_type"]
    if delta_type not in DELTA_ARGUMENTS:
        raise ValueError(
            f"{source / CONFIG_NAME} holds OpenDelta's delta_type {delta_type!r}; fastdelta "
            f"loads OpenDelta's {', '.join(DELTA_ARGUMENTS)} checkpoints"
        )
    missing = [name for name in DELTA_ARGUMENTS[delta_type] if name not in config]
    if missing:
        raise ValueError(
            f"{source / CONFIG_NAME} lacks {', '.join(missing)}, which OpenDelta writes for "
            f"every {delta_type} checkpoint and the saved deltas depend on: the file was edited "
            "or truncated; restore it, or write the values the deltas were trained with"
        )
    unread = UNREAD_ARGUMENTS.get(delta_type, ())
    arguments = {
        key: value
        for key, value in config.items()
        if key not in METADATA_KEYS and key not in unread
    }
    metadata = {key: config[key] for key in METADATA_KEYS if key in config}
    if arguments.get("modified_modules") is None:
        arguments["modified_modules"] = list(DEFAULT_MODIFIED_MODULES[delta_type])
        arguments["common_structure"] = True
    if delta_type == "parallel_adapter":
        _check_pairs(arguments["modified_modules"], source)
    # OpenDelta's delta models take common_structure=None, meaning False, and save it so.
    if arguments.get("common_structure") is None:
        arguments["common_structure"] = False
    return arguments, metadata


def _check_pairs(entries: Any, source: Path) -> None:
    """A parallel adapter's modified_modules are pairs (the module whose input an adapter reads,
    the one whose output it adds to): an odd number of entries is refused."""
    if isinstance(entries, list) and len(entries) % 2:
        raise ValueError(
            f"{source / CONFIG_NAME} gives the parallel adapter modified_modules {entries}, an "
            "odd number of entries, but OpenDelta reads them as (input module, output module) "
            "pairs: the file was edited; restore the pairs the deltas were trained with"
        )


def opendelta_targets(backbone: nn.Module, arguments: dict[str, Any]) -> list[str]:
    """The names of the modules of `backbone` OpenDelta modified for `arguments`: those a
    modified_modules entry selects (whole-segment suffixes, `[r]` regexes, common-structure
    names), less those whose names start with an exclude_modules entry (OpenDelta's rule for
    excluding, which its default ["lm_head"] relies on). For a parallel adapter, the pairs
    [input_0, output_0, ...] of module names, the i-th module each entry of a pair selects
    paired with the i-th of the other."""
    if arguments.get("delta_type") == "soft_prompt":
        # OpenDelta puts the prompt in front of the backbone's (or its encoder's) input
        # whatever modified_modules and exclude_modules say; SoftPromptConfig takes ["root"].
        return ["root"]
    addresses = ModuleAddresses(backbone)
    excluded = tuple(arguments.get("exclude_modules") or ())
    entries = arguments["modified_modules"]
    if arguments.get("delta_type") == "parallel_adapter":
        targets = _opendelta_pairs(addresses, entries, excluded)
    else:
        selected = addresses.select(entries, every_entry_must_match=False)
        targets = [name for name in selected if not name.startswith(excluded)]
    if not targets:
        raise ValueError(
            f"exclude_modules {list(excluded)} exclude every module that modified_modules "
            f"{entries} select on this {type(backbone).__name__}"
        )
    return targets


def _opendelta_pairs(addresses: ModuleAddresses, entries: list[str], excluded: tuple) -> list[str]:
    """[input_0, output_0, input_1, ...]: for each pair of `entries`, the i-th module its first
    entry selects with the i-th its second selects, less those `excluded` names start with."""
    targets = []
    for first, second in zip(entries[::2], entries[1::2], strict=True):
        inputs, outputs = (
            [
                name
                for name in addresses.modules
                if name and addresses.matches(name, entry) and not name.startswith(excluded)
            ]
            for entry in (first, second)
        )
        if len(inputs) != len(outputs):
            raise ValueError(
                f"The parallel adapter pair ({first!r}, {second!r}) selects {len(inputs)} input "
                f"and {len(outputs)} output modules on this {type(addresses.model).__name__}, "
                "which cannot be paired in order: the checkpoint was trained on another "
                "backbone; load it onto the one it was trained on"
            )
        targets.extend(name for pair in zip(inputs, outputs, strict=True) for name in pair)
    return targets


# Tensor names


def opendelta_names(
    delta_type: str, host: nn.Module, delta_name: str, parameter_name: str
) -> tuple[str, ...]:
    """The names, relative to its host module, that OpenDelta saves the fastdelta delta
    parameter `<host>.<delta_name>.<parameter_name>` under: first the one a trimmed state dict
    holds, then any alias a whole state dict holds too (OpenDelta registers a parallel adapter
    on its module twice, the second time as `parallel_adapter_1`)."""
    if delta_type in ("adapter", "parallel_adapter"):
        inner = ADAPTER_TENSORS[parameter_name]
        names = (f"{delta_name}.{inner}",)
        if delta_type == "parallel_adapter":
            names += (f"{delta_name}_1.{inner}",)
        return names
    if delta_type == "bitfit" and isinstance(host, (nn.Linear, nn.LayerNorm)):
        # OpenDelta gives a Linear or LayerNorm without a bias a bias of its own.
        return (parameter_name,)
    return (f"{DELTA_MODULE_NAMES.get(delta_type, delta_name)}.{parameter_name}",)


def rename_tensors(
    tensors: dict[str, torch.Tensor], names: dict[str, tuple[str, ...]], source: Path
) -> dict[str, torch.Tensor]:
    """`tensors` with each delta tensor under its fastdelta name. `names` maps each fastdelta
    delta parameter name to the names OpenDelta saves it under (`opendelta_names`, prefixed with
    the host's name). A delta the file lacks, and aliases of one tensor that differ, are errors
    naming them; the file's other tensors (a head) keep their names."""
    renamed: dict[str, torch.Tensor] = {}
    missing = []
    taken = set()
    for name, candidates in names.items():
        present = [candidate for candidate in candidates if candidate in tensors]
        if not present:
            missing.append(f"{candidates[0]} (fastdelta's {name})")
            continue
        first = tensors[present[0]]
        differing = [c for c in present[1:] if not torch.equal(tensors[c], first)]
        if differing:
            raise ValueError(
                f"{source / OPENDELTA_WEIGHTS_NAME} holds {present[0]} and {differing[0]}, which "
                "OpenDelta saves as one tensor, with different values: the file was edited"
            )
        renamed[name] = first
        taken.update(present)
    if missing:
        shown = "; ".join(missing[:5]) + (f" and {len(missing) - 5} more" if missing[5:] else "")
        raise ValueError(
            f"{source / OPENDELTA_WEIGHTS_NAME} lacks delta tensors that the config builds: "
            f"{shown}. The checkpoint was saved from other modules than its config.json names "
            "now, or with these deltas frozen (freeze_module trims the state dict to the "
            "trainable tensors): OpenDelta would leave them at their random initialisation"
        )
    clashing = sorted(name for name in tensors if name not in taken and name in renamed)
    if clashing:
        raise ValueError(
            f"{source / OPENDELTA_WEIGHTS_NAME} holds {clashing[0]} under both fastdelta's and "
            "OpenDelta's name: the file was not written by OpenDelta"
        )
    renamed.update((name, tensor) for name, tensor in tensors.items() if name not in taken)
    return renamed
