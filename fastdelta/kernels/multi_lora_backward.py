"""Mixed-batch LoRA in Triton, backward, from x, xa, the segments and the dropout seed alone.

  dxa = s_j dY B_j / (1 - p) per segment      multi_lora._shrink_kernel
  dX  = dY W (cuBLAS) + drop'(dxa A_j)        multi_lora._expand_kernel, in place
  dB_j = s_j dY_j^T xa_j, dA_j = dxa_j^T drop(x_j): _segment_product_kernel, each adapter's
       [P, Q] product reduced over its own rows, gathered through `order`.
dW and db, only for a trainable base, are cuBLAS's, over the whole batch.

The reductions are lora_backward's (`reduction.transposed_product`), per adapter: each
adapter's rows are split into S ranges, S chosen from the batch so that the programs fill the
GPU, each program reduces its range into a [BLOCK_P, BLOCK_Q] tile and writes it to its own
slice of an [S, n, P, Q] float32 buffer, which torch sums over S. No atomics, so the gradients
do not depend on the order the programs run in. An adapter with no rows gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdelta.ops.torch_backend import base_grads, base_weight

from . import configs
from ._common import autotuned, dot_precision, drop, launch, load_tile, m_bucket, mma
from .lora import dropout_arguments
from .multi_lora import expand, shrink
from .reduction import MIN_ROWS_PER_SPLIT, TARGET_PROGRAMS


def _footprint(values: dict) -> configs.Footprint:
    block_p, block_q, block_m = values["BLOCK_P"], values["BLOCK_Q"], values["BLOCK_M"]
    return configs.Footprint(
        accumulators=block_p * block_q,
        dots=((block_p * block_q, block_m),),
        loads=(
            configs.tile(block_m * block_p, values["l_ptr"], values["P"], held="float32"),
            configs.tile(block_m * block_q, values["r_ptr"], values["Q"], held="float32"),
        ),
        stores=(configs.tile(block_p * block_q, values["out_ptr"], values["Q"]),),
        register_operand=(block_p, block_m),
        dropped=block_m * block_q if values["DROPOUT"] else 0,
    )


@autotuned(
    configs.REDUCTION,
    key=["P", "Q", "ROWS_BUCKET", "DROPOUT", "ADAPTER_SCALE"],
    prune_configs_by=configs.prune_by(_footprint, "l_ptr", "BLOCK_P:P", "BLOCK_Q:Q"),
)
@triton.jit
def _segment_product_kernel(
    l_ptr, r_ptr, out_ptr, order_ptr, starts_ptr, scalings_ptr, seed_ptr,
    P, Q, ADAPTERS, SPLITS, ROWS_BUCKET,
    stride_lm, stride_lp, stride_rm, stride_rq,
    dropout_p,
    DROPOUT: tl.constexpr, ADAPTER_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Program (tile of [P, Q], adapter j, split): its split of adapter j's rows' share of
    (s_j L)^T f(R) into out[split, j], f the forward's dropout mask (at the rows' own indices,
    with no 1 / (1 - p)) or the identity, s_j 1 without ADAPTER_SCALE. Both tiles are loaded
    as they lie in memory and scaled in float32 registers, as reduction.py's kernel does."""
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = tl.program_id(0) // num_q
    pid_q = tl.program_id(0) % num_q
    adapter = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(starts_ptr + adapter)
    end = tl.load(starts_ptr + adapter + 1)
    rows_per_split = tl.cdiv(end - start, SPLITS)
    first = start + split * rows_per_split
    last = tl.minimum(first + rows_per_split, end)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = rp < P
    mask_q = rq < Q
    scale = tl.load(scalings_ptr + adapter) if ADAPTER_SCALE else 1.0
    seed = tl.load(seed_ptr) if DROPOUT else 0
    acc = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    for m0 in range(first, last, BLOCK_M):
        positions = m0 + tl.arange(0, BLOCK_M)
        mask_m = positions < last
        rows = tl.load(order_ptr + positions, mask=mask_m, other=0).to(tl.int64)
        left = load_tile(l_ptr, rows, rp, stride_lm, stride_lp, mask_m, mask_p)
        left = left.to(tl.float32) * scale
        right = load_tile(r_ptr, rows, rq, stride_rm, stride_rq, mask_m, mask_q)
        if DROPOUT:
            right = drop(right, seed, rows, rq, Q, dropout_p)
        acc = mma(tl.trans(left), right.to(tl.float32), acc, PRECISION)
    tile = (split * ADAPTERS + adapter).to(tl.int64) * P * Q
    out_offsets = tile + rp.to(tl.int64)[:, None] * Q + rq[None, :]
    tl.store(out_ptr + out_offsets, acc, mask=mask_p[:, None] & mask_q[None, :])


def split_count(m: int, adapters: int, p: int, q: int) -> int:
    """How many row ranges each adapter's reduction into a [p, q] result is split into, for a
    batch of m rows shared by `adapters` adapters (evenly, as far as the host knows)."""
    tiles = triton.cdiv(p, 64) * triton.cdiv(q, 64) * adapters
    wanted = triton.cdiv(TARGET_PROGRAMS, tiles)
    return max(1, min(wanted, m // (adapters * MIN_ROWS_PER_SPLIT)))


def segment_product(
    left: torch.Tensor,
    right: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    scalings: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """[n, P, Q] float32: for each adapter j, (s_j left[rows_j])^T f(right[rows_j]) over its
    rows, s_j = scalings[j] (1 when None), f the dropout mask of right's shape drawn from
    `seed` (no 1 / (1 - p)) when dropout_p > 0. left: [M, P]; right: [M, Q] (any strides)."""
    m, p = left.shape
    q = right.shape[1]
    adapters = starts.shape[0] - 1
    splits = split_count(m, adapters, p, q)
    partial = torch.empty((splits, adapters, p, q), dtype=torch.float32, device=left.device)
    launch(
        _segment_product_kernel,
        lambda meta: (
            triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]), adapters, splits
        ),
        left, right, partial, order, starts, partial if scalings is None else scalings,
        partial if seed is None else seed,
        p, q, adapters, splits, m_bucket(triton.cdiv(m, adapters * splits)),
        *left.stride(), *right.stride(),
        dropout_p,
        DROPOUT=dropout_p > 0, ADAPTER_SCALE=scalings is not None,
        PRECISION=dot_precision(left.dtype if right.dtype == torch.float32 else right.dtype),
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)


def multi_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    xa: torch.Tensor,
    seed: torch.Tensor | None,
    dropout_p: float,
    fan_in_fan_out: bool,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, weight, bias, lora_A, lora_B); None for those not needed."""
    need_x, need_weight, need_bias, need_A, need_B = needs
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    grad2d = grad_y.reshape(-1, grad_y.shape[-1])
    m = grad2d.shape[0]
    rank = lora_A.shape[1]
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
        product = segment_product(grad2d, xa.reshape(m, rank), order, starts, scalings)
        grad_B = product.to(lora_B.dtype)
    if need_x or need_A:
        # Only the rows of an adapter are written, and only they are read.
        grad_xa = torch.empty((m, rank), dtype=torch.float32, device=x.device)
        b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))
        shrink(
            grad2d, lora_B, b_strides, grad_xa, order, starts, scalings, seed, 0.0, dropout_scale
        )
        if need_A:
            product = segment_product(grad_xa, x2d, order, starts, None, seed, dropout_p)
            grad_A = product.to(lora_A.dtype)
        if need_x:
            grad_x = grad2d @ base_weight(weight, fan_in_fan_out)
            a_strides = (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1))
            expand(grad_xa, lora_A, a_strides, grad_x, order, starts, None, seed, dropout_p, 1.0)
            grad_x = grad_x.view(x.shape)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B
