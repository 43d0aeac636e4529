"""Mixed-batch LoRA in Triton, forward: one base GEMM, the low-rank products per adapter.

    y[i] = x[i] W^T + b + s_j * (drop(x[i]) A_j^T) B_j^T,  j = the adapter of row i

The rows come grouped by adapter (`fastdelta.ops.multi_lora`): order [M] lists them sorted by
adapter, starts [n + 1] says where each adapter's rows begin in it. As in Punica's SGMV and
vLLM's LoRA shrink / expand kernels, a program gathers a block of one adapter's rows through
`order` and multiplies them by that adapter's weights. The segments are laid end to end, each
cut into blocks of BLOCK_M rows, and each program finds its block from the starts
(`segment_block`): the grid is cdiv(M, BLOCK_M) + n row blocks whatever the ids, so the host
reads nothing, a CUDA graph can capture the step, and at most n programs return unused.

  _shrink_kernel  out[rows, chunk] = scale (* s_j) * drop(src[rows]) V_j[chunk]^T, float32:
                  the forward's xa = drop(x) A_j^T / (1 - p), the backward's dxa = s_j dY B_j
                  / (1 - p) (lora_backward.py's _grad_xa_kernel, per segment).
  _expand_kernel  out[rows] += scale (* s_j) * drop'(low[rows] V_j^T), in place: the forward's
                  s_j xa B_j^T added onto cuBLAS's x W^T + b (lora.py's composed path, per
                  segment), the backward's drop'(dxa A_j) onto dY W.
Each adapter's V_j is read from the stack through its strides ([n, r, K] or [n, N, r]), never
copied. Only the composed form exists: the base product is cuBLAS's, over the whole batch.
The backward is in multi_lora_backward.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdelta.ops.torch_backend import base_weight

from . import configs
from ._common import (
    MAX_BLOCK_R,
    autotuned,
    dot_precision,
    drop,
    launch,
    load_tile,
    loop_chunk,
    m_bucket,
    mma,
    rank_chunk,
)
from .lora import dropout_arguments

# The shrink's widest rank chunk. With chunks of 128 columns, a 64-row tile of 4 warps spilled
# 72 bytes on sm_80 (fp16, 64 adapters) and tiles of 32 rows and more sat at the 255-register
# cap; with 64, none spills. A rank above 64 is split over programs, each gathering its rows of
# the source again (for rank 128, x read twice: a few percent of the base GEMM's time).
SHRINK_BLOCK_R = min(MAX_BLOCK_R, 64)


@triton.jit
def segment_block(pid, starts_ptr, ADAPTERS, BLOCK_ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(adapter, first, end) of row block `pid` of the segments laid end to end, each adapter's
    cut into blocks of BLOCK_M rows: the block holds positions first .. min(first + BLOCK_M,
    end) - 1 of `order`. adapter == ADAPTERS past the last block. Every program finds its own
    from the n + 1 starts (a few vector instructions), so the grid needs only cdiv(M, BLOCK_M)
    + n row blocks, against n * cdiv(M, BLOCK_M) for a grid that gives every adapter every row
    block (vLLM's: most of its programs return at once, a real cost at 16 adapters)."""
    index = tl.arange(0, BLOCK_ADAPTERS)
    present = index < ADAPTERS
    lows = tl.load(starts_ptr + index, mask=present, other=0).to(tl.int32)
    highs = tl.load(starts_ptr + index + 1, mask=present, other=0).to(tl.int32)
    blocks = tl.cdiv(highs - lows, BLOCK_M)
    ends = tl.cumsum(blocks, 0)
    adapter = tl.sum((ends <= pid).to(tl.int32), 0)
    chosen = index == adapter
    first_block = tl.sum(tl.where(chosen, ends - blocks, 0), 0)
    first = tl.sum(tl.where(chosen, lows, 0), 0) + (pid - first_block) * BLOCK_M
    return adapter, first, tl.sum(tl.where(chosen, highs, 0), 0)


def _shrink_footprint(values: dict) -> configs.Footprint:
    m, k, r = values["BLOCK_M"], values["BLOCK_K"], values["BLOCK_R"]
    dropout = values["HAS_DROPOUT"]
    source = values["src_ptr"]
    tf32 = source.element_size() == 4 and values["PRECISION"] == "tf32"
    rounded = configs.tf32_operand_registers(m, k, r, values["num_warps"], dropout) if tf32 else 0
    return configs.Footprint(
        accumulators=m * r,
        dots=((m * r, k),),
        loads=(
            configs.tile(m * k, source, values["K"], held="loaded" if dropout else ""),
            configs.tile(k * r, values["w_ptr"], values["K"], values["R"]),
        ),
        stores=(configs.tile(m * r, values["out_ptr"], values["R"]),),
        dropped=m * k if dropout else 0,
        measured=rounded,
    )


def _expand_footprint(values: dict) -> configs.Footprint:
    m, n, r = values["BLOCK_M"], values["BLOCK_N"], values["BLOCK_R"]
    out, dropout = values["out_ptr"], values["HAS_DROPOUT"]
    return configs.Footprint(
        accumulators=m * n * (2 if dropout else 1),
        dots=((m * n, r),),
        epilogue=(
            configs.tile(m * r, values["low_ptr"], values["R"], held="loaded"),
            configs.tile(r * n, values["w_ptr"], values["N"], values["R"], held="float32"),
            configs.tile(m * n, out, values["N"], held="float32"),
        ),
        stores=(configs.tile(m * n, out, values["N"]),),
        register_operand=(m, r),
        dropped=m * n if dropout else 0,
    )


@autotuned(
    configs.make(configs.ROW_SHAPES, names=("BLOCK_M", "BLOCK_K")),
    key=["K", "R", "BLOCK_R", "HAS_DROPOUT", "ADAPTER_SCALE", "M_BUCKET"],
    prune_configs_by=configs.prune_by(_shrink_footprint, "src_ptr", "BLOCK_M:M"),
)
@triton.jit
def _shrink_kernel(
    src_ptr, w_ptr, out_ptr, order_ptr, starts_ptr, scalings_ptr, seed_ptr,
    M, K, R, ADAPTERS, M_BUCKET,
    stride_sm, stride_sk, stride_wa, stride_wr, stride_wk,
    scale, dropout_p,
    HAS_DROPOUT: tl.constexpr, ADAPTER_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_ADAPTERS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[rows, chunk] = scale * drop(src[rows]) V_j[chunk]^T (times s_j with ADAPTER_SCALE),
    float32, out [M, R] contiguous; V_j = w + j * stride_wa, [R, K] by its strides. Program
    (row block of the segments, rank chunk). The dropout mask is drawn at the rows' own
    indices, so it is the LoRA kernels' mask for src's shape."""
    adapter, first, end = segment_block(
        tl.program_id(0), starts_ptr, ADAPTERS, BLOCK_ADAPTERS, BLOCK_M
    )
    if adapter >= ADAPTERS:
        return
    positions = first + tl.arange(0, BLOCK_M)
    mask_m = positions < end
    rows = tl.load(order_ptr + positions, mask=mask_m, other=0).to(tl.int64)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rr < R
    w_ptr += adapter.to(tl.int64) * stride_wa
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        tile = load_tile(src_ptr, rows, rk, stride_sm, stride_sk, mask_m, mask_k)
        if HAS_DROPOUT:
            tile = drop(tile, seed, rows, rk, K, dropout_p)
        w = load_tile(w_ptr, rk, rr, stride_wk, stride_wr, mask_k, mask_r)
        acc = mma(tile, w, acc, PRECISION)
    if ADAPTER_SCALE:
        scale = scale * tl.load(scalings_ptr + adapter)
    out_mask = mask_m[:, None] & mask_r[None, :]
    tl.store(out_ptr + rows[:, None] * R + rr[None, :], acc * scale, mask=out_mask)


@autotuned(
    configs.make(configs.TILE_SHAPES, names=("BLOCK_M", "BLOCK_N")),
    key=["N", "R", "BLOCK_R", "HAS_DROPOUT", "ADAPTER_SCALE", "M_BUCKET"],
    prune_configs_by=configs.prune_by(_expand_footprint, "out_ptr", "BLOCK_M:M", "BLOCK_N:N"),
    # It adds into `out`: each configuration the autotuner times must start from the same out.
    restore_value=["out_ptr"],
)
@triton.jit
def _expand_kernel(
    low_ptr, w_ptr, out_ptr, order_ptr, starts_ptr, scalings_ptr, seed_ptr,
    M, N, R, ADAPTERS, M_BUCKET,
    stride_wa, stride_wn, stride_wr,
    scale, dropout_p,
    HAS_DROPOUT: tl.constexpr, ADAPTER_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_ADAPTERS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[rows, cols] += drop'(scale * low[rows] V_j[cols]^T) (scale times s_j with
    ADAPTER_SCALE), the mask at the rows' own indices; low [M, R] float32 and out [M, N]
    contiguous, V_j = w + j * stride_wa, [N, R] by its strides. Program (row block of the
    segments, column block), the column blocks of a row block side by side."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    adapter, first, end = segment_block(
        tl.program_id(0) // num_n, starts_ptr, ADAPTERS, BLOCK_ADAPTERS, BLOCK_M
    )
    if adapter >= ADAPTERS:
        return
    positions = first + tl.arange(0, BLOCK_M)
    mask_m = positions < end
    rows = tl.load(order_ptr + positions, mask=mask_m, other=0).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = rn < N
    out_offsets = rows[:, None] * N + rn[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if ADAPTER_SCALE:
        scale = scale * tl.load(scalings_ptr + adapter)
    w_ptr += adapter.to(tl.int64) * stride_wa
    acc = tl.load(out_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    low_rank = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) if HAS_DROPOUT else acc
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < R
        low_mask = mask_m[:, None] & mask_r[None, :]
        low = tl.load(low_ptr + rows[:, None] * R + rr[None, :], mask=low_mask, other=0.0)
        w = load_tile(w_ptr, rr, rn, stride_wr, stride_wn, mask_r, mask_n)
        low_rank = mma(low * scale, w.to(tl.float32), low_rank, PRECISION)
    if HAS_DROPOUT:
        acc += drop(low_rank, tl.load(seed_ptr), rows, rn, N, dropout_p)
    else:
        acc = low_rank
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def row_blocks(m: int, adapters: int, block_m: int) -> int:
    """The row blocks of `adapters` segments of m rows in all, each cut into blocks of block_m:
    at most one partial block per segment."""
    return triton.cdiv(m, block_m) + adapters


def adapter_block(adapters: int) -> int:
    """The vector width that holds every adapter's start (segment_block)."""
    return max(16, triton.next_power_of_2(adapters))


def shrink(source, stack, stack_strides, out, order, starts, scalings, seed, dropout_p, scale):
    """out[rows of j] = scale (* scalings[j]) * drop(source[rows]) V_j^T for each adapter j, V_j
    = stack[j] read through `stack_strides` (adapter, rank, depth); out [M, R] float32. Rows of
    no adapter are not written. scalings None: no per-adapter scale; dropout_p 0: no dropout."""
    m, depth = source.shape
    adapters, rank = stack.shape[0], out.shape[1]
    chunk = rank_chunk(rank, source.dtype, SHRINK_BLOCK_R)
    launch(
        _shrink_kernel,
        lambda meta: (row_blocks(m, adapters, meta["BLOCK_M"]), triton.cdiv(rank, chunk)),
        source, stack, out, order, starts, out if scalings is None else scalings, seed,
        m, depth, rank, adapters, m_bucket(m),
        *source.stride(), *stack_strides,
        scale, dropout_p,
        HAS_DROPOUT=dropout_p > 0, ADAPTER_SCALE=scalings is not None,
        PRECISION=dot_precision(source.dtype), BLOCK_ADAPTERS=adapter_block(adapters),
        BLOCK_R=chunk,
    )  # fmt: skip


def expand(low, stack, stack_strides, out, order, starts, scalings, seed, dropout_p, scale):
    """out[rows of j] += drop'(scale (* scalings[j]) * low[rows] V_j^T) for each adapter j, in
    place, V_j = stack[j] read through `stack_strides` (adapter, output column, rank); low [M, R]
    float32 and out [M, N] contiguous. Rows of no adapter are not touched."""
    m, rank = low.shape
    adapters, n = stack.shape[0], out.shape[1]
    launch(
        _expand_kernel,
        lambda meta: (row_blocks(m, adapters, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        low, stack, out, order, starts, out if scalings is None else scalings, seed,
        m, n, rank, adapters, m_bucket(m),
        *stack_strides,
        scale, dropout_p,
        HAS_DROPOUT=dropout_p > 0, ADAPTER_SCALE=scalings is not None,
        PRECISION=dot_precision(out.dtype), BLOCK_ADAPTERS=adapter_block(adapters),
        BLOCK_R=loop_chunk(rank, m, out.dtype),
    )  # fmt: skip


def multi_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    seed: torch.Tensor | None,
    dropout_p: float,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa): cuBLAS's y = x W^T + b over the whole batch, xa = drop(x) A_j^T / (1 - p) per
    segment ([..., r] float32, zero on the rows of no adapter), then y += s_j xa B_j^T per
    segment. lora_A [n, r, K], lora_B [n, N, r], scalings [n] float32, order [M], starts
    [n + 1] (int64)."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    rank, n = lora_A.shape[1], lora_B.shape[1]
    leading = x.shape[:-1]
    if m == 0:
        y = x.new_empty((*leading, n))
        return y, x.new_empty((*leading, rank), dtype=torch.float32)
    seed, dropout_p, dropout_scale = dropout_arguments(seed, dropout_p, x.device)
    y = torch.nn.functional.linear(x2d, base_weight(weight, fan_in_fan_out), bias)
    xa = torch.zeros((m, rank), dtype=torch.float32, device=x.device)
    shrink(x2d, lora_A, lora_A.stride(), xa, order, starts, None, seed, dropout_p, dropout_scale)
    b_strides = (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2))
    expand(xa, lora_B, b_strides, y, order, starts, scalings, seed, 0.0, 1.0)
    return y.view(*leading, n), xa.view(*leading, rank)
