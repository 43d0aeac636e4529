"""A batch whose samples run different named deltas: what a host computes inside
`fastdelta.adapter_ids` (which builds the `MixedBatch`: fastdelta.delta_models.mixed_batch).

Sample b (row b of the first dimension of every module's input, so all its tokens) runs the
deltas of the name given for it, alone, or none; deltas that cannot be switched off (BitFit,
prefixes, soft prompts) run on every sample. Per kind of delta:
- LoRA on a linear layer (`LoraDelta`), one per name on the layer and one dropout among the names
  the batch runs: one `ops.multi_lora_linear` over those names' weights, stacked and zero-padded
  to the highest rank (exact), with one scaling each. The base GEMM runs once over the batch and
  the low-rank products per name; the rows are grouped once per batch for every layer of the same
  names (`ops.adapter_segments`, cached here by names, shape and device). The stacks are made per
  call while the weights train (differentiable: each name's weights get the gradients of its
  rows) and kept between calls otherwise (`fastdelta.layers.lora_stacks`).
- Any other LoRA (DoRA, an embedding's, two LoRAs of one name on a layer, names of different
  dropouts, as the op takes one): each name's samples through its deltas (index_select, the
  delta's own forward, index_copy), the samples of no LoRA through the layer itself.
- Deltas before, beside or after a module (adapters, parallel adapters, Compacter, low-rank
  adapters, custom modules): the module's forward once over the batch, each delta on its name's
  samples (index_select, the delta, index_copy).
Eagerly, those grouped paths read the number of samples of each name on the host, once per
batch and set of names. Under torch.compile they read nothing: each such delta runs on every
sample and a mask keeps its name's (torch.where), so the graph does not depend on the ids (the
fused LoRA op never depends on them); that costs each delta's work on the whole batch, and a
delta of a name with no sample gets a zero gradient rather than none.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastdelta import ops
from fastdelta.injection import (
    _computes_its_host,
    _map_main_output,
    attached_deltas,
    with_first_input,
)
from fastdelta.layers import lora_stacks
from fastdelta.layers.adapter import AdapterDelta, InputTap, SpanningAdapterDelta
from fastdelta.layers.base import DeltaLayer, parameter
from fastdelta.layers.lora import LoraDelta

logger = logging.getLogger(__name__)

# A delta and the name whose samples it runs on (None: every sample).
Routed = tuple[nn.Module, "str | None"]


@dataclass(frozen=True)
class HostPlan:
    """How a host computes a mixed batch: its deltas by role, each with the name whose samples
    it runs on (None: every sample), in the order the host's own forward runs them."""

    host_name: str
    before: tuple[Routed, ...]
    # LoRAs that compute the host (the core of its forward), in the order they were attached.
    loras: tuple[tuple[nn.Module, str], ...]
    # The names that have LoRAs in `loras`, in the order of the mixed batch's names.
    lora_names: tuple[str, ...]
    # The LoRAs in `lora_names`' order, when one op computes them all (see the module docstring).
    fused: tuple[LoraDelta, ...] | None
    replacer: Routed | None
    parallel: tuple[Routed, ...]
    after: tuple[Routed, ...]


def plan_host(
    host: nn.Module, host_name: str, deltas: list[tuple[nn.Module, str, str | None]], names
) -> HostPlan:
    """The plan of `host` (named `host_name` in messages) for a batch of `names` (the mixed
    batch's names, in order). deltas: (delta, role, name) of the host's deltas that run in the
    batch, in attachment order, name None for a delta that runs on every sample."""
    # A plain module in the host's place (not a LoRA): LoRAs stacked on it add to its output.
    plain_replacer = any(
        role == "replace" and not _computes_its_host(host._modules[delta_name])
        for delta_name, role in attached_deltas(host)
    )
    roles: dict[str, list] = {"before": [], "core": [], "replace": [], "parallel": [], "after": []}
    for delta, role, name in deltas:
        if isinstance(delta, InputTap):
            name = None  # keeps the whole input: its adapter picks its samples from it
        if role in ("replace", "parallel") and _computes_its_host(delta) and not plain_replacer:
            role = "core"
        roles[role].append((delta, name))
    loras = tuple(roles["core"])
    lora_names = tuple(name for name in names if any(n == name for _, n in loras))
    by_name = {name: delta for delta, name in loras}
    fusable = (
        len(by_name) == len(loras)
        and all(type(d) is LoraDelta and d.lora_magnitude_vector is None for d, _ in loras)
        and len({(d.lora_A.dtype, d.lora_A.device) for d, _ in loras}) <= 1
    )
    return HostPlan(
        host_name=host_name,
        before=tuple(roles["before"]),
        loras=loras,
        lora_names=lora_names,
        fused=tuple(by_name[name] for name in lora_names) if fusable and loras else None,
        replacer=roles["replace"][0] if roles["replace"] else None,
        parallel=tuple(roles["parallel"]),
        after=tuple(roles["after"]),
    )


class MixedBatch:
    """A mixed batch in effect: `sample_ids` [B] (int64, -1 for no delta) index `names`, and
    `plans` maps id(host) to the HostPlan of each host of the model it was made for. Host
    forwards call `forward` (fastdelta.injection)."""

    def __init__(self, names: tuple[str, ...], sample_ids: torch.Tensor, plans: dict):
        self.names = names
        self.sample_ids = sample_ids
        self.batch_size = int(sample_ids.shape[0])
        self.plans = plans
        # What every layer of the batch shares (ids per device, segments, groups), computed by
        # the first layer that needs it; not under torch.compile, whose graph holds it instead.
        self._shared: dict = {}

    def covers(self, host: nn.Module) -> bool:
        """Whether `host` runs the mixed batch: a host of the model it was made for, or a
        DataParallel replica (refused by `forward`)."""
        return id(host) in self.plans or host.__dict__.get("_is_replica", False)

    def forward(self, host: nn.Module, original_forward, input_name, args, kwargs):
        """The output of `host` (called with args, kwargs) on the mixed batch."""
        plan = self.plans.get(id(host))
        if plan is None:
            raise RuntimeError(
                "fastdelta.adapter_ids does not reach DataParallel's replicas: each runs a part "
                "of the batch on a copy of the model. Run the mixed batch on the model itself "
                "(or with DistributedDataParallel, each process its own samples' names)"
            )
        hidden = None
        if plan.before or plan.loras or plan.replacer or plan.parallel:
            hidden, args, kwargs = self._input(host, plan, input_name, args, kwargs)
        if plan.loras or plan.replacer:
            if len(args) + len(kwargs) > 1:
                raise TypeError(
                    f"{plan.host_name} ({type(host).__name__})'s forward is replaced by a delta "
                    "that takes one input, but it was called with more arguments"
                )
            if plan.loras:
                output = self._lora_core(host, plan, original_forward, hidden)
            else:
                output = self._replaced(host, plan, original_forward, hidden)
        else:
            output = original_forward(host, *args, **kwargs)
        for delta, name in plan.parallel:
            output = _map_main_output(
                host, output, lambda main, d=delta, n=name: self._parallel(plan, d, n, hidden, main)
            )
        for delta, name in plan.after:
            output = _map_main_output(
                host, output, lambda main, d=delta, n=name: self._after(plan, d, n, main)
            )
        return output

    # The rows of each name

    def _input(self, host, plan, input_name, args, kwargs):
        """(the host's first input after its "before" deltas, args, kwargs carrying it)."""

        def before(hidden):
            for delta, name in plan.before:
                hidden = self._routed(plan, name, delta, hidden)
            return hidden

        where = f"{plan.host_name} ({type(host).__name__})"
        return with_first_input(host, input_name, args, kwargs, before, where)

    def _check_batch(self, plan: HostPlan, tensor: torch.Tensor) -> None:
        if tensor.dim() < 1 or tensor.shape[0] != self.batch_size:
            raise ValueError(
                f"fastdelta.adapter_ids was given {self.batch_size} samples, but "
                f"{plan.host_name} got a tensor of shape {tuple(tensor.shape)}, whose first "
                f"dimension is not the batch of {self.batch_size}: give one name per sample of "
                "the batch the model is called with (beam search, DataParallel and models that "
                "flatten the batch change it)"
            )

    def _routed(self, plan, name, function: Callable, *tensors) -> torch.Tensor:
        """The last of `tensors` with its samples of `name` (None: all of them) replaced by
        `function` of those samples of each of `tensors`. Eagerly, the samples are selected
        (index_select, index_copy); under torch.compile `function` runs on every sample and a
        mask keeps the name's, so that the shapes, and the graph, do not depend on the ids."""
        if name is None:
            return function(*tensors)
        for tensor in tensors:
            self._check_batch(plan, tensor)
        base = tensors[-1]
        if torch.compiler.is_compiling():
            keep = self.local_ids((name,), base.device) == 0
            return torch.where(keep.view(-1, *[1] * (base.dim() - 1)), function(*tensors), base)
        rows = self.samples((name,), base.device)[0][0]
        if rows.numel() == 0:
            return base
        return base.index_copy(0, rows, function(*(t.index_select(0, rows) for t in tensors)))

    def _parallel(self, plan, delta, name, hidden, main):
        """`main` plus the parallel `delta` of `hidden` on the samples of `name`."""
        if isinstance(delta, DeltaLayer):
            return self._routed(plan, name, delta, hidden, main)
        return self._routed(plan, name, lambda h, m: m + delta(h), hidden, main)

    def _after(self, plan, delta, name, main):
        """`main` through the "after" `delta` on the samples of `name`."""
        if not isinstance(delta, SpanningAdapterDelta):
            return self._routed(plan, name, delta, main)
        # A parallel adapter spanning modules adds its function of an earlier module's input,
        # kept whole by its tap: take the same samples of both.
        held = delta.input_tap.take(delta.host_name)
        return self._routed(plan, name, functools.partial(AdapterDelta.forward, delta), held, main)

    def _replaced(self, host, plan, original_forward, hidden):
        """A plain module in the host's place on its name's samples, the host elsewhere."""
        delta, name = plan.replacer
        if name is None:
            return delta(hidden)
        output = original_forward(host, hidden)
        return self._routed(plan, name, lambda h, _: delta(h), hidden, output)

    # LoRA

    def _lora_core(self, host, plan, original_forward, x):
        """The host's output with each sample's LoRA."""
        self._check_batch(plan, x)
        for delta, name in plan.loras:
            if delta.merged:
                raise RuntimeError(
                    f"The LoRA delta of {name!r} on {plan.host_name} was merged into its layer "
                    "inside fastdelta.adapter_ids; its update would reach every sample: "
                    f"unmerge() delta model {name!r} before running a mixed batch"
                )
        if plan.fused is not None:
            dropouts = {delta.dropout if delta.training else 0.0 for delta in plan.fused}
            if len(dropouts) == 1:
                return self._fused_lora(host, plan, x, dropouts.pop())
            _note_dropouts(plan, dropouts)
        return self._grouped_lora(host, plan, original_forward, x)

    def _fused_lora(self, host, plan, x, dropout):
        deltas = plan.fused
        lora_A, lora_B = lora_stacks.stacked_weights(host, plan.lora_names, deltas)
        return ops.multi_lora_linear(
            x,
            parameter(host, "weight"),
            parameter(host, "bias"),
            lora_A,
            lora_B,
            lora_stacks.scalings_tensor(host, plan.lora_names, deltas, x.device),
            self.segments(plan.lora_names, x.shape[:-1], x.device),
            dropout,
            deltas[0].fan_in_fan_out,
        )

    def _grouped_lora(self, host, plan, original_forward, x):
        """Each name's samples through its LoRAs, the other samples through the host (under
        torch.compile: the host on every sample, then each name's LoRAs, masked)."""

        def through_loras(name, rows_x, _=None):
            output = None
            for delta, delta_name in plan.loras:
                if delta_name != name:
                    continue
                if output is None:
                    output = delta.replace_forward(host, rows_x)
                else:  # a second LoRA of the name, stacked: its update added
                    output = delta(rows_x, output)
            return output

        if torch.compiler.is_compiling():
            output = original_forward(host, x)
            for name in plan.lora_names:
                output = self._routed(plan, name, functools.partial(through_loras, name), x, output)
            return output
        groups, others = self.samples(plan.lora_names, x.device)
        pieces = [
            (rows, through_loras(name, x.index_select(0, rows)))
            for name, rows in zip(plan.lora_names, groups, strict=True)
            if rows.numel()
        ]
        if others.numel():
            pieces.append((others, original_forward(host, x.index_select(0, others))))
        first = pieces[0][1]
        output = first.new_empty((x.shape[0], *first.shape[1:]))
        for rows, piece in pieces:
            output.index_copy_(0, rows, piece)
        return output

    # What the layers of one batch share

    def _shared_value(self, key, compute: Callable):
        if torch.compiler.is_compiling():
            return compute()
        value = self._shared.get(key)
        if value is None:
            value = self._shared[key] = compute()
        return value

    def local_ids(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """[B] int64 on `device`: each sample's position in `names` (a host's), -1 for none."""

        def compute():
            positions = [names.index(n) if n in names else -1 for n in self.names]
            table = torch.tensor([*positions, -1], dtype=torch.int64, device=device)
            return table[self.sample_ids.to(device)]

        return self._shared_value(("ids", names, device), compute)

    def segments(self, names, leading: torch.Size, device) -> ops.AdapterSegments:
        """The rows of an input of leading shape `leading` ([B, ...]) grouped by position in
        `names`: every row of a sample takes the sample's."""

        def compute():
            ids = self.local_ids(names, device)
            per_row = ids.view(-1, *[1] * (len(leading) - 1)).expand(leading)
            return ops.adapter_segments(per_row, len(names))

        return self._shared_value(("segments", names, tuple(leading), device), compute)

    def samples(self, names, device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([the samples of each of `names`], the samples of none of them), int64 index
        tensors on `device`: one read of the group sizes on the host."""

        def compute():
            groups = self.local_ids(names, self.sample_ids.device) + 1
            order = torch.argsort(groups, stable=True)
            sizes = torch.bincount(groups, minlength=len(names) + 1).tolist()
            parts = [part.to(device) for part in order.split(sizes)]
            return parts[1:], parts[0]

        return self._shared_value(("samples", names, device), compute)


_noted_dropouts: set[str] = set()


def _note_dropouts(plan: HostPlan, dropouts) -> None:
    if plan.host_name in _noted_dropouts or torch.compiler.is_compiling():
        return
    _noted_dropouts.add(plan.host_name)
    logger.info(
        "fastdelta.adapter_ids: the LoRAs of %s on %s have different dropouts (%s); the fused "
        "mixed-batch op takes one, so each name's samples run through their own LoRA op",
        ", ".join(map(repr, plan.lora_names)),
        plan.host_name,
        ", ".join(f"{p:g}" for p in sorted(dropouts)),
    )
