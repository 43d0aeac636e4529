"""What every fastdelta kernel shares: interpreter detection, autotuning, tile helpers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is defined, so this is fixed at import: with it,
# the kernels run on CPU tensors through Triton's interpreter (slowly; that is how CI tests them).
INTERPRETED = bool(triton.knobs.runtime.interpret)

# Block sizes used under the interpreter, where autotuning cannot run: small, so CI stays fast,
# and not dividing the test shapes, so the masked edges are exercised.
INTERPRETER_BLOCKS = {
    "BLOCK_M": 32,
    "BLOCK_N": 32,
    "BLOCK_K": 32,
    "BLOCK_P": 32,
    "BLOCK_Q": 32,
    "GROUP_M": 2,
}

# The widest rank (or bottleneck) chunk a kernel holds at once; wider ranks are split into chunks
# of this many columns, looped over or spread over programs. Under the interpreter it is small,
# so the test shapes (ranks up to 64) go through the chunked loops too.
MAX_BLOCK_R = 32 if INTERPRETED else 128


def autotuned(configs: list[triton.Config], key: list[str], **options):
    """Autotune a kernel over `configs` on a GPU; under the interpreter keep the plain kernel."""

    def decorate(kernel):
        if INTERPRETED:
            return kernel
        return triton.autotune(configs=configs, key=key, **options)(kernel)

    return decorate


# While fastdelta.kernels.aot records the launches the launchers make (on meta tensors, to
# compile them for real GPUs without one), it sets this to a function that launch() calls with
# (kernel, grid, args, constants) instead of launching.
launch_recorder = None


def launch(kernel, grid, *args, **constants) -> None:
    """Launch `kernel` (plain or autotuned) on the current device; the interpreter gets
    INTERPRETER_BLOCKS for the block sizes the autotuner would otherwise choose."""
    if launch_recorder is not None:
        launch_recorder(kernel, grid, args, constants)
        return
    if INTERPRETED:
        names = kernel.arg_names
        constants = {**{k: v for k, v in INTERPRETER_BLOCKS.items() if k in names}, **constants}
        kernel[grid](*args, **constants)
        return
    with torch.cuda.device(args[0].device):
        kernel[grid](*args, **constants)


def block_r(rank: int, largest: int = MAX_BLOCK_R) -> int:
    """The tile width of a rank chunk: a power of two, at least 16 (tl.dot's minimum), at most
    `largest`; a rank wider than that is split into chunks of this width."""
    return max(16, min(triton.next_power_of_2(rank), largest))


# The widest rank chunk a kernel reduces over with the chunk's first operand held in float32
# registers (xa, act(pre), d(pre): the epilogues' loops). Every warp along a tile's columns
# holds its rows' whole chunk, and with a tile of 16 rows every warp holds all of it, so these
# chunks are narrower: 64, and 32 for row counts up to 16. A dot on FMA units (float32 with
# TF32 off) holds the chunk's whole width of both operands for each of a thread's outputs:
# 32 there too.
MAX_LOOP_BLOCK_R = 64
NARROW_BLOCK_R = 32


def rank_chunk(rank: int, dtype: torch.dtype, largest: int = MAX_BLOCK_R) -> int:
    """block_r(rank) for kernels on `dtype` tensors, with narrower chunks for FMA dots."""
    if dot_precision(dtype) == "ieee":
        largest = min(largest, NARROW_BLOCK_R)
    return block_r(rank, largest)


def loop_chunk(rank: int, rows: int, dtype: torch.dtype) -> int:
    """The rank chunk of a loop over the rank whose first operand is held in registers (see
    MAX_LOOP_BLOCK_R), for a problem of `rows` rows."""
    return rank_chunk(rank, dtype, NARROW_BLOCK_R if rows <= 16 else MAX_LOOP_BLOCK_R)


def m_bucket(m: int) -> int:
    """The autotuning bucket of a row count: kernels retune per power of two, not per length."""
    return min(m.bit_length(), 16)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 inputs follow torch's TF32 setting for matmuls. The
    float32 low-rank products of half inputs use TF32, which holds fp16 and bf16 exactly."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


if INTERPRETED:

    @triton.jit
    def mma(a, b, acc, PRECISION: tl.constexpr):
        """tl.dot(a, b, acc). Triton 3.9's interpreter gets bfloat16 tl.dot wrong (results off
        by 1e10; float16 and float32 are right), so there bfloat16 operands go in as float32."""
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

else:

    @triton.jit
    def mma(a, b, acc, PRECISION: tl.constexpr):
        """tl.dot(a, b, acc) with the given input precision."""
        return tl.dot(a, b, acc, input_precision=PRECISION)


if INTERPRETED:

    @triton.jit
    def round_to(values, dtype: tl.constexpr):
        """values.to(dtype), rounded to nearest even as a GPU rounds. Triton 3.9's interpreter
        truncates float32 to bfloat16 (every value rounded toward zero, measured), which biases
        a bfloat16 intermediate that is summed again (DoRA's dY * k); so here bfloat16 is
        rounded in float32 bits first."""
        if dtype == tl.bfloat16:
            bits = values.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            values = bits.to(tl.float32, bitcast=True)
        return values.to(dtype)

else:

    @triton.jit
    def round_to(values, dtype: tl.constexpr):
        """values.to(dtype) (rounded to nearest even)."""
        return values.to(dtype)


@triton.jit
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), in groups of GROUP_M rows for L2 reuse."""
    programs_per_group = GROUP_M * num_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, row_mask, col_mask):
    """ptr[rows, cols] with the given strides, zero outside the masks. The offsets are int64:
    index times stride passes 2^31 in a tensor of 2^31 elements (a [256000, 8192] weight, say),
    and int32 arithmetic would wrap without a word."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    return tl.load(ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def load_vector(ptr, index, stride, mask):
    """ptr[index] of a strided vector (a bias, say: an expanded or sliced one has stride != 1),
    as float32, zero outside the mask."""
    return tl.load(ptr + index.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def drop(values, seed, rows, cols, n_cols, p):
    """Zero the dropped elements of a [rows, cols] tile of a matrix with n_cols columns (the
    caller applies the 1 / (1 - p) scale, in float32).

    The mask is Philox noise at offset row * n_cols + col (int64), so every kernel that draws
    it for the same element and seed gets the same bit; it is never stored.
    """
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, values, tl.zeros_like(values))


def tile_grid(rows: int, columns: int, column_block: str = "BLOCK_N"):
    """The launch grid of one program per [BLOCK_M, column_block] tile of a [rows, columns]
    result, for a kernel that swizzles its program id into (tile row, tile column)."""
    return lambda meta: (
        triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(columns, meta[column_block]),
    )


def row_block_grid(rows: int, chunks: int):
    """The launch grid of one program per (BLOCK_M rows, rank chunk)."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), chunks)


_unused_seeds: dict[torch.device, torch.Tensor] = {}


def unused_seed(device: torch.device) -> torch.Tensor:
    """The seed argument of a launch without dropout, which the kernels never read: one per
    device, so a call allocates nothing for it."""
    seed = _unused_seeds.get(device)
    if seed is None:
        seed = _unused_seeds[device] = torch.zeros((), dtype=torch.int64, device=device)
    return seed
