"""LoRA checkpoints in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

PEFT keys its tensors `base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]), the same shapes fastdelta's `<module>.lora.lora_A` / `lora_B` have, and saves the
modules in `modules_to_save` (a task head) as `base_model.model.<module>.<param>`. Fields of
PEFT's config that fastdelta does not implement are refused by name, never ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastdelta.pseudo_input import is_conv1d, linear_sizes
from fastdelta.saving import checkpoint_name, trainable_tensors

if TYPE_CHECKING:
    from fastdelta.delta_models.lora import LoraModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
LORA_KEYS = {".lora_A.weight": ".lora.lora_A", ".lora_B.weight": ".lora.lora_B"}
# PEFT LoRA fields whose non-empty values ask for something fastdelta does not implement.
UNSUPPORTED_FIELDS = (
    "use_dora",
    "lora_bias",
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "megatron_config",
    "use_bdlora",
    "arrow_config",
)


def is_peft_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_peft_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of `path`, refusing any PEFT feature fastdelta does not support."""
    config_file = Path(path) / CONFIG_NAME
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_file} has peft_type {config.get('peft_type')!r}: fastdelta loads PEFT "
            "adapters of peft_type 'LORA' only"
        )
    # 0 counts (layers_to_transform=0 means layer 0); None, False and empty values do not.
    refused = [
        field
        for field in UNSUPPORTED_FIELDS
        if config.get(field) is not None
        and config.get(field) is not False
        and config.get(field) not in ([], {}, "")
    ]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    if refused:
        raise ValueError(
            f"{config_file} uses PEFT LoRA options fastdelta does not support: {', '.join(refused)}"
        )
    if not config.get("target_modules"):
        raise ValueError(f"{config_file} names no target_modules")
    return config


def _peft_selects(name: str, targets: str | list[str] | None) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name; a list entry matches
    the name itself or its last dot-segments."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def peft_targets(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """The names of the modules of `model` that PEFT would give a LoRA delta under `config`."""
    linears = [name for name, module in model.named_modules() if name and linear_sizes(module)]
    targets = config["target_modules"]
    if targets == "all-linear":
        # PEFT's rule: every linear layer but the output layer and the task head.
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        heads = list(config.get("modules_to_save") or [])
        if config.get("task_type") == "SEQ_CLS":
            heads += ["classifier", "score"]
        names = [
            name
            for name in linears
            if model.get_submodule(name) is not output
            and not any(_peft_selects(prefix, heads) for prefix in _prefixes(name))
        ]
    else:
        names = [name for name, _ in model.named_modules() if name and _peft_selects(name, targets)]
    names = [name for name in names if not _peft_selects(name, config.get("exclude_modules"))]
    if not names:
        raise ValueError(
            f"PEFT target_modules {targets!r} match no module of this "
            f"{type(model).__name__}; is it the backbone the adapter was trained on?"
        )
    return names


def _prefixes(name: str) -> list[str]:
    """`name` and the names of its ancestors: a.b.c -> a, a.b, a.b.c."""
    segments = name.split(".")
    return [".".join(segments[: index + 1]) for index in range(len(segments))]


def _as_entries(peft_targets: str | list[str] | None) -> list[str] | None:
    """PEFT's target/exclude rule in fastdelta's addressing: list entries mean the same; a
    string is a regex over the whole name."""
    if not peft_targets:
        return None
    return [f"[r]^(?:{peft_targets})$"] if isinstance(peft_targets, str) else list(peft_targets)


def lora_arguments(
    config: dict[str, Any], targets: list[str] | None, model: nn.Module | None = None
) -> dict[str, Any]:
    """LoraConfig arguments equivalent to a PEFT LoRA config. With `targets` resolved on
    `model` they are named exactly; else PEFT's target_modules are translated."""
    heads = list(config.get("modules_to_save") or [])
    if model is not None:
        # PEFT skips modules_to_save entries that match nothing (SEQ_CLS lists two names).
        names = [name for name, _ in model.named_modules() if name]
        heads = [head for head in heads if any(_peft_selects(name, [head]) for name in names)]
    exclude = None
    if targets is None:
        if config["target_modules"] == "all-linear":
            raise ValueError(
                "target_modules='all-linear' names modules only on a backbone: load the adapter "
                "with AutoDeltaModel.from_finetuned(path, backbone_model)"
            )
        targets = _as_entries(config["target_modules"])
        exclude = _as_entries(config.get("exclude_modules"))
    return {
        "delta_type": "lora",
        "modified_modules": targets,
        "exclude_modules": exclude,
        # The deltas train with the head, as in PEFT.
        "unfrozen_modules": ["deltas", *heads] if heads else None,
        "lora_r": config.get("r", 8),
        "lora_alpha": config.get("lora_alpha", 8),
        "lora_dropout": config.get("lora_dropout", 0.0),
        "use_rslora": bool(config.get("use_rslora", False)),
        "rank_pattern": config.get("rank_pattern") or None,
        "alpha_pattern": config.get("alpha_pattern") or None,
    }


def read_peft_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors renamed to fastdelta's parameter names."""
    from fastdelta.saving import load_weights_file

    path = Path(path)
    weights = next((path / name for name in WEIGHTS_NAMES if (path / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"The PEFT adapter {str(path)!r} has none of {WEIGHTS_NAMES}")
    renamed = {}
    for key, tensor in load_weights_file(weights).items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{weights} holds {key!r}, which is not under {PREFIX!r}")
        name = key[len(PREFIX) :]
        for peft_suffix, suffix in LORA_KEYS.items():
            if name.endswith(peft_suffix):
                name = name[: -len(peft_suffix)] + suffix
        renamed[name] = tensor
    return renamed


def save_peft(delta_model: LoraModel, path: str | Path) -> Path:
    """Write `delta_model`'s LoRA deltas (and trainable head) in PEFT's layout."""
    from safetensors.torch import save_file

    from fastdelta.layers.base import delta_parameter_names
    from fastdelta.layers.lora import LoraDelta

    backbone = delta_model.backbone_model
    attachments = [a for a in delta_model.attachments if a.attached]
    if not attachments or not all(isinstance(a.delta, LoraDelta) for a in attachments):
        raise ValueError("format='peft' saves LoRA deltas: this delta model has none attached")
    if any(a.delta.merged for a in attachments):
        raise RuntimeError("The LoRA deltas are merged: call unmerge() before save_finetuned()")
    conv1d = {is_conv1d(backbone.get_submodule(a.host_name)) for a in attachments}
    if len(conv1d) > 1:
        raise ValueError(
            "PEFT's fan_in_fan_out is one setting per adapter, but these deltas modify both "
            "Conv1D and Linear layers: save them with format='fastdelta'"
        )
    tensors = {}
    for attachment in attachments:
        for suffix, tensor in (
            ("lora_A", attachment.delta.lora_A),
            ("lora_B", attachment.delta.lora_B),
        ):
            tensors[f"{PREFIX}{attachment.host_name}.{suffix}.weight"] = tensor.detach()
    deltas = delta_parameter_names(backbone)
    heads = sorted(
        {name.rpartition(".")[0] for name in trainable_tensors(backbone) if name not in deltas}
    )
    hosts = {attachment.host_name for attachment in attachments}
    tangled = [head for head in heads if any(set(_prefixes(host)) & {head} for host in hosts)]
    if tangled:
        raise ValueError(
            f"PEFT's layout saves whole modules besides the LoRA deltas, but {tangled[0]!r} "
            "holds a LoRA layer and has trainable parameters of its own: call "
            "delta_model.freeze_module() before save_finetuned(format='peft')"
        )
    for head in heads:
        for name, tensor in backbone.get_submodule(head).named_parameters():
            tensors[f"{PREFIX}{head}.{name}"] = tensor.detach()
    config = delta_model.config
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": checkpoint_name(backbone),
        "target_modules": [a.host_name for a in attachments],
        "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "rank_pattern": config.rank_pattern or {},
        "alpha_pattern": config.alpha_pattern or {},
        "fan_in_fan_out": conv1d.pop(),
        "bias": "none",
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    save_file(
        {name: tensor.contiguous().cpu() for name, tensor in tensors.items()},
        path / WEIGHTS_NAMES[0],
        metadata={"format": "pt"},
    )
    return path
