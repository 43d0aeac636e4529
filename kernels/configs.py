"""Tile configurations of the kernels, and the pruners that keep the ones a GPU runs well.

Each kernel family has one list of candidate configurations (block sizes, pipeline stages,
warps). Before autotuning, a pruner drops those that (a) would not fit the device's shared
memory per block, (b) hold more float32 accumulators per thread than fit in registers beside
the addresses and operands (a spill costs more than a smaller tile), or (c) are much larger than
the problem. The estimates are deliberately simple; the ahead-of-time compile suite
(`fastdelta.kernels.aot`, run in CI) compiles every configuration a pruner keeps for sm_80 and
sm_90 and checks them against ptxas: no spills, shared memory within the limit.
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
# Float32 accumulator elements per thread that leave room in the 255 registers a thread can
# have for addresses, masks and operand fragments (measured with ptxas on sm_80 and sm_90).
ACCUMULATORS_PER_THREAD = 128
# With float32 inputs and TF32 off, tl.dot runs on FMA units and holds its operand tiles in
# registers too; their per-thread share counts against this larger budget.
FMA_REGISTERS_PER_THREAD = 160

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
        configs.append(triton.Config(kwargs, num_stages=stages, num_warps=warps))
    return configs


# Main-loop GEMM tiles (the fused forward, dX): the usual large bf16 tiles for A100 and H100,
# and smaller-K ones that fit float32 operands.
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
        (128, 64, 32, 4, 4),
        (64, 64, 32, 3, 4),
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
    (m, k, s, w) for m in (16, 32, 64, 128) for k in (64, 128) for s, w in ((3, 4), (4, 8))
]
# Output tiles reduced over a rank chunk (the adapter's up-projection and dh, the composed
# paths' low-rank passes): (BLOCK_M, BLOCK_N, stages, warps).
TILE_SHAPES = [(128, 128, 3, 8), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 64, 4, 4)]
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
    ],
    names=("BLOCK_P", "BLOCK_Q", "BLOCK_M"),
)


@dataclass(frozen=True)
class Footprint:
    """What one program of a kernel holds, in elements: float32 accumulators live across the
    main loop, the operand tiles of one pipeline stage (in shared memory), and shared memory
    outside the pipeline (epilogue operands)."""

    accumulators: int
    stage: int
    epilogue: int = 0


def pruner(footprint: Callable[[dict], Footprint], operand: str, fitted: tuple[str, ...] = ()):
    """An `early_config_prune` for triton.autotune: keep the configs whose `footprint` (a
    function of the config's and the launch's arguments) fits the device. `operand` names the
    tensor argument whose dtype the operand tiles have. Each "BLOCK_X:SIZE" of `fitted` drops
    tiles wider along X than the problem's SIZE needs (a 64-wide tile for 16 columns), unless
    no tile is narrow enough: then the narrowest fitting ones stay."""

    def prune(configs, named_args, **kwargs):
        arguments = {**named_args, **kwargs}
        tensor = arguments[operand]
        limit = shared_memory_limit(tensor.device)
        element = tensor.element_size()
        fma = element == 4 and arguments.get("PRECISION") == "ieee"
        budget = FMA_REGISTERS_PER_THREAD if fma else ACCUMULATORS_PER_THREAD
        kept = []
        for config in configs:
            usage = footprint({**arguments, **config.kwargs})
            threads = 32 * config.num_warps
            registers = (usage.accumulators + (usage.stage if fma else 0)) / threads
            shared = (config.num_stages * usage.stage + usage.epilogue) * element
            if registers <= budget and shared <= limit:
                kept.append(config)
        if not kept:
            raise RuntimeError(
                f"fastdelta: no tile configuration fits this launch ({_describe(arguments)}) "
                f"in {limit} bytes of shared memory; this is a fastdelta bug, please report it"
            )
        return _narrowest(kept, arguments, fitted)

    return prune


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
