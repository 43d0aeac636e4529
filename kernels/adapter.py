"""The fused adapter bottleneck in Triton, forward and backward.

out = residual + s * (act(h D^T + b_d) U^T + b_u); h [M, d_in], D [m, d_in], U [d_out, m],
residual [M, d_out] (h itself for a sequential adapter), pre = h D^T + b_d [M, m] float32.

Forward, m <= MAX_FUSED_RANK: one launch. Each program takes BLOCK_M rows, computes their
  pre-activation over d_in, stores it (small, [M, m], for the backward), keeps act(pre)
  on-chip, and sweeps d_out writing out = residual + s * (act U^T + b_u).
Forward, larger m: _forward_kernel writes pre in BLOCK_R chunks, then _up_kernel computes out
  per [BLOCK_M, BLOCK_N] tile, reducing over m.
Backward (saves h and pre only; the activation is recomputed):
  _grad_out_kernel  one pass over d(out) per [BLOCK_M, BLOCK_R] chunk: d(pre) = s * dOut U *
                    act'(pre) (stored, float32), and dU, db_u, db_d by atomic adds.
  _grad_in_kernel   per [BLOCK_M, BLOCK_K] tile of h: dh = d(pre) D (+ dOut for a sequential
                    adapter), and dD = d(pre)^T h by atomic adds, from the same h tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotuned, block_r, dot_precision, launch, load_tile, m_bucket, mma, swizzle

# Bottlenecks up to this size are one tile, kept on-chip between the two products.
MAX_FUSED_RANK = 256

_SQRT_HALF: tl.constexpr = 0.7071067811865476
_INV_SQRT_2PI: tl.constexpr = 0.3989422804014327
_TANH_C: tl.constexpr = 0.7978845608028654
_TANH_K: tl.constexpr = 0.044715


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def activate(z, ACT: tl.constexpr):
    """act(z) for ACT in relu, gelu (erf), gelu_new (tanh), silu; float32 in and out."""
    if ACT == "relu":
        a = tl.maximum(z, 0.0)
    elif ACT == "gelu":
        a = 0.5 * z * (1.0 + tl.erf(z * _SQRT_HALF))
    elif ACT == "gelu_new":
        a = 0.5 * z * (1.0 + _tanh(_TANH_C * (z + _TANH_K * z * z * z)))
    else:
        a = z * tl.sigmoid(z)
    return a


@triton.jit
def activate_grad(z, ACT: tl.constexpr):
    """d act / dz."""
    if ACT == "relu":
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == "gelu":
        g = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == "gelu_new":
        t = _tanh(_TANH_C * (z + _TANH_K * z * z * z))
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _TANH_C * (1.0 + 3.0 * _TANH_K * z * z)
    else:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    return g


def _configs(shapes, extra=None):
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **(extra or {})},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in shapes
    ]


# Row-block kernels: memory-bound sweeps over d_in or d_out with the bottleneck in registers.
_ROWS = _configs(
    [(m, n, n, s, w) for m in (32, 64, 128) for n in (64, 128) for s, w in ((2, 4), (3, 4), (3, 8))]
)
_TILES = _configs(
    [(128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    {"GROUP_M": 8},
)


def _fits_rank(configs, named_args, **kwargs):
    """Drop row blocks whose [BLOCK_M, BLOCK_R] float32 tiles would spill registers."""
    rank_tile = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] * rank_tile <= 64 * 128]
    return fitting or configs[-1:]


_PRUNE = {"early_config_prune": _fits_rank}
_KEY = ["D_IN", "D_OUT", "R", "ACT", "M_BUCKET"]


@autotuned(_ROWS, key=[*_KEY, "FUSED"], prune_configs_by=_PRUNE)
@triton.jit
def _forward_kernel(
    h_ptr, dw_ptr, db_ptr, uw_ptr, ub_ptr, res_ptr, pre_ptr, out_ptr,
    M, D_IN, D_OUT, R, M_BUCKET,
    stride_hm, stride_hk, stride_dr, stride_dk, stride_un, stride_ur, stride_resm, stride_resn,
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
        d = load_tile(dw_ptr, rk, rr, stride_dk, stride_dr, mask_k, mask_r).to(h.dtype)
        pre = mma(h, d, pre, PRECISION)
    if HAS_DOWN_BIAS:
        pre += tl.load(db_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    tl.store(pre_ptr + rm[:, None] * R + rr[None, :], pre, mask=mask_m[:, None] & mask_r[None, :])
    if FUSED:
        act = activate(pre, ACT)
        for n0 in range(0, D_OUT, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < D_OUT
            u = load_tile(uw_ptr, rr, rn, stride_ur, stride_un, mask_r, mask_n).to(tl.float32)
            up = mma(act, u, None, PRECISION)
            _store_out(up, ub_ptr, res_ptr, out_ptr, rm, rn, mask_m, mask_n, D_OUT,
                       stride_resm, stride_resn, scaling, HAS_UP_BIAS)  # fmt: skip


@triton.jit
def _store_out(up, ub_ptr, res_ptr, out_ptr, rm, rn, mask_m, mask_n, D_OUT,
               stride_resm, stride_resn, scaling, HAS_UP_BIAS: tl.constexpr):  # fmt: skip
    """out[rm, rn] = residual + scaling * (up + b_u)."""
    if HAS_UP_BIAS:
        up += tl.load(ub_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    residual = load_tile(res_ptr, rm, rn, stride_resm, stride_resn, mask_m, mask_n)
    out = residual.to(tl.float32) + scaling * up
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + rm[:, None] * D_OUT + rn[None, :], out.to(out_ptr.dtype.element_ty), mask)


@autotuned(_TILES, key=["D_OUT", "R", "ACT", "M_BUCKET"])
@triton.jit
def _up_kernel(
    pre_ptr, uw_ptr, ub_ptr, res_ptr, out_ptr,
    M, D_OUT, R, M_BUCKET,
    stride_un, stride_ur, stride_resm, stride_resn,
    scaling,
    ACT: tl.constexpr, HAS_UP_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
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
        act = activate(load_tile(pre_ptr, rm, rr, R, 1, mask_m, mask_r), ACT)
        u = load_tile(uw_ptr, rr, rn, stride_ur, stride_un, mask_r, mask_n).to(tl.float32)
        up = mma(act, u, up, PRECISION)
    _store_out(up, ub_ptr, res_ptr, out_ptr, rm, rn, mask_m, mask_n, D_OUT,
               stride_resm, stride_resn, scaling, HAS_UP_BIAS)  # fmt: skip


@autotuned(
    _ROWS,
    key=[*_KEY, "NEED_DU", "NEED_DBU", "NEED_DBD"],
    prune_configs_by=_PRUNE,
    reset_to_zero=["du_ptr", "dbu_ptr", "dbd_ptr"],
)
@triton.jit
def _grad_out_kernel(
    dy_ptr, uw_ptr, pre_ptr, dpre_ptr, du_ptr, dbu_ptr, dbd_ptr,
    M, D_IN, D_OUT, R, M_BUCKET,
    stride_dym, stride_dyn, stride_un, stride_ur,
    scaling,
    ACT: tl.constexpr, NEED_DU: tl.constexpr, NEED_DBU: tl.constexpr, NEED_DBD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (row block, bottleneck chunk), one pass over dOut: d(pre) = s * (dOut U) *
    act'(pre), stored; dOut^T act(pre) into du, column sums of dOut into dbu (first chunk
    only) and of d(pre) into dbd, all float32 atomics (the launcher applies s to du, dbu)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    pre_offsets = rm[:, None] * R + rr[None, :]
    pre_mask = mask_m[:, None] & mask_r[None, :]
    pre = tl.load(pre_ptr + pre_offsets, mask=pre_mask, other=0.0)
    act = activate(pre, ACT)
    d_act = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for n0 in range(0, D_OUT, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < D_OUT
        dy = load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, mask_m, mask_n)
        u = load_tile(uw_ptr, rn, rr, stride_un, stride_ur, mask_n, mask_r).to(dy.dtype)
        d_act = mma(dy, u, d_act, PRECISION)
        if NEED_DU:
            partial = mma(tl.trans(dy.to(tl.float32)), act, None, PRECISION)
            du_mask = mask_n[:, None] & mask_r[None, :]
            tl.atomic_add(du_ptr + rn[:, None] * R + rr[None, :], partial, mask=du_mask)
        if NEED_DBU:  # noqa: SIM102 (a compile-time switch around a run-time test)
            if tl.program_id(1) == 0:
                tl.atomic_add(dbu_ptr + rn, tl.sum(dy.to(tl.float32), 0), mask=mask_n)
    d_pre = d_act * scaling * activate_grad(pre, ACT)
    d_pre = tl.where(pre_mask, d_pre, 0.0)
    tl.store(dpre_ptr + pre_offsets, d_pre, mask=pre_mask)
    if NEED_DBD:
        tl.atomic_add(dbd_ptr + rr, tl.sum(d_pre, 0), mask=mask_r)


@autotuned(
    _TILES,
    key=[*_KEY, "NEED_DH", "NEED_DD", "SEQUENTIAL"],
    prune_configs_by=_PRUNE,
    reset_to_zero=["dd_ptr"],
)
@triton.jit
def _grad_in_kernel(
    dpre_ptr, dw_ptr, h_ptr, dy_ptr, dh_ptr, dd_ptr,
    M, D_IN, D_OUT, R, M_BUCKET,
    stride_dr, stride_dk, stride_hm, stride_hk, stride_dym, stride_dyn,
    ACT: tl.constexpr, NEED_DH: tl.constexpr, NEED_DD: tl.constexpr, SEQUENTIAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Per [BLOCK_M, BLOCK_K] tile of h: dh = d(pre) D (+ dOut when SEQUENTIAL), and
    d(pre)^T h into dd (float32 atomics), reducing over the bottleneck in BLOCK_R chunks."""
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D_IN, BLOCK_K), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_m = rm < M
    mask_k = rk < D_IN
    if NEED_DD:
        h = load_tile(h_ptr, rm, rk, stride_hm, stride_hk, mask_m, mask_k).to(tl.float32)
    dh = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < R
        d_pre = load_tile(dpre_ptr, rm, rr, R, 1, mask_m, mask_r)
        if NEED_DH:
            d = load_tile(dw_ptr, rr, rk, stride_dr, stride_dk, mask_r, mask_k).to(tl.float32)
            dh = mma(d_pre, d, dh, PRECISION)
        if NEED_DD:
            partial = mma(tl.trans(d_pre), h, None, PRECISION)
            dd_mask = mask_r[:, None] & mask_k[None, :]
            tl.atomic_add(dd_ptr + rr[:, None] * D_IN + rk[None, :], partial, mask=dd_mask)
    if NEED_DH:
        if SEQUENTIAL:
            dh += load_tile(dy_ptr, rm, rk, stride_dym, stride_dyn, mask_m, mask_k).to(tl.float32)
        dh_mask = mask_m[:, None] & mask_k[None, :]
        dh_offsets = rm[:, None] * D_IN + rk[None, :]
        tl.store(dh_ptr + dh_offsets, dh.to(dh_ptr.dtype.element_ty), mask=dh_mask)


def _rank_tiling(rank: int) -> tuple[int, int, bool]:
    """(BLOCK_R, number of bottleneck chunks, fused) for a bottleneck of `rank`."""
    if rank <= MAX_FUSED_RANK:
        return block_r(rank), 1, True
    return 128, triton.cdiv(rank, 128), False


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
    tile, chunks, fused = _rank_tiling(rank)
    common = {"ACT": activation, "PRECISION": dot_precision(h.dtype), "BLOCK_R": tile}
    sizes = (m, d_in, d_out, rank, m_bucket(m))
    if m > 0:
        launch(
            _forward_kernel,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), chunks),
            h2d, down_weight, down_bias if down_bias is not None else pre, up_weight,
            up_bias if up_bias is not None else pre, residual2d, pre, out,
            *sizes,
            *h2d.stride(), *down_weight.stride(), *up_weight.stride(), *residual2d.stride(),
            scaling,
            HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None,
            FUSED=fused, **common,
        )  # fmt: skip
    if m > 0 and not fused:
        launch(
            _up_kernel,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),),
            pre, up_weight, up_bias if up_bias is not None else pre, residual2d, out,
            m, d_out, rank, m_bucket(m),
            *up_weight.stride(), *residual2d.stride(),
            scaling,
            HAS_UP_BIAS=up_bias is not None, **common,
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
    pre2d = pre.reshape(m, rank)
    device = h.device
    tile, chunks, _ = _rank_tiling(rank)
    common = {"ACT": activation, "PRECISION": dot_precision(h.dtype), "BLOCK_R": tile}
    sizes = (m, d_in, d_out, rank, m_bucket(m))
    grad_pre = torch.empty((m, rank), dtype=torch.float32, device=device)
    grad_up32 = torch.zeros((d_out, rank), dtype=torch.float32, device=device)
    grad_up_bias32 = torch.zeros(d_out, dtype=torch.float32, device=device)
    grad_down_bias32 = torch.zeros(rank, dtype=torch.float32, device=device)
    grad_down32 = torch.zeros((rank, d_in), dtype=torch.float32, device=device)
    need_pre = need_h or need_down_weight or need_down_bias
    if m > 0 and (need_pre or need_up_weight or need_up_bias):
        launch(
            _grad_out_kernel,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), chunks),
            grad2d, up_weight, pre2d, grad_pre, grad_up32, grad_up_bias32, grad_down_bias32,
            *sizes,
            *grad2d.stride(), *up_weight.stride(),
            scaling,
            NEED_DU=need_up_weight, NEED_DBU=need_up_bias, NEED_DBD=need_down_bias, **common,
        )  # fmt: skip
    grad_h = torch.empty((m, d_in), dtype=h.dtype, device=device) if need_h else None
    if m > 0 and (need_h or need_down_weight):
        launch(
            _grad_in_kernel,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d_in, meta["BLOCK_K"]),),
            grad_pre, down_weight, h2d, grad2d, grad_h if need_h else grad_pre, grad_down32,
            *sizes,
            *down_weight.stride(), *h2d.stride(), *grad2d.stride(),
            NEED_DH=need_h, NEED_DD=need_down_weight, SEQUENTIAL=sequential, **common,
        )  # fmt: skip
    return (
        grad_h.view(h.shape) if need_h else None,
        grad_down32.to(down_weight.dtype) if need_down_weight else None,
        grad_down_bias32.to(down_weight.dtype) if need_down_bias else None,
        (grad_up32 * scaling).to(up_weight.dtype) if need_up_weight else None,
        (grad_up_bias32 * scaling).to(up_weight.dtype) if need_up_bias else None,
    )
