"""The fused LoRA linear in Triton: y = x W^T + b + s * (drop(x) A^T) B^T, forward and backward.

Shapes: x [M, K], W [N, K] (nn.Linear) or [K, N] (GPT-2's Conv1D, read through its strides,
never copied), A [r, K], B [N, r], xa = drop(x) A^T [M, r] in float32.

Forward, two launches (one when M <= 16):
  _down_kernel     xa = drop(x) A^T * 1/(1-p), the dropout mask drawn in-kernel from a seed.
  _forward_kernel  y = x W^T + b + s * xa B^T: the low-rank product and the bias are added in
                   the GEMM's epilogue, so y is the only [M, N] tensor written. For small M it
                   also computes xa from the x tiles it already holds (SMALL_M: one launch).
Backward, two launches, saving only x, xa and the seed:
  _grad_out_kernel  one pass over dY: dxa = s * dY B, and dB = s * dY^T xa (atomic adds).
  _grad_in_kernel   dX = dY W + drop'(dxa A), and dA = dxa^T drop(x) (atomic adds) from the same
                    x tile and mask, so the mask is drawn once per backward.
dW and db, only for a trainable base, are plain matmuls (cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdelta.ops.torch_backend import base_grads

from ._common import (
    autotuned,
    block_r,
    dot_precision,
    drop,
    launch,
    load_tile,
    m_bucket,
    mma,
    swizzle,
)

# Rows at or below which the forward is one launch that recomputes xa in every column block.
SMALL_M = 16


def _configs(shapes, extra=None, prune_rank=True):
    """triton.Configs from (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) tuples."""
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **(extra or {})},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in shapes
    ]


# GEMM tiles for Ampere (A100) and Hopper (H100): the usual large-tile bf16 configurations.
_GEMM = _configs(
    [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
    ],
    {"GROUP_M": 8},
)
_SMALL_M = _configs(
    [(16, n, k, s, 4) for n in (32, 64, 128) for k in (64, 128, 256) for s in (3, 4)],
    {"GROUP_M": 1},
)
_ROWS = _configs(
    [
        (m, n, k, s, w)
        for m in (32, 64, 128)
        for n, k in ((64, 64), (128, 128))
        for s, w in ((3, 4), (4, 8))
    ]
)


def _fits_rank(configs, named_args, **kwargs):
    """Drop tiles whose [BLOCK_M, BLOCK_R] float32 low-rank tile would spill registers."""
    rank_tile = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] * rank_tile <= 128 * 128]
    return fitting or configs[-1:]


_PRUNE = {"early_config_prune": _fits_rank}


@autotuned(_ROWS, key=["K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"], prune_configs_by=_PRUNE)
@triton.jit
def _down_kernel(
    x_ptr, a_ptr, xa_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak,
    dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """xa[M, R] = drop(x) A^T / (1 - p), float32. One program per BLOCK_M rows."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
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
        a = load_tile(a_ptr, rk, rr, stride_ak, stride_ar, mask_k, mask_r).to(x.dtype)
        xa = mma(x, a, xa, PRECISION)
    if HAS_DROPOUT:
        xa = xa * dropout_scale
    tl.store(xa_ptr + rm[:, None] * R + rr[None, :], xa, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xa_ptr, y_ptr, seed_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling, dropout_p, dropout_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_XA: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x W^T + b + scaling * xa B^T, one program per [BLOCK_M, BLOCK_N] tile.

    COMPUTE_XA: also accumulate xa = drop(x) A^T from the x tiles of the main loop (and store
    it from the first column of programs); else read the xa that _down_kernel wrote.
    """
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_n = rn < N
    mask_r = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
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
            a = load_tile(a_ptr, rk, rr, stride_ak, stride_ar, mask_k, mask_r).to(x.dtype)
            xa = mma(x, a, xa, PRECISION)
    xa_offsets = rm[:, None] * R + rr[None, :]
    xa_mask = mask_m[:, None] & mask_r[None, :]
    if COMPUTE_XA:
        if HAS_DROPOUT:
            xa = xa * dropout_scale
        if pid_n == 0:
            tl.store(xa_ptr + xa_offsets, xa, mask=xa_mask)
    else:
        xa = tl.load(xa_ptr + xa_offsets, mask=xa_mask, other=0.0)
    b = load_tile(b_ptr, rr, rn, stride_br, stride_bn, mask_r, mask_n).to(tl.float32)
    acc = mma(xa * scaling, b, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


_forward_large = autotuned(
    _GEMM, key=["N", "K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"], prune_configs_by=_PRUNE
)(_forward_kernel)
_forward_small = autotuned(_SMALL_M, key=["N", "K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"])(
    _forward_kernel
)


@autotuned(
    _ROWS,
    key=["N", "BLOCK_R", "NEED_DB", "M_BUCKET"],
    prune_configs_by=_PRUNE,
    reset_to_zero=["db_ptr"],
)
@triton.jit
def _grad_out_kernel(
    dy_ptr, b_ptr, xa_ptr, dxa_ptr, db_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br,
    scaling,
    NEED_DB: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One pass over dY per BLOCK_M rows: dxa = scaling * dY B (float32, stored), and
    dY^T xa added into the float32 buffer db (the launcher applies scaling)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    xa_offsets = rm[:, None] * R + rr[None, :]
    xa_mask = mask_m[:, None] & mask_r[None, :]
    if NEED_DB:
        xa = tl.load(xa_ptr + xa_offsets, mask=xa_mask, other=0.0)
    dxa = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        dy = load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, mask_m, mask_n)
        b = load_tile(b_ptr, rn, rr, stride_bn, stride_br, mask_n, mask_r).to(dy.dtype)
        dxa = mma(dy, b, dxa, PRECISION)
        if NEED_DB:
            partial = mma(tl.trans(dy.to(tl.float32)), xa, None, PRECISION)
            db_offsets = rn[:, None] * R + rr[None, :]
            tl.atomic_add(db_ptr + db_offsets, partial, mask=mask_n[:, None] & mask_r[None, :])
    tl.store(dxa_ptr + xa_offsets, dxa * scaling, mask=xa_mask)


@autotuned(
    _GEMM,
    key=["N", "K", "BLOCK_R", "NEED_DX", "NEED_DA", "HAS_DROPOUT", "M_BUCKET"],
    prune_configs_by=_PRUNE,
    reset_to_zero=["da_ptr"],
)
@triton.jit
def _grad_in_kernel(
    dy_ptr, w_ptr, a_ptr, x_ptr, dxa_ptr, dx_ptr, da_ptr, seed_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_xm, stride_xk,
    dropout_p, dropout_scale,
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Per [BLOCK_M, BLOCK_K] tile of x: dX = dY W + drop'(dxa A) (NEED_DX), and
    dxa^T drop(x) added into the float32 buffer da (NEED_DA). The reduction over N runs in
    BLOCK_N steps."""
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_k = rk < K
    mask_r = rr < R
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    dxa = tl.load(
        dxa_ptr + rm[:, None] * R + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0
    )
    if NEED_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < N
            dy = load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, mask_m, mask_n)
            w = load_tile(w_ptr, rn, rk, stride_wn, stride_wk, mask_n, mask_k)
            acc = mma(dy, w, acc, PRECISION)
        a = load_tile(a_ptr, rr, rk, stride_ar, stride_ak, mask_r, mask_k).to(tl.float32)
        lora = mma(dxa, a, None, PRECISION)
        if HAS_DROPOUT:
            lora = drop(lora, seed, rm, rk, K, dropout_p) * dropout_scale
        acc += lora
        dx_mask = mask_m[:, None] & mask_k[None, :]
        dx_offsets = rm[:, None] * K + rk[None, :]
        tl.store(dx_ptr + dx_offsets, acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)
    if NEED_DA:
        x = load_tile(x_ptr, rm, rk, stride_xm, stride_xk, mask_m, mask_k).to(tl.float32)
        if HAS_DROPOUT:
            x = drop(x, seed, rm, rk, K, dropout_p) * dropout_scale
        partial = mma(tl.trans(dxa), x, None, PRECISION)
        da_offsets = rr[:, None] * K + rk[None, :]
        tl.atomic_add(da_ptr + da_offsets, partial, mask=mask_r[:, None] & mask_k[None, :])


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
        return torch.zeros((), dtype=torch.int64, device=device), 0.0, 1.0
    return seed, dropout_p, 1.0 / (1.0 - dropout_p)


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
    """(y, xa): the fused forward; see the module docstring."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    rank = lora_A.shape[0]
    n = lora_B.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    xa = torch.empty((m, rank), dtype=torch.float32, device=x.device)
    seed, dropout_p, dropout_scale = _dropout_arguments(seed, dropout_p, x.device)
    common = {
        "HAS_DROPOUT": dropout_p > 0,
        "PRECISION": dot_precision(x.dtype),
        "BLOCK_R": block_r(rank),
    }
    small = m <= SMALL_M
    if not small and m > 0:
        launch(
            _down_kernel,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),),
            x2d, lora_A, xa, seed,
            m, k, rank, m_bucket(m),
            *x2d.stride(), *lora_A.stride(),
            dropout_p, dropout_scale,
            **common,
        )  # fmt: skip
    if m > 0:
        launch(
            _forward_small if small else _forward_large,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
            x2d, weight, bias if bias is not None else y, lora_A, lora_B, xa, y, seed,
            m, n, k, rank, m_bucket(m),
            *x2d.stride(), *_weight_strides(weight, fan_in_fan_out), *lora_A.stride(),
            *lora_B.stride(),
            scaling, dropout_p, dropout_scale,
            HAS_BIAS=bias is not None, COMPUTE_XA=small, **common,
        )  # fmt: skip
    leading = x.shape[:-1]
    return y.view(*leading, n), xa.view(*leading, rank)


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
    seed, dropout_p, dropout_scale = _dropout_arguments(seed, dropout_p, x.device)
    grad_x = grad_A = grad_B = None
    precision = dot_precision(x.dtype)
    if (need_x or need_A or need_B) and m > 0:
        grad_xa = torch.empty((m, rank), dtype=torch.float32, device=x.device)
        grad_B32 = torch.zeros((n, rank), dtype=torch.float32, device=x.device)
        launch(
            _grad_out_kernel,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),),
            grad2d, lora_B, xa, grad_xa, grad_B32,
            m, n, rank, m_bucket(m),
            *grad2d.stride(), *lora_B.stride(),
            scaling,
            NEED_DB=need_B, PRECISION=precision, BLOCK_R=block_r(rank),
        )  # fmt: skip
        if need_B:
            grad_B = (grad_B32 * scaling).to(lora_B.dtype)
        if need_x or need_A:
            grad_A32 = torch.zeros((rank, k), dtype=torch.float32, device=x.device)
            grad_x = torch.empty((m, k), dtype=x.dtype, device=x.device) if need_x else None
            launch(
                _grad_in_kernel,
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),),
                grad2d, weight, lora_A, x2d, grad_xa, grad_x if need_x else x2d, grad_A32, seed,
                m, n, k, rank, m_bucket(m),
                *grad2d.stride(), *_weight_strides(weight, fan_in_fan_out), *lora_A.stride(),
                *x2d.stride(),
                dropout_p, dropout_scale,
                NEED_DX=need_x, NEED_DA=need_A, HAS_DROPOUT=dropout_p > 0,
                PRECISION=precision, BLOCK_R=block_r(rank),
            )  # fmt: skip
            grad_x = grad_x.view(x.shape) if need_x else None
            grad_A = grad_A32.to(lora_A.dtype) if need_A else None
    elif m == 0:
        grad_x = torch.zeros_like(x) if need_x else None
        grad_A = torch.zeros_like(lora_A) if need_A else None
        grad_B = torch.zeros_like(lora_B) if need_B else None
    grad_weight, grad_bias = base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B
