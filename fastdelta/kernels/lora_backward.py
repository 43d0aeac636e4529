"""The fused LoRA linear in Triton, backward, from x, xa and the dropout seed alone.

  _grad_xa_kernel  dxa = s dY B (float32), a program per row block and rank chunk.
  _grad_x_kernel   dX = dY W + drop'(dxa A) / (1 - p), the mask drawn again; composed:
                   cuBLAS's dY W, then the same kernel adds the low-rank term (BASE_IN_DX).
                   `dispatch` picks the faster path per shape bucket; float32 composes (see
                   lora.py).
  dB = s dY^T xa and dA = dxa^T drop(x) / (1 - p): `reduction.transposed_product`, summed in
  a fixed order.
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
    dot_precision,
    drop,
    launch,
    load_tile,
    loop_chunk,
    m_bucket,
    mma,
    rank_chunk,
    row_block_grid,
    swizzle,
    tile_grid,
)
from .lora import dropout_arguments, paths, weight_strides
from .reduction import transposed_product


def _grad_xa_footprint(values: dict) -> configs.Footprint:
    m, k, r = values["BLOCK_M"], values["BLOCK_K"], values["BLOCK_R"]
    return configs.Footprint(
        accumulators=m * r,
        dots=((m * r, k),),
        loads=(
            configs.tile(m * k, values["dy_ptr"], values["N"]),
            configs.tile(k * r, values["b_ptr"], values["R"]),
        ),
        stores=(configs.tile(m * r, values["dxa_ptr"], values["R"]),),
    )


def _grad_x_footprint(values: dict) -> configs.Footprint:
    m, n, k, r = (values[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R"))
    dx, big_k = values["dx_ptr"], values["K"]
    composed, dropout = values["BASE_IN_DX"], values["HAS_DROPOUT"]
    loads = ()
    epilogue = (
        configs.tile(m * r, values["dxa_ptr"], values["R"], held="loaded"),
        configs.tile(r * k, values["a_ptr"], big_k, held="float32"),
    )
    if composed:
        epilogue += (configs.tile(m * k, dx, big_k, held="float32"),)
    else:
        loads = (
            configs.tile(m * n, values["dy_ptr"], values["N"]),
            configs.tile(n * k, values["w_ptr"], values["N"], big_k),
        )
    return configs.Footprint(
        accumulators=m * k * (2 if dropout else 1),
        dots=((m * k, r),) if composed else ((m * k, n), (m * k, r)),
        loads=loads,
        epilogue=epilogue,
        stores=(configs.tile(m * k, dx, big_k),),
        register_operand=(m, r),
        dropped=m * k if dropout else 0,
    )


@autotuned(
    configs.make(configs.ROW_SHAPES, names=("BLOCK_M", "BLOCK_K")),
    key=["N", "BLOCK_R", "M_BUCKET"],
    prune_configs_by=configs.prune_by(_grad_xa_footprint, "dy_ptr", "BLOCK_M:M"),
)
@triton.jit
def _grad_xa_kernel(
    dy_ptr, b_ptr, dxa_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br,
    scaling,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dxa[:, chunk] = scaling * dY B[:, chunk] (float32), BLOCK_K columns of dY a step.
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
    tl.store(dxa_ptr + rm[:, None] * R + rr[None, :], dxa * scaling, mask=dxa_mask)


@triton.jit
def _grad_x_kernel(
    dy_ptr, w_ptr, a_ptr, dxa_ptr, dx_ptr, seed_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, BASE_IN_DX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dX = dY W + drop'(dxa A) / (1 - p) per [BLOCK_M, BLOCK_K] tile; with BASE_IN_DX, dX
    already holds dY W (cuBLAS's) and only the low-rank term is added."""
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
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < R
        dxa_mask = mask_m[:, None] & mask_r[None, :]
        dxa = tl.load(dxa_ptr + rm[:, None] * R + rr[None, :], mask=dxa_mask, other=0.0)
        a = load_tile(a_ptr, rr, rk, stride_ar, stride_ak, mask_r, mask_k)
        lora = mma(dxa, a.to(tl.float32) * dropout_scale, lora, PRECISION)
    if HAS_DROPOUT:
        acc += drop(lora, tl.load(seed_ptr), rm, rk, K, dropout_p)
    else:
        acc = lora
    tl.store(dx_ptr + dx_offsets, acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


_GRAD_X_KEY = ["N", "K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"]
_grad_x_fused = autotuned(
    configs.GEMM,
    key=_GRAD_X_KEY,
    prune_configs_by=configs.prune_by(_grad_x_footprint, "dy_ptr", "BLOCK_N:N", "BLOCK_K:K"),
)(_grad_x_kernel)
_add_low_rank_grad = autotuned(
    configs.make(configs.TILE_SHAPES, names=("BLOCK_M", "BLOCK_K"), extra={"GROUP_M": 8}),
    key=["K", "R", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"],
    prune_configs_by=configs.prune_by(_grad_x_footprint, "dx_ptr", "BLOCK_M:M", "BLOCK_K:K"),
    restore_value=["dx_ptr"],  # it adds onto dX = dY W in place (see lora._add_low_rank)
)(_grad_x_kernel)


def _grad_x(path, grad2d, weight, lora_A, dxa, seed, dropout_p, fan_in_fan_out):
    """dX = dY W + drop'(dxa A) / (1 - p) by `path`, "fused" or "composed"."""
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
        *grad2d.stride(), *weight_strides(weight, fan_in_fan_out), *lora_A.stride(),
        dropout_p, 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=dropout_p > 0, BASE_IN_DX=path == "composed",
        PRECISION=dot_precision(grad2d.dtype), BLOCK_R=loop_chunk(rank, m, grad2d.dtype),
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
    seed, dropout_p, dropout_scale = dropout_arguments(seed, dropout_p, x.device)
    grad_x = grad_A = grad_B = None
    if need_B:
        product, _ = transposed_product(grad2d, xa.reshape(m, rank), left_scale=scaling)
        grad_B = product.to(lora_B.dtype)
    if need_x or need_A:
        chunk = rank_chunk(rank, x.dtype)
        grad_xa = torch.empty((m, rank), dtype=torch.float32, device=x.device)
        launch(
            _grad_xa_kernel,
            row_block_grid(m, triton.cdiv(rank, chunk)),
            grad2d, lora_B, grad_xa,
            m, n, rank, m_bucket(m),
            *grad2d.stride(), *lora_B.stride(),
            scaling,
            PRECISION=dot_precision(x.dtype), BLOCK_R=chunk,
        )  # fmt: skip
        if need_A:
            product, _ = transposed_product(
                grad_xa, x2d, left_scale=dropout_scale,
                transform="dropout" if dropout_p > 0 else "none", seed=seed, dropout_p=dropout_p,
            )  # fmt: skip
            grad_A = product.to(lora_A.dtype)
        if need_x:
            arguments = (grad2d, weight, lora_A, grad_xa, seed, dropout_p, fan_in_fan_out)
            key = ("lora_grad_x", x.device, x.dtype, n, k, rank, m_bucket(m), dropout_p > 0)
            candidates = {p: lambda p=p: _grad_x(p, *arguments) for p in paths(x.dtype)}
            grad_x = _grad_x(dispatch.choose(key, x.device, candidates), *arguments).view(x.shape)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B
