"""Attaching deltas to a module's forward, per instance, without touching its class.

A module that gets a delta in its forward (a host) has its `__class__` switched to a subclass
of its own class, made once per class, whose `forward` runs the original forward with the
deltas around it. Only that instance changes; the subclass keeps the original name, docstring
and forward signature, and the delta is a child module under its `delta_name`, so parameter
names stay the backbone's own. This survives what per-instance `forward` attributes do not:
`copy.deepcopy`, pickling and DataParallel's replicas (which copy `__dict__` shallowly and
would keep calling the original module) all find the forward through the class.

Roles of a delta in its host's forward, in the order they run:
- "before": `delta(input)` replaces the host's first input;
- "replace": the host's own computation is replaced by `delta.replace_forward(host, input)`
  (or `delta(input)` for a plain module);
- "parallel": `delta(input, output)` gives the new output (plain module: output + delta(input));
- "after": `delta(output)` gives the new output.
For a host returning a tuple or a ModelOutput, "output" is its first item. Deltas of one role
run in the order they were first attached, across delta models, so taking one off and putting it
back (`detach()`, `attach()`) leaves the computation as it was.

Each delta carries the name of its delta model (`DELTA_MODEL_NAME`), and a delta whose name is
not active (`set_delta_active`) is skipped. The host's forward reads one tuple,
`RUNNING_DELTAS`, of the deltas it runs: recomputed when a delta is attached, detached or
switched, never per call, so an inactive delta costs nothing and a host whose deltas are all
inactive runs its own forward.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Mapping

import torch
from torch import nn

from fastdelta.layers.base import ATTACHED_DELTAS, DeltaLayer, attached_deltas

ROLES = ("before", "replace", "parallel", "after", None)
_ORIGINAL_CLASS = "_fastdelta_original_class"
_HOST_CLASSES: dict[type, type] = {}
# Attribute of a delta module: its place in the order deltas were first attached.
_ORDER = "_fastdelta_attach_order"
_ATTACH_COUNTER = itertools.count()
# Attribute, in a host's __dict__: the (delta name, role) of the deltas its forward runs (see the
# module's docstring), a tuple of strings like ATTACHED_DELTAS, so copies carry it.
RUNNING_DELTAS = "_fastdelta_running"
# Attributes of a delta module: the name of the delta model that attached it (absent: "default"),
# and True while that name is not active.
DELTA_MODEL_NAME = "_fastdelta_name"
INACTIVE = "_fastdelta_inactive"
DEFAULT_NAME = "default"
# Attribute of a stacked LoRA that runs as its host's fused op (the layer's first LoRA inactive).
RUNS_IN_PLACE = "_fastdelta_runs_in_place"
# Attribute of the one delta of a host that computes the host's output with its own (an adapter
# on a plain linear layer, `host_forward`): (parallel, fan_in_fan_out), see refresh_running_deltas.
RUNS_ITS_HOST = "_fastdelta_runs_its_host"
# The mixed batch in progress (`fastdelta.adapter_ids`), or None: while set, the hosts it covers
# route each row of their input to its own named deltas (`fastdelta.layers.mixed_batch`).
_mixed_batch = None


def attach_delta(
    host: nn.Module,
    delta: nn.Module,
    delta_name: str,
    role: str | None,
    host_name: str | None = None,
) -> None:
    """Register `delta` as child `delta_name` of `host` and run it in the host's forward.

    A delta attached again after `detach_delta` takes back its place among the host's deltas.
    `host_name` (the host's name in the model) is for error messages."""
    if role not in ROLES:
        raise ValueError(f"Unknown delta role {role!r}; choose one of {ROLES}")
    _refuse_inside_mixed_batch("attached")
    host_class = type(host).__name__
    where = f"{host_name} ({host_class})" if host_name else host_class
    if delta_name in host._modules or hasattr(host, delta_name):
        raise ValueError(
            f"{where} already has a {delta_name!r} attribute: a module takes one delta of "
            "each kind. Detach the first delta model, or exclude this module from the second."
        )
    if role == "replace" and any(existing == "replace" for _, existing in attached_deltas(host)):
        replacer = next(name for name, existing in attached_deltas(host) if existing == "replace")
        raise ValueError(
            f"{where} already has its forward replaced by the {replacer!r} "
            f"delta; it cannot also be replaced by {delta_name!r}"
        )
    if role is not None and "forward" in host.__dict__:
        raise RuntimeError(
            f"{where} has a forward set on the instance (as accelerate's device-map hooks "
            "do), which would bypass fastdelta's deltas. Add the deltas before dispatching the "
            "model (before from_pretrained(device_map=...) hooks or accelerate's dispatch_model)."
        )
    entries = attached_deltas(host)
    if not hasattr(delta, _ORDER):
        # First attachment: after every delta the host carries (a process-wide counter alone
        # could fall behind the orders of deltas unpickled from another process).
        latest = max((_order_of(host, name) for name, _ in entries), default=-1)
        setattr(delta, _ORDER, max(next(_ATTACH_COUNTER), latest + 1))
    order = getattr(delta, _ORDER)
    position = next(
        (index for index, (name, _) in enumerate(entries) if _order_of(host, name) > order),
        len(entries),
    )
    host.add_module(delta_name, delta)
    host.__dict__[ATTACHED_DELTAS] = (
        *entries[:position],
        (delta_name, role),
        *entries[position:],
    )
    refresh_running_deltas(host)
    if role is not None and not hasattr(type(host), _ORIGINAL_CLASS):
        host.__class__ = host_class_for(type(host))


def _order_of(host: nn.Module, delta_name: str) -> int:
    return getattr(host._modules[delta_name], _ORDER, -1)


def original_class(module: nn.Module) -> type:
    """The class of `module` before fastdelta gave it a host class."""
    return getattr(type(module), _ORIGINAL_CLASS, type(module))


def detach_delta(host: nn.Module, delta_name: str) -> nn.Module:
    """Take delta `delta_name` off `host` and return it; the last one restores the host's class."""
    _refuse_inside_mixed_batch("detached")
    remaining = tuple(entry for entry in attached_deltas(host) if entry[0] != delta_name)
    if len(remaining) == len(attached_deltas(host)):
        raise ValueError(f"{type(host).__name__} has no delta named {delta_name!r}")
    delta = host._modules.pop(delta_name)
    for mark in (RUNS_IN_PLACE, RUNS_ITS_HOST):  # what refresh_running_deltas set on it
        delta.__dict__.pop(mark, None)
    if remaining:
        host.__dict__[ATTACHED_DELTAS] = remaining
    else:
        del host.__dict__[ATTACHED_DELTAS]
    refresh_running_deltas(host)
    if not any(role is not None for _, role in remaining) and hasattr(type(host), _ORIGINAL_CLASS):
        host.__class__ = getattr(type(host), _ORIGINAL_CLASS)
    return delta


def delta_model_name(delta: nn.Module) -> str:
    """The name of the delta model that attached `delta`."""
    return delta.__dict__.get(DELTA_MODEL_NAME, DEFAULT_NAME)


def is_active(delta: nn.Module) -> bool:
    """Whether `delta` runs when attached: its delta model's name is active."""
    return not delta.__dict__.get(INACTIVE, False)


def set_delta_active(host: nn.Module, delta_names, active: bool) -> None:
    """Make the deltas `delta_names` (attached to `host`) run, or be skipped, in its forward."""
    for delta_name in delta_names:
        delta = host._modules[delta_name]
        if active:
            delta.__dict__.pop(INACTIVE, None)
        else:
            delta.__dict__[INACTIVE] = True
    refresh_running_deltas(host)


def refresh_running_deltas(host: nn.Module) -> tuple[tuple[str, str], ...]:
    """Compute and store the (delta name, role) of the deltas `host`'s forward runs: the active
    ones that take part in the forward, in order. When no active delta replaces the host's
    forward, an active stacked LoRA (a "parallel" delta that can compute its host) takes that
    place, so a LoRA runs as the fused op whichever of a layer's named LoRAs is active. Only
    parallel deltas, which add to the output and so commute, may run before it: the result is
    the same sum. A host's only running delta that can compute the host with itself in one op
    (`fused_layout(host)` not None: an adapter on a plain linear layer) is marked
    RUNS_ITS_HOST, and the forward calls its `host_forward` in place of both."""
    entries = tuple(
        (name, role)
        for name, role in attached_deltas(host)
        if role is not None and is_active(host._modules[name])
    )
    for name, _ in attached_deltas(host):
        host._modules[name].__dict__.pop(RUNS_IN_PLACE, None)
        host._modules[name].__dict__.pop(RUNS_ITS_HOST, None)
    if len(entries) == 1 and entries[0][1] in ("after", "parallel"):
        # A lone adapter on a plain linear layer: one op computes the layer and the adapter.
        delta = host._modules[entries[0][0]]
        layout = delta.fused_layout(host) if hasattr(delta, "fused_layout") else None
        if layout is not None:
            delta.__dict__[RUNS_ITS_HOST] = (entries[0][1] == "parallel", layout)
    if not any(role == "replace" for _, role in entries):
        promoted = None
        for index, (name, role) in enumerate(entries):
            if role == "after":
                break  # a function of the output: the LoRA's update must come after it
            if role == "parallel" and _computes_its_host(host._modules[name]):
                promoted = index
                break
        if promoted is not None:
            name = entries[promoted][0]
            entries = ((name, "replace"), *entries[:promoted], *entries[promoted + 1 :])
            host._modules[name].__dict__[RUNS_IN_PLACE] = True
    if ATTACHED_DELTAS in host.__dict__:
        host.__dict__[RUNNING_DELTAS] = entries
    else:
        host.__dict__.pop(RUNNING_DELTAS, None)
    return entries


def host_class_for(original: type) -> type:
    """The subclass of `original` whose forward runs the deltas attached to an instance."""
    if original not in _HOST_CLASSES:
        original_forward = original.forward
        # Read once per class: the forward of every call must not inspect signatures.
        input_name = first_input_name(original_forward)

        @functools.wraps(original_forward)
        def forward(self, *args, **kwargs):
            return _forward_with_deltas(self, original_forward, input_name, args, kwargs)

        _HOST_CLASSES[original] = type(
            original.__name__,
            (original,),
            {
                "forward": forward,
                "__doc__": original.__doc__,
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
                "__reduce_ex__": _reduce_host,
                _ORIGINAL_CLASS: original,
            },
        )
    return _HOST_CLASSES[original]


def _reduce_host(self, protocol):
    # The host class has the original's qualified name, so pickle cannot find it by name:
    # rebuild it from the original class instead (used by pickle and copy.deepcopy alike).
    return _new_host, (getattr(type(self), _ORIGINAL_CLASS),), self.__dict__


def _new_host(original: type) -> nn.Module:
    return object.__new__(host_class_for(original))


def first_input_name(forward) -> str | None:
    """Name of the first argument of a module class's forward (its hidden-state input), or
    None when the forward takes no named first argument."""
    parameters = list(inspect.signature(forward).parameters.values())[1:]
    if parameters and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        return parameters[0].name
    return None


def set_mixed_batch(mixed_batch) -> None:
    """Make `mixed_batch` (a `fastdelta.layers.mixed_batch.MixedBatch`, or None) the one that
    hosts read; one at a time."""
    global _mixed_batch
    if mixed_batch is not None and _mixed_batch is not None:
        raise RuntimeError(
            "fastdelta.adapter_ids is already in effect: one mixed batch at a time (a row runs "
            "one name). Leave the first `with fastdelta.adapter_ids(...)` block before entering "
            "another"
        )
    _mixed_batch = mixed_batch


def _refuse_inside_mixed_batch(action: str) -> None:
    if _mixed_batch is not None:
        raise RuntimeError(
            f"A delta cannot be {action} inside `with fastdelta.adapter_ids(...)`, which planned "
            "each layer's deltas on entry: build, attach, detach or disable_adapter() the delta "
            "models outside the block"
        )


def mixed_batch_in_effect():
    """The mixed batch hosts read now (`set_mixed_batch`), or None."""
    return _mixed_batch


def _forward_with_deltas(host: nn.Module, original_forward, input_name, args, kwargs):
    if _mixed_batch is not None and _mixed_batch.covers(host):
        # The one check a call outside `fastdelta.adapter_ids` pays: a global's None test.
        return _mixed_batch.forward(host, original_forward, input_name, args, kwargs)
    entries = host.__dict__.get(RUNNING_DELTAS)
    if entries is None:  # a host pickled by a fastdelta that did not store it
        entries = refresh_running_deltas(host)
    if len(entries) == 1:
        # The common case, one delta (LoRA on a linear layer, an adapter after one), without
        # the general case's bookkeeping: a few microseconds a call.
        name, role = entries[0]
        delta = host._modules[name]
        if role == "replace" and len(args) == 1 and not kwargs and _computes_its_host(delta):
            return delta.replace_forward(host, args[0])
        fused = delta.__dict__.get(RUNS_ITS_HOST)  # an adapter computing its linear host
        if fused is not None and len(args) == 1 and not kwargs and not _has_hooks(delta):
            return delta.host_forward(host, args[0], *fused)
        if role == "after":
            return _map_main_output(host, original_forward(host, *args, **kwargs), delta)
    if not entries:  # every delta of the host is inactive
        return original_forward(host, *args, **kwargs)
    deltas = [(host._modules[name], role) for name, role in entries]
    needs_input = any(role != "after" for _, role in deltas)
    if needs_input:
        hidden, args, kwargs = _apply_before_deltas(host, input_name, deltas, args, kwargs)

    replacer = next((delta for delta, role in deltas if role == "replace"), None)
    if replacer is None:
        output = original_forward(host, *args, **kwargs)
    elif len(args) + len(kwargs) > 1:
        raise TypeError(
            f"{type(host).__name__}'s forward is replaced by a delta that takes one "
            "input, but it was called with more arguments"
        )
    elif _computes_its_host(replacer):
        output = replacer.replace_forward(host, hidden)
    else:
        output = replacer(hidden)

    for delta, role in deltas:
        if role == "parallel":
            if isinstance(delta, DeltaLayer):
                output = _map_main_output(host, output, lambda main, d=delta: d(hidden, main))
            else:
                output = _map_main_output(host, output, lambda main, d=delta: main + d(hidden))
        elif role == "after":
            output = _map_main_output(host, output, delta)
    return output


def _has_hooks(module: nn.Module) -> bool:
    """Whether hooks are registered on `module` itself, which a call that skips its __call__
    would not run."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _computes_its_host(delta: nn.Module) -> bool:
    """Whether a "replace" delta computes its host's output itself (`replace_forward(host,
    input)`, LoRA's way), rather than being a module called on the input in its place."""
    return isinstance(delta, DeltaLayer) and hasattr(delta, "replace_forward")


def _apply_before_deltas(host, input_name, deltas, args, kwargs):
    """The host's first input after the "before" deltas, and the arguments carrying it."""

    def before(hidden):
        for delta, role in deltas:
            if role == "before":
                hidden = delta(hidden)
        return hidden

    return with_first_input(host, input_name, args, kwargs, before)


def with_first_input(host, input_name, args, kwargs, transform, where: str | None = None):
    """(transform(the host's first input), args, kwargs): the call's arguments with the
    transformed input in its place, positional or by name (`input_name`). `where` names the
    host in the error of a call without that input."""
    if args:
        hidden = args[0]
    elif input_name is not None and input_name in kwargs:
        hidden = kwargs[input_name]
    else:
        raise TypeError(
            f"{where or type(host).__name__}.forward() was called without its first "
            f"argument {input_name!r}, which its deltas read"
        )
    hidden = transform(hidden)
    if args:
        return hidden, (hidden, *args[1:]), kwargs
    return hidden, args, {**kwargs, input_name: hidden}


def _map_main_output(host: nn.Module, output, function):
    """Apply `function` to the main tensor of a module's output, keeping the rest as it is."""
    if isinstance(output, torch.Tensor):
        return function(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        mapped = [function(output[0]), *output[1:]]
        return type(output)(mapped) if type(output) in (tuple, list) else type(output)(*mapped)
    if (
        isinstance(output, Mapping)
        and output
        and isinstance(next(iter(output.values())), torch.Tensor)
    ):
        key = next(iter(output))
        return type(output)(**{**output, key: function(output[key])})
    raise TypeError(
        f"{type(host).__name__} returned {type(output).__name__}; a delta can modify a tensor, "
        "a tuple or list whose first item is a tensor, or a ModelOutput. Choose a module whose "
        "output is the hidden state."
    )
