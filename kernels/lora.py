"""The fused LoRA linear in Triton: y = x W^T + b + s * (drop(x) A^T) B^T, forward and backward.

Shapes: x [M, K], W [N, K] (nn.Linear) or [K, N] (GPT-2's Conv1D, read through its strides,
never copied), A [r, K], B [N, r], xa = drop(x) A^T / (1 - p) [M, r] in float32. A rank wider
than MAX_BLOCK_R is split into chunks: one program per chunk where the chunk is a result
(xa, dxa), a loop over the chunks where the rank is reduced over (the epilogues).

Forward, fused (one launch when M <= SMALL_M and the rank is one chunk, else two):
  _down_kernel     xa = drop(x) A^T / (1 - p), the dropout mask drawn in-kernel from a seed.
  _forward_kernel  y = x W^T + b + s * xa B^T: the low-rank product and the bias are added in
                   the GEMM's epilogue, so y is the only [M, N] tensor written. For small M it
                   also computes xa from the x tiles it holds (COMPUTE_XA: one launch).
Forward, composed: cuBLAS writes y = x W^T + b, and _forward_kernel (BASE_IN_Y) adds s * xa B^T
  into it. `dispatch` picks the faster per shape bucket; float32 with TF32 off always composes
  (its tl.dot would run the main GEMM on FMA units).
Backward, from x, xa and the seed alone:
  _grad_xa_kernel  dxa = s / (1 - p) * dY B (float32).
  _grad_x_kernel   dX = dY W + drop'(dxa A), the mask drawn again; composed: cuBLAS's dY W,
                   then the same kernel adds the low-rank term (BASE_IN_DX).
  dB = s dY^T xa and dA = dxa^T drop(x): `reduction.transposed_product`, in a fixed order.
dW and db, only for a trainable base, are plain matmuls (cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdelta.ops.torch_backend import base_grads, base_weight

from . import configs, dispatch
from ._common import (
    autotuned,
    block_r,
    dot_precision,
    drop,
    launch,
    load_tile,
    load_vector,
    m_bucket,
    mma,
    row_block_grid,
    swizzle,
    tile_grid,
    unused_seed,
)
from .reduction import transposed_product

# Rows at or below which the fused forward is one launch that recomputes xa per column block.
SMALL_M = 16


def _rows_footprint(values: dict) -> configs.Footprint:
    """_down_kernel and _grad_xa_kernel: a [BLOCK_M, BLOCK_R] result, BLOCK_K a step."""
    m, k, r = values["BLOCK_M"], values["BLOCK_K"], values["BLOCK_R"]
    return configs.Footprint(accumulators=m * r, stage=m * k + k * r)


def _forward_footprint(values: dict) -> configs.Footprint:
    m, n, k, r = (values[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R"))
    with_xa = values["COMPUTE_XA"]
    main_loop = 0 if values["BASE_IN_Y"] else m * k + k * n + (k * r if with_xa else 0)
    return configs.Footprint(
        accumulators=m * n + (m * r if with_xa else 0), stage=main_loop, epilogue=m * r + r * n
    )


def _grad_x_footprint(values: dict) -> configs.Footprint:
    m, n, k, r = (values[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R"))
    main_loop = 0 if values["BASE_IN_DX"] else m * n + n * k
    lora = m * k if values["HAS_DROPOUT"] else 0
    return configs.Footprint(accumulators=m * k + lora, stage=main_loop, epilogue=m * r + r * k)


def _prune(footprint, operand, *fitted):
    return {"early_config_prune": configs.pruner(footprint, operand, fitted)}


@autotuned(
    configs.make(configs.ROW_SHAPES, names=("BLOCK_M", "BLOCK_K")),
    key=["K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"],
    prune_configs_by=_prune(_rows_footprint, "x_ptr", "BLOCK_M:M"),
)
@triton.jit
def _down_kernel(
    x_ptr, a_ptr, xa_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak,
    dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """xa[:, chunk] = drop(x) A[chunk]^T / (1 - p), float32. Program (row block, rank chunk)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    xa = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        x = load_tile(x_ptr, rm, rk, stride_xm, stride_xk, mask_m, mask_k)
        if HAS_DROPOUT:
            x = drop(x, seed, rm, rk, K, dropout_p)
        a = load_tile(a_ptr, rk, rr, stride_ak, stride_ar, mask_k, mask_r)
        xa = mma(x, a, xa, PRECISION)
    xa_mask = mask_m[:, None] & mask_r[None, :]
    tl.store(xa_ptr + rm[:, None] * R + rr[None, :], xa * dropout_scale, mask=xa_mask)


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xa_ptr, y_ptr, seed_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_ar, stride_ak, stride_bn, stride_br,
    scaling, dropout_p, dropout_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_XA: tl.constexpr,
    BASE_IN_Y: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x W^T + b + scaling * xa B^T, one program per [BLOCK_M, BLOCK_N] tile.

    COMPUTE_XA (rank of one chunk): also accumulate xa = drop(x) A^T from the x tiles of the
    main loop (stored by the first column of programs); else read the xa _down_kernel wrote.
    BASE_IN_Y: y already holds x W^T + b (cuBLAS's); only add the low-rank product.
    """
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_n = rn < N
    y_offsets = rm[:, None] * N + rn[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    xa = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    if BASE_IN_Y:
        acc = tl.load(y_ptr + y_offsets, mask=y_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        seed = tl.load(seed_ptr) if HAS_DROPOUT and COMPUTE_XA else 0
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            x = load_tile(x_ptr, rm, rk, stride_xm, stride_xk, mask_m, mask_k)
            w = load_tile(w_ptr, rk, rn, stride_wk, stride_wn, mask_k, mask_n)
            acc = mma(x, w, acc, PRECISION)
            if COMPUTE_XA:
                if HAS_DROPOUT:
                    x = drop(x, seed, rm, rk, K, dropout_p)
                a = load_tile(a_ptr, rk, rr, stride_ak, stride_ar, mask_k, rr < R)
                xa = mma(x, a, xa, PRECISION)
        if HAS_BIAS:
            acc += load_vector(bias_ptr, rn, stride_bias, mask_n)[None, :]
    if COMPUTE_XA:
        xa = xa * dropout_scale
        xa_mask = mask_m[:, None] & (rr < R)[None, :]
        if pid_n == 0:
            tl.store(xa_ptr + rm[:, None] * R + rr[None, :], xa, mask=xa_mask)
        b = load_tile(b_ptr, rr, rn, stride_br, stride_bn, rr < R, mask_n)
        acc = mma(xa * scaling, b.to(tl.float32), acc, PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            chunk = r0 + rr
            mask_r = chunk < R
            xa_mask = mask_m[:, None] & mask_r[None, :]
            xa = tl.load(xa_ptr + rm[:, None] * R + chunk[None, :], mask=xa_mask, other=0.0)
            b = load_tile(b_ptr, chunk, rn, stride_br, stride_bn, mask_r, mask_n)
            acc = mma(xa * scaling, b.to(tl.float32), acc, PRECISION)
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


_FORWARD_KEY = ["N", "K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"]
_forward_large = autotuned(
    configs.GEMM,
    key=_FORWARD_KEY,
    prune_configs_by=_prune(_forward_footprint, "x_ptr", "BLOCK_N:N", "BLOCK_K:K"),
)(_forward_kernel)
_forward_small = autotuned(
    configs.SMALL_M,
    key=_FORWARD_KEY,
    prune_configs_by=_prune(_forward_footprint, "x_ptr", "BLOCK_N:N", "BLOCK_K:K"),
)(_forward_kernel)
_add_low_rank = autotuned(
    configs.make(configs.TILE_SHAPES, names=("BLOCK_M", "BLOCK_N"), extra={"GROUP_M": 8}),
    key=["N", "R", "BLOCK_R", "M_BUCKET"],
    prune_configs_by=_prune(_forward_footprint, "y_ptr", "BLOCK_M:M", "BLOCK_N:N"),
)(_forward_kernel)


@autotuned(
    configs.make(configs.ROW_SHAPES, names=("BLOCK_M", "BLOCK_K")),
    key=["N", "BLOCK_R", "M_BUCKET"],
    prune_configs_by=_prune(_rows_footprint, "dy_ptr", "BLOCK_M:M"),
)
@triton.jit
def _grad_xa_kernel(
    dy_ptr, b_ptr, dxa_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br,
    scale,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dxa[:, chunk] = scale * dY B[:, chunk] (float32), BLOCK_K columns of dY a step.
    Program (row block, rank chunk)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    dxa = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for n0 in range(0, N, BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        mask_n = rn < N
        dy = load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, mask_m, mask_n)
        b = load_tile(b_ptr, rn, rr, stride_bn, stride_br, mask_n, mask_r)
        dxa = mma(dy, b, dxa, PRECISION)
    dxa_mask = mask_m[:, None] & mask_r[None, :]
    tl.store(dxa_ptr + rm[:, None] * R + rr[None, :], dxa * scale, mask=dxa_mask)


@triton.jit
def _grad_x_kernel(
    dy_ptr, w_ptr, a_ptr, dxa_ptr, dx_ptr, seed_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    dropout_p,
    HAS_DROPOUT: tl.constexpr, BASE_IN_DX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dX = dY W + drop'(dxa A) per [BLOCK_M, BLOCK_K] tile (dxa carries s / (1 - p)); with
    BASE_IN_DX, dX already holds dY W (cuBLAS's) and only the low-rank term is added."""
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_m = rm < M
    mask_k = rk < K
    dx_offsets = rm[:, None] * K + rk[None, :]
    dx_mask = mask_m[:, None] & mask_k[None, :]
    if BASE_IN_DX:
        acc = tl.load(dx_ptr + dx_offsets, mask=dx_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < N
            dy = load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, mask_m, mask_n)
            w = load_tile(w_ptr, rn, rk, stride_wn, stride_wk, mask_n, mask_k)
            acc = mma(dy, w, acc, PRECISION)
    lora = tl.zeros((BLOCK_M, BLOCK_K), tl.float32) if HAS_DROPOUT else acc
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < R
        dxa_mask = mask_m[:, None] & mask_r[None, :]
        dxa = tl.load(dxa_ptr + rm[:, None] * R + rr[None, :], mask=dxa_mask, other=0.0)
        a = load_tile(a_ptr, rr, rk, stride_ar, stride_ak, mask_r, mask_k)
        lora = mma(dxa, a.to(tl.float32), lora, PRECISION)
    if HAS_DROPOUT:
        acc += drop(lora, tl.load(seed_ptr), rm, rk, K, dropout_p)
    else:
        acc = lora
    tl.store(dx_ptr + dx_offsets, acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


_GRAD_X_KEY = ["N", "K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"]
_grad_x_fused = autotuned(
    configs.GEMM,
    key=_GRAD_X_KEY,
    prune_configs_by=_prune(_grad_x_footprint, "dy_ptr", "BLOCK_N:N", "BLOCK_K:K"),
)(_grad_x_kernel)
_add_low_rank_grad = autotuned(
    configs.make(configs.TILE_SHAPES, names=("BLOCK_M", "BLOCK_K"), extra={"GROUP_M": 8}),
    key=["K", "R", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"],
    prune_configs_by=_prune(_grad_x_footprint, "dx_ptr", "BLOCK_M:M", "BLOCK_K:K"),
)(_grad_x_kernel)


@triton.jit
def _keep_mask_kernel(keep_ptr, seed_ptr, M, K, dropout_p, BLOCK: tl.constexpr):
    """The dropout keep-mask the kernels above draw for an [M, K] input, as int8 (for tests)."""
    rm = tl.program_id(0).to(tl.int64)
    rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ones = tl.full((1, BLOCK), 1, tl.int8)
    keep = drop(ones, tl.load(seed_ptr), rm + tl.zeros((1,), tl.int64), rk, K, dropout_p)
    tl.store(keep_ptr + rm * K + rk[None, :], keep, mask=(rk < K)[None, :])


def _weight_strides(weight: torch.Tensor, fan_in_fan_out: bool) -> tuple[int, int]:
    """(stride along N, stride along K) of the base weight, for either layout."""
    if fan_in_fan_out:
        return weight.stride(1), weight.stride(0)
    return weight.stride(0), weight.stride(1)


def _dropout_arguments(seed: torch.Tensor | None, dropout_p: float, device: torch.device):
    if seed is None:
        return unused_seed(device), 0.0, 1.0
    return seed, dropout_p, 1.0 / (1.0 - dropout_p)


def _paths(dtype: torch.dtype) -> tuple[str, ...]:
    """The forward and dX paths that can run `dtype`: float32 with TF32 off only composes."""
    if dot_precision(dtype) == "ieee":
        return ("composed",)
    return dispatch.PATHS


def dropout_keep_mask(seed: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The boolean keep-mask that these kernels draw from `seed` for an input of `shape`."""
    k = shape[-1]
    m = 1
    for size in shape[:-1]:
        m *= size
    keep = torch.empty((m, k), dtype=torch.int8, device=seed.device)
    block = 32
    launch(_keep_mask_kernel, (m, triton.cdiv(k, block)), keep, seed, m, k, p, BLOCK=block)
    return keep.bool().view(shape)


def _down(x2d, lora_A, seed, dropout_p, dropout_scale, chunk):
    """xa = drop(x) A^T / (1 - p), [M, r] float32."""
    m, k = x2d.shape
    rank = lora_A.shape[0]
    xa = torch.empty((m, rank), dtype=torch.float32, device=x2d.device)
    launch(
        _down_kernel,
        row_block_grid(m, triton.cdiv(rank, chunk)),
        x2d, lora_A, xa, seed,
        m, k, rank, m_bucket(m),
        *x2d.stride(), *lora_A.stride(),
        dropout_p, dropout_scale,
        HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(x2d.dtype), BLOCK_R=chunk,
    )  # fmt: skip
    return xa


def _forward(path, x2d, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out):
    """(y, xa) of the forward by `path`, "fused" or "composed"."""
    m, k = x2d.shape
    rank, n = lora_A.shape[0], lora_B.shape[0]
    dropout_scale = 1.0 / (1.0 - dropout_p)
    chunk = block_r(rank)
    one_launch = path == "fused" and m <= SMALL_M and rank <= chunk
    if one_launch:
        xa = torch.empty((m, rank), dtype=torch.float32, device=x2d.device)
    else:
        xa = _down(x2d, lora_A, seed, dropout_p, dropout_scale, chunk)
    if path == "composed":
        y = torch.nn.functional.linear(x2d, base_weight(weight, fan_in_fan_out), bias)
        kernel, bias = _add_low_rank, None
    else:
        y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        kernel = _forward_small if m <= SMALL_M else _forward_large
    extra = {"BLOCK_K": 16} if path == "composed" else {}
    launch(
        kernel,
        tile_grid(m, n),
        x2d, weight, y if bias is None else bias, lora_A, lora_B, xa, y, seed,
        m, n, k, rank, m_bucket(m),
        *x2d.stride(), *_weight_strides(weight, fan_in_fan_out),
        0 if bias is None else bias.stride(0), *lora_A.stride(), *lora_B.stride(),
        scaling, dropout_p, dropout_scale,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, COMPUTE_XA=one_launch,
        BASE_IN_Y=path == "composed", PRECISION=dot_precision(x2d.dtype), BLOCK_R=chunk,
        **extra,
    )  # fmt: skip
    return y, xa


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
    """(y, xa): the forward; see the module docstring."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    rank, n = lora_A.shape[0], lora_B.shape[0]
    leading = x.shape[:-1]
    if m == 0:
        y = x.new_empty((*leading, n))
        return y, x.new_empty((*leading, rank), dtype=torch.float32)
    seed, dropout_p, _ = _dropout_arguments(seed, dropout_p, x.device)
    arguments = (x2d, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out)
    key = ("lora_forward", x.device, x.dtype, n, k, rank, m_bucket(m), dropout_p > 0)
    candidates = {path: lambda path=path: _forward(path, *arguments) for path in _paths(x.dtype)}
    y, xa = _forward(dispatch.choose(key, x.device, candidates), *arguments)
    return y.view(*leading, n), xa.view(*leading, rank)


def _grad_x(path, grad2d, weight, lora_A, dxa, seed, dropout_p, fan_in_fan_out):
    """dX = dY W + drop'(dxa A) by `path`, "fused" or "composed"."""
    m, n = grad2d.shape
    rank, k = lora_A.shape
    if path == "composed":
        grad_x = grad2d @ base_weight(weight, fan_in_fan_out)
        kernel, extra = _add_low_rank_grad, {"BLOCK_N": 16}
    else:
        grad_x = torch.empty((m, k), dtype=grad2d.dtype, device=grad2d.device)
        kernel, extra = _grad_x_fused, {}
    launch(
        kernel,
        tile_grid(m, k, "BLOCK_K"),
        grad2d, weight, lora_A, dxa, grad_x, seed,
        m, n, k, rank, m_bucket(m),
        *grad2d.stride(), *_weight_strides(weight, fan_in_fan_out), *lora_A.stride(),
        dropout_p,
        HAS_DROPOUT=dropout_p > 0, BASE_IN_DX=path == "composed",
        PRECISION=dot_precision(grad2d.dtype), BLOCK_R=block_r(rank),
        **extra,
    )  # fmt: skip
    return grad_x


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
    need_x, need_weight, need_bias, need_A, need_B = needs
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    grad2d = grad_y.reshape(-1, grad_y.shape[-1])
    m, n = grad2d.shape
    rank = lora_A.shape[0]
    grad_weight, grad_bias = base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias)
    if m == 0:
        grad_x, grad_A, grad_B = (
            torch.zeros_like(tensor) if needed else None
            for tensor, needed in ((x, need_x), (lora_A, need_A), (lora_B, need_B))
        )
        return grad_x, grad_weight, grad_bias, grad_A, grad_B
    seed, dropout_p, dropout_scale = _dropout_arguments(seed, dropout_p, x.device)
    grad_x = grad_A = grad_B = None
    if need_B:
        product, _ = transposed_product(grad2d, xa.reshape(m, rank), scale=scaling)
        grad_B = product.to(lora_B.dtype)
    if need_x or need_A:
        chunk = block_r(rank)
        grad_xa = torch.empty((m, rank), dtype=torch.float32, device=x.device)
        launch(
            _grad_xa_kernel,
            row_block_grid(m, triton.cdiv(rank, chunk)),
            grad2d, lora_B, grad_xa,
            m, n, rank, m_bucket(m),
            *grad2d.stride(), *lora_B.stride(),
            scaling * dropout_scale,
            PRECISION=dot_precision(x.dtype), BLOCK_R=chunk,
        )  # fmt: skip
        if need_A:
            transform = "dropout" if dropout_p > 0 else "none"
            product, _ = transposed_product(
                grad_xa, x2d, transform=transform, seed=seed, dropout_p=dropout_p
            )
            grad_A = product.to(lora_A.dtype)
        if need_x:
            arguments = (grad2d, weight, lora_A, grad_xa, seed, dropout_p, fan_in_fan_out)
            key = ("lora_grad_x", x.device, x.dtype, n, k, rank, m_bucket(m), dropout_p > 0)
            candidates = {p: lambda p=p: _grad_x(p, *arguments) for p in _paths(x.dtype)}
            grad_x = _grad_x(dispatch.choose(key, x.device, candidates), *arguments).view(x.shape)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B
