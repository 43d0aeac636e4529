"""Tile configurations of the kernels, and the pruners that keep the ones a GPU runs well.

Each kernel family has one list of candidate configurations (block sizes, pipeline stages,
warps). Before autotuning, a pruner drops those that (a) would not fit the device's shared
memory per block, (b) would need more registers per thread than a thread has, or (c) are much
larger than the problem. Registers are estimated from what a program holds (`Footprint`):
float32 accumulators, float32 dot operands kept in registers, and for each tile it loads, the
values and addresses in flight. An address costs a 64-bit register pair per element when the
load cannot be vectorised (an odd size or stride, which Triton does not specialise on), and
one pair per 16 bytes when it can, so the same tile costs several times more registers for an
odd-sized problem; a dropout mask costs a 64-bit element offset per element. The weights were
fitted to ptxas's register counts, and the ahead-of-time compile suite (`fastdelta.kernels.aot`,
run in CI) compiles every configuration a pruner keeps for sm_80 and sm_90 and checks it:
no spills, shared memory within the limit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton

# Shared memory per block (bytes) that a kernel may opt into: A100 (sm_80) 163 KB, H100
# (sm_90) 227 KB. Without a GPU to ask (or a target named by the compile suite), the pruners
# assume the smaller of the two.
SHARED_MEMORY = {80: 166912, 90: 232448}
# Registers per thread a configuration may be estimated to need, of the 255 a thread can have:
# the rest is for indices, masks, loop state and ptxas's own temporaries.
REGISTER_BUDGET = 200
# Every configuration is compiled with .maxnreg 255. Without it, ptxas trades registers for
# occupancy on its own (it capped kernels needing 170-180 registers at 168, three blocks of 128
# threads per SM, and spilled 8-48 bytes to get there); a kernel whose tile needs the registers
# runs faster with them than with spills, and the autotuner still picks the faster tile.
MAX_REGISTERS = 255
# Registers per element of a tile whose dropout mask a step draws (fitted to ptxas's counts on
# sm_80 and sm_90).
DROPOUT_REGISTERS = 6

# With float32 operands and TF32 on, a dot of fewer than 64 rows (mma.sync; sm_90's wgmma needs
# 64 rows and reads its operands from shared memory) holds TF32-rounded copies of its operands in
# registers across the K step: each warp its rows of the first and its columns of the second.
# Registers per element held, fitted to ptxas on sm_90, where LoRA's down projection spilled
# (255 registers) at 16x128 by 128x128 and 32x128 by 128x64 with 4 warps; configurations it now
# drops measured 198-250 registers.
TF32_OPERAND_REGISTERS = 0.75

_assumed_shared_memory: int | None = None


@contextlib.contextmanager
def assume_shared_memory(limit: int) -> Iterator[None]:
    """Prune for a device with `limit` bytes of shared memory per block (the compile suite
    names its target this way; no GPU is asked)."""
    global _assumed_shared_memory
    previous, _assumed_shared_memory = _assumed_shared_memory, limit
    try:
        yield
    finally:
        _assumed_shared_memory = previous


def shared_memory_limit(device: torch.device) -> int:
    """The shared memory per block available on `device` (bytes)."""
    if _assumed_shared_memory is not None:
        return _assumed_shared_memory
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return SHARED_MEMORY[80]


def make(shapes, names=("BLOCK_M", "BLOCK_N", "BLOCK_K"), extra=None) -> list[triton.Config]:
    """triton.Configs from tuples of block sizes (named by `names`), stages and warps."""
    configs = []
    for shape in shapes:
        *blocks, stages, warps = shape
        kwargs = dict(zip(names, blocks, strict=True)) | (extra or {})
        configs.append(
            triton.Config(kwargs, num_stages=stages, num_warps=warps, maxnreg=MAX_REGISTERS)
        )
    return configs


# Main-loop GEMM tiles (the fused forward and dX of float16 / bfloat16 LoRA): the usual large
# tiles for A100 and H100, and small ones for odd sizes, whose loads cannot be vectorised.
GEMM = make(
    [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 3, 8),
        (64, 64, 32, 3, 4),
        (32, 32, 32, 3, 4),
        (32, 32, 32, 3, 8),
    ],
    extra={"GROUP_M": 8},
)
# Decode-sized forward (M <= 16): one row block, wide K steps.
SMALL_M = make(
    [(16, n, k, s, 4) for n in (32, 64, 128) for k in (64, 128, 256) for s in (3, 4)],
    extra={"GROUP_M": 1},
)
# Row-block kernels whose result is a narrow [M, rank chunk] tile, a sweep over K or N:
# (BLOCK_M, sweep block, stages, warps). Small row blocks put more programs on the GPU's SMs.
ROW_SHAPES = [
    *((m, k, s, w) for m in (16, 32, 64, 128) for k in (64, 128) for s, w in ((3, 4), (4, 8))),
    *((m, 32, 3, w) for m in (16, 32) for w in (4, 8)),
    (16, 64, 3, 8),
    (32, 64, 3, 8),
]
# Output tiles reduced over a rank chunk (the adapter's up-projection and dh, the composed
# paths' low-rank passes): (BLOCK_M, BLOCK_N, stages, warps).
TILE_SHAPES = [
    (128, 128, 3, 8),
    (128, 64, 4, 4),
    (64, 128, 4, 4),
    (64, 64, 4, 4),
    (32, 64, 4, 4),
    (32, 32, 3, 4),
    (16, 32, 3, 4),
    (16, 32, 3, 8),
]
# Transposed products reduced over rows (the weight gradients): [P, Q] tiles, BLOCK_M rows a step.
REDUCTION = make(
    [
        (128, 128, 32, 3, 8),
        (128, 64, 64, 3, 4),
        (64, 128, 64, 3, 4),
        (64, 64, 64, 3, 4),
        (128, 32, 64, 3, 4),
        (64, 32, 64, 3, 4),
        (128, 16, 64, 3, 4),
        (64, 16, 64, 4, 4),
        (32, 32, 64, 4, 4),
        (32, 16, 64, 4, 4),
        (32, 16, 32, 3, 4),
        (16, 16, 32, 3, 4),
    ],
    names=("BLOCK_P", "BLOCK_Q", "BLOCK_M"),
)

# DoRA's backward scaling pass (dY * k with column sums), a stream over [M, N]: (BLOCK_M,
# BLOCK_N, stages, warps), tiles of 4K-8K elements wide along the contiguous columns for 16-byte
# accesses, and of 1K-2K for odd sizes, whose loads are not vectorised (an address an element).
SCALE_GRAD = make(
    [
        (32, 128, 1, 4), (16, 256, 1, 4), (64, 64, 1, 4), (64, 128, 1, 8), (32, 256, 1, 8),
        (16, 128, 1, 4), (32, 64, 1, 4), (16, 64, 1, 4),
    ],
    names=("BLOCK_M", "BLOCK_N"),
)  # fmt: skip


@dataclass(frozen=True)
class Tile:
    """A tile a program loads or stores: `elements` of `element_bytes` in memory, `vectorized`
    when its addresses are 16-byte runs (see `vectorized`), and `held` bytes per element kept in
    registers: 0 for a load Triton copies straight to shared memory, the element size for one
    the kernel transforms first (a scale, a mask), 4 for one it converts to float32."""

    elements: int
    element_bytes: int
    vectorized: bool
    held: int = 0

    def registers(self) -> float:
        """Registers it takes, all threads together: 64-bit addresses, one per 16-byte vector
        or one per element, and the values it holds. A load that cannot be vectorised passes
        through registers too (only 4-, 8- and 16-byte runs are copied straight to shared
        memory)."""
        held = self.held or (0 if self.vectorized else self.element_bytes)
        per_address = 2 * self.element_bytes / 16 if self.vectorized else 2
        return self.elements * (per_address + held / 4)

    def shared_bytes(self) -> int:
        """Bytes it takes in shared memory as a dot operand (a converted tile is stored as
        converted)."""
        return self.elements * max(self.element_bytes, self.held)


def tile(elements: int, tensor: torch.Tensor, *sizes: int, held: str = "") -> Tile:
    """The Tile of `elements` of `tensor`, vectorised when `vectorized(tensor, *sizes)`; `held`
    is "" (copied straight to shared memory, or stored from accumulators), "loaded" (kept in
    registers in its dtype) or "float32" (converted)."""
    size = tensor.element_size()
    return Tile(
        elements,
        size,
        vectorized(tensor, *sizes),
        {"": 0, "loaded": size, "float32": 4}[held],
    )


@dataclass(frozen=True)
class Footprint:
    """What one program of a kernel holds. `loads` are the tiles of its pipelined loop (in shared
    memory once per stage); `epilogue` the tiles it loads once, after the loop (the rank loops
    of the epilogues are not pipelined); `stores` the tiles it writes (their addresses);
    `accumulators` float32 elements live in registers (with any tile of elementwise float32
    math); `register_operands` float32 elements of a dot's first operand computed in registers
    (xa in the LoRA forward's epilogue, act(pre) in the adapter's); `dropped` elements whose
    dropout mask is drawn each step; `dots` the (outputs, depth) of each of its dots."""

    accumulators: int
    dots: tuple[tuple[int, int], ...]
    loads: tuple[Tile, ...] = ()
    epilogue: tuple[Tile, ...] = ()
    stores: tuple[Tile, ...] = ()
    register_operand: tuple[int, int] = (0, 0)
    operand_math: int = 1
    dropped: int = 0
    measured: float = 0.0

    def registers(self, threads: int, fma: bool) -> float:
        """Estimated registers per thread, all threads' needs shared out. A dropped element
        costs its 64-bit offset and the Philox rounds in flight. A dot's first operand held in
        registers is split over the warps along its rows only (a warp's MMA tile has 16 rows),
        so every warp holds all of it when it has 16 rows, and whatever computed it (a scale, an
        activation) has as many temporaries. With float32 inputs and TF32 off, tl.dot runs on
        FMA units, where each thread holds, for each of its outputs' rows and columns, the whole
        depth of both operands."""
        held = self.accumulators + DROPOUT_REGISTERS * self.dropped + self.measured
        held += sum(tile.registers() for tile in (*self.loads, *self.epilogue, *self.stores))
        per_thread = held / threads
        rows, columns = self.register_operand
        if rows:
            warps_along_rows = max(1, min(threads // 32, rows // 16))
            per_thread += self.operand_math * rows * columns / (32 * warps_along_rows)
        if fma:
            per_thread += max(
                2 * depth * max(1.0, outputs / threads) ** 0.5 for outputs, depth in self.dots
            )
        return per_thread

    def shared_memory(self, stages: int) -> int:
        return stages * sum(tile.shared_bytes() for tile in self.loads) + sum(
            tile.shared_bytes() for tile in self.epilogue
        )


def tf32_operand_registers(
    rows: int, depth: int, columns: int, warps: int, first_held: bool = False
) -> float:
    """Registers, all threads together, that a [rows, depth] x [depth, columns] dot of float32
    operands under TF32 takes for their rounded copies (see TF32_OPERAND_REGISTERS); none from
    64 rows up. Warps split the rows first, 16 a warp, the rest along the columns, as Triton
    lays out mma.sync. A first operand already held in registers (a dropout mask applied) is
    rounded in place."""
    if rows >= 64:
        return 0.0
    warps_m = max(1, min(warps, rows // 16))
    warps_n = max(1, warps // warps_m)
    first = 0 if first_held else rows * depth / warps_m
    return TF32_OPERAND_REGISTERS * (first + depth * columns / warps_n) * warps


def vectorized(tensor: torch.Tensor, *sizes: int) -> bool:
    """Whether Triton can load `tensor`'s tiles in 16-byte vectors: its start is 16-byte aligned,
    one dimension has stride 1, the other strides and the `sizes` that bound the tiles' masks
    are multiples of 16 (what Triton specialises integer arguments on)."""
    strides = tensor.stride()
    if tensor.data_ptr() % 16 or 1 not in strides:
        return False
    others = list(strides)
    others.remove(1)
    return all(value % 16 == 0 for value in (*others, *sizes))


def pruner(footprint: Callable[[dict], Footprint], operand: str, fitted: tuple[str, ...] = ()):
    """An `early_config_prune` for triton.autotune: keep the configs whose `footprint` (a
    function of the config's and the launch's arguments, and its `num_warps`) fits the device.
    `operand` names the tensor argument whose dtype decides whether dots run on FMA units
    (float32 with TF32 off). Each "BLOCK_X:SIZE" of `fitted` drops tiles wider along X than the
    problem's SIZE needs (a 64-wide tile for 16 columns), unless no tile is narrow enough: then
    the narrowest fitting ones stay."""

    def prune(configs, named_args, **kwargs):
        arguments = {**named_args, **kwargs}
        tensor = arguments[operand]
        limit = shared_memory_limit(tensor.device)
        fma = tensor.element_size() == 4 and arguments.get("PRECISION") == "ieee"
        kept = []
        for config in configs:
            usage = footprint({**arguments, **config.kwargs, "num_warps": config.num_warps})
            registers = usage.registers(32 * config.num_warps, fma)
            if registers <= REGISTER_BUDGET and usage.shared_memory(config.num_stages) <= limit:
                kept.append(config)
        if not kept:
            raise RuntimeError(
                f"fastdelta: no tile configuration fits this launch ({_describe(arguments)}) "
                f"in {limit} bytes of shared memory; this is a fastdelta bug, please report it"
            )
        return _narrowest(kept, arguments, fitted)

    return prune


def prune_by(footprint: Callable[[dict], Footprint], operand: str, *fitted: str) -> dict:
    """triton.autotune's `prune_configs_by` argument for `pruner(footprint, operand, fitted)`."""
    return {"early_config_prune": pruner(footprint, operand, fitted)}


def _narrowest(configs: list, arguments: dict, fitted: tuple[str, ...]) -> list:
    """The configs whose blocks along each fitted dimension are no wider than the problem
    needs; where none is, those with the narrowest such block."""
    for pair in fitted:
        block, size = pair.split(":")
        needed = max(16, triton.next_power_of_2(int(arguments[size])))
        narrow = [config for config in configs if config.kwargs[block] <= needed]
        smallest = min(config.kwargs[block] for config in configs)
        configs = narrow or [config for config in configs if config.kwargs[block] == smallest]
    return configs


def _describe(arguments: dict) -> str:
    return ", ".join(
        f"{name}={value}"
        for name, value in arguments.items()
        if isinstance(value, int | str) and not isinstance(value, bool)
    )
