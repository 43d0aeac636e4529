"""The functional entry of mixed batches: many LoRAs on one base, one adapter per row.

    y = fastdelta.ops.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_ids)

Row i of x (its leading dimensions flattened) runs adapter adapter_ids[i], or none for -1, so
several LoRAs train in one step on one frozen base (`fastdelta.ops.multi_lora`). A layer that
holds its adapters' weights apart stacks them with `stack_lora_weights` (differentiable); a
model whose layers all see the same ids groups the rows once per batch with `adapter_segments`
and hands the result to every layer in place of the ids.

As in `fastdelta.ops.lora_linear`, the checks that depend only on the arguments' shapes, dtypes
and devices run once per kind of call in eager mode; the ids' values are checked every batch,
where the segments are computed: on the host for CPU tensors, on the device (an asynchronous
assertion, no host read) for CUDA tensors and under torch.compile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastdelta.ops import reference
from fastdelta.ops.backend import backend_module, resolve_backend
from fastdelta.ops.eager import autocast_dtype, cast_operands, eager_path, runs_reference
from fastdelta.ops.multi_lora import multi_lora_eager, multi_lora_linear_op

_OP = "fastdelta.ops.multi_lora_linear"
# The metadata of each kind of call whose arguments passed their checks; emptied past
# MAX_CHECKED kinds, which only varied shapes would reach (as fastdelta.ops' own cache).
_checked: set[tuple] = set()
MAX_CHECKED = 4096


class AdapterSegments(NamedTuple):
    """The rows of a mixed batch grouped by adapter (`adapter_segments`). adapter_ids: the ids
    as given; order: [M] int64, the rows sorted by adapter (stably), those of no adapter last;
    starts: [n + 1] int64, adapter j's rows being order[starts[j]:starts[j + 1]]."""

    adapter_ids: torch.Tensor
    order: torch.Tensor
    starts: torch.Tensor


def _check_ids(adapter_ids: torch.Tensor, num_adapters: int) -> None:
    """Raise a ValueError naming adapter_ids when it is not an integer tensor, or (a host read,
    only for CPU tensors in eager mode) when an id is outside [-1, num_adapters)."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise ValueError(
            f"{_OP}: adapter_ids must be an integer tensor with one id per row of x, got "
            f"{type(adapter_ids).__name__}: pass torch.tensor(ids)"
        )
    if (
        adapter_ids.is_floating_point()
        or adapter_ids.is_complex()
        or adapter_ids.dtype == torch.bool
    ):
        raise ValueError(
            f"{_OP}: adapter_ids must be an integer tensor (int64 or int32), got "
            f"{adapter_ids.dtype}: pass adapter_ids.long()"
        )
    if torch.compiler.is_compiling() or adapter_ids.device.type != "cpu":
        return
    if adapter_ids.numel() and (adapter_ids.min() < -1 or adapter_ids.max() >= num_adapters):
        bad = adapter_ids[(adapter_ids < -1) | (adapter_ids >= num_adapters)]
        raise ValueError(
            f"{_OP}: adapter_ids must be in [-1, {num_adapters}) (-1: no adapter; "
            f"{num_adapters} adapters are stacked in lora_A), got {bad.unique().tolist()}"
        )


def adapter_segments(adapter_ids: torch.Tensor, num_adapters: int) -> AdapterSegments:
    """Group the rows of a mixed batch by adapter, once per batch: the result goes to every
    layer's `multi_lora_linear` in place of the ids. adapter_ids: one integer per row (any
    shape; -1 for a row of no adapter), on the device of the activations. A few small device
    ops (a sort and a search), no host read on a GPU."""
    _check_ids(adapter_ids, num_adapters)
    ids = adapter_ids.reshape(-1).long()
    if torch.compiler.is_compiling() or ids.device.type != "cpu":
        valid = ((ids >= -1) & (ids < num_adapters)).all()
        torch._assert_async(valid, f"{_OP}: adapter_ids must be in [-1, {num_adapters})")
    key = torch.where(ids < 0, num_adapters, ids)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_adapters + 1, device=ids.device)
    return AdapterSegments(adapter_ids, order, torch.searchsorted(sorted_key, bounds))


def stack_lora_weights(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [n, r, K], lora_B [n, N, r]) stacking n adapters' lora_A [r_j, K] and lora_B
    [N, r_j], r = max r_j, the lower ranks zero-padded. The padding is exact: its rows of A and
    columns of B meet zeros in every product, and receive zero gradients. Differentiable: each
    adapter's weights get their part of the stacks' gradients. (A layer that trains the stacks
    themselves keeps them as its parameters and skips this copy.)"""
    if not lora_As or len(lora_As) != len(lora_Bs):
        raise ValueError(
            f"fastdelta.ops.stack_lora_weights: one lora_B per lora_A, at least one; got "
            f"{len(lora_As)} and {len(lora_Bs)}"
        )
    rank = max(a.shape[0] for a in lora_As)
    stacked_A = torch.stack([F.pad(a, (0, 0, 0, rank - a.shape[0])) for a in lora_As])
    stacked_B = torch.stack([F.pad(b, (0, rank - b.shape[1])) for b in lora_Bs])
    return stacked_A, stacked_B


def _check_arguments(x, weight, bias, lora_A, lora_B, scalings, dropout_p, fan_in_fan_out):
    """Raise a ValueError naming the argument whose shape, dtype or device does not fit."""
    for name, tensor, dims in (("weight", weight, 2), ("lora_A", lora_A, 3), ("lora_B", lora_B, 3)):
        if tensor.dim() != dims:
            stacked = " (the adapters stacked: stack_lora_weights)" if dims == 3 else ""
            raise ValueError(
                f"{_OP}: {name} must be {dims}-D{stacked}, got shape {tuple(tensor.shape)}"
            )
    out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    layout = "[in, out] (fan_in_fan_out)" if fan_in_fan_out else "[out, in]"
    adapters, rank = lora_A.shape[:2]
    problems = []
    if x.shape[-1] != in_features:
        problems.append(
            f"x has {x.shape[-1]} features but the weight {tuple(weight.shape)}, laid out as "
            f"{layout}, takes {in_features}"
        )
    elif lora_A.shape[2] != in_features or lora_B.shape != (adapters, out_features, rank):
        problems.append(
            f"lora_A {tuple(lora_A.shape)} must be [n, r, {in_features}] and lora_B "
            f"{tuple(lora_B.shape)} must be [n, {out_features}, r] for this weight (n adapters "
            "of rank up to r, the lower ranks zero-padded: stack_lora_weights)"
        )
    if bias is not None and bias.shape != (out_features,):
        problems.append(f"bias {tuple(bias.shape)} must be [{out_features}]")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        problems.append(
            f"x is {x.dtype} but the weight or bias is not: cast the model or the input, or run "
            "under torch.autocast"
        )
    if not isinstance(scalings, torch.Tensor):
        problems.append(
            f"scalings must be a float tensor [{adapters}], got {type(scalings).__name__}: pass "
            "torch.tensor(scalings) (a tensor, so that other values never recompile a graph)"
        )
    elif scalings.shape != (adapters,) or not scalings.is_floating_point():
        problems.append(
            f"scalings must be a float tensor [{adapters}], one per adapter, got "
            f"{scalings.dtype} {tuple(scalings.shape)}"
        )
    elif scalings.requires_grad and torch.is_grad_enabled():
        problems.append(
            "scalings is a constant of the op (it gets no gradient): pass scalings.detach()"
        )
    tensors = (x, weight, bias, lora_A, lora_B, scalings)
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        problems.append(f"the tensors are on different devices ({sorted(map(str, devices))})")
    if not 0.0 <= dropout_p < 1.0:
        problems.append(f"dropout_p must be in [0, 1), got {dropout_p}")
    if problems:
        raise ValueError(f"{_OP}: " + "; ".join(problems))


def _check_segments(segments: AdapterSegments, x: torch.Tensor, adapters: int) -> None:
    """Raise a ValueError naming adapter_ids when its shape or device does not fit x, or its
    segments were computed for another number of adapters."""
    ids = segments.adapter_ids
    rows = x.shape[:-1]
    if tuple(ids.shape) not in (tuple(rows), (rows.numel(),)):
        raise ValueError(
            f"{_OP}: adapter_ids {tuple(ids.shape)} must hold one id per row of x, shaped as "
            f"x's leading dimensions {tuple(rows)} or flat ({rows.numel()},)"
        )
    if ids.device != x.device:
        raise ValueError(
            f"{_OP}: adapter_ids is on {ids.device} but x is on {x.device}: move the ids "
            "(adapter_ids.to(x.device)) before grouping them"
        )
    if segments.starts.shape != (adapters + 1,):
        raise ValueError(
            f"{_OP}: adapter_ids were grouped for {segments.starts.shape[0] - 1} adapters but "
            f"lora_A stacks {adapters}: call adapter_segments(ids, {adapters})"
        )


def _metadata(tensor) -> tuple:
    """What the argument checks read of an argument: a tensor's shape, dtype, device and whether
    it requires grad; another object's type."""
    if not isinstance(tensor, torch.Tensor):
        return (type(tensor),)
    return tensor.shape, tensor.dtype, tensor.device, tensor.requires_grad


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor | AdapterSegments,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer with a LoRA per row: y[i] = x[i] W^T + b + scalings[j] * (dropout(x[i])
    A[j]^T) B[j]^T for j = adapter_ids[i], and x[i] W^T + b where j = -1.

    x: [..., K]; weight: [N, K], or [K, N] with `fan_in_fan_out`; bias: [N] or None; lora_A:
    [n, r, K] and lora_B: [n, N, r], n adapters stacked (`stack_lora_weights` pads lower ranks
    with zeros); scalings: a float tensor [n] (alpha / r_j each; a constant of the op, with no
    gradient); adapter_ids: one integer per row of x (x's leading shape, or flat), -1 for none,
    or `adapter_segments(ids, n)` computed once per batch. Returns [..., N]. Gradients reach x,
    lora_A, lora_B, and weight and bias where they require them.

    Dropout as in `lora_linear`, on the low-rank path: the same mask for the same seed and x's
    shape, so a batch of one adapter computes what `lora_linear` computes. LoRA weights of
    another dtype than x are cast to x's; under torch.autocast every tensor is cast first.
    """
    device = x.device
    dtype = autocast_dtype(device)
    if dtype is not None:
        x, weight, bias, lora_A, lora_B = cast_operands(dtype, x, weight, bias, lora_A, lora_B)
    backend = resolve_backend(device, x.dtype)
    arguments = (x, weight, bias, lora_A, lora_B, scalings, dropout_p, fan_in_fan_out)
    adapters = lora_A.shape[0] if lora_A.dim() == 3 else 0
    if torch.compiler.is_compiling():
        _check_arguments(*arguments)
    else:
        key = (
            x.shape[-1], x.dtype, x.device, _metadata(weight), _metadata(bias),
            _metadata(lora_A), _metadata(lora_B), _metadata(scalings), dropout_p, fan_in_fan_out,
            torch.is_grad_enabled(),
        )  # fmt: skip
        if key not in _checked:
            _check_arguments(*arguments)
            if len(_checked) >= MAX_CHECKED:
                _checked.clear()
            _checked.add(key)
    if isinstance(adapter_ids, AdapterSegments):
        segments = adapter_ids
    else:
        segments = adapter_segments(adapter_ids, adapters)
    _check_segments(segments, x, adapters)
    if lora_A.dtype != x.dtype or lora_B.dtype != x.dtype:
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    scalings = scalings.to(torch.promote_types(x.dtype, torch.float32))
    if dropout_p > 0 and seed is None:
        seed = torch.randint(2**62, (), dtype=torch.int64, device=device)
    elif dropout_p == 0:
        seed = None
    if runs_reference():
        keep_mask = None
        if seed is not None:
            keep_mask = backend_module(backend).dropout_keep_mask(seed, tuple(x.shape), dropout_p)
        return reference.multi_lora_linear(
            x, weight, bias, lora_A, lora_B, scalings, segments.adapter_ids, dropout_p,
            fan_in_fan_out, keep_mask,
        )  # fmt: skip
    tensors = (x, weight, bias, lora_A, lora_B, scalings, segments.order, segments.starts, seed)
    if eager_path(*tensors):
        return multi_lora_eager(*tensors, float(dropout_p), fan_in_fan_out, backend)
    return multi_lora_linear_op(*tensors, float(dropout_p), fan_in_fan_out, backend)[0]
