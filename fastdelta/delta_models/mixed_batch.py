"""Mixed batches: a delta name per sample, so one forward (and backward) runs several deltas.

    with fastdelta.adapter_ids(model, ["sql", "chat", None, "sql"]):
        loss = loss_function(model(**batch), labels)  # sample 0 runs sql, 2 none, ...
        loss.backward()  # each name's weights get the gradients of its samples

A context manager, not an argument of the forward: the model's forward signature is its own (a
transformers model's, a user's), and the context reaches every layer of whatever calls it
(generate, a Trainer's loss, a pipeline). PEFT's `model(x, adapter_names=[...])` takes the same
list; its "__base__" is taken for None. Everything that depends only on the model and the names
is checked on entry, each failure naming the fix: unknown names (the attached ones listed), names
that cannot be switched per sample, merged LoRA deltas, a mixed batch already in effect. What
each layer computes is `fastdelta.layers.mixed_batch`'s.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fastdelta.delta_models.names import ALWAYS_ACTIVE
from fastdelta.injection import delta_model_name, set_mixed_batch
from fastdelta.layers.base import attached_deltas
from fastdelta.layers.mixed_batch import HostPlan, MixedBatch, plan_host

# PEFT's name for "no adapter" in adapter_names.
PEFT_BASE_NAME = "__base__"


@contextlib.contextmanager
def adapter_ids(
    model: nn.Module, ids: Sequence[str | None] | torch.Tensor, names: Sequence[str] | None = None
) -> Iterator[None]:
    """Inside the block, sample b of every batch `model` is called with (its first dimension)
    runs the deltas of the delta model named `ids[b]`, alone, or none where `ids[b]` is None
    (or PEFT's "__base__"), forward and backward; BitFit, prefix and soft-prompt delta models run
    on every sample. The active set (`set_active`) is set aside meanwhile and comes back after.

    ids: one name (or None) per sample; or an integer tensor [B] of positions in `names` (-1 for
    none), as a data loader might carry them. `names` fixes the names the batch can run and their
    order; a LoRA layer then stacks them all, so that a torch.compile'd model does not recompile
    for batches of other names (a name without samples gets zero gradients; left out, it gets
    none). Without `names`, the batch runs the names in `ids`.

    A LoRA layer runs its names' LoRAs as one fused op where it can (one per name on the layer,
    one dropout); other deltas run on their samples' rows. Refused on entry: names of no attached
    delta model, names of delta models that cannot be switched off per sample, merged LoRA
    deltas, a mixed batch inside another; inside the block, attaching or detaching a delta; at a
    layer, an input whose first dimension is not the batch. Call backward inside the block when
    the model recomputes its forward in the backward (gradient checkpointing). The block is the
    process's (one at a time, whichever thread): DataParallel's replicas are refused; with
    DistributedDataParallel each process gives its own samples' names."""
    set_mixed_batch(mixed_batch(model, ids, names))
    try:
        yield
    finally:
        set_mixed_batch(None)


def mixed_batch(model: nn.Module, ids, names=None) -> MixedBatch:
    """The MixedBatch of `adapter_ids(model, ids, names)`, every argument checked."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            "fastdelta.adapter_ids takes the backbone model the delta models were built on, then "
            f"one name per sample: adapter_ids(model, ['a', None, ...]); got {type(model).__name__}"
        )
    hosts = [
        (host_name, host) for host_name, host in model.named_modules() if attached_deltas(host)
    ]
    choosable = _attached_names(hosts)
    if names is not None:
        names = _checked_names(names, choosable, "names")
    if isinstance(ids, torch.Tensor):
        if names is None:
            raise TypeError(
                "fastdelta.adapter_ids: a tensor of ids holds positions in a list of names: pass "
                "it as names=[...] (or pass the names themselves, one per sample)"
            )
        sample_ids = _checked_positions(ids, len(names))
    else:
        labels = _labels(ids)
        wanted = _checked_names([n for n in dict.fromkeys(labels) if n is not None], choosable)
        if names is None:
            names = tuple(name for name in choosable if name in wanted)
        missing = [name for name in wanted if name not in names]
        if missing:
            raise ValueError(
                f"fastdelta.adapter_ids: {', '.join(map(repr, missing))} is not among "
                f"names={list(names)}: add it there"
            )
        sample_ids = torch.tensor(
            [-1 if label is None else names.index(label) for label in labels], dtype=torch.int64
        )
    _refuse_merged(hosts)
    plans = {
        id(host): _plan(host, host_name or "the backbone itself", names)
        for host_name, host in hosts
        if any(role is not None for _, role in attached_deltas(host))
    }
    return MixedBatch(names, sample_ids, plans)


# host -> (what its plan depends on, the plan): a batch of the same names on the same deltas
# reuses it (planning a host costs about 10 microseconds; a model has hundreds).
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(host: nn.Module, host_name: str, names: tuple[str, ...]) -> HostPlan:
    entries = attached_deltas(host)
    # The deltas themselves (compared by identity), not their names: a delta taken off and
    # another put in its place under the same name makes a new plan.
    key = (names, host_name, entries, tuple(host._modules[name] for name, _ in entries))
    kept = _plans.get(host)
    if kept is None or kept[0] != key:
        kept = _plans[host] = (key, plan_host(host, host_name, _running(host, names), names))
    return kept[1]


def _attached_names(hosts) -> dict[str, bool]:
    """{name: whether its deltas can be chosen per sample} of the delta models attached."""
    choosable: dict[str, bool] = {}
    for _, host in hosts:
        for delta_name, _ in attached_deltas(host):
            delta = host._modules[delta_name]
            name = delta_model_name(delta)
            always = delta.__dict__.get(ALWAYS_ACTIVE, False)
            choosable[name] = choosable.get(name, True) and not always
    return choosable


def _labels(ids) -> list[str | None]:
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise TypeError(
            "fastdelta.adapter_ids takes one delta model name (or None) per sample of the batch, "
            f"as a list, got {type(ids).__name__}"
            + (": to run one name on every sample, use fastdelta.set_active" if ids else "")
        )
    labels = [None if label == PEFT_BASE_NAME else label for label in ids]
    wrong = [label for label in labels if label is not None and not isinstance(label, str)]
    if wrong:
        raise TypeError(
            "fastdelta.adapter_ids takes a delta model name (a str) or None per sample, got "
            f"{wrong[0]!r}; for positions in a list of names pass a tensor and names=[...]"
        )
    if not labels:
        raise ValueError("fastdelta.adapter_ids needs one name (or None) per sample, got none")
    return labels


def _checked_names(names, choosable: dict[str, bool], argument: str = "") -> tuple[str, ...]:
    """`names` as a tuple, each the name of an attached delta model that can run per sample."""
    where = f" in {argument}" if argument else ""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"fastdelta.adapter_ids: names must be a list of names, got {names!r}")
    names = tuple(names)
    bad = [name for name in names if not isinstance(name, str)]
    if bad or len(set(names)) != len(names):
        raise ValueError(
            f"fastdelta.adapter_ids: names must list distinct delta model names, got {names!r}"
        )
    unknown = [name for name in names if name not in choosable]
    if unknown:
        attached = ", ".join(map(repr, choosable))
        raise ValueError(
            f"fastdelta.adapter_ids: no delta model named {', '.join(map(repr, unknown))}"
            f"{where} is attached to this model; "
            + (f"the attached ones are named {attached}" if choosable else "it carries no delta")
        )
    fixed = [name for name in names if not choosable[name]]
    if fixed:
        raise ValueError(
            f"fastdelta.adapter_ids: delta model {fixed[0]!r} runs on every sample (BitFit, "
            "prefix and soft-prompt deltas work outside the layers' rows and cannot be switched "
            "off): give None for those samples"
        )
    return names


def _checked_positions(ids: torch.Tensor, count: int) -> torch.Tensor:
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            "fastdelta.adapter_ids: a tensor of ids must be a 1-D integer tensor, one position "
            f"in names per sample (-1: none), got {ids.dtype} {tuple(ids.shape)}"
        )
    if ids.numel() == 0:
        raise ValueError("fastdelta.adapter_ids needs one id per sample, got none")
    if ids.device.type == "cpu" and (ids.min() < -1 or ids.max() >= count):
        raise ValueError(
            f"fastdelta.adapter_ids: the ids must be positions in names, in [-1, {count}) (-1: "
            f"no delta), got {ids[(ids < -1) | (ids >= count)].unique().tolist()}"
        )
    return ids.long()


def _refuse_merged(hosts) -> None:
    for host_name, host in hosts:
        for delta_name, _ in attached_deltas(host):
            delta = host._modules[delta_name]
            if getattr(delta, "merged", False):
                name = delta_model_name(delta)
                raise RuntimeError(
                    f"fastdelta.adapter_ids: the LoRA delta {delta_name} of {host_name} (delta "
                    f"model {name!r}) is merged into its layer's weight, so every sample would "
                    f"run it: call unmerge() on delta model {name!r} first"
                )


def _running(host: nn.Module, names: tuple[str, ...]) -> list:
    """(delta, role, name) of `host`'s deltas that run in a batch of `names`: those of the
    names, and (name None) those that run on every sample."""
    running = []
    for delta_name, role in attached_deltas(host):
        if role is None:
            continue
        delta = host._modules[delta_name]
        if delta.__dict__.get(ALWAYS_ACTIVE, False):
            running.append((delta, role, None))
        elif delta_model_name(delta) in names:
            running.append((delta, role, delta_model_name(delta)))
    return running
