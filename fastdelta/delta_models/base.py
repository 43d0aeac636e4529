"""DeltaBase: attaches deltas to a backbone by name, freezes it, logs, detaches and re-attaches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from fastdelta.addressing import ModuleAddresses, check_entries, name_matches
from fastdelta.delta_models import checkpoint
from fastdelta.delta_models.config import BaseDeltaConfig
from fastdelta.delta_models.targets import check_target_runs
from fastdelta.injection import attach_delta, detach_delta
from fastdelta.layers.base import DeltaLayer, delta_parameter_names
from fastdelta.pseudo_input import Sizes, module_sizes
from fastdelta.structures import common_structure_names

# Model classes whose head is freshly initialised for the task (not pretrained), so
# freeze_module keeps it trainable unless told otherwise.
# The names transformers gives those heads, for models whose base model is not one child
# (T5ForQuestionAnswering holds shared/encoder/decoder directly).
TASK_HEAD_NAMES = ("classifier", "pre_classifier", "classification_head", "score", "qa_outputs")
TASK_HEAD_CLASS_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
DELTAS_ENTRY = "deltas"


@dataclass
class Attachment:
    host_name: str
    delta_name: str
    role: str | None
    delta: nn.Module
    attached: bool = True


class DeltaBase:
    """The deltas of one kind attached to one backbone model.

    Subclasses set `config_class` and `default_modified_modules` (common-structure names used
    when `modified_modules` is None) and implement `add_all_delta_to_backbone`.
    The delta model is not called itself: the backbone's forward runs the deltas.
    Every delta model takes `delta_dtype` (keyword-only): the dtype of the delta parameters it
    creates, such as torch.float32 deltas on a bfloat16 backbone (they compute in the
    activations' dtype and keep their weights and gradients in theirs); None, the default,
    follows the backbone. Existing biases that BitFit trains in place keep their layer's dtype.
    """

    config_class: type[BaseDeltaConfig] = BaseDeltaConfig
    default_modified_modules: tuple[str, ...] = ()

    def __init__(self, backbone_model: nn.Module, config: BaseDeltaConfig):
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(
                f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}"
            )
        self.backbone_model = backbone_model
        self.config = config
        self.attachments: list[Attachment] = []
        self._trainable_state_dict_hook = None
        self._trainable_state_dict_wanted = False
        targets = self._targets()
        try:
            self.add_all_delta_to_backbone(targets)
        except Exception:
            # Never leave a backbone half-modified: take off what was attached, then re-raise.
            for attachment in reversed(self.attachments):
                detach_delta(
                    self.backbone_model.get_submodule(attachment.host_name), attachment.delta_name
                )
            self.attachments.clear()
            raise

    @classmethod
    def from_config(cls, config: BaseDeltaConfig | dict, backbone_model: nn.Module):
        """Build the delta model that `config` (a config object or its dict) describes."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}"
            )
        return cls(backbone_model, **config.delta_arguments())

    @classmethod
    def from_finetuned(
        cls, finetuned_delta_path, backbone_model: nn.Module, *, allow_non_finite: bool = False
    ):
        """Rebuild the deltas saved by `save_finetuned` at `finetuned_delta_path` on
        `backbone_model` and load their tensors (see `AutoDeltaModel.from_finetuned`)."""
        saved = checkpoint.read_checkpoint(finetuned_delta_path, backbone_model)
        if saved.delta_type != cls.config_class.delta_type:
            raise ValueError(
                f"{str(finetuned_delta_path)!r} holds delta_type {saved.delta_type!r}, which "
                f"{cls.__name__} cannot load: use AutoDeltaModel.from_finetuned"
            )
        return checkpoint.build_from_checkpoint(cls, saved, backbone_model, allow_non_finite)

    def save_finetuned(
        self, finetuned_delta_path="./delta_checkpoints/", format: str = "fastdelta", **kwargs
    ):
        """Save the config and this delta model's tensors (its deltas, and any trainable task
        head) to the directory `finetuned_delta_path`; returns its path. Other delta models on
        the backbone are not saved. format="peft" writes LoRA deltas in PEFT's layout
        (adapter_config.json, adapter_model.safetensors) instead."""
        if kwargs:
            raise TypeError(
                f"save_finetuned got unsupported argument(s) {', '.join(sorted(kwargs))}: "
                "fastdelta writes config.json and delta.safetensors and does not upload"
            )
        return checkpoint.save_finetuned(self, finetuned_delta_path, format)

    @property
    def delta_type(self) -> str:
        return self.config.delta_type

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"A {type(self).__name__} is not called itself: call the backbone model "
            "(the one passed as backbone_model), whose forward now runs the deltas"
        )

    def __repr__(self) -> str:
        active = sum(attachment.attached for attachment in self.attachments)
        return (
            f"{type(self).__name__}(backbone={type(self.backbone_model).__name__}, "
            f"deltas={active}/{len(self.attachments)} attached, config={self.config})"
        )

    # Which modules to modify

    def _targets(self) -> list[str]:
        uses_defaults = self.config.modified_modules is None
        entries = list(
            self.default_modified_modules if uses_defaults else self.config.modified_modules
        )
        if self.config.common_structure or uses_defaults:
            common_structure_names(self.backbone_model)  # raises for an unmapped architecture
        return ModuleAddresses(self.backbone_model).select(
            entries, self.config.exclude_modules or [], every_entry_must_match=not uses_defaults
        )

    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        """Create and attach the deltas for the target modules named in `targets`."""
        raise NotImplementedError(f"{type(self).__name__} must implement add_all_delta_to_backbone")

    def target_sizes(self, names: list[str]) -> dict[str, Sizes]:
        """(input, output) feature sizes of the named backbone modules."""
        return module_sizes(self.backbone_model, names)

    def factory_kwargs(self, module: nn.Module) -> dict:
        """device and dtype for a delta of `module`: those of its (else the backbone's) weights;
        the config's `delta_dtype` instead of their dtype when it is set."""
        weights = (
            parameter
            for candidate in (module, self.backbone_model)
            for parameter in candidate.parameters()
            if parameter.is_floating_point()
        )
        weight = next(weights, None)
        kwargs = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
        if self.config.delta_dtype is not None:
            kwargs["dtype"] = getattr(torch, self.config.delta_dtype)
        return kwargs

    # The three operations

    def replace_module(
        self, module: nn.Module | str, delta_module: nn.Module, delta_name: str | None = None
    ) -> None:
        """Let `delta_module` compute the output of `module` in its place (its parameters stay)."""
        self._attach(module, delta_module, delta_name, "replace")

    def insert_sequential_module(
        self,
        module: nn.Module | str,
        delta_module: nn.Module,
        delta_name: str | None = None,
        position: str = "after",
    ) -> None:
        """Run `delta_module` on the output of `module` ("after") or on its input ("before")."""
        if position not in ("before", "after"):
            raise ValueError(f"position must be 'before' or 'after', got {position!r}")
        self._attach(module, delta_module, delta_name, position)

    def insert_parallel_module(
        self, module: nn.Module | str, delta_module: nn.Module, delta_name: str | None = None
    ) -> None:
        """Add `delta_module`'s function of the input of `module` to its output."""
        self._attach(module, delta_module, delta_name, "parallel")

    def mark_delta_module(
        self, module: nn.Module | str, delta_module: nn.Module, delta_name: str | None = None
    ) -> None:
        """Attach a delta that takes no part in the forward (it trains host parameters)."""
        self._attach(module, delta_module, delta_name, None)

    def _attach(self, module, delta_module, delta_name, role) -> None:
        host_name = module if isinstance(module, str) else self._name_of(module)
        host = self.backbone_model.get_submodule(host_name)
        delta_name = delta_name or getattr(delta_module, "delta_name", "delta")
        # A new module starts in training mode; the delta follows its host's (an eval-mode
        # model must not run LoRA dropout).
        delta_module.train(host.training)
        check_target_runs(self.backbone_model, host_name, role)
        attach_delta(host, delta_module, delta_name, role, host_name)
        self.attachments.append(Attachment(host_name, delta_name, role, delta_module))

    def _name_of(self, module: nn.Module) -> str:
        for name, candidate in self.backbone_model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"The {type(module).__name__} given is not a module of the backbone")

    # Detach and attach

    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Take the deltas (inside `module`, default all) off the backbone, which then computes
        exactly what it did before they were added (a merged LoRA delta is unmerged first, which
        restores its layer's weight to within the dtype's rounding). `attach()` puts them back."""
        selected = self._in_scope(module, attached=True, action="detach")
        for attachment in reversed(selected):
            host = self.backbone_model.get_submodule(attachment.host_name)
            detach_delta(host, attachment.delta_name)
            if isinstance(attachment.delta, DeltaLayer):
                attachment.delta.on_detach(host)
            attachment.attached = False
        if reset_state_dict:
            self._set_trainable_state_dict(False)

    def attach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Put back the deltas that `detach()` took off (inside `module`, default all), each in
        its place among its module's deltas. If one cannot be attached (another delta model
        attached a delta of its kind there meanwhile), those put back are taken off again."""
        attached = []
        try:
            for attachment in self._in_scope(module, attached=False, action="attach"):
                host = self.backbone_model.get_submodule(attachment.host_name)
                attach_delta(
                    host,
                    attachment.delta,
                    attachment.delta_name,
                    attachment.role,
                    attachment.host_name,
                )
                if isinstance(attachment.delta, DeltaLayer):
                    attachment.delta.on_attach(host)
                attachment.attached = True
                attached.append(attachment)
        except Exception:
            for attachment in reversed(attached):
                host = self.backbone_model.get_submodule(attachment.host_name)
                detach_delta(host, attachment.delta_name)
                if isinstance(attachment.delta, DeltaLayer):
                    attachment.delta.on_detach(host)
                attachment.attached = False
            raise
        if reset_state_dict:
            self._set_trainable_state_dict(self._trainable_state_dict_wanted)

    def _in_scope(self, module, attached: bool, action: str) -> list[Attachment]:
        prefix = None if module is None else self._name_of(module)
        selected = [
            attachment
            for attachment in self.attachments
            if attachment.attached == attached
            and (
                not prefix
                or attachment.host_name == prefix
                or attachment.host_name.startswith(prefix + ".")
            )
        ]
        if not selected:
            state = "attached" if attached else "detached"
            where = "" if module is None else f" inside {prefix or 'the backbone'}"
            raise RuntimeError(
                f"Nothing to {action}: no {state} delta of this {type(self).__name__}{where}"
            )
        return selected

    # Freezing

    def freeze_module(
        self,
        module: nn.Module | None = None,
        exclude: list[str] | None = None,
        set_state_dict: bool = True,
    ) -> None:
        """Freeze every parameter of `module` (default the backbone) except those in `exclude`.

        `exclude` uses the addressing rules on module and parameter names; the entry "deltas"
        means every delta parameter. With `exclude=None` the deltas stay trainable, and so does
        a freshly initialised task head (the classifier of a *ForSequenceClassification model);
        `unfrozen_modules` given to the constructor replaces that default. An explicit `exclude`
        is honoured exactly. `set_state_dict=True` makes the backbone's `state_dict()` hold the
        trainable tensors only. Calling it again re-applies the rule.
        """
        module = self.backbone_model if module is None else module
        explicit = exclude if exclude is not None else self.config.unfrozen_modules
        entries = check_entries(explicit, "exclude") if explicit is not None else [DELTAS_ENTRY]
        heads = task_head_names(module) if explicit is None else []
        named_entries = [entry for entry in entries if entry != DELTAS_ENTRY]

        addresses = ModuleAddresses(module, include_deltas=True)
        parameters = list(module.named_parameters(remove_duplicate=False))
        missing = [
            entry
            for entry in addresses.unmatched(named_entries)
            if not any(name_matches(name, entry) for name, _ in parameters)
        ]
        if missing:
            raise ValueError(
                "freeze_module exclude: nothing matches "
                + "; ".join(f"{entry!r}{addresses.suggest(entry)}" for entry in missing)
            )

        kept_modules = set(heads) | {
            name
            for name in addresses.modules
            if name and addresses.matches_any(name, named_entries)
        }
        deltas = delta_parameter_names(module) if DELTAS_ENTRY in entries else set()
        trainable: dict[int, bool] = {}
        for name, parameter in parameters:
            keep = (
                name in deltas
                or any(name_matches(name, entry) for entry in named_entries if "@" not in entry)
                or any(ancestor in kept_modules for ancestor in _ancestors(name))
            )
            trainable[id(parameter)] = trainable.get(id(parameter), False) or keep
        for _, parameter in parameters:
            parameter.requires_grad_(trainable[id(parameter)])

        self._trainable_state_dict_wanted = set_state_dict
        self._set_trainable_state_dict(set_state_dict)

    def _set_trainable_state_dict(self, enabled: bool) -> None:
        if enabled and self._trainable_state_dict_hook is None:
            self._trainable_state_dict_hook = self.backbone_model.register_state_dict_post_hook(
                _keep_trainable_tensors
            )
        elif not enabled and self._trainable_state_dict_hook is not None:
            self._trainable_state_dict_hook.remove()
            self._trainable_state_dict_hook = None

    # Counting and logging

    def trainable_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        module = self.backbone_model if module is None else module
        return [name for name, parameter in module.named_parameters() if parameter.requires_grad]

    def trainable_parameters(self, module: nn.Module | None = None) -> list[nn.Parameter]:
        module = self.backbone_model if module is None else module
        return [parameter for parameter in module.parameters() if parameter.requires_grad]

    def num_trainable_parameters(self, module: nn.Module | None = None) -> int:
        return sum(parameter.numel() for parameter in self.trainable_parameters(module))

    def num_total_parameters(self, module: nn.Module | None = None) -> int:
        module = self.backbone_model if module is None else module
        return sum(parameter.numel() for parameter in module.parameters())

    def num_delta_parameters(self, module: nn.Module | None = None) -> int:
        module = self.backbone_model if module is None else module
        names = delta_parameter_names(module)
        # A tied parameter may be a delta under only one of its names: count by identity.
        deltas = {
            id(parameter): parameter
            for name, parameter in module.named_parameters(remove_duplicate=False)
            if name in names
        }
        return sum(parameter.numel() for parameter in deltas.values())

    def log(
        self,
        module: nn.Module | None = None,
        delta_ratio: bool = True,
        trainable_ratio: bool = True,
        visualization: bool = True,
        cuda_memory: bool = True,
    ):
        """Print the structure graph, parameter ratios, memory and the backend of each delta."""
        from fastdelta.visualization import Visualization

        module = self.backbone_model if module is None else module
        console = Console()
        if visualization:
            console.print(Visualization(module).structure_graph(printTree=False))
        total = self.num_total_parameters(module)
        table = Table(title=f"{type(self).__name__} on {type(module).__name__}", show_header=False)
        if trainable_ratio:
            trainable = self.num_trainable_parameters(module)
            table.add_row("trainable parameters", f"{trainable:,} ({100 * trainable / total:.4f}%)")
        if delta_ratio:
            delta = self.num_delta_parameters(module)
            table.add_row("delta parameters", f"{delta:,} ({100 * delta / total:.4f}%)")
        table.add_row("total parameters", f"{total:,}")
        table.add_row(
            "deltas attached",
            f"{sum(a.attached for a in self.attachments)} of {len(self.attachments)}",
        )
        table.add_row("compute backend", ", ".join(sorted(self.backends())) or "-")
        parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        table.add_row("parameter memory", f"{parameter_bytes / 2**20:.2f} MiB")
        if cuda_memory and torch.cuda.is_available():
            table.add_row(
                "CUDA memory allocated (peak)",
                f"{torch.cuda.memory_allocated() / 2**20:.1f} MiB "
                f"({torch.cuda.max_memory_allocated() / 2**20:.1f} MiB)",
            )
        console.print(table)

    def backends(self) -> set[str]:
        """The compute backends the attached deltas run on."""
        return {
            attachment.delta.backend_name()
            for attachment in self.attachments
            if attachment.attached
            and isinstance(attachment.delta, DeltaLayer)
            and attachment.role is not None
        }


def config_arguments(arguments: dict) -> dict:
    """A delta model constructor's arguments (its `locals()`), as its config class takes them."""
    return {
        name: value
        for name, value in arguments.items()
        if name not in ("self", "backbone_model", "__class__")
    }


def task_head_names(model: nn.Module) -> list[str]:
    """The children of a task model that form its freshly initialised head (its classifier)."""
    if not type(model).__name__.endswith(TASK_HEAD_CLASS_SUFFIXES):
        return []
    base = getattr(model, "base_model_prefix", "")
    has_base_child = bool(base) and isinstance(getattr(model, base, None), nn.Module)
    return [
        name
        for name, child in model.named_children()
        if (name != base if has_base_child else name in TASK_HEAD_NAMES)
        and any(True for _ in child.parameters())
    ]


def _ancestors(parameter_name: str) -> list[str]:
    segments = parameter_name.split(".")[:-1]
    return [".".join(segments[: index + 1]) for index in range(len(segments))]


def _keep_trainable_tensors(module, state_dict, prefix, local_metadata) -> None:
    trainable = {
        prefix + name
        for name, parameter in module.named_parameters(remove_duplicate=False)
        if parameter.requires_grad
    }
    for key in [key for key in state_dict if key.startswith(prefix) and key not in trainable]:
        del state_dict[key]
