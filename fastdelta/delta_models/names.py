"""Named deltas: which delta models of a backbone run.

Every delta model has a name ("default" unless given). Several delta models, of one kind or of
several, sit on one backbone under different names (two LoRA models on the same layers stack,
as in OpenDelta), and the backbone's active set chooses which of them run: one, several (their
updates add up) or none, without detaching anything. A name left out of the active set costs
nothing in the forward (see fastdelta.injection). Building a delta model makes its name active,
as attaching runs a delta in OpenDelta; `detach()` and `attach()` leave the active set as it
is, and deltas put back by `attach()` run if their name is in it.

The active set is the backbone's (an attribute in its `__dict__`, so deep copies and pickles
carry it); a backbone on which `set_active` was never called runs every name. Trainability is
not touched: `freeze_module` decides it, and an inactive delta simply gets no gradient.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from fastdelta.injection import (
    DEFAULT_NAME,
    DELTA_MODEL_NAME,
    INACTIVE,
    delta_model_name,
    is_active,
    set_delta_active,
)
from fastdelta.layers.base import attached_deltas

# Attribute, in the backbone's __dict__: the tuple of active names (absent: every name runs).
ACTIVE_NAMES = "_fastdelta_active_names"
# Attribute of a delta module whose delta model cannot be switched off by name (BitFit trains
# the layers' own biases in place; prefixes and soft prompts are routed outside the forward).
ALWAYS_ACTIVE = "_fastdelta_always_active"


def check_name(name) -> str:
    """`name` if it is a valid delta model name: a non-empty Python identifier."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"A delta model's name must be a non-empty identifier (letters, digits and "
            f"underscores, not starting with a digit), such as 'default' or 'sql_lora'; got "
            f"{name!r}: rename it, e.g. name={_suggested_name(name)!r}"
        )
    return name


def _suggested_name(name) -> str:
    text = "".join(char if char.isalnum() else "_" for char in str(name)).strip("_")
    text = text if text and not text[0].isdigit() else f"delta_{text}".rstrip("_")
    return text if text.isidentifier() else DEFAULT_NAME


def tag_delta(delta: nn.Module, name: str, active: bool, switchable: bool) -> None:
    """Mark `delta`, before it is attached, as the delta model `name`'s, active or not, and
    whether it can be switched off."""
    delta.__dict__[DELTA_MODEL_NAME] = name
    for flag, value in ((ALWAYS_ACTIVE, not switchable), (INACTIVE, not active)):
        if value:
            delta.__dict__[flag] = True
        else:
            delta.__dict__.pop(flag, None)


def name_is_active(backbone: nn.Module, name: str) -> bool:
    """Whether deltas of the delta model `name` run when attached to `backbone`."""
    active = backbone.__dict__.get(ACTIVE_NAMES)
    return active is None or name in active


def _attached(backbone: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(host, delta name, delta) of every delta attached inside `backbone`."""
    for host in backbone.modules():
        for delta_name, _ in attached_deltas(host):
            yield host, delta_name, host._modules[delta_name]


def delta_names(backbone: nn.Module) -> list[str]:
    """The names of the delta models whose deltas are attached to `backbone`, in the order
    their deltas first appear in it."""
    return list(dict.fromkeys(delta_model_name(delta) for _, _, delta in _attached(backbone)))


def active_deltas(backbone: nn.Module) -> list[str]:
    """The names of the delta models whose deltas run in `backbone`'s forward (of those
    attached), in the order their deltas first appear in it."""
    return list(
        dict.fromkeys(
            delta_model_name(delta) for _, _, delta in _attached(backbone) if is_active(delta)
        )
    )


def _names_argument(names) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(
        isinstance(name, str) for name in names
    ):
        raise TypeError(
            "set_active takes a delta model's name, a list of names, or None (or []) for none, "
            f"got {names!r}"
        )
    return tuple(dict.fromkeys(sorted(names) if isinstance(names, (set, frozenset)) else names))


def set_active(backbone: nn.Module, names) -> None:
    """Run the deltas of the delta models named `names` (a name, a list of names, or None or
    [] for none) in `backbone`'s forward, and skip the others, without detaching any. Several
    names run together, their updates added. Delta models built on `backbone` later are active
    too. An unknown name is refused, listing the names of the delta models attached; so is
    switching off a merged LoRA (unmerge() it first) or a BitFit, prefix or soft-prompt delta
    model (they cannot be skipped in the forward: detach() it instead)."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(
            f"set_active takes the backbone model the delta models were built on, got "
            f"{type(backbone).__name__}"
        )
    wanted = _names_argument(names)
    known = delta_names(backbone)
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(
            f"No delta model named {', '.join(map(repr, unknown))} is attached to this "
            f"{type(backbone).__name__}; "
            + (
                f"the attached ones are named {', '.join(map(repr, known))}"
                if known
                else "it carries no delta"
            )
            + " (a detached delta model's name is known again once it is attached)"
        )
    for host, delta_name, delta in _attached(backbone):
        name = delta_model_name(delta)
        if name in wanted or not is_active(delta):
            continue
        if getattr(delta, "merged", False):
            raise RuntimeError(
                f"The LoRA delta {delta_name} of {type(host).__name__} (delta model {name!r}) "
                f"is merged into its layer's weight, so it cannot be switched off: call "
                f"unmerge() on delta model {name!r} first"
            )
        if delta.__dict__.get(ALWAYS_ACTIVE, False):
            raise ValueError(
                f"Delta model {name!r} cannot be switched off by name: its deltas ("
                f"{type(delta).__name__}) do not run in their module's forward (BitFit trains "
                "the layers' own biases; prefixes and soft prompts are routed around it). "
                f"Keep {name!r} in the names, or detach() it"
            )
    backbone.__dict__[ACTIVE_NAMES] = wanted
    _apply(backbone)


def activate(backbone: nn.Module, name: str) -> None:
    """Add `name` to `backbone`'s active set (when it has one) and run its deltas: a delta model
    just built runs, as attaching runs it."""
    active = backbone.__dict__.get(ACTIVE_NAMES)
    if active is not None and name not in active:
        backbone.__dict__[ACTIVE_NAMES] = (*active, name)
    _apply(backbone)


def _apply(backbone: nn.Module) -> None:
    """Switch every delta attached inside `backbone` on or off by its name."""
    by_host: dict[int, tuple[nn.Module, dict[bool, list[str]]]] = {}
    for host, delta_name, delta in _attached(backbone):
        wanted = name_is_active(backbone, delta_model_name(delta))
        if wanted != is_active(delta):
            by_host.setdefault(id(host), (host, {True: [], False: []}))[1][wanted].append(
                delta_name
            )
    for host, switched in by_host.values():
        for active, names in switched.items():
            if names:
                set_delta_active(host, names, active)
