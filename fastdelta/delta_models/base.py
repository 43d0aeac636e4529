"""DeltaBase: attaches deltas to a backbone by name, freezes it, logs, detaches and re-attaches."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from rich.table import Table
from torch import nn

from fastdelta.addressing import ModuleAddresses, check_entries, name_matches
from fastdelta.delta_models import checkpoint
from fastdelta.delta_models.config import BaseDeltaConfig
from fastdelta.delta_models.names import (
    activate,
    active_deltas,
    delta_names,
    name_is_active,
    set_active,
    tag_delta,
)
from fastdelta.delta_models.targets import check_target_runs
from fastdelta.injection import attach_delta, detach_delta, is_active
from fastdelta.layers.base import DeltaLayer, attached_deltas, delta_parameter_names
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
# Modules of a base model that some checkpoints lack (sentence encoders saved without BERT's
# pooler): when transformers initialised one at random on loading, it is a fresh head too.
FRESH_WHEN_NOT_LOADED = ("pooler",)
DELTAS_ENTRY = "deltas"


@dataclass
class Attachment:
    host_name: str
    delta_name: str
    role: str | None
    delta: nn.Module
    attached: bool = True
    # The host's hooks that run an OpenDelta-style delta's pre_forward / post_forward.
    hooks: list = field(default_factory=list)
    # Attachments of one group (a delta spanning two modules) are detached and attached
    # together; the group names them in a checkpoint's targets ("<input> -> <output>").
    group: str | None = None
    # The name the delta takes on a host that has no other delta of its kind ("adapter"), which
    # a checkpoint records; delta_name is "adapter_1" for a second adapter on the host.
    saved_name: str = ""

    def __post_init__(self):
        self.saved_name = self.saved_name or self.delta_name

    @property
    def target(self) -> str:
        """What a checkpoint records for this attachment: its group, else its host's name."""
        return self.group or self.host_name


# DeltaBase is not an nn.Module, though OpenDelta's is: its deltas are children of the backbone's
# modules, so registering them again under the delta model would give them two parents (twice in
# any walk of modules), and registering the backbone would put it inside a second model. Its
# train()/eval()/apply() would act on a tree that is not the model. The delta model instead has
# the nn.Module methods OpenDelta scripts call on it (parameters, named_parameters, state_dict,
# load_state_dict, to), each about its own deltas under their names in the backbone.
class DeltaBase:
    """The deltas of one kind attached to one backbone model.

    Subclasses set `config_class` and `default_modified_modules` (common-structure names used
    when `modified_modules` is None) and implement `add_all_delta_to_backbone`.
    The delta model is not called itself: the backbone's forward runs the deltas.
    Every delta model takes `delta_dtype` (keyword-only): the dtype of the delta parameters it
    creates, such as torch.float32 deltas on a bfloat16 backbone (they compute in the
    activations' dtype and keep their weights and gradients in theirs); None, the default,
    follows the backbone. Existing biases that BitFit trains in place keep their layer's dtype.
    Every delta model also takes `name` (keyword-only, "default" unless given): delta models of
    different names sit on one backbone, and `fastdelta.set_active` chooses which of them run.
    """

    config_class: type[BaseDeltaConfig] = BaseDeltaConfig
    default_modified_modules: tuple[str, ...] = ()
    # Whether `set_active` may switch this delta model off by its name (its deltas run in their
    # hosts' forward, and are skipped there).
    switchable: bool = True

    def __init__(self, backbone_model: nn.Module, config: BaseDeltaConfig):
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(
                f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}"
            )
        self.backbone_model = backbone_model
        if config.interactive_modify:
            config = _choose_interactively(backbone_model, config)
        self.config = config
        self.attachments: list[Attachment] = []
        self._trainable_state_dict_hook = None
        self._trainable_state_dict_wanted = False
        # {module name: why freeze_module kept it trainable}, for log().
        self.kept_trainable: dict[str, str] = {}
        targets = self._targets()
        try:
            self.add_all_delta_to_backbone(targets)
        except Exception:
            # Never leave a backbone half-modified: take off what was attached, then re-raise.
            self._remove_attachments()
            raise
        activate(backbone_model, self.name)  # a new delta model runs (fastdelta.set_active)

    def _remove_attachments(self) -> None:
        """Take every delta off the backbone as if none had been attached (construction or
        loading failed) and forget them."""
        for attachment in reversed(self.attachments):
            detach_delta(
                self.backbone_model.get_submodule(attachment.host_name), attachment.delta_name
            )
            for hook in attachment.hooks:
                hook.remove()
        self.attachments.clear()

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
        cls,
        finetuned_delta_path,
        backbone_model: nn.Module,
        delta_config=None,
        *,
        allow_non_finite: bool = False,
        name: str | None = None,
        **options,
    ):
        """Rebuild the deltas saved by `save_finetuned` at `finetuned_delta_path` on
        `backbone_model` and load their tensors (see `AutoDeltaModel.from_finetuned`, which
        takes OpenDelta's other arguments too, and `name`)."""
        saved = checkpoint.read_named_checkpoint(finetuned_delta_path, backbone_model, name)
        if saved.delta_type != cls.config_class.delta_type:
            raise ValueError(
                f"{str(finetuned_delta_path)!r} holds delta_type {saved.delta_type!r}, which "
                f"{cls.__name__} cannot load: use AutoDeltaModel.from_finetuned"
            )
        checkpoint.check_load_options(saved, {"delta_config": delta_config, **options})
        return checkpoint.build_from_checkpoint(cls, saved, backbone_model, allow_non_finite)

    def save_finetuned(
        self, finetuned_delta_path="./delta_checkpoints/", format: str = "fastdelta", **options
    ):
        """Save the config and this delta model's tensors (its deltas, and any trainable task
        head) to the directory `finetuned_delta_path`; returns its path. Other delta models on
        the backbone are not saved. format="peft" writes LoRA deltas in PEFT's layout
        (adapter_config.json, adapter_model.safetensors) instead. OpenDelta's arguments are
        taken with the values fastdelta has (save_config=True, push_to_dc=False or with
        delay_push=True, which saves into the card's subdirectory as OpenDelta did, the
        DeltaCenter's as no-ops); other values are refused by name."""
        checkpoint.check_save_options(options)
        path = checkpoint.save_directory(self, finetuned_delta_path, options)
        return checkpoint.save_finetuned(self, path, format)

    @property
    def delta_type(self) -> str:
        return self.config.delta_type

    @property
    def name(self) -> str:
        """This delta model's name (its config's `name`, "default" unless given)."""
        return self.config.name

    @property
    def active(self) -> bool:
        """Whether this delta model's name is in its backbone's active set (its attached deltas
        run; see `fastdelta.set_active`)."""
        return name_is_active(self.backbone_model, self.name)

    def _check_active(self, action: str) -> None:
        """Refuse `action` (folding the deltas into the backbone) while this delta model's name
        is not active: the backbone would start computing deltas that are switched off."""
        if not self.active:
            raise RuntimeError(
                f"{action}() would fold the deltas of {self.name!r} into the backbone, but that "
                f"name is not active (fastdelta.set_active): activate it first, e.g. "
                f"delta_model.set_active()"
            )

    def set_active(self, names=None) -> None:
        """`fastdelta.set_active(backbone, names)` on this delta model's backbone; by default
        (`names` None) this delta model's name alone runs. `[]` runs none."""
        set_active(self.backbone_model, self.name if names is None else names)

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"A {type(self).__name__} is not called itself: call the backbone model "
            "(the one passed as backbone_model), whose forward now runs the deltas"
        )

    def __repr__(self) -> str:
        active = sum(attachment.attached for attachment in self.attachments)
        return (
            f"{type(self).__name__}(name={self.name!r}, "
            f"backbone={type(self.backbone_model).__name__}, "
            f"deltas={active}/{len(self.attachments)} attached, config={self.config})"
        )

    # The nn.Module methods OpenDelta scripts call on the delta model

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """This delta model's parameters, attached or detached, by their names in the backbone
        (with BitFit's host biases; other delta models' deltas and the head are not included:
        `trainable_parameters()` gives what trains). `recurse` is nn.Module's, and has nothing to
        change: a delta model holds its deltas only."""
        seen = set()
        for name, parameter in checkpoint.owned_parameters(self).items():
            if remove_duplicate and id(parameter) in seen:
                continue
            seen.add(id(parameter))
            yield prefix + name, parameter

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The parameters of `named_parameters()`, for an optimizer over the deltas alone."""
        for _, parameter in self.named_parameters(recurse=recurse):
            yield parameter

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        """This delta model's own tensors (its deltas' parameters and persistent buffers, and
        BitFit's host biases) by their names in the backbone: what `save_finetuned` saves
        besides a head, and what `load_state_dict` takes."""
        destination = OrderedDict() if destination is None else destination
        for attachment in self.attachments:
            host_prefix = f"{attachment.host_name}." if attachment.host_name else ""
            host = self.backbone_model.get_submodule(attachment.host_name)
            tensors = attachment.delta.state_dict(keep_vars=True)
            for name, tensor in tensors.items():
                full = f"{prefix}{host_prefix}{attachment.delta_name}.{name}"
                destination[full] = tensor if keep_vars else tensor.detach()
            for name in getattr(attachment.delta, "host_parameter_names", ()):
                parameter = host.get_parameter(name)
                destination[prefix + host_prefix + name] = (
                    parameter if keep_vars else parameter.detach()
                )
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy the tensors of `state_dict` (keyed as `state_dict()` keys them) into this delta
        model's deltas. With `strict` (the default), a missing or unexpected key is an error
        naming it; otherwise those are returned, as nn.Module returns them. A shape that differs
        is always an error, and then nothing is copied."""
        if assign:
            raise ValueError(
                "load_state_dict(assign=True) would put new tensors in place of the deltas' "
                "parameters, which the backbone's modules hold: leave assign out to copy values"
            )
        own = self.state_dict(keep_vars=True)
        missing = [name for name in own if name not in state_dict]
        unexpected = [name for name in state_dict if name not in own]
        misshapen = [
            f"{name}: {tuple(state_dict[name].shape)} given, {tuple(own[name].shape)} here"
            for name in own
            if name in state_dict and state_dict[name].shape != own[name].shape
        ]
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if misshapen:
            problems.append("shapes that differ: " + "; ".join(misshapen))
        if problems:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                + "; ".join(problems)
                + ". Its keys are this delta model's delta tensors, named as in the backbone "
                "(see state_dict())"
            )
        with torch.no_grad():
            for name, tensor in own.items():
                if name in state_dict:
                    tensor.copy_(state_dict[name])
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def to(self, *args, **kwargs):
        """Move or cast this delta model's deltas (and BitFit's host biases), as nn.Module.to
        takes its arguments; returns the delta model. The backbone is not moved: `model.to()`
        moves it, its deltas with it."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        for attachment in self.attachments:
            attachment.delta.to(*args, **kwargs)
            host = self.backbone_model.get_submodule(attachment.host_name)
            for name in getattr(attachment.delta, "host_parameter_names", ()):
                parameter = host.get_parameter(name)
                cast = dtype if dtype is not None and parameter.is_floating_point() else None
                parameter.data = parameter.data.to(device, cast, non_blocking)
        return self

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
        """Run `delta_module` on the output of `module` ("after") or on its input ("before").

        A module with OpenDelta's protocol (a `pre_forward(*args, **kwargs)` returning the
        (args, kwargs) `module` is called with, and/or a `post_forward(output)` returning its new
        output) runs as OpenDelta runs it, whatever `position`: pre_forward on every argument of
        `module`'s call, post_forward on its whole output. Its parameters are named
        `<module>.<delta_name>.<name>`, as in OpenDelta."""
        if position not in ("before", "after"):
            raise ValueError(f"position must be 'before' or 'after', got {position!r}")
        if _has_forward_protocol(delta_module):
            self._attach(module, delta_module, delta_name, None)
            attachment = self.attachments[-1]
            _hook_protocol(self.backbone_model.get_submodule(attachment.host_name), attachment)
            return
        self._attach(module, delta_module, delta_name, position)

    def insert_parallel_module(
        self, module: nn.Module | str, delta_module: nn.Module, delta_name: str | None = None
    ) -> None:
        """Add `delta_module`'s function of the input of `module` to its output."""
        self._attach(module, delta_module, delta_name, "parallel")

    def insert_spanning_module(
        self,
        input_module: str,
        tap: nn.Module,
        output_module: str,
        delta_module: nn.Module,
        delta_name: str,
    ) -> None:
        """Add `delta_module`'s function of the input of `input_module` to the output of the
        later `output_module`: `tap` (parameterless) runs before `input_module` and keeps its
        input, and `delta_module` runs after `output_module` and reads it. Its parameters are
        named `<output_module>.<delta_name>.<name>`; the tap is `<input_module>.<delta_name>_input`.
        The two form one group, which detach() and attach() take off and put back together."""
        group = f"{input_module} -> {output_module}"
        # A second delta of this kind on output_module takes a suffix: so does its tap.
        taken = _free_delta_name(self.backbone_model.get_submodule(output_module), delta_name)
        suffix = taken[len(delta_name) :]
        self._attach(input_module, tap, f"{delta_name}_input", "before", group, suffix)
        self._attach(output_module, delta_module, delta_name, "after", group, suffix)

    def mark_delta_module(
        self, module: nn.Module | str, delta_module: nn.Module, delta_name: str | None = None
    ) -> None:
        """Attach a delta that takes no part in the forward (it trains host parameters)."""
        self._attach(module, delta_module, delta_name, None)

    def _attach(self, module, delta_module, delta_name, role, group=None, suffix=None) -> None:
        """Attach `delta_module` to `module` as `delta_name` (by default the delta's own), or,
        on a host that has a delta of that name from another delta model, as OpenDelta names
        it: `adapter_1`, `adapter_2`, ... (`suffix` chooses the suffix instead)."""
        host_name = module if isinstance(module, str) else self._name_of(module)
        host = self.backbone_model.get_submodule(host_name)
        saved_name = delta_name or getattr(delta_module, "delta_name", "delta")
        # Not a second forward replacement (LoRA), nor a second delta training the host's own
        # parameters (BitFit): attach_delta refuses those by name.
        if role == "replace" or getattr(delta_module, "host_parameter_names", ()):
            delta_name = saved_name
        elif suffix is None:
            delta_name = _free_delta_name(host, saved_name)
        else:
            delta_name = saved_name + suffix
        # A new module starts in training mode; the delta follows its host's (an eval-mode
        # model must not run LoRA dropout).
        delta_module.train(host.training)
        check_target_runs(self.backbone_model, host_name, role)
        active = name_is_active(self.backbone_model, self.name)
        tag_delta(delta_module, self.name, active, self.switchable)
        # The backbone itself has the empty name: error messages name it in words.
        attach_delta(host, delta_module, delta_name, role, host_name or "the backbone itself")
        self.attachments.append(
            Attachment(
                host_name, delta_name, role, delta_module, group=group, saved_name=saved_name
            )
        )

    def _name_of(self, module: nn.Module) -> str:
        for name, candidate in self.backbone_model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"The {type(module).__name__} given is not a module of the backbone")

    # Detach and attach

    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Take the deltas (inside `module`, default all) off the backbone, which then computes
        exactly what it did before they were added (a merged LoRA delta is unmerged first, which
        restores its layer's weight to within the dtype's rounding). `attach()` puts them back.
        Called again with every delta already detached, it does nothing; a `module` holding no
        delta of this model that is still attached is an error."""
        if not self._all_in_state(module, attached=False):
            self._take_off(self._in_scope(module, attached=True, action="detach"))
        if reset_state_dict:
            self._set_trainable_state_dict(False)

    def _take_off(self, selected: list[Attachment]) -> None:
        for attachment in reversed(selected):
            host = self.backbone_model.get_submodule(attachment.host_name)
            detach_delta(host, attachment.delta_name)
            for hook in attachment.hooks:
                hook.remove()
            attachment.hooks.clear()
            if isinstance(attachment.delta, DeltaLayer):
                attachment.delta.on_detach(host)
            attachment.attached = False

    def attach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Put back the deltas that `detach()` took off (inside `module`, default all), each in
        its place among its module's deltas. If one cannot be attached (another delta model
        attached a delta of its kind there meanwhile), those put back are taken off again.
        Called with every delta already attached, it does nothing; a `module` holding no delta of
        this model that is detached is an error."""
        if not self._all_in_state(module, attached=True):
            self._put_back(self._in_scope(module, attached=False, action="attach"))
        if reset_state_dict:
            self._set_trainable_state_dict(self._trainable_state_dict_wanted)

    def _put_back(self, selected: list[Attachment]) -> None:
        """Attach `selected` again, all or (taking back those put back) none."""
        attached = []
        try:
            active = name_is_active(self.backbone_model, self.name)
            for attachment in selected:
                host = self.backbone_model.get_submodule(attachment.host_name)
                tag_delta(attachment.delta, self.name, active, self.switchable)
                attach_delta(
                    host,
                    attachment.delta,
                    attachment.delta_name,
                    attachment.role,
                    attachment.host_name or "the backbone itself",
                )
                if isinstance(attachment.delta, DeltaLayer):
                    attachment.delta.on_attach(host)
                if _has_forward_protocol(attachment.delta):
                    _hook_protocol(host, attachment)
                attachment.attached = True
                attached.append(attachment)
        except Exception:
            self._take_off(attached)
            raise

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """PEFT's context manager for the base model's outputs: inside `with
        delta_model.disable_adapter():` the backbone runs without this delta model's deltas (as
        `detach()` leaves it); on leaving, by an exception too, exactly the deltas that were
        attached are put back, and merged LoRA deltas merged again (their layers' weights within
        the dtype's rounding). A trained head stays as it is: it is part of the backbone."""
        attached = [attachment for attachment in self.attachments if attachment.attached]
        merged = [a for a in attached if getattr(a.delta, "merged", False)]
        trimmed = self._trainable_state_dict_hook is not None
        self._take_off(attached)
        self._set_trainable_state_dict(False)
        try:
            yield
        finally:
            self._put_back(attached)
            for attachment in merged:
                attachment.delta.merge(self.backbone_model.get_submodule(attachment.host_name))
            self._set_trainable_state_dict(trimmed)

    def _all_in_state(self, module: nn.Module | None, attached: bool) -> bool:
        """Whether this is a whole-model call (`module` None) and every delta, of which there is
        one at least, is already `attached` (True) or detached (False)."""
        return (
            module is None
            and bool(self.attachments)
            and all(attachment.attached == attached for attachment in self.attachments)
        )

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
        return self._with_whole_groups(selected, attached)

    def _with_whole_groups(self, selected: list[Attachment], attached: bool) -> list[Attachment]:
        """`selected` with the other attachments (in the same state) of each group it touches,
        so that a delta spanning two modules is never half attached; in attachment order."""
        chosen = {id(attachment) for attachment in selected}
        groups = {attachment.group for attachment in selected if attachment.group}
        return [
            attachment
            for attachment in self.attachments
            if id(attachment) in chosen
            or (attachment.group in groups and attachment.attached == attached)
        ]

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
        a freshly initialised head: the classifier of a *ForSequenceClassification model, and a
        pooler that the checkpoint lacked (transformers initialised it at random on loading; a
        pretrained pooler stays frozen, as in PEFT). `unfrozen_modules` given to the constructor
        replaces that default. An explicit `exclude` is honoured exactly. `log()` says which
        modules stayed trainable and why (`kept_trainable`).

        `set_state_dict=True` makes the backbone's `state_dict()` hold the trainable tensors
        only (OpenDelta's meaning: `torch.save(model.state_dict())` saves just those). Its
        transformers `save_pretrained` (and `push_to_hub`) then refuses to write such a partial
        model: save with `save_finetuned`. Calling it again re-applies the rule.
        """
        module = self.backbone_model if module is None else module
        explicit = exclude if exclude is not None else self.config.unfrozen_modules
        entries = check_entries(explicit, "exclude") if explicit is not None else [DELTAS_ENTRY]
        heads = fresh_heads(module) if explicit is None else {}
        named_entries = [entry for entry in entries if entry != DELTAS_ENTRY]

        addresses = ModuleAddresses(module, include_deltas=True)
        parameters = list(module.named_parameters(remove_duplicate=False))
        missing = [
            entry
            for entry in addresses.unmatched(named_entries)
            if not any(name_matches(name, entry) for name, _ in parameters)
        ]
        if missing:  # ignored, as OpenDelta ignores it, but said
            warnings.warn(
                "freeze_module exclude: nothing matches "
                + "; ".join(f"{entry!r}{addresses.suggest(entry)}" for entry in missing)
                + " (ignored)",
                stacklevel=2,
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

        argument = "exclude" if exclude is not None else "unfrozen_modules"
        delta_modules = _delta_module_names(module)
        self.kept_trainable = heads or {
            name: f"named in {argument}"
            for name in _outermost(kept_modules)
            if not _inside_a_delta(name, delta_modules)
        }
        self._trainable_state_dict_wanted = set_state_dict
        self._set_trainable_state_dict(set_state_dict)

    def _set_trainable_state_dict(self, enabled: bool) -> None:
        backbone = self.backbone_model
        if enabled and self._trainable_state_dict_hook is None:
            self._trainable_state_dict_hook = backbone.register_state_dict_post_hook(
                _keep_trainable_tensors
            )
            _guard_save_pretrained(backbone)
        elif not enabled and self._trainable_state_dict_hook is not None:
            self._trainable_state_dict_hook.remove()
            self._trainable_state_dict_hook = None
            if not trims_state_dict(backbone):  # another delta model's trimming may remain
                _unguard_save_pretrained(backbone)

    # Counting and logging

    # The trainable parameters are the backbone's (inside `module`): what an optimizer built from
    # the model gets, other delta models' deltas and the head included, as in PEFT.

    def trainable_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        module = self.backbone_model if module is None else module
        return [name for name, parameter in module.named_parameters() if parameter.requires_grad]

    def trainable_parameters(self, module: nn.Module | None = None) -> list[nn.Parameter]:
        module = self.backbone_model if module is None else module
        return [parameter for parameter in module.parameters() if parameter.requires_grad]

    def num_trainable_parameters(self, module: nn.Module | None = None) -> int:
        return sum(parameter.numel() for parameter in self.trainable_parameters(module))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters) of the backbone, deltas included, each shared
        parameter counted once: PEFT's method of the same name."""
        return self.num_trainable_parameters(), self.num_total_parameters()

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: `trainable params: X || all params: Y || trainable%: Z`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def num_total_parameters(self, module: nn.Module | None = None) -> int:
        module = self.backbone_model if module is None else module
        return sum(parameter.numel() for parameter in module.parameters())

    def num_delta_parameters(self, module: nn.Module | None = None) -> int:
        """The parameters of this delta model's attached deltas (inside `module`, default all),
        with the host biases it trains in place (BitFit): another delta model's on the same
        backbone are not counted (`num_backbone_delta_parameters` counts every delta)."""
        prefix = "" if module is None else self._name_of(module)
        deltas = {}
        for attachment in self.attachments:
            inside = not prefix or f"{attachment.host_name}.".startswith(f"{prefix}.")
            if attachment.attached and inside:
                for parameter in checkpoint.attachment_parameters(self, attachment).values():
                    deltas[id(parameter)] = parameter  # shared ones (Compacter's rules) once
        return sum(parameter.numel() for parameter in deltas.values())

    def num_backbone_delta_parameters(self, module: nn.Module | None = None) -> int:
        """The parameters of every delta attached to the backbone (inside `module`), whichever
        delta model attached it."""
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
        """Print the structure graph, parameter ratios, the modules outside the deltas that
        stayed trainable and why, memory and the backend of each delta. Off a terminal (a log
        file) lines are not wrapped and parameter states are written as tags."""
        from fastdelta.visualization import Visualization, output_console

        module = self.backbone_model if module is None else module
        console = output_console()
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
            every = self.num_backbone_delta_parameters(module)
            if every != delta:
                table.add_row(
                    "all deltas on the backbone",
                    f"{every:,} ({100 * every / total:.4f}%), other delta models' included",
                )
        table.add_row("total parameters", f"{total:,}")
        table.add_row("name", f"{self.name} ({'active' if self.active else 'inactive'})")
        names = delta_names(self.backbone_model)
        if names != [self.name]:
            running = active_deltas(self.backbone_model)
            table.add_row(
                "delta models on the backbone",
                ", ".join(f"{name}{'' if name in running else ' (inactive)'}" for name in names),
            )
        for label, text in self._head_rows(module):
            table.add_row(label, text)
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

    def _head_rows(self, module: nn.Module) -> list[tuple[str, str]]:
        """log()'s rows on the modules outside the deltas that freeze_module kept trainable
        (and why), and on frozen poolers, which newcomers expect to train with the head."""
        rows = [
            ("trainable, besides the deltas", f"{name}: {reason}")
            for name, reason in self.kept_trainable.items()
            if _has_trainable_parameter(module, name)
        ]
        for name, child in module.named_modules():
            if name.rpartition(".")[2] not in FRESH_WHEN_NOT_LOADED or name in self.kept_trainable:
                continue
            parameters = list(child.parameters())
            if parameters and not any(parameter.requires_grad for parameter in parameters):
                advice = f'freeze_module(exclude=["deltas", <head>, "{name}"]) trains it too'
                rows.append(("frozen", f"{name}: part of the base model; {advice}"))
        return rows

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


def fresh_heads(model: nn.Module) -> dict[str, str]:
    """{name: why} of the modules of `model` that were freshly initialised for the task: the
    head of a task model (`task_head_names`), and a pooler that the checkpoint it was loaded
    from lacked (`not_loaded_modules`)."""
    reason = f"new task head of {type(model).__name__}, initialised for the task"
    heads = dict.fromkeys(task_head_names(model), reason)
    for name in not_loaded_modules(model, FRESH_WHEN_NOT_LOADED):
        if not any(head == name or name.startswith(head + ".") for head in heads):
            heads[name] = (
                "not in the checkpoint the model was loaded from: transformers initialised it "
                "at random"
            )
    return heads


def not_loaded_modules(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """The modules of `model` named one of `names` (last segment) whose parameters
    transformers' `from_pretrained` initialised instead of loading them.

    transformers (5.x) marks each parameter it loaded from the checkpoint with
    `_is_hf_initialized`; a model built from a config, deep-copied, or loaded by a transformers
    that does not mark them has no marked parameter, and then nothing is reported."""
    deltas = delta_parameter_names(model)
    parameters = [
        (name, parameter) for name, parameter in model.named_parameters() if name not in deltas
    ]
    if not any(_loaded(parameter) for _, parameter in parameters):
        return []
    found = []
    for module_name, _ in model.named_modules():
        if module_name.rpartition(".")[2] not in names:
            continue
        own = [p for name, p in parameters if name.startswith(module_name + ".")]
        if own and not any(_loaded(parameter) for parameter in own):
            found.append(module_name)
    return found


def _has_trainable_parameter(model: nn.Module, name: str) -> bool:
    try:
        submodule = model.get_submodule(name)
    except AttributeError:
        return False
    return any(parameter.requires_grad for parameter in submodule.parameters())


def _loaded(parameter: nn.Parameter) -> bool:
    return bool(getattr(parameter, "_is_hf_initialized", False))


def _outermost(names) -> list[str]:
    """`names` without those inside another of them, sorted."""
    names = sorted(names)
    return [name for name in names if not any(name.startswith(other + ".") for other in names)]


def _delta_module_names(model: nn.Module) -> set[str]:
    return {
        f"{host_name}.{delta_name}" if host_name else delta_name
        for host_name, host in model.named_modules()
        for delta_name, _ in attached_deltas(host)
    }


def _inside_a_delta(name: str, delta_modules: set[str]) -> bool:
    return name in delta_modules or any(ancestor in delta_modules for ancestor in _ancestors(name))


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


def trims_state_dict(model: nn.Module) -> bool:
    """Whether a delta model's freeze_module(set_state_dict=True) trims `model.state_dict()`."""
    return any(hook is _keep_trainable_tensors for hook in model._state_dict_hooks.values())


class _GuardedSavePretrained:
    """The backbone's transformers `save_pretrained` (which `push_to_hub` calls too), set on the
    instance while its state dict is trimmed to the trainable tensors.

    Writing that trimmed state dict as a model would leave a model.safetensors that
    `from_pretrained` silently completes with freshly initialised weights, and writing the whole
    state dict would save the deltas under names that `from_pretrained` ignores: either way the
    user would reload something other than what they trained. So it refuses and names the
    calls that do save it. The state dict itself stays trimmed, as OpenDelta's set_state_dict
    means (`torch.save(model.state_dict())` saves the trainable tensors), and an explicit
    `state_dict=` argument is the caller's choice and is saved as given. A plain object (not a
    closure), so that the model still deep-copies and pickles.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.__doc__ = type(model).save_pretrained.__doc__

    def __call__(self, save_directory, *args, **kwargs):
        model = self.model
        if kwargs.get("state_dict") is None and trims_state_dict(model):
            trainable = sum(1 for parameter in model.parameters() if parameter.requires_grad)
            raise RuntimeError(
                f"{type(model).__name__}.save_pretrained would write only its {trainable} "
                "trainable tensors, because delta_model.freeze_module() (set_state_dict=True, "
                "its default) trims the model's state_dict(), and from_pretrained would fill in "
                "the rest with freshly initialised weights. Save the deltas and the trained head "
                "with delta_model.save_finetuned(dir) and reload them with "
                "AutoDeltaModel.from_finetuned(dir, backbone_model=<the base model>), or call "
                "delta_model.freeze_module(set_state_dict=False) first to save every tensor. "
                "With transformers' Trainer, use fastdelta.DeltaTrainer."
            )
        return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def _free_delta_name(host: nn.Module, name: str) -> str:
    """`name`, or the first of `name_1`, `name_2`, ... that `host` has no attribute of."""
    candidate, counter = name, 0
    while candidate in host._modules or hasattr(host, candidate):
        counter += 1
        candidate = f"{name}_{counter}"
    return candidate


def _choose_interactively(model: nn.Module, config: BaseDeltaConfig) -> BaseDeltaConfig:
    """`config` with the modules chosen on the interactive page as its modified_modules."""
    from fastdelta.interactive import DEFAULT_PORT, select_modules

    port = DEFAULT_PORT if config.interactive_modify is True else config.interactive_modify
    names = select_modules(model, port)
    return dataclasses.replace(
        config, modified_modules=names, interactive_modify=False, common_structure=False
    )


def _guard_save_pretrained(model: nn.Module) -> None:
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _GuardedSavePretrained(model)


def _unguard_save_pretrained(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), _GuardedSavePretrained):
        del model.__dict__["save_pretrained"]


def _keep_trainable_tensors(module, state_dict, prefix, local_metadata) -> None:
    trainable = {
        prefix + name
        for name, parameter in module.named_parameters(remove_duplicate=False)
        if parameter.requires_grad
    }
    for key in [key for key in state_dict if key.startswith(prefix) and key not in trainable]:
        del state_dict[key]


def _has_forward_protocol(delta: nn.Module) -> bool:
    """Whether `delta` is an OpenDelta-style sequential module (pre_forward / post_forward) rather
    than one of fastdelta's deltas."""
    return not isinstance(delta, DeltaLayer) and (
        callable(getattr(delta, "pre_forward", None))
        or callable(getattr(delta, "post_forward", None))
    )


def _hook_protocol(host: nn.Module, attachment: Attachment) -> None:
    """Register on `host` the hooks that run the attached delta's pre_forward / post_forward."""
    if callable(getattr(attachment.delta, "pre_forward", None)):
        hook = _PreForward(attachment.delta_name)
        attachment.hooks.append(host.register_forward_pre_hook(hook, with_kwargs=True))
    if callable(getattr(attachment.delta, "post_forward", None)):
        attachment.hooks.append(host.register_forward_hook(_PostForward(attachment.delta_name)))


class _PreForward:
    """A forward pre-hook calling `pre_forward` of the host's delta `delta_name`, which returns
    the (args, kwargs) the host is called with (OpenDelta's protocol). It finds the delta through
    the host, so deep copies, pickles and DataParallel replicas run their own."""

    def __init__(self, delta_name: str):
        self.delta_name = delta_name

    def __call__(self, host: nn.Module, args: tuple, kwargs: dict):
        if not is_active(host._modules[self.delta_name]):
            return None  # its delta model's name is not active: the arguments as they are
        result = host._modules[self.delta_name].pre_forward(*args, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
            raise TypeError(
                f"{type(host._modules[self.delta_name]).__name__}.pre_forward must return "
                f"(args, kwargs), as in OpenDelta, got {type(result).__name__}"
            )
        return tuple(result[0]), result[1]


class _PostForward:
    """A forward hook calling `post_forward` of the host's delta `delta_name` on the host's
    output, which it replaces (OpenDelta's protocol)."""

    def __init__(self, delta_name: str):
        self.delta_name = delta_name

    def __call__(self, host: nn.Module, args: tuple, output):
        if not is_active(host._modules[self.delta_name]):
            return None
        return host._modules[self.delta_name].post_forward(output)
