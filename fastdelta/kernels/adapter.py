"""The fused adapter bottleneck in Triton, forward and backward.

out = residual + s * (act(h D^T + b_d) U^T + b_u); h [M, d_in], D [m, d_in], U [d_out, m],
residual [M, d_out] (h itself for a sequential adapter), pre = h D^T + b_d [M, m] float32.

Forward, m <= MAX_FUSED_RANK (MAX_FMA_BLOCK_R for dots on FMA units): one launch. Each
  program takes BLOCK_M rows, computes their pre-activation over d_in, stores it (small,
  [M, m], for the backward), keeps act(pre) on-chip, and sweeps d_out writing
  out = residual + s * (act U^T + b_u).
Forward, larger m: _forward_kernel writes pre, a program per rank chunk, then _up_kernel
  computes out per [BLOCK_M, BLOCK_N] tile, reducing over m in chunks.
Backward, from h and pre alone (the activation is recomputed):
  _grad_pre_kernel  d(pre) = s * dOut U * act'(pre) (float32), per row block and rank chunk.
  _grad_h_kernel    dh = d(pre) D (+ dOut for a sequential adapter) per [BLOCK_M, BLOCK_N]
                    tile of h, reducing over m in chunks.
  dU = s dOut^T act(pre) with db_u, and dD = d(pre)^T h with db_d: the column sums ride in
  `reduction.transposed_product`, which sums in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._common import (
    MAX_BLOCK_R,
    autotuned,
    dot_precision,
    launch,
    load_tile,
    load_vector,
    loop_chunk,
    m_bucket,
    mma,
    rank_chunk,
    row_block_grid,
    swizzle,
    tile_grid,
)
from .activations import activate, activate_grad
from .reduction import transposed_product

# Bottlenecks up to this size are one tile, kept on-chip between the two products: act(pre) is
# the second product's first operand, held in float32 registers by every warp along its rows
# with the activation's temporaries. Wider ones (and with odd sizes) leave no tile that fits
# registers (the compile suite's measure); the split path costs one more read of pre,
# [M, m] float32, beside out's [M, d_out].
MAX_FUSED_RANK = 64


def _forward_footprint(values: dict) -> configs.Footprint:
    m, k, n, r = (values[name] for name in ("BLOCK_M", "BLOCK_K", "BLOCK_N", "BLOCK_R"))
    d_out, fused = values["D_OUT"], values["FUSED"]
    epilogue, stores = (), (configs.tile(m * r, values["pre_ptr"], values["R"]),)
    if fused:
        epilogue = (
            configs.tile(r * n, values["uw_ptr"], values["R"], held="float32"),
            configs.tile(m * n, values["res_ptr"], d_out, held="float32"),
        )
        stores += (configs.tile(m * n, values["out_ptr"], d_out),)
    # TF32 dots round float32 operands in registers first (ptxas: 255 registers and spills for
    # a 16x128 tile of h with a 128x128 tile of D on sm_90, where the tiles alone fit).
    held = "loaded" if values["h_ptr"].element_size() == 4 and values["PRECISION"] == "tf32" else ""
    return configs.Footprint(
        accumulators=m * r + (m * n if fused else 0),
        dots=((m * r, k), (m * n, r)) if fused else ((m * r, k),),
        loads=(
            configs.tile(m * k, values["h_ptr"], values["D_IN"], held=held),
            configs.tile(k * r, values["dw_ptr"], values["D_IN"], held=held),
        ),
        epilogue=epilogue,
        stores=stores,
        register_operand=(m, r) if fused else (0, 0),
        operand_math=2,
    )


# Float32 temporaries per element of act(pre) while a tile computes it, beyond the value itself:
# ptxas gave the up projection's 32x64 tile with a 64-wide bottleneck (4 warps) 108 registers
# with relu, 218-241 with gelu and 254-255 with gelu_new (spilling on sm_90), all else equal.
_ACTIVATION_MATH = {"gelu": 3, "gelu_new": 3}


def _up_footprint(values: dict) -> configs.Footprint:
    m, n, r = values["BLOCK_M"], values["BLOCK_N"], values["BLOCK_R"]
    d_out = values["D_OUT"]
    return configs.Footprint(
        accumulators=m * n,
        dots=((m * n, r),),
        loads=(
            configs.tile(m * r, values["pre_ptr"], values["R"], held="float32"),
            configs.tile(r * n, values["uw_ptr"], values["R"], held="float32"),
        ),
        epilogue=(configs.tile(m * n, values["res_ptr"], d_out, held="float32"),),
        stores=(configs.tile(m * n, values["out_ptr"], d_out),),
        register_operand=(m, r),
        operand_math=_ACTIVATION_MATH.get(values["ACT"], 2),
    )


def _grad_pre_footprint(values: dict) -> configs.Footprint:
    m, n, r = values["BLOCK_M"], values["BLOCK_N"], values["BLOCK_R"]
    return configs.Footprint(
        accumulators=2 * m * r,  # d(act) and act'(pre)
        dots=((m * r, n),),
        loads=(
            configs.tile(m * n, values["dy_ptr"], values["D_OUT"]),
            configs.tile(n * r, values["uw_ptr"], values["R"]),
        ),
        epilogue=(configs.tile(m * r, values["pre_ptr"], values["R"], held="float32"),),
        stores=(configs.tile(m * r, values["dpre_ptr"], values["R"]),),
    )


def _grad_h_footprint(values: dict) -> configs.Footprint:
    m, n, r = values["BLOCK_M"], values["BLOCK_N"], values["BLOCK_R"]
    dh, d_in = values["dh_ptr"], values["D_IN"]
    epilogue = ()
    if values["SEQUENTIAL"]:
        epilogue = (configs.tile(m * n, values["dy_ptr"], d_in, held="float32"),)
    return configs.Footprint(
        accumulators=m * n,
        dots=((m * n, r),),
        loads=(
            configs.tile(m * r, values["dpre_ptr"], values["R"], held="loaded"),
            configs.tile(r * n, values["dw_ptr"], d_in, held="float32"),
        ),
        epilogue=epilogue,
        stores=(configs.tile(m * n, dh, d_in),),
        register_operand=(m, r),
    )


_KEY = ["D_IN", "D_OUT", "BLOCK_R", "ACT", "M_BUCKET"]
_TILES = configs.make(configs.TILE_SHAPES, names=("BLOCK_M", "BLOCK_N"), extra={"GROUP_M": 8})


@autotuned(
    configs.make(
        [(m, k, k, s, w) for m, k, s, w in configs.ROW_SHAPES],
        names=("BLOCK_M", "BLOCK_K", "BLOCK_N"),
    ),
    key=[*_KEY, "FUSED"],
    prune_configs_by=configs.prune_by(_forward_footprint, "h_ptr", "BLOCK_M:M"),
)
@triton.jit
def _forward_kernel(
    h_ptr, dw_ptr, db_ptr, uw_ptr, ub_ptr, res_ptr, pre_ptr, out_ptr,
    M, D_IN, D_OUT, R, M_BUCKET,
    stride_hm, stride_hk, stride_dr, stride_dk, stride_db, stride_un, stride_ur, stride_ub,
    stride_resm, stride_resn,
    scaling,
    ACT: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    FUSED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (row block, bottleneck chunk): pre = h D^T + b_d for the chunk; FUSED (one
    chunk holds the whole bottleneck): also out = residual + s * (act(pre) U^T + b_u)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    pre = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < D_IN
        h = load_tile(h_ptr, rm, rk, stride_hm, stride_hk, mask_m, mask_k)
        d = load_tile(dw_ptr, rk, rr, stride_dk, stride_dr, mask_k, mask_r)
        pre = mma(h, d, pre, PRECISION)
    if HAS_DOWN_BIAS:
        pre += load_vector(db_ptr, rr, stride_db, mask_r)[None, :]
    tl.store(pre_ptr + rm[:, None] * R + rr[None, :], pre, mask=mask_m[:, None] & mask_r[None, :])
    if FUSED:
        act = activate(pre, ACT)
        for n0 in range(0, D_OUT, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < D_OUT
            u = load_tile(uw_ptr, rr, rn, stride_ur, stride_un, mask_r, mask_n).to(tl.float32)
            up = mma(act, u, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PRECISION)
            _store_out(up, ub_ptr, res_ptr, out_ptr, rm, rn, mask_m, mask_n, D_OUT,
                       stride_ub, stride_resm, stride_resn, scaling, HAS_UP_BIAS)  # fmt: skip


@triton.jit
def _store_out(
    up, ub_ptr, res_ptr, out_ptr, rm, rn, mask_m, mask_n, D_OUT,
    stride_ub, stride_resm, stride_resn, scaling, HAS_UP_BIAS: tl.constexpr,
):  # fmt: skip
    """out[rm, rn] = residual + scaling * (up + b_u)."""
    if HAS_UP_BIAS:
        up += load_vector(ub_ptr, rn, stride_ub, mask_n)[None, :]
    residual = load_tile(res_ptr, rm, rn, stride_resm, stride_resn, mask_m, mask_n)
    out = residual.to(tl.float32) + scaling * up
    mask = mask_m[:, None] & mask_n[None, :]
    offsets = rm.to(tl.int64)[:, None] * D_OUT + rn[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask)


@autotuned(
    _TILES,
    key=["D_OUT", "R", "BLOCK_R", "ACT", "M_BUCKET"],
    prune_configs_by=configs.prune_by(_up_footprint, "res_ptr", "BLOCK_M:M", "BLOCK_N:D_OUT"),
)
@triton.jit
def _up_kernel(
    pre_ptr, uw_ptr, ub_ptr, res_ptr, out_ptr,
    M, D_OUT, R, M_BUCKET,
    stride_un, stride_ur, stride_ub, stride_resm, stride_resn,
    scaling,
    ACT: tl.constexpr, HAS_UP_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out = residual + s * (act(pre) U^T + b_u) per [BLOCK_M, BLOCK_N] tile (large bottlenecks)."""
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D_OUT, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = rm < M
    mask_n = rn < D_OUT
    up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < R
        u = load_tile(uw_ptr, rr, rn, stride_ur, stride_un, mask_r, mask_n).to(tl.float32)
        act = activate(load_tile(pre_ptr, rm, rr, R, 1, mask_m, mask_r), ACT)
        up = mma(act, u, up, PRECISION)
    _store_out(up, ub_ptr, res_ptr, out_ptr, rm, rn, mask_m, mask_n, D_OUT,
               stride_ub, stride_resm, stride_resn, scaling, HAS_UP_BIAS)  # fmt: skip


@autotuned(
    configs.make(configs.ROW_SHAPES, names=("BLOCK_M", "BLOCK_N")),
    key=["D_OUT", "R", "BLOCK_R", "ACT", "M_BUCKET"],
    prune_configs_by=configs.prune_by(_grad_pre_footprint, "dy_ptr", "BLOCK_M:M"),
)
@triton.jit
def _grad_pre_kernel(
    dy_ptr, uw_ptr, pre_ptr, dpre_ptr,
    M, D_OUT, R, M_BUCKET,
    stride_dym, stride_dyn, stride_un, stride_ur,
    scaling,
    ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """d(pre)[:, chunk] = s * (dOut U[:, chunk]) * act'(pre), float32, one pass over dOut.
    Program (row block, bottleneck chunk)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    d_act = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for n0 in range(0, D_OUT, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < D_OUT
        dy = load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, mask_m, mask_n)
        u = load_tile(uw_ptr, rn, rr, stride_un, stride_ur, mask_n, mask_r)
        d_act = mma(dy, u, d_act, PRECISION)
    pre_offsets = rm[:, None] * R + rr[None, :]
    pre_mask = mask_m[:, None] & mask_r[None, :]
    pre = tl.load(pre_ptr + pre_offsets, mask=pre_mask, other=0.0)
    d_pre = d_act * scaling * activate_grad(pre, ACT)
    tl.store(dpre_ptr + pre_offsets, d_pre, mask=pre_mask)


@autotuned(
    _TILES,
    key=["D_IN", "R", "BLOCK_R", "SEQUENTIAL", "M_BUCKET"],
    prune_configs_by=configs.prune_by(_grad_h_footprint, "dh_ptr", "BLOCK_M:M", "BLOCK_N:D_IN"),
)
@triton.jit
def _grad_h_kernel(
    dpre_ptr, dw_ptr, dy_ptr, dh_ptr,
    M, D_IN, R, M_BUCKET,
    stride_dr, stride_dk, stride_dym, stride_dyn,
    SEQUENTIAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dh = d(pre) D (+ dOut when SEQUENTIAL) per [BLOCK_M, BLOCK_N] tile of h."""
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D_IN, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = rm < M
    mask_n = rn < D_IN
    dh = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < R
        d = load_tile(dw_ptr, rr, rn, stride_dr, stride_dk, mask_r, mask_n).to(tl.float32)
        d_pre = load_tile(dpre_ptr, rm, rr, R, 1, mask_m, mask_r)
        dh = mma(d_pre, d, dh, PRECISION)
    if SEQUENTIAL:
        dh += load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, mask_m, mask_n).to(tl.float32)
    dh_mask = mask_m[:, None] & mask_n[None, :]
    dh_offsets = rm[:, None] * D_IN + rn[None, :]
    tl.store(dh_ptr + dh_offsets, dh.to(dh_ptr.dtype.element_ty), mask=dh_mask)


def _stride(vector: torch.Tensor | None) -> int:
    return 0 if vector is None else vector.stride(0)


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
    """(out, pre): the fused forward; see the module docstring. residual None means h."""
    d_in = h.shape[-1]
    h2d = h.reshape(-1, d_in)
    m = h2d.shape[0]
    rank, d_out = down_weight.shape[0], up_weight.shape[0]
    residual2d = h2d if residual is None else residual.reshape(m, d_out)
    out = torch.empty((m, d_out), dtype=h.dtype, device=h.device)
    pre = torch.empty((m, rank), dtype=torch.float32, device=h.device)
    fused = rank <= rank_chunk(rank, h.dtype, MAX_FUSED_RANK)
    chunk = rank_chunk(rank, h.dtype, MAX_FUSED_RANK if fused else MAX_BLOCK_R)
    common = {"ACT": activation, "PRECISION": dot_precision(h.dtype)}
    if m > 0:
        launch(
            _forward_kernel,
            row_block_grid(m, triton.cdiv(rank, chunk)),
            h2d, down_weight, pre if down_bias is None else down_bias, up_weight,
            pre if up_bias is None else up_bias, residual2d, pre, out,
            m, d_in, d_out, rank, m_bucket(m),
            *h2d.stride(), *down_weight.stride(), _stride(down_bias), *up_weight.stride(),
            _stride(up_bias), *residual2d.stride(),
            scaling,
            HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None,
            FUSED=fused, BLOCK_R=chunk, **common,
        )  # fmt: skip
    if m > 0 and not fused:
        launch(
            _up_kernel,
            tile_grid(m, d_out),
            pre, up_weight, pre if up_bias is None else up_bias, residual2d, out,
            m, d_out, rank, m_bucket(m),
            *up_weight.stride(), _stride(up_bias), *residual2d.stride(),
            scaling,
            HAS_UP_BIAS=up_bias is not None, BLOCK_R=loop_chunk(rank, m, h.dtype), **common,
        )  # fmt: skip
    leading = h.shape[:-1]
    return out.view(*leading, d_out), pre.view(*leading, rank)


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
    """Gradients of (h, down_weight, down_bias, up_weight, up_bias); None where not needed."""
    need_h, need_down_weight, need_down_bias, need_up_weight, need_up_bias = needs
    d_in = h.shape[-1]
    h2d = h.reshape(-1, d_in)
    grad2d = grad_out.reshape(-1, grad_out.shape[-1])
    m, d_out = grad2d.shape
    rank = down_weight.shape[0]
    if m == 0:
        likes = (h, down_weight, down_weight[:, 0], up_weight, up_weight[:, 0])
        return tuple(
            torch.zeros_like(like) if needed else None
            for like, needed in zip(likes, needs, strict=True)
        )
    pre2d = pre.reshape(m, rank)
    chunk = rank_chunk(rank, h.dtype)
    precision = dot_precision(h.dtype)
    grad_h = grad_down_weight = grad_down_bias = grad_up_weight = grad_up_bias = None
    if need_up_weight:
        grad_up, grad_up_bias = transposed_product(
            grad2d, pre2d, left_scale=scaling, transform="activation", activation=activation,
            column_sums=need_up_bias,
        )  # fmt: skip
        grad_up_weight = grad_up.to(up_weight.dtype)
    elif need_up_bias:
        grad_up_bias = grad2d.sum(0, dtype=torch.float32) * scaling
    if need_h or need_down_weight or need_down_bias:
        grad_pre = torch.empty((m, rank), dtype=torch.float32, device=h.device)
        launch(
            _grad_pre_kernel,
            row_block_grid(m, triton.cdiv(rank, chunk)),
            grad2d, up_weight, pre2d, grad_pre,
            m, d_out, rank, m_bucket(m),
            *grad2d.stride(), *up_weight.stride(),
            scaling,
            ACT=activation, PRECISION=precision, BLOCK_R=chunk,
        )  # fmt: skip
        if need_down_weight:
            grad_down, grad_down_bias = transposed_product(
                grad_pre, h2d, column_sums=need_down_bias
            )
            grad_down_weight = grad_down.to(down_weight.dtype)
        elif need_down_bias:
            grad_down_bias = grad_pre.sum(0)
        if need_h:
            grad_h = torch.empty((m, d_in), dtype=h.dtype, device=h.device)
            launch(
                _grad_h_kernel,
                tile_grid(m, d_in),
                grad_pre, down_weight, grad2d, grad_h,
                m, d_in, rank, m_bucket(m),
                *down_weight.stride(), *grad2d.stride(),
                SEQUENTIAL=sequential, PRECISION=precision,
                BLOCK_R=loop_chunk(rank, m, h.dtype),
            )  # fmt: skip
            grad_h = grad_h.view(h.shape)
    return (
        grad_h,
        grad_down_weight,
        None if grad_down_bias is None else grad_down_bias.to(down_weight.dtype),
        grad_up_weight,
        None if grad_up_bias is None else grad_up_bias.to(up_weight.dtype),
    )
