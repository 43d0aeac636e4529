"""The fused LoRA linear in Triton, forward: y = x W^T + b + s * (drop(x) A^T) B^T.

Shapes: x [M, K], W [N, K] (nn.Linear) or [K, N] (GPT-2's Conv1D, read through its strides,
never copied), A [r, K], B [N, r], xa = drop(x) A^T / (1 - p) [M, r] in float32. A wide rank
is split into chunks (see _common.rank_chunk): one program per chunk where the chunk is a
result (xa), a loop over the chunks where the rank is reduced over (the epilogue).

Fused (one launch when M <= SMALL_M and the rank is one epilogue chunk, else two):
  _down_kernel     xa = drop(x) A^T / (1 - p), the dropout mask drawn in-kernel from a seed.
  _forward_kernel  y = x W^T + b + s * xa B^T: the low-rank product and the bias are added in
                   the GEMM's epilogue, so y is the only [M, N] tensor written. For small M it
                   also computes xa from the x tiles it holds (COMPUTE_XA: one launch).
Composed: cuBLAS writes y = x W^T + b, and _forward_kernel (BASE_IN_Y) adds s * xa B^T into
  it. `dispatch` picks the faster per shape bucket for float16 and bfloat16. Float32 always
  composes: its tl.dot would run the GEMM on FMA units (TF32 off) or, on sm_90, copy
  transposed float32 tiles to shared memory 4 bytes at a time (TF32 on); cuBLAS does neither.
DoRA (COLUMN_SCALE; kernels/dora.py) scales the sum per column in the same epilogue, on either
  path: y = k * (x W^T + s xa B^T) + b, the bias after the scale (so cuBLAS writes x W^T alone),
  and with STORE_Z also writes the unscaled sum z, which DoRA's backward needs.
The backward is in lora_backward.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdelta.ops.torch_backend import base_weight

from . import configs, dispatch
from ._common import (
    autotuned,
    dot_precision,
    drop,
    launch,
    load_tile,
    load_vector,
    loop_chunk,
    m_bucket,
    mma,
    rank_chunk,
    round_to,
    row_block_grid,
    swizzle,
    tile_grid,
    unused_seed,
)

# Rows at or below which the fused forward is one launch that recomputes xa per column block.
SMALL_M = 16


def _down_footprint(values: dict) -> configs.Footprint:
    m, k, r = values["BLOCK_M"], values["BLOCK_K"], values["BLOCK_R"]
    dropout = values["HAS_DROPOUT"]
    tf32 = values["x_ptr"].element_size() == 4 and values["PRECISION"] == "tf32"
    rounded = configs.tf32_operand_registers(m, k, r, values["num_warps"], dropout) if tf32 else 0
    return configs.Footprint(
        accumulators=m * r,
        dots=((m * r, k),),
        loads=(
            configs.tile(m * k, values["x_ptr"], values["K"], held="loaded" if dropout else ""),
            configs.tile(k * r, values["a_ptr"], values["K"]),
        ),
        stores=(configs.tile(m * r, values["xa_ptr"], values["R"]),),
        dropped=m * k if dropout else 0,
        measured=rounded,
    )


# A 16-row tile that also accumulates xa (the decode forward's one launch) needs far more
# registers than its tiles account for, growing with BLOCK_N (its 4 warps all lie along N, and
# x feeds two dots of different shapes): ptxas measured 104-191 registers where the model gave
# 41-62, and spills from BLOCK_N=128 on (bf16 and fp16, sm_80 and sm_90). Per thread, for 4
# warps: 1.4 per column and 0.6 per K step, fitted to those counts. With x's or W's loads not
# vectorised, no tile of it fits registers with dropout (and some spill without), so it runs
# only on aligned operands; elsewhere _down_kernel computes xa first.
_DECODE_XA_REGISTERS = 128


def _forward_footprint(values: dict) -> configs.Footprint:
    m, n, k, r = (values[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R"))
    with_xa, composed = values["COMPUTE_XA"], values["BASE_IN_Y"]
    y, xa, big_r = values["y_ptr"], values["xa_ptr"], values["R"]
    loads, epilogue = (), (configs.tile(r * n, values["b_ptr"], big_r, held="float32"),)
    stores = (configs.tile(m * n, y, values["N"]), configs.tile(m * r, xa, big_r))
    if values["COLUMN_SCALE"]:
        epilogue += (configs.tile(n, values["scale_ptr"], held="float32"),)
    if values["STORE_Z"]:
        stores += (configs.tile(m * n, values["z_ptr"], values["N"]),)
    if composed:
        epilogue += (configs.tile(m * n, y, values["N"], held="float32"),)
    else:
        loads = (
            configs.tile(m * k, values["x_ptr"], values["K"]),
            configs.tile(k * n, values["w_ptr"], values["K"], values["N"]),
        )
        if with_xa:
            loads += (configs.tile(k * r, values["a_ptr"], values["K"]),)
    if not with_xa:
        epilogue += (configs.tile(m * r, xa, big_r, held="float32"),)
    return configs.Footprint(
        accumulators=m * n + (m * r if with_xa else 0),
        dots=((m * n, r),) if composed else ((m * n, k), (m * n, r)),
        loads=loads,
        epilogue=epilogue,
        stores=stores,
        register_operand=(m, r),
        dropped=m * k if with_xa and values["HAS_DROPOUT"] else 0,
        measured=_DECODE_XA_REGISTERS * (1.4 * n + 0.6 * k) if with_xa and m == 16 else 0.0,
    )


@autotuned(
    configs.make(configs.ROW_SHAPES, names=("BLOCK_M", "BLOCK_K")),
    key=["K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"],
    prune_configs_by=configs.prune_by(_down_footprint, "x_ptr", "BLOCK_M:M"),
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
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xa_ptr, y_ptr, seed_ptr, scale_ptr, z_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_ar, stride_ak, stride_bn, stride_br,
    scaling, dropout_p, dropout_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_XA: tl.constexpr,
    BASE_IN_Y: tl.constexpr, COLUMN_SCALE: tl.constexpr, STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x W^T + b + scaling * xa B^T, one program per [BLOCK_M, BLOCK_N] tile.

    COMPUTE_XA (rank of one chunk): also accumulate xa = drop(x) A^T from the x tiles of the
    main loop (stored by the first column of programs); else read the xa _down_kernel wrote.
    BASE_IN_Y: y already holds x W^T (+ b, without COLUMN_SCALE; cuBLAS's); only add the
    low-rank product. COLUMN_SCALE (DoRA): y = scale * (x W^T + scaling * xa B^T) + b, scale
    [N] float32, the bias added after the scale; STORE_Z also writes the unscaled sum to z.
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
        if HAS_BIAS and not COLUMN_SCALE:
            acc += load_vector(bias_ptr, rn, stride_bias, mask_n)[None, :]
    if COMPUTE_XA:
        xa = xa * dropout_scale
        xa_mask = mask_m[:, None] & (rr < R)[None, :]
        if pid_n == 0:
            tl.store(xa_ptr + rm[:, None] * R + rr[None, :], xa, mask=xa_mask)
        b = load_tile(b_ptr, rr, rn, stride_br, stride_bn, rr < R, mask_n)
        acc = mma(xa * scaling, b.to(tl.float32), acc, PRECISION)
    else:
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
            chunk = r0 + rr
            mask_r = chunk < R
            xa_mask = mask_m[:, None] & mask_r[None, :]
            xa = tl.load(xa_ptr + rm[:, None] * R + chunk[None, :], mask=xa_mask, other=0.0)
            b = load_tile(b_ptr, chunk, rn, stride_br, stride_bn, mask_r, mask_n)
            acc = mma(xa * scaling, b.to(tl.float32), acc, PRECISION)
    if COLUMN_SCALE:
        if STORE_Z:
            tl.store(z_ptr + y_offsets, round_to(acc, z_ptr.dtype.element_ty), mask=y_mask)
        acc = acc * load_vector(scale_ptr, rn, 1, mask_n)[None, :]
        if HAS_BIAS:
            acc += load_vector(bias_ptr, rn, stride_bias, mask_n)[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


_FORWARD_KEY = ["N", "K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET", "COLUMN_SCALE", "STORE_Z"]
_forward_large = autotuned(
    configs.GEMM,
    key=_FORWARD_KEY,
    prune_configs_by=configs.prune_by(_forward_footprint, "x_ptr", "BLOCK_N:N", "BLOCK_K:K"),
)(_forward_kernel)
_forward_small = autotuned(
    configs.SMALL_M,
    key=_FORWARD_KEY,
    prune_configs_by=configs.prune_by(_forward_footprint, "x_ptr", "BLOCK_N:N", "BLOCK_K:K"),
)(_forward_kernel)
_add_low_rank = autotuned(
    configs.make(configs.TILE_SHAPES, names=("BLOCK_M", "BLOCK_N"), extra={"GROUP_M": 8}),
    key=["N", "R", "BLOCK_R", "M_BUCKET", "COLUMN_SCALE", "STORE_Z"],
    prune_configs_by=configs.prune_by(_forward_footprint, "y_ptr", "BLOCK_M:M", "BLOCK_N:N"),
    # It adds onto y (cuBLAS's x W^T) in place: every configuration the autotuner times must
    # start from the same y, or the first call of a shape adds the low-rank term many times.
    restore_value=["y_ptr"],
)(_forward_kernel)


@triton.jit
def _keep_mask_kernel(keep_ptr, seed_ptr, M, K, dropout_p, BLOCK: tl.constexpr):
    """The dropout keep-mask the kernels above draw for an [M, K] input, as int8 (for tests)."""
    rm = tl.program_id(0).to(tl.int64)
    rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ones = tl.full((1, BLOCK), 1, tl.int8)
    keep = drop(ones, tl.load(seed_ptr), rm + tl.zeros((1,), tl.int64), rk, K, dropout_p)
    tl.store(keep_ptr + rm * K + rk[None, :], keep, mask=(rk < K)[None, :])


def weight_strides(weight: torch.Tensor, fan_in_fan_out: bool) -> tuple[int, int]:
    """(stride along N, stride along K) of the base weight, for either layout."""
    if fan_in_fan_out:
        return weight.stride(1), weight.stride(0)
    return weight.stride(0), weight.stride(1)


def dropout_arguments(seed: torch.Tensor | None, dropout_p: float, device: torch.device):
    if seed is None:
        return unused_seed(device), 0.0, 1.0
    return seed, dropout_p, 1.0 / (1.0 - dropout_p)


def paths(dtype: torch.dtype) -> tuple[str, ...]:
    """The forward and dX paths that can run `dtype`: float32 only composes (see above)."""
    if dtype == torch.float32:
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


def forward_on_path(
    path, x2d, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out,
    scale=None, keep_z=False,
):  # fmt: skip
    """(y, xa, z or None) of the forward by `path`, "fused" or "composed". With `scale` ([N]
    float32, DoRA's k), y = scale * (x W^T + s xa B^T) + b, and z is that sum unscaled (x's
    dtype) when `keep_z`."""
    m, k = x2d.shape
    rank, n = lora_A.shape[0], lora_B.shape[0]
    dropout_scale = 1.0 / (1.0 - dropout_p)
    chunk = rank_chunk(rank, x2d.dtype)
    epilogue_chunk = loop_chunk(rank, m, x2d.dtype)
    one_launch = (
        path == "fused"
        and m <= SMALL_M
        and rank <= epilogue_chunk
        and configs.vectorized(x2d, k)
        and configs.vectorized(weight, k, n)
    )
    if one_launch:
        xa = torch.empty((m, rank), dtype=torch.float32, device=x2d.device)
    else:
        xa = _down(x2d, lora_A, seed, dropout_p, dropout_scale, chunk)
    if path == "composed":
        # DoRA's bias goes after the scale, in the kernel; LoRA's goes with cuBLAS's product.
        cublas_bias, bias = (None, bias) if scale is not None else (bias, None)
        y = torch.nn.functional.linear(x2d, base_weight(weight, fan_in_fan_out), cublas_bias)
        kernel = _add_low_rank
    else:
        y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        kernel = _forward_small if m <= SMALL_M else _forward_large
    z = torch.empty_like(y) if keep_z else None
    extra = {"BLOCK_K": 16} if path == "composed" else {}
    launch(
        kernel,
        tile_grid(m, n),
        x2d, weight, y if bias is None else bias, lora_A, lora_B, xa, y, seed,
        y if scale is None else scale, y if z is None else z,
        m, n, k, rank, m_bucket(m),
        *x2d.stride(), *weight_strides(weight, fan_in_fan_out),
        0 if bias is None else bias.stride(0), *lora_A.stride(), *lora_B.stride(),
        scaling, dropout_p, dropout_scale,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, COMPUTE_XA=one_launch,
        BASE_IN_Y=path == "composed", COLUMN_SCALE=scale is not None, STORE_Z=keep_z,
        PRECISION=dot_precision(x2d.dtype), BLOCK_R=epilogue_chunk,
        **extra,
    )  # fmt: skip
    return y, xa, z


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
    seed, dropout_p, _ = dropout_arguments(seed, dropout_p, x.device)
    arguments = (x2d, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out)
    key = ("lora_forward", x.device, x.dtype, n, k, rank, m_bucket(m), dropout_p > 0)
    candidates = {
        path: lambda path=path: forward_on_path(path, *arguments) for path in paths(x.dtype)
    }
    y, xa, _ = forward_on_path(dispatch.choose(key, x.device, candidates), *arguments)
    return y.view(*leading, n), xa.view(*leading, rank)
