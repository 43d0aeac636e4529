"""LoRA checkpoints in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

PEFT keys its tensors `base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]), the same shapes fastdelta's `<module>.lora.lora_A` / `lora_B` have, and saves the
modules in `modules_to_save` (a task head) as `base_model.model.<module>.<param>`.

Every field of PEFT's LoraConfig is classified below: implemented, or without effect on the
computation of a trained adapter, or refused by name when set. A field this list does not know
(from a newer PEFT) is refused too unless it is null, false or empty, the values PEFT writes for
an option that is off. Like saving.py, this is checkpoint I/O (on fastdelta.checkpoint_io): it
never imports a delta model.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fastdelta.addressing import pattern_matches
from fastdelta.checkpoint_io import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAMES,
    follow_umask,
    load_weights_file,
    prepare_directory,
)
from fastdelta.pseudo_input import linear_sizes

CONFIG_NAME = PEFT_CONFIG_NAME
WEIGHTS_NAMES = PEFT_WEIGHTS_NAMES
PREFIX = "base_model.model."
LORA_KEYS = {
    ".lora_A.weight": ".lora.lora_A",
    ".lora_B.weight": ".lora.lora_B",
    ".lora_embedding_A": ".lora.lora_embedding_A",
    ".lora_embedding_B": ".lora.lora_embedding_B",
    ".lora_magnitude_vector": ".lora.lora_magnitude_vector",
}
BASE_LAYER = ".base_layer."  # PEFT's infix of the wrapped layer's own tensors
# Fields fastdelta reads and implements.
IMPLEMENTED_FIELDS = (
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "bias",
    "init_lora_weights",
    "use_dora",
)
# Fields that do not change what a trained adapter computes: bookkeeping, initialisation-only
# settings (the saved tensors are the result) and run-time options. fan_in_fan_out is decided by
# the layer's type (Conv1D or Linear), as PEFT itself corrects it.
WITHOUT_EFFECT_FIELDS = (
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "fan_in_fan_out",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "megatron_core",
    "runtime_config",
    "ensure_weight_tying",
)
# Fields whose set values ask for something fastdelta does not implement (they change the math).
UNSUPPORTED_FIELDS = (
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
    "loftq_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)


def base_changing_init(value) -> bool:
    """Whether init_lora_weights `value` (PEFT's name) is one fastdelta has that changes the
    base weight: PiSSA ("pissa", "pissa_niter_K") or OLoRA ("olora")."""
    return value in ("pissa", "olora") or (
        isinstance(value, str) and bool(re.fullmatch(r"pissa_niter_[1-9][0-9]*", value))
    )


# init_lora_weights values that only initialise A and B (a trained adapter is then plain LoRA).
# The others (pissa, olora, corda, loftq, ...) also change the base weights unless PEFT converted
# the adapter when saving it (it then writes True), or select a LoRA variant (mica).
PLAIN_INITIALISATIONS = (True, False, "gaussian", "eva", "orthogonal")


# PEFT's task types, each with the transformers auto-class mapping ({model_type: class name})
# of its models; the AutoPeftModelFor* class of a task loads only adapters of its task type.
TASK_TYPE_MAPPINGS = (
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)


def peft_task_type(class_name: str, model_type: str | None) -> str | None:
    """PEFT's task_type of a transformers model class (`BertForSequenceClassification` of
    model_type "bert" -> "SEQ_CLS"): the task whose auto class builds that class for that
    model_type. None for a class of no PEFT task (a masked LM, a module outside transformers),
    which PeftModel.from_pretrained loads and the AutoPeftModelFor* classes do not."""
    from transformers.models.auto import modeling_auto

    for task_type, mapping in TASK_TYPE_MAPPINGS:
        names = getattr(modeling_auto, mapping, {}).get(model_type, ())
        if class_name in ((names,) if isinstance(names, str) else names):
            return task_type
    return None


def _is_off(value) -> bool:
    """Whether a PEFT option's value means "not used" (0 does not: layers_to_transform=0 is
    layer 0)."""
    return value is None or value is False or value in ([], {}, "")


def read_peft_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of `path`, refusing every PEFT option fastdelta does not implement."""
    config_file = Path(path) / CONFIG_NAME
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_file} holds a {type(config).__name__}, not a JSON object: it is not a PEFT "
            "adapter config"
        )
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_file} has peft_type {config.get('peft_type')!r}: fastdelta loads PEFT "
            "adapters of peft_type 'LORA' only"
        )
    known = {*IMPLEMENTED_FIELDS, *WITHOUT_EFFECT_FIELDS, *UNSUPPORTED_FIELDS}
    refused = [field for field in UNSUPPORTED_FIELDS if not _is_off(config.get(field))]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    initialisation = config.get("init_lora_weights", True)
    if base_changing_init(initialisation):
        warnings.warn(
            f"{config_file} is a {initialisation} adapter saved unconverted: its deltas apply to "
            "the residual base model PEFT's initialisation left (the weights minus B_0 A_0), as "
            "in PEFT; load it onto that model, or save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion to load it onto the original one",
            UserWarning,
            stacklevel=4,
        )
    elif not any(
        initialisation is value or initialisation == value for value in PLAIN_INITIALISATIONS
    ):
        refused.append(
            f"init_lora_weights={initialisation!r} (it changes the base weights or the LoRA "
            "variant: save the adapter with PEFT's path_initial_model_for_weight_conversion)"
        )
    unknown = sorted(field for field in config if field not in known and not _is_off(config[field]))
    refused += [f"{field} (unknown to fastdelta)" for field in unknown]
    if refused:
        raise ValueError(
            f"{config_file} uses PEFT LoRA options fastdelta does not implement, which change "
            f"what the adapter computes: {', '.join(refused)}. Load it with PEFT instead"
        )
    _check_numbers(config, config_file)
    if not config.get("target_modules"):
        raise ValueError(f"{config_file} names no target_modules")
    _check_names(config, config_file)
    return config


def _check_names(config: dict[str, Any], config_file: Path) -> None:
    """target_modules / exclude_modules: a regex or a list of names; modules_to_save: a list."""
    for field in ("target_modules", "exclude_modules", "modules_to_save"):
        value = config.get(field)
        if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            continue
        if not isinstance(value, str) or field == "modules_to_save":
            kind = "a list of module names" + ("" if field == "modules_to_save" else " or a regex")
            raise ValueError(f"{config_file} has {field}={value!r}, which must be {kind}")
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(
                f"{config_file} has {field}={value!r}, which is not a valid regex: {error}"
            ) from None


def _check_numbers(config: dict[str, Any], config_file: Path) -> None:
    """r and lora_alpha decide the scaling, so they must be present (PEFT writes both)."""
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise ValueError(
                f"{config_file} has no {field!r}, which the adapter's scaling depends on: the "
                "file was edited or truncated; restore it"
            )
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{config_file} has {field}={value!r}, which must be a number")
    if not isinstance(config["r"], int) or config["r"] <= 0:
        raise ValueError(f"{config_file} has r={config['r']!r}, which must be a positive integer")
    if not math.isfinite(config["lora_alpha"]):
        raise ValueError(f"{config_file} has lora_alpha={config['lora_alpha']!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise ValueError(
                f"{config_file} has {field}={config[field]!r}, which must be an object "
                "{module regex: value}"
            )


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


def peft_heads(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """The modules of `model` PEFT saves whole (`modules_to_save`); PEFT skips entries that match
    nothing (SEQ_CLS lists both classifier and score)."""
    heads = list(config.get("modules_to_save") or [])
    return [name for name, _ in model.named_modules() if name and _peft_selects(name, heads)]


def _prefixes(name: str) -> list[str]:
    """`name` and the names of its ancestors: a.b.c -> a, a.b, a.b.c."""
    segments = name.split(".")
    return [".".join(segments[: index + 1]) for index in range(len(segments))]


def as_entries(peft_targets: str | list[str] | None) -> list[str] | None:
    """PEFT's target/exclude rule in fastdelta's addressing: list entries mean the same; a
    string is a regex over the whole name."""
    if not peft_targets:
        return None
    return [f"[r]^(?:{peft_targets})$"] if isinstance(peft_targets, str) else list(peft_targets)


def _patterns_for(patterns: dict | None, targets: list[str]) -> dict | None:
    """PEFT ignores pattern keys that match no target; fastdelta refuses them, so keep the
    others (the same computation)."""
    kept = {
        pattern: value
        for pattern, value in (patterns or {}).items()
        if any(pattern_matches(pattern, target) for target in targets)
    }
    return kept or None


def lora_arguments(
    config: dict[str, Any], targets: list[str] | None, model: nn.Module | None = None
) -> dict[str, Any]:
    """LoraConfig arguments equivalent to a PEFT LoRA config. With `targets` resolved on
    `model` they are named exactly; else PEFT's target_modules are translated."""
    heads = list(config.get("modules_to_save") or [])
    if model is not None:
        names = [name for name, _ in model.named_modules() if name]
        heads = [head for head in heads if any(_peft_selects(name, [head]) for name in names)]
    exclude = None
    rank_pattern = config.get("rank_pattern") or None
    alpha_pattern = config.get("alpha_pattern") or None
    if targets is None:
        if config["target_modules"] == "all-linear":
            raise ValueError(
                "target_modules='all-linear' names modules only on a backbone: load the adapter "
                "with AutoDeltaModel.from_finetuned(path, backbone_model)"
            )
        targets = as_entries(config["target_modules"])
        exclude = as_entries(config.get("exclude_modules"))
    else:
        rank_pattern = _patterns_for(rank_pattern, targets)
        alpha_pattern = _patterns_for(alpha_pattern, targets)
    return {
        "delta_type": "lora",
        "modified_modules": targets,
        "exclude_modules": exclude,
        # The deltas train with the head, as in PEFT.
        "unfrozen_modules": ["deltas", *heads] if heads else None,
        "lora_r": config["r"],
        "lora_alpha": config["lora_alpha"],
        # PEFT's defaults for fields that older PEFT versions did not write.
        "lora_dropout": config.get("lora_dropout") or 0.0,
        "use_rslora": config.get("use_rslora") or False,
        "use_dora": config.get("use_dora") or False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # The initialisation, where fastdelta has it (the others only made the saved tensors).
        **_initialisation(config.get("init_lora_weights", True)),
    }


def _initialisation(value) -> dict[str, Any]:
    if isinstance(value, bool) or value == "gaussian":
        return {"init_lora_weights": value}
    return {}


def read_peft_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors renamed to fastdelta's parameter names."""
    path = Path(path)
    weights = next((path / name for name in WEIGHTS_NAMES if (path / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"The PEFT adapter {str(path)!r} has none of {WEIGHTS_NAMES}")
    renamed = {}
    for key, tensor in load_weights_file(weights).items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{weights} holds {key!r}, which is not under {PREFIX!r}")
        name = key[len(PREFIX) :]
        if BASE_LAYER in name:
            # A target's own tensor, which PEFT saves with the adapter and loads into the base
            # layer (a targeted embedding's table, under save_embedding_layers): the host's.
            module, _, tensor_name = name.rpartition(BASE_LAYER)
            name = f"{module}.{tensor_name}"
        for peft_suffix, suffix in LORA_KEYS.items():
            if name.endswith(peft_suffix):
                name = name[: -len(peft_suffix)] + suffix
        renamed[name] = tensor
    return renamed


def peft_config(
    arguments: dict[str, Any],
    targets: list[str],
    fan_in_fan_out: bool,
    heads: list[str],
    base_model_name: str | None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """The adapter_config.json of LoRA deltas on `targets` built with LoraConfig `arguments`,
    for a base model loaded from `base_model_name` (a path or hub name; None when it was not
    loaded with from_pretrained) of PEFT task `task_type` (`peft_task_type`)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name,
        "target_modules": targets,
        "r": arguments["lora_r"],
        "lora_alpha": arguments["lora_alpha"],
        "lora_dropout": arguments["lora_dropout"],
        "use_rslora": arguments["use_rslora"],
        "rank_pattern": arguments["rank_pattern"] or {},
        "alpha_pattern": arguments["alpha_pattern"] or {},
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": heads or None,
        "init_lora_weights": arguments["init_lora_weights"],
        "inference_mode": True,
        "use_dora": arguments["use_dora"],
    }


def unpadded_arguments(arguments: dict[str, Any], scalings: dict[str, float]) -> dict[str, Any]:
    """The LoraConfig `arguments` of deltas padded to rank max_rank (`scalings`: {module name:
    its delta's scaling}) as PEFT, which has no padding, describes them: rank max_rank
    everywhere, each module's alpha the one that gives it its scaling (the zeros it loads change
    nothing). Arguments without max_rank are returned as they are."""
    max_rank = arguments.get("max_rank")
    if max_rank is None:
        return arguments
    rank, alpha = arguments["lora_r"], arguments["lora_alpha"]
    factor = math.sqrt(max_rank) if arguments["use_rslora"] else max_rank
    default = alpha / math.sqrt(rank) if arguments["use_rslora"] else alpha / rank
    alphas = {
        f"^{re.escape(name)}": scaling * factor
        for name, scaling in scalings.items()
        if scaling != default
    }
    return {
        **arguments,
        "lora_r": max_rank,
        "lora_alpha": default * factor,
        "rank_pattern": None,
        "alpha_pattern": alphas or None,
        "max_rank": None,
    }


def peft_key(name: str) -> str:
    """PEFT's key of a fastdelta parameter name (`<module>.lora.lora_A` -> `...lora_A.weight`)."""
    for peft_suffix, suffix in LORA_KEYS.items():
        if name.endswith(suffix):
            name = name[: -len(suffix)] + peft_suffix
    return PREFIX + name


def write_peft(path: str | Path, config: dict[str, Any], tensors: dict) -> Path:
    """Write a PEFT adapter: `config` and `tensors` (keyed by fastdelta's names) to `path`."""
    path = prepare_directory(path, "peft")
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(
        {peft_key(name): tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
        path / WEIGHTS_NAMES[0],
        metadata={"format": "pt"},
    )
    follow_umask(path / CONFIG_NAME, path / WEIGHTS_NAMES[0])
    return path
