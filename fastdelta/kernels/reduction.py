"""Weight gradients: transposed products reduced over the rows, in a fixed order.

    out[P, Q] = sum over rows m of (left_scale L[m, P]) (right_scale f(R[m, Q]))

with f the identity, the forward's dropout (the mask drawn again from its seed) or an
activation, and optionally the column sums of L. Every delta weight gradient has this form:
LoRA's dB = s dY^T xa and dA = dxa^T drop(x); the adapter's dU = s dOut^T act(pre) (with
db_u = s * the column sums of dOut) and dD = d(pre)^T h (with db_d).

The rows are split into S contiguous ranges, S chosen so that the programs fill the GPU. Each
program reduces its range into a [BLOCK_P, BLOCK_Q] tile in registers and writes it to its own
slice of a [S, P, Q] float32 buffer, which torch sums over S. There are no atomics, so the
result does not depend on the order the programs run in: gradients repeat bit for bit
(`torch.use_deterministic_algorithms(True)` needs no other path), and no float32 atomic traffic
sits in the loops. The buffer is at most TARGET_PROGRAMS tiles, a few MB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._common import (
    INTERPRETED,
    autotuned,
    dot_precision,
    drop,
    launch,
    load_tile,
    m_bucket,
    mma,
    unused_seed,
)
from .activations import activate

# Programs to aim for: a few per SM of an H100 (132 SMs), so the tail wave is short.
TARGET_PROGRAMS = 4 * 132
# The fewest rows a split reduces, so its loop amortises the tile's store. Small under the
# interpreter, so the tests' shapes are split too.
MIN_ROWS_PER_SPLIT = 32 if INTERPRETED else 256

TRANSFORMS = ("none", "dropout", "activation")


def _footprint(values: dict) -> configs.Footprint:
    block_p, block_q, block_m = values["BLOCK_P"], values["BLOCK_Q"], values["BLOCK_M"]
    return configs.Footprint(
        accumulators=block_p * block_q + block_p,
        dots=((block_p * block_q, block_m),),
        loads=(
            configs.tile(block_m * block_p, values["l_ptr"], values["P"], held="float32"),
            configs.tile(block_m * block_q, values["r_ptr"], values["Q"], held="float32"),
        ),
        stores=(configs.tile(block_p * block_q, values["out_ptr"], values["Q"]),),
        register_operand=(block_p, block_m),
        dropped=block_m * block_q if values["TRANSFORM"] == "dropout" else 0,
    )


@autotuned(
    configs.REDUCTION,
    key=["P", "Q", "ROWS_BUCKET", "TRANSFORM", "ACT", "COLUMN_SUMS"],
    prune_configs_by=configs.prune_by(_footprint, "l_ptr", "BLOCK_P:P", "BLOCK_Q:Q"),
)
@triton.jit
def _transposed_product_kernel(
    l_ptr, r_ptr, out_ptr, sums_ptr, seed_ptr,
    M, P, Q, ROWS_PER_SPLIT, ROWS_BUCKET,
    stride_lm, stride_lp, stride_rm, stride_rq,
    left_scale, right_scale, dropout_p,
    TRANSFORM: tl.constexpr, ACT: tl.constexpr, COLUMN_SUMS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Program (tile of [P, Q], split): its split's share of (left_scale L)^T f(right_scale R)
    into out[split]; with COLUMN_SUMS, the tiles of the first Q column also write the column
    sums of left_scale L over the split into sums[split].

    Both tiles are loaded as they lie in memory, [BLOCK_M, BLOCK_P] and [BLOCK_M, BLOCK_Q], and
    scaled in float32 registers, and the dot is TF32 (a float16 or bfloat16 value is exact in
    it, and xa or d(pre) keep their float32 precision). The reduced dimension is the slow one of
    both tiles, so a tile copied straight to shared memory for a TF32 dot would move 4 bytes at
    a time (measured in the sm_90 PTX); through registers the loads are 16-byte vectors."""
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = tl.program_id(0) // num_q
    pid_q = tl.program_id(0) % num_q
    split = tl.program_id(1).to(tl.int64)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = rp < P
    mask_q = rq < Q
    first = split * ROWS_PER_SPLIT
    last = tl.minimum(first + ROWS_PER_SPLIT, M)
    seed = tl.load(seed_ptr) if TRANSFORM == "dropout" else 0
    acc = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    sums = tl.zeros((BLOCK_P,), tl.float32)
    for m0 in range(first, last, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask_m = rm < last
        left = load_tile(l_ptr, rm, rp, stride_lm, stride_lp, mask_m, mask_p)
        left = left.to(tl.float32) * left_scale
        right = load_tile(r_ptr, rm, rq, stride_rm, stride_rq, mask_m, mask_q)
        if TRANSFORM == "dropout":
            right = drop(right, seed, rm, rq, Q, dropout_p)
        right = right.to(tl.float32)
        if TRANSFORM == "activation":
            right = activate(right, ACT)
        if COLUMN_SUMS:
            sums += tl.sum(left, 0)
        acc = mma(tl.trans(left), right * right_scale, acc, PRECISION)
    out_offsets = split * P * Q + rp.to(tl.int64)[:, None] * Q + rq[None, :]
    tl.store(out_ptr + out_offsets, acc, mask=mask_p[:, None] & mask_q[None, :])
    if COLUMN_SUMS:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if pid_q == 0:
            tl.store(sums_ptr + split * P + rp, sums, mask=mask_p)


def split_count(m: int, p: int, q: int) -> int:
    """How many row ranges a reduction of m rows into a [p, q] result is split into."""
    tiles = triton.cdiv(p, 64) * triton.cdiv(q, 64)
    wanted = triton.cdiv(TARGET_PROGRAMS, tiles)
    return max(1, min(wanted, m // MIN_ROWS_PER_SPLIT))


def transposed_product(
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    left_scale: float = 1.0,
    right_scale: float = 1.0,
    transform: str = "none",
    activation: str = "relu",
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    column_sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((left_scale left)^T (right_scale f(right)) [P, Q], the column sums of left_scale left
    [P] or None), float32.

    left: [M, P]; right: [M, Q] (any strides); f per `transform`: "none", "dropout" (the
    forward's mask for an input of right's shape, from `seed` and `dropout_p`, with no 1/(1-p)
    scale) or "activation" (`activation` of float32 right). M > 0.
    """
    m, p = left.shape
    q = right.shape[1]
    splits = split_count(m, p, q)
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), MIN_ROWS_PER_SPLIT) * MIN_ROWS_PER_SPLIT
    splits = triton.cdiv(m, rows_per_split)
    device = left.device
    partial = torch.empty((splits, p, q), dtype=torch.float32, device=device)
    sums = torch.empty((splits, p), dtype=torch.float32, device=device) if column_sums else None
    if seed is None:
        seed = unused_seed(device)
    launch(
        _transposed_product_kernel,
        lambda meta: (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]), splits),
        left, right, partial, partial if sums is None else sums, seed,
        m, p, q, rows_per_split, m_bucket(rows_per_split),
        *left.stride(), *right.stride(),
        left_scale, right_scale, dropout_p,
        TRANSFORM=transform, ACT=activation, COLUMN_SUMS=column_sums,
        PRECISION=dot_precision(left.dtype if right.dtype == torch.float32 else right.dtype),
    )  # fmt: skip
    product = partial[0] if splits == 1 else partial.sum(0)
    if sums is not None:
        sums = sums[0] if splits == 1 else sums.sum(0)
    return product, sums
