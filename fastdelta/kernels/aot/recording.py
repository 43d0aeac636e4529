"""Recording the launches the launchers make: each launcher called on meta tensors with launch()
replaced by a recorder, and the dispatcher forced down one of its paths."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from fastdelta.ops import kernel_check

from .. import (
    _common,
    adapter_backward,
    adapter_forward,
    dispatch,
    dora_backward,
    dora_forward,
    dropout_keep_mask,
    lora_backward,
    lora_forward,
    multi_lora_backward,
    multi_lora_forward,
)
from .factors import DTYPES, Case


@dataclasses.dataclass
class Launch:
    """A launch as launch() received it, from one grid case."""

    kernel: object
    args: tuple
    constants: dict
    case: Case


@contextlib.contextmanager
def recording():
    """Within it, launch() appends (kernel, args, constants) to the yielded list instead."""
    launches = []
    previous = _common.launch_recorder
    _common.launch_recorder = lambda kernel, grid, args, constants: launches.append(
        (kernel, args, constants)
    )
    try:
        yield launches
    finally:
        _common.launch_recorder = previous


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _seed(dropout: bool):
    return torch.zeros((), dtype=torch.int64, device="meta") if dropout else None


def _lora_tensors(dtype, m, k, n, rank, fan_in_fan_out):
    weight = _meta(k, n, dtype=dtype) if fan_in_fan_out else _meta(n, k, dtype=dtype)
    x, lora_a, lora_b = (
        _meta(m, k, dtype=dtype),
        _meta(rank, k, dtype=dtype),
        _meta(n, rank, dtype=dtype),
    )
    return x, weight, lora_a, lora_b


def _call_lora_forward(dtype, m, k, n, rank, dropout, bias, fan_in_fan_out):
    x, weight, lora_a, lora_b = _lora_tensors(dtype, m, k, n, rank, fan_in_fan_out)
    bias = _meta(n, dtype=dtype) if bias else None
    lora_forward(x, weight, bias, lora_a, lora_b, _seed(dropout), 2.0, 0.1, fan_in_fan_out)


def _call_lora_backward(dtype, m, k, n, rank, dropout, fan_in_fan_out, needs, grad):
    x, weight, lora_a, lora_b = _lora_tensors(dtype, m, k, n, rank, fan_in_fan_out)
    seed = _seed(dropout)
    with recording():  # the forward only gives xa as the backward receives it
        _, xa = lora_forward(x, weight, None, lora_a, lora_b, seed, 2.0, 0.1, fan_in_fan_out)
    grad_y = (
        _meta(1, 1, dtype=dtype).expand(m, n) if grad == "expanded" else _meta(m, n, dtype=dtype)
    )
    need_x, need_a, need_b = needs
    lora_backward(
        grad_y, x, weight, lora_a, lora_b, xa, seed, 2.0, 0.1, fan_in_fan_out,
        (need_x, False, False, need_a, need_b),
    )  # fmt: skip


def _dora_scale(n: int):
    """The magnitude and the norm of a DoRA call: [n] float32 (k's dtype for every Triton dtype)."""
    return _meta(n, dtype=torch.float32), _meta(n, dtype=torch.float32)


def _call_dora_forward(dtype, m, k, n, rank, dropout, bias, fan_in_fan_out, keep_z):
    x, weight, lora_a, lora_b = _lora_tensors(dtype, m, k, n, rank, fan_in_fan_out)
    bias = _meta(n, dtype=dtype) if bias else None
    magnitude, norm = _dora_scale(n)
    dora_forward(
        x, weight, bias, lora_a, lora_b, magnitude, norm, _seed(dropout), 2.0, 0.1,
        fan_in_fan_out, keep_z,
    )  # fmt: skip


def _call_dora_backward(dtype, m, k, n, rank, dropout, fan_in_fan_out, needs, grad):
    x, weight, lora_a, lora_b = _lora_tensors(dtype, m, k, n, rank, fan_in_fan_out)
    magnitude, norm = _dora_scale(n)
    seed = _seed(dropout)
    need_x, need_a, need_b, need_bias, need_magnitude = needs
    scale = (magnitude, norm)
    with recording():  # the forward only gives xa and z as the backward receives them
        _, xa, z = dora_forward(
            x, weight, None, lora_a, lora_b, *scale, seed, 2.0, 0.1, fan_in_fan_out,
            need_magnitude,
        )  # fmt: skip
    grad_y = (
        _meta(1, 1, dtype=dtype).expand(m, n) if grad == "expanded" else _meta(m, n, dtype=dtype)
    )
    dora_backward(
        grad_y, x, weight, lora_a, lora_b, *scale, xa, z, seed, 2.0, 0.1, fan_in_fan_out, False,
        (need_x, False, need_bias, need_a, need_b, need_magnitude),
    )  # fmt: skip


def _multi_lora_tensors(dtype, m, k, n, rank, adapters):
    """x, the weight, the stacks, the scalings and the segments of a mixed batch."""
    x, weight = _meta(m, k, dtype=dtype), _meta(n, k, dtype=dtype)
    stacks = (_meta(adapters, rank, k, dtype=dtype), _meta(adapters, n, rank, dtype=dtype))
    segments = (
        _meta(adapters, dtype=torch.float32),
        _meta(m, dtype=torch.int64),
        _meta(adapters + 1, dtype=torch.int64),
    )
    return x, weight, *stacks, *segments


def _call_multi_lora_forward(dtype, m, k, n, rank, dropout, adapters):
    tensors = _multi_lora_tensors(dtype, m, k, n, rank, adapters)
    x, weight, lora_a, lora_b, *segments = tensors
    multi_lora_forward(x, weight, None, lora_a, lora_b, *segments, _seed(dropout), 0.1, False)


def _call_multi_lora_backward(dtype, m, k, n, rank, dropout, adapters, needs, grad):
    x, weight, lora_a, lora_b, *segments = _multi_lora_tensors(dtype, m, k, n, rank, adapters)
    seed = _seed(dropout)
    with recording():  # the forward only gives xa as the backward receives it
        _, xa = multi_lora_forward(x, weight, None, lora_a, lora_b, *segments, seed, 0.1, False)
    grad_y = (
        _meta(1, 1, dtype=dtype).expand(m, n) if grad == "expanded" else _meta(m, n, dtype=dtype)
    )
    need_x, need_a, need_b = needs
    multi_lora_backward(
        grad_y, x, weight, lora_a, lora_b, *segments, xa, seed, 0.1, False,
        (need_x, False, False, need_a, need_b),
    )  # fmt: skip


def _adapter_tensors(dtype, m, d_in, d_out, rank, sequential):
    d_out = d_in if sequential else d_out
    h, residual = _meta(m, d_in, dtype=dtype), None if sequential else _meta(m, d_out, dtype=dtype)
    return h, _meta(rank, d_in, dtype=dtype), _meta(d_out, rank, dtype=dtype), residual


def _call_adapter_forward(dtype, m, d_in, d_out, rank, activation, down_bias, up_bias, sequential):
    h, down, up, residual = _adapter_tensors(dtype, m, d_in, d_out, rank, sequential)
    down_bias = _meta(rank, dtype=dtype) if down_bias else None
    up_bias = _meta(up.shape[0], dtype=dtype) if up_bias else None
    adapter_forward(h, down, down_bias, up, up_bias, residual, 2.0, activation)


def _call_adapter_backward(dtype, m, d_in, d_out, rank, activation, sequential, needs):
    h, down, up, residual = _adapter_tensors(dtype, m, d_in, d_out, rank, sequential)
    with recording():  # the forward only gives pre as the backward receives it
        out, pre = adapter_forward(h, down, None, up, None, residual, 2.0, activation)
    adapter_backward(torch.empty_like(out), h, down, up, pre, 2.0, activation, sequential, needs)


def _call_dropout_keep_mask(dtype, m, k):
    dropout_keep_mask(_seed(True), (m, k), 0.1)


CALLS = {
    "lora_forward": _call_lora_forward,
    "lora_backward": _call_lora_backward,
    "dora_forward": _call_dora_forward,
    "dora_backward": _call_dora_backward,
    "adapter_forward": _call_adapter_forward,
    "adapter_backward": _call_adapter_backward,
    "dropout_keep_mask": _call_dropout_keep_mask,
    "multi_lora_forward": _call_multi_lora_forward,
    "multi_lora_backward": _call_multi_lora_backward,
}


def record(case: Case, path: str = dispatch.PATHS[0]) -> list[Launch]:
    """The launches the launcher of `case` makes on meta tensors, the dispatcher forced to
    `path` (where the launcher has a choice of paths)."""
    if _common.INTERPRETED:
        raise RuntimeError(
            "the kernels were defined under TRITON_INTERPRET=1, so they are interpreted, not "
            "compiled; run fastdelta.kernels.aot in a process without TRITON_INTERPRET"
        )
    arguments = case.arguments
    dtype, tf32 = DTYPES[arguments.pop("dtype", "bf16")]
    with kernel_check.tf32(tf32), dispatch.force_path(path), recording() as launches:
        CALLS[case.op](dtype, **arguments)
    return [Launch(kernel, args, constants, case) for kernel, args, constants in launches]
