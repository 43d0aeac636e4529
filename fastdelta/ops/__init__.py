"""Functional delta ops, dispatched to the chosen backend.

Every delta layer computes through these functions; nothing else in the library does the math.
Each runs its `fastdelta::` custom op under torch.compile and on tensor subclasses, and the
same backend functions through a plain autograd.Function in eager mode (`ops.eager`).

What a call checks of its arguments depends on their shapes, dtypes and devices only, which a
layer's calls share whatever their row count: in eager mode each kind of call is checked once
and remembered (a dictionary lookup on that metadata), so the per-call host work is what the
data needs. Measured on one CPU thread with a [4, 64] input: the checks took 9 us a call.

On the cpp backend, in eager mode, a call goes straight to the extension's differentiable op
(`cpp_backend.lora_linear`, `cpp_backend.adapter_bottleneck`), whose forward, checks and
backward are all C++ (csrc/autograd.cpp); only when it raises are the arguments checked here,
for the error that names them (the figures are in csrc/autograd.cpp).
"""

from __future__ import annotations

import torch

from fastdelta.ops import cpp_backend, reference, verification
from fastdelta.ops.activations import canonical_activation
from fastdelta.ops.adapter import adapter_bottleneck_eager, adapter_bottleneck_op
from fastdelta.ops.backend import backend_module, get_backend, resolve_backend, set_backend
from fastdelta.ops.dora import dora_linear_eager, dora_linear_op
from fastdelta.ops.dora import row_norms_squared as dora_row_norms_squared
from fastdelta.ops.dora import weight_norm as dora_weight_norm
from fastdelta.ops.eager import autocast_dtype, cast_operands, eager_path, runs_reference
from fastdelta.ops.lora import lora_linear_eager, lora_linear_op
from fastdelta.ops.multi_lora_functional import (
    AdapterSegments,
    adapter_segments,
    multi_lora_linear,
    stack_lora_weights,
)

# The metadata of each kind of call whose arguments passed their checks (see the module
# docstring); emptied when it grows past MAX_CHECKED, which only varied shapes would do.
_checked: set[tuple] = set()
MAX_CHECKED = 4096


def _metadata(tensor: torch.Tensor | None) -> tuple | None:
    """What the argument checks read of a tensor: its shape, dtype and device."""
    return None if tensor is None else (tensor.shape, tensor.dtype, tensor.device)


def _check_once(check, key: tuple, *arguments) -> None:
    """check(*arguments), unless arguments with this metadata `key` passed it before."""
    if key in _checked:
        return
    check(*arguments)
    if len(_checked) >= MAX_CHECKED:
        _checked.clear()
    _checked.add(key)


def _check_lora_arguments(
    x, weight, bias, lora_A, lora_B, dropout_p, fan_in_fan_out, op="lora_linear"
):
    """Raise a ValueError naming the argument whose shape, dtype or device does not fit, and
    the op (`op`: lora_linear, or dora_linear, whose LoRA operands these are too)."""
    for name, tensor in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if tensor.dim() != 2:
            raise ValueError(
                f"fastdelta.ops.{op}: {name} must be 2-D, got shape {tuple(tensor.shape)}"
            )
    out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    layout = "[in, out] (fan_in_fan_out)" if fan_in_fan_out else "[out, in]"
    problems = []
    if x.shape[-1] != in_features:
        problems.append(
            f"x has {x.shape[-1]} features but the weight {tuple(weight.shape)}, laid out as "
            f"{layout}, takes {in_features}"
        )
    elif lora_A.shape[1] != in_features or lora_B.shape != (out_features, lora_A.shape[0]):
        problems.append(
            f"lora_A {tuple(lora_A.shape)} must be [r, {in_features}] and lora_B "
            f"{tuple(lora_B.shape)} must be [{out_features}, r] for this weight"
        )
    if bias is not None and bias.shape != (out_features,):
        problems.append(f"bias {tuple(bias.shape)} must be [{out_features}]")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        problems.append(
            f"x is {x.dtype} but the weight or bias is not: cast the model or the input, or run "
            "under torch.autocast"
        )
    devices = {t.device for t in (x, weight, bias, lora_A, lora_B) if t is not None}
    if len(devices) > 1:
        problems.append(f"the tensors are on different devices ({sorted(map(str, devices))})")
    if not 0.0 <= dropout_p < 1.0:
        problems.append(f"dropout_p must be in [0, 1), got {dropout_p}")
    if problems:
        raise ValueError(f"fastdelta.ops.{op}: " + "; ".join(problems))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer with a LoRA delta: x W^T + b + scaling * (dropout(x) A^T) B^T.

    x: [..., K]; weight: [N, K], or [K, N] with `fan_in_fan_out` (GPT-2's Conv1D); bias: [N]
    or None; lora_A: [r, K]; lora_B: [N, r]. Returns [..., N]. Dropout applies to the
    low-rank path only; its mask comes from `seed` (an int64 scalar tensor), drawn from
    torch's generator when not given, so `torch.manual_seed` makes runs repeatable. LoRA
    weights of another dtype than x (say float32 with a bfloat16 model) are cast to x's; under
    torch.autocast every tensor is cast to the autocast dtype first.
    """
    device = x.device
    dtype = autocast_dtype(device)
    if dtype is not None:
        x, weight, bias, lora_A, lora_B = cast_operands(dtype, x, weight, bias, lora_A, lora_B)
    # Resolved once, here, for the forward and its backward (see fastdelta.ops.backend).
    backend = resolve_backend(device, x.dtype)
    arguments = (x, weight, bias, lora_A, lora_B, dropout_p, fan_in_fan_out)
    if (
        backend == "cpp"
        and lora_A.dtype == x.dtype == lora_B.dtype
        and eager_path(x, weight, bias, lora_A, lora_B, seed)
        and not verification.may_route(device)
    ):
        try:
            return cpp_backend.lora_linear(
                x, weight, bias, lora_A, lora_B, seed, float(scaling), float(dropout_p),
                fan_in_fan_out,
            )  # fmt: skip
        except RuntimeError:
            # The extension's checks failed (or its kernels did): name the argument if ours
            # find it.
            _check_lora_arguments(*arguments)
            raise
    if torch.compiler.is_compiling():
        _check_lora_arguments(*arguments)
    else:
        key = (
            "lora", x.shape[-1], x.dtype, x.device, _metadata(weight), _metadata(bias),
            _metadata(lora_A), _metadata(lora_B), dropout_p, fan_in_fan_out,
        )  # fmt: skip
        _check_once(_check_lora_arguments, key, *arguments)
    if lora_A.dtype != x.dtype or lora_B.dtype != x.dtype:
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if dropout_p > 0 and seed is None:
        seed = torch.randint(2**62, (), dtype=torch.int64, device=x.device)
    elif dropout_p == 0:
        seed = None
    if runs_reference():
        keep_mask = _keep_mask(backend, seed, x, dropout_p)
        return reference.lora_linear(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out, keep_mask
        )
    arguments = (x, weight, bias, lora_A, lora_B, seed, float(scaling), float(dropout_p))
    if eager_path(x, weight, bias, lora_A, lora_B, seed):
        return lora_linear_eager(*arguments, fan_in_fan_out, backend)
    return lora_linear_op(*arguments, fan_in_fan_out, backend)[0]


def _check_adapter_arguments(h, down_weight, down_bias, up_weight, up_bias, residual):
    """Raise a ValueError naming the argument whose shape, dtype or device does not fit."""
    for name, tensor in (("down_weight", down_weight), ("up_weight", up_weight)):
        if tensor.dim() != 2:
            raise ValueError(
                f"fastdelta.ops.adapter_bottleneck: {name} must be 2-D, got shape "
                f"{tuple(tensor.shape)}"
            )
    problems = []
    bottleneck = down_weight.shape[0]
    if h.shape[-1] != down_weight.shape[1]:
        problems.append(
            f"h has {h.shape[-1]} features but down_weight {tuple(down_weight.shape)} takes "
            f"{down_weight.shape[1]}"
        )
    elif up_weight.shape[1] != bottleneck:
        problems.append(
            f"up_weight {tuple(up_weight.shape)} must be [out, {bottleneck}] to follow "
            f"down_weight {tuple(down_weight.shape)}"
        )
    out_features = up_weight.shape[0]
    if down_bias is not None and down_bias.shape != (bottleneck,):
        problems.append(f"down_bias {tuple(down_bias.shape)} must be [{bottleneck}]")
    if up_bias is not None and up_bias.shape != (out_features,):
        problems.append(f"up_bias {tuple(up_bias.shape)} must be [{out_features}]")
    expected = (*h.shape[:-1], out_features)
    if residual is None and h.shape[-1] != out_features:
        problems.append(
            f"a sequential adapter (no residual) needs out_features == in_features, got "
            f"{out_features} and {h.shape[-1]}"
        )
    elif residual is not None and tuple(residual.shape) != expected:
        problems.append(f"residual {tuple(residual.shape)} must be {list(expected)}")
    if residual is not None and residual.dtype != h.dtype:
        problems.append(f"residual is {residual.dtype} but h is {h.dtype}")
    tensors = (h, down_weight, down_bias, up_weight, up_bias, residual)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        problems.append(f"the tensors are on different devices ({sorted(map(str, devices))})")
    if problems:
        raise ValueError("fastdelta.ops.adapter_bottleneck: " + "; ".join(problems))


def adapter_bottleneck(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scaling: float,
    activation: str,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """An adapter bottleneck added to a residual: residual + scaling * (act(h D^T + b_d) U^T + b_u).

    h: [..., d_in]; down_weight D: [m, d_in]; up_weight U: [d_out, m]; residual: [..., d_out],
    or None (or h itself) for a sequential adapter, whose residual is h. activation: relu,
    gelu, gelu_new (tanh), silu or an alias. Adapter weights of another dtype than h are cast
    to h's; under torch.autocast every tensor is cast to the autocast dtype first.
    """
    activation = canonical_activation(activation)
    if residual is h:
        residual = None
    device = h.device
    dtype = autocast_dtype(device)
    if dtype is not None:
        h, residual = h.to(dtype), None if residual is None else residual.to(dtype)
    backend = resolve_backend(device, h.dtype)
    arguments = (h, down_weight, down_bias, up_weight, up_bias, residual)
    if (
        backend == "cpp"
        and _all_of_dtype(h.dtype, (down_weight, down_bias, up_weight, up_bias))
        and eager_path(*arguments)
        and not verification.may_route(device)
    ):
        try:
            return cpp_backend.adapter_bottleneck(*arguments, float(scaling), activation)
        except RuntimeError:
            _check_adapter_arguments(*arguments)  # names the argument, if ours find it
            raise
    if torch.compiler.is_compiling():
        _check_adapter_arguments(*arguments)
    else:
        # The checks read h's leading dimensions only to compare them with the residual's.
        residual_key = None
        if residual is not None:
            same_rows = residual.shape[:-1] == h.shape[:-1]
            residual_key = (same_rows, residual.shape[-1:], residual.dtype, residual.device)
        key = (
            "adapter", h.shape[-1], h.dtype, h.device, _metadata(down_weight),
            _metadata(down_bias), _metadata(up_weight), _metadata(up_bias), residual_key,
        )  # fmt: skip
        _check_once(_check_adapter_arguments, key, *arguments)
    parameters = (down_weight, down_bias, up_weight, up_bias)
    if any(t is not None and t.dtype != h.dtype for t in parameters):
        down_weight, down_bias, up_weight, up_bias = (
            None if t is None else t.to(h.dtype) for t in parameters
        )
    tensors = (h, down_weight, down_bias, up_weight, up_bias, residual)
    if runs_reference():
        return reference.adapter_bottleneck(*tensors[:5], scaling, activation, residual)
    if eager_path(*tensors):
        return adapter_bottleneck_eager(*tensors, float(scaling), activation, backend)
    return adapter_bottleneck_op(*tensors, float(scaling), activation, backend)[0]


def _check_linear_adapter_arguments(
    x, weight, bias, down_weight, down_bias, up_weight, up_bias, parallel, fan_in_fan_out
):
    """Raise a ValueError naming the argument whose shape, dtype or device does not fit."""
    where = "fastdelta.ops.linear_adapter"
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D, got shape {tuple(weight.shape)}")
    in_features, out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
    problems = []
    if x.shape[-1] != in_features:
        layout = "[in, out] (fan_in_fan_out)" if fan_in_fan_out else "[out, in]"
        problems.append(
            f"x has {x.shape[-1]} features but weight {tuple(weight.shape)}, stored {layout}, "
            f"takes {in_features}"
        )
    if bias is not None and bias.shape != (out_features,):
        problems.append(f"bias {tuple(bias.shape)} must be [{out_features}]")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dtype, tensor.device) != (x.dtype, x.device):
            problems.append(
                f"{name} is {tensor.dtype} on {tensor.device}, x {x.dtype} on {x.device}"
            )
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    h = x.new_empty(()).expand(*x.shape[:-1], out_features)
    _check_adapter_arguments(
        x if parallel else h, down_weight, down_bias, up_weight, up_bias, h if parallel else None
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
    parallel: bool = False,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """A linear layer with an adapter after it: h = x W^T + b, then
    `adapter_bottleneck(h, ...)` (sequential: h + scaling * (act(h D^T + b_d) U^T + b_u)) or,
    `parallel`, `adapter_bottleneck(x, ..., residual=h)`, the adapter reading the layer's input.

    weight: [out, in], or [in, out] with `fan_in_fan_out` (transformers' Conv1D). The result is
    the two calls' own; on the cpp backend, outside autocast and with one dtype, it is one op
    of the extension with one autograd node (csrc/autograd.cpp), which spares the host time of
    the linear's call and of a second op.
    """
    activation = canonical_activation(activation)
    tensors = (x, weight, bias, down_weight, down_bias, up_weight, up_bias)
    device = x.device
    if (
        autocast_dtype(device) is None
        and resolve_backend(device, x.dtype) == "cpp"
        and _all_of_dtype(x.dtype, tensors)
        and eager_path(*tensors)
        and not verification.may_route(device)
    ):
        try:
            return cpp_backend.linear_adapter(
                *tensors, float(scaling), activation, parallel, fan_in_fan_out
            )
        except RuntimeError:
            _check_linear_adapter_arguments(*tensors, parallel, fan_in_fan_out)
            raise
    try:
        h = torch.nn.functional.linear(x, weight.t() if fan_in_fan_out else weight, bias)
    except RuntimeError:
        _check_linear_adapter_arguments(*tensors, parallel, fan_in_fan_out)
        raise
    adapter = (down_weight, down_bias, up_weight, up_bias, scaling, activation)
    if parallel:
        return adapter_bottleneck(x, *adapter, residual=h)
    return adapter_bottleneck(h, *adapter)


def _keep_mask(backend: str, seed, x: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """The dropout keep-mask the fused ops draw from `seed` for x on `backend` (None without
    dropout), for the reference that runs under forward-mode AD or a torch.func transform."""
    if seed is None:
        return None
    return backend_module(backend).dropout_keep_mask(seed, tuple(x.shape), dropout_p)


def _all_of_dtype(dtype: torch.dtype, tensors) -> bool:
    """Whether every tensor of `tensors` (None skipped) has `dtype`."""
    for tensor in tensors:  # noqa: SIM110 (a loop: see eager_path)
        if tensor is not None and tensor.dtype != dtype:
            return False
    return True


def backend_description(op: str, device: torch.device, dtype: torch.dtype, **features) -> str:
    """The backend that runs `op` ("lora", "dora" or "adapter") on `dtype` tensors on `device`, and
    where its variants with these `features` (e.g. in_features=768, rank=8) run that failed
    their first-use check (see fastdelta.ops.verification): "triton (cpp for 1 variant that
    failed verification)"."""
    return verification.moved_summary(resolve_backend(device, dtype), op, device, **features)


def _check_dora_arguments(
    x, weight, bias, lora_A, lora_B, magnitude, norm, dropout_p, fan_in_fan_out
):
    """Raise a ValueError naming the argument whose shape, dtype or device does not fit."""
    _check_lora_arguments(x, weight, bias, lora_A, lora_B, dropout_p, fan_in_fan_out, "dora_linear")
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    problems = []
    for name, tensor in (("magnitude", magnitude), ("norm", norm)):
        if tensor is None:
            continue
        if tensor.shape != (out_features,):
            problems.append(
                f"{name} {tuple(tensor.shape)} must be [{out_features}], a value per output feature"
            )
        elif not tensor.is_floating_point():
            problems.append(f"{name} must be floating point, got {tensor.dtype}")
        if tensor.device != x.device:
            problems.append(f"{name} is on {tensor.device} but x is on {x.device}")
    if problems:
        raise ValueError("fastdelta.ops.dora_linear: " + "; ".join(problems))


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    seed: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    exact_norm: bool = False,
) -> torch.Tensor:
    """A linear layer with a DoRA delta: y = k * (x W^T + scaling * (dropout(x) A^T) B^T) + b,
    k = magnitude / ||W + scaling * B A|| per output feature.

    Shapes and dropout as in `lora_linear` (dropout on the low-rank path only, the same mask for
    the same seed); magnitude: [N]. `norm` ([N]): the row norms of W + scaling * B A when the
    caller has them (`dora_weight_norm`, which can reuse a kept ||W||^2), else computed here; a
    constant of the backward (detached), unless `exact_norm`, which adds the gradient through it
    to lora_A, lora_B (and the weight). The backward keeps z = the unscaled output ([..., N],
    x's dtype) when the magnitude needs a gradient (or exact_norm one through the norm).
    """
    device = x.device
    dtype = autocast_dtype(device)
    if dtype is not None:
        x, weight, bias, lora_A, lora_B = cast_operands(dtype, x, weight, bias, lora_A, lora_B)
    backend = resolve_backend(device, x.dtype)
    arguments = (x, weight, bias, lora_A, lora_B, magnitude, norm, dropout_p, fan_in_fan_out)
    if torch.compiler.is_compiling():
        _check_dora_arguments(*arguments)
    else:
        key = (
            "dora", x.shape[-1], x.dtype, x.device, _metadata(weight), _metadata(bias),
            _metadata(lora_A), _metadata(lora_B), _metadata(magnitude), _metadata(norm),
            dropout_p, fan_in_fan_out,
        )  # fmt: skip
        _check_once(_check_dora_arguments, key, *arguments)
    if lora_A.dtype != x.dtype or lora_B.dtype != x.dtype:
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    precise = torch.promote_types(x.dtype, torch.float32)  # xa's, k's and the norm's dtype
    if norm is None:
        with torch.no_grad():
            norm = dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    norm, magnitude = norm.detach().to(precise), magnitude.to(precise)
    keep_z = torch.is_grad_enabled() and (
        magnitude.requires_grad
        or (exact_norm and any(t.requires_grad for t in (weight, lora_A, lora_B)))
    )
    if dropout_p > 0 and seed is None:
        seed = torch.randint(2**62, (), dtype=torch.int64, device=x.device)
    elif dropout_p == 0:
        seed = None
    if runs_reference():
        keep_mask = _keep_mask(backend, seed, x, dropout_p)
        return reference.dora_linear(
            x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, fan_in_fan_out,
            keep_mask, exact_norm,
        )  # fmt: skip
    arguments = (
        x, weight, bias, lora_A, lora_B, magnitude, norm, seed, float(scaling), float(dropout_p),
        fan_in_fan_out, bool(exact_norm), keep_z,
    )  # fmt: skip
    if eager_path(x, weight, bias, lora_A, lora_B, magnitude, norm, seed):
        return dora_linear_eager(*arguments, backend)
    return dora_linear_op(*arguments, backend)[0]


__all__ = [
    "AdapterSegments",
    "adapter_bottleneck",
    "adapter_segments",
    "backend_description",
    "dora_linear",
    "dora_row_norms_squared",
    "dora_weight_norm",
    "get_backend",
    "linear_adapter",
    "lora_linear",
    "multi_lora_linear",
    "resolve_backend",
    "set_backend",
    "stack_lora_weights",
]
