"""The cpp backend: the fused ops computed by the C++/CUDA extension (csrc/).

Each function calls the extension's own op, `torch.ops.fastdelta_C.*`, whose CPU or CUDA kernel
the dispatcher picks by the tensors' device; `fastdelta.ops._extension` builds and loads the
extension, and `fastdelta.ops.backend` decides when this backend runs. The functions match
`fastdelta.ops.torch_backend`'s signatures and semantics; the dropout mask is the extension's
own (a counter-based hash of the seed and the element index, the same on CPU and CUDA).

On CUDA the big products (x W^T, dY W, dW) are cuBLAS's, through ATen, and the products with the
rank or the bottleneck as a dimension are the extension's tile kernels, with the dropout mask,
scaling, bias, activation and residual applied inside them. The LoRA output is not one write:
a tile kernel writes y = b + scaling * xa B^T, then cuBLAS reads y back and writes x W^T + y
over it (beta = 1), so y costs 2 writes and 1 read of [M, N] where the triton backend's fused
epilogue writes it once (2 * M * N * itemsize more bytes); dX in the backward likewise. cuBLASLt
epilogues add a bias or an activation, never a second product; csrc/cuda/lora_cuda.cpp says
why this is still the fallback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fastdelta.ops import _extension, dora_composed


@functools.cache
def _op(name: str) -> Callable:
    """The extension's op `name`: its Python entry point where it has one (the differentiable
    ops, see csrc/python.cpp), else its one overload, which called directly skips the overload
    packet's resolution, a fifth of a small forward's host time (measured on the CPU)."""
    entry_point = getattr(_extension.entry_points, name, None)
    return entry_point or getattr(torch.ops.fastdelta_C, name).default


def cpu_vector_isa() -> str:
    """The instruction set that the CPU kernels' vectorised dropout loops run on this CPU:
    "arch=x86-64-v4" or "avx512f" (AVX-512, by the compiler that built the extension), "avx2",
    or "baseline" (another compiler or architecture, or a CPU with neither)."""
    return _extension.entry_points.cpu_vector_isa()


def dropout_keep_mask(seed: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The boolean keep-mask that the extension's dropout draws from `seed` for `shape`."""
    return _op("dropout_keep_mask")(seed, list(shape), p)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) for y = x W^T + b + scaling * xa B^T with xa = dropout(x) A^T; xa in float32
    (float64 for float64 x)."""
    return _op("lora_forward")(
        x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out
    )


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """y of lora_forward, differentiable: the extension's op records one autograd node whose
    backward is lora_backward, with no Python in either (csrc/autograd.cpp). With dropout and no
    seed it draws one from torch's generator for x's device. It checks every argument and
    raises a RuntimeError for the first that does not fit."""
    return _op("lora_linear")(
        x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out
    )


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, weight, bias, lora_A, lora_B); None for those not needed."""
    arguments = (grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, fan_in_fan_out)
    return tuple(_op("lora_backward")(*arguments, list(needs)))


def dora_forward(
    x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p, fan_in_fan_out,
    keep_z,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(y, xa, z or None) of DoRA: the extension's LoRA forward without bias computes z, ATen
    scales its columns and adds the bias (`fastdelta.ops.dora_composed`)."""
    return dora_composed.dora_forward_using(
        lora_forward, x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling,
        dropout_p, fan_in_fan_out, keep_z,
    )  # fmt: skip


def dora_backward(
    grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, z, seed, scaling, dropout_p,
    fan_in_fan_out, exact_norm, needs,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients of (x, weight, bias, lora_A, lora_B, magnitude): ATen scales dY by k once, the
    extension's LoRA backward takes it from there."""
    return dora_composed.dora_backward_using(
        lora_backward, dora_composed.scale_grad, grad_y, x, weight, lora_A, lora_B, magnitude,
        norm, xa, z, seed, scaling, dropout_p, fan_in_fan_out, exact_norm, needs,
    )  # fmt: skip


def adapter_forward(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    scaling: float,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, pre): out = residual + scaling * (act(pre) U^T + b_u), pre = h D^T + b_d in
    float32 (float64 for float64 h). residual None means h (a sequential adapter)."""
    return _op("adapter_forward")(
        h, down_weight, down_bias, up_weight, up_bias, residual, scaling, activation
    )


def adapter_bottleneck(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    scaling: float,
    activation: str,
) -> torch.Tensor:
    """out of adapter_forward, differentiable, as lora_linear is (csrc/autograd.cpp); a
    parallel adapter's residual receives the output's gradient unchanged."""
    return _op("adapter_bottleneck")(
        h, down_weight, down_bias, up_weight, up_bias, residual, scaling, activation
    )


def linear_adapter(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scaling: float,
    activation: str,
    parallel: bool,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """A linear layer and its adapter as one differentiable op: `fastdelta.ops.linear_adapter`
    on this backend (csrc/autograd.cpp)."""
    return _op("linear_adapter")(
        x, weight, bias, down_weight, down_bias, up_weight, up_bias, scaling, activation,
        parallel, fan_in_fan_out,
    )  # fmt: skip


def adapter_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    pre: torch.Tensor,
    scaling: float,
    activation: str,
    sequential: bool,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (h, down_weight, down_bias, up_weight, up_bias); None where not needed.
    A sequential adapter's dh includes the residual path."""
    return tuple(
        _op("adapter_backward")(
            grad_out, h, down_weight, up_weight, pre, scaling, activation, sequential, list(needs)
        )
    )


def multi_lora_forward(
    x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p, fan_in_fan_out
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) of the mixed-batch LoRA (`fastdelta.ops.multi_lora`): the extension's segmented
    products (csrc/multi_lora.cpp), with its dropout mask, so a row is dropped as this backend's
    lora_linear drops it."""
    return _op("multi_lora_forward")(
        x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p, fan_in_fan_out
    )


def multi_lora_backward(
    grad_y, x, weight, lora_A, lora_B, scalings, order, starts, xa, seed, dropout_p,
    fan_in_fan_out, needs,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients of (x, weight, bias, lora_A, lora_B) of the mixed-batch LoRA; None for those
    not needed."""
    arguments = (grad_y, x, weight, lora_A, lora_B, scalings, order, starts, xa, seed)
    return tuple(_op("multi_lora_backward")(*arguments, dropout_p, fan_in_fan_out, list(needs)))
