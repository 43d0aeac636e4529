"""DoRA's linear in Triton: y = k * (x W^T + s drop(x) A^T B^T) + b, k = magnitude / norm [N].

Forward: the LoRA forward's kernels (lora.py) with the column scale in _forward_kernel's epilogue
(COLUMN_SCALE), on the fused and the composed path alike; the unscaled sum z is written from
the same registers when the backward needs it (STORE_Z). One base GEMM, and no [M, N] pass
besides the output (and z).

Backward:
  _scale_grad_kernel  dZ = dY * k, and in the same pass over dY the column sums of dY * z (for
                      dm = sum(dY * z) / norm) and of dY (db), reduced over row ranges into
                      [S, N] float32 partials that torch sums in a fixed order (no atomics, as
                      in reduction.py). dY is read once, z once.
  then the LoRA backward's kernels on dZ (lora_backward.py), and the norm's own gradient
  (exact_norm) in ATen (`fastdelta.ops.dora_composed`: [N, r]-sized products and two reads of W).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdelta.ops import dora_composed

from . import configs, dispatch
from ._common import (
    INTERPRETED,
    autotuned,
    launch,
    load_tile,
    load_vector,
    m_bucket,
    round_to,
)
from .lora import dropout_arguments, forward_on_path, paths
from .lora_backward import lora_backward

# Programs to aim for, and the fewest rows a split reduces (as in reduction.py): small under
# the interpreter, so the tests' shapes are split too.
TARGET_PROGRAMS = 4 * 132
MIN_ROWS_PER_SPLIT = 32 if INTERPRETED else 256


def _scale_grad_footprint(values: dict) -> configs.Footprint:
    m, n = values["BLOCK_M"], values["BLOCK_N"]
    dy, big_n = values["dy_ptr"], values["N"]
    loads = (configs.tile(m * n, dy, big_n, held="float32"),)
    if values["NEED_DOTS"]:
        loads += (configs.tile(m * n, values["z_ptr"], big_n, held="float32"),)
    return configs.Footprint(
        accumulators=m * n + 3 * n,
        dots=(),
        loads=loads,
        epilogue=(configs.tile(n, values["scale_ptr"], held="float32"),),
        stores=(configs.tile(m * n, values["dz_ptr"], big_n),),
    )


@autotuned(
    configs.SCALE_GRAD,
    key=["N", "ROWS_BUCKET", "NEED_DOTS", "NEED_SUMS"],
    prune_configs_by=configs.prune_by(_scale_grad_footprint, "dy_ptr", "BLOCK_N:N"),
)
@triton.jit
def _scale_grad_kernel(
    dy_ptr, z_ptr, scale_ptr, dz_ptr, dots_ptr, sums_ptr,
    M, N, ROWS_PER_SPLIT, ROWS_BUCKET,
    stride_dym, stride_dyn,
    NEED_DOTS: tl.constexpr, NEED_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (column block, split): dZ = dY * scale over its split's rows (z and dZ
    contiguous [M, N]); with NEED_DOTS the split's column sums of dY * z into dots[split], with
    NEED_SUMS those of dY into sums[split]. dY has any strides (a sum's gradient is stride 0)."""
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = rn < N
    split = tl.program_id(1).to(tl.int64)
    first = split * ROWS_PER_SPLIT
    last = tl.minimum(first + ROWS_PER_SPLIT, M)
    scale = load_vector(scale_ptr, rn, 1, mask_n)
    dots = tl.zeros((BLOCK_N,), tl.float32)
    sums = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(first, last, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask_m = rm < last
        mask = mask_m[:, None] & mask_n[None, :]
        dy = load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, mask_m, mask_n).to(tl.float32)
        offsets = rm[:, None] * N + rn[None, :]
        dz = round_to(dy * scale[None, :], dz_ptr.dtype.element_ty)
        tl.store(dz_ptr + offsets, dz, mask=mask)
        if NEED_DOTS:
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dots += tl.sum(dy * z, 0)
        if NEED_SUMS:
            sums += tl.sum(dy, 0)
    if NEED_DOTS:
        tl.store(dots_ptr + split * N + rn, dots, mask=mask_n)
    if NEED_SUMS:
        tl.store(sums_ptr + split * N + rn, sums, mask=mask_n)


def scale_grad(
    grad2d: torch.Tensor, z2d: torch.Tensor | None, k: torch.Tensor, need_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dZ = dY * k in dY's dtype, the column sums of dY * z or None, the column sums of dY or
    None; sums float32), in one pass: `fastdelta.ops.dora_composed.scale_grad`'s contract."""
    m, n = grad2d.shape
    device = grad2d.device
    grad_z = torch.empty((m, n), dtype=grad2d.dtype, device=device)
    need_dots = z2d is not None
    if m == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=device)
        return grad_z, zeros if need_dots else None, zeros.clone() if need_bias else None
    column_blocks = triton.cdiv(n, 128)
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, column_blocks), m // MIN_ROWS_PER_SPLIT))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), MIN_ROWS_PER_SPLIT) * MIN_ROWS_PER_SPLIT
    splits = triton.cdiv(m, rows_per_split)
    dots = torch.empty((splits, n), dtype=torch.float32, device=device) if need_dots else None
    sums = torch.empty((splits, n), dtype=torch.float32, device=device) if need_bias else None
    launch(
        _scale_grad_kernel,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits),
        grad2d, grad_z if z2d is None else z2d, k, grad_z,
        grad_z if dots is None else dots, grad_z if sums is None else sums,
        m, n, rows_per_split, m_bucket(rows_per_split),
        *grad2d.stride(),
        NEED_DOTS=need_dots, NEED_SUMS=need_bias,
    )  # fmt: skip
    return grad_z, None if dots is None else dots.sum(0), None if sums is None else sums.sum(0)


def dora_forward(
    x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p, fan_in_fan_out,
    keep_z,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(y, xa, z or None): the LoRA forward with k = magnitude / norm in its epilogue; see the
    module docstring. Float32 k (the norm's dtype is float32 for Triton's dtypes)."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    rank, n = lora_A.shape[0], lora_B.shape[0]
    leading = x.shape[:-1]
    if m == 0:
        y = x.new_empty((*leading, n))
        xa = x.new_empty((*leading, rank), dtype=torch.float32)
        return y, xa, y.clone() if keep_z else None
    scale = dora_composed.column_scale(magnitude, norm).to(torch.float32).contiguous()
    seed, dropout_p, _ = dropout_arguments(seed, dropout_p, x.device)
    arguments = (
        x2d, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, scale, keep_z,
    )  # fmt: skip
    key = ("dora_forward", x.device, x.dtype, n, k, rank, m_bucket(m), dropout_p > 0, keep_z)
    candidates = {p: lambda p=p: forward_on_path(p, *arguments) for p in paths(x.dtype)}
    y, xa, z = forward_on_path(dispatch.choose(key, x.device, candidates), *arguments)
    z = None if z is None else z.view(*leading, n)
    return y.view(*leading, n), xa.view(*leading, rank), z


def dora_backward(
    grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, z, seed, scaling, dropout_p,
    fan_in_fan_out, exact_norm, needs,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients of (x, weight, bias, lora_A, lora_B, magnitude); None for those not needed."""
    return dora_composed.dora_backward_using(
        lora_backward, scale_grad, grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, z,
        seed, scaling, dropout_p, fan_in_fan_out, exact_norm, needs,
    )  # fmt: skip
