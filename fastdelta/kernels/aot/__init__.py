"""Ahead-of-time compilation of every fastdelta Triton kernel for real GPUs, with no GPU.

    python -m fastdelta.kernels.aot [--full] [--targets 80,90] [--json PATH] [--jobs N] [-k FILTER]

The interpreter (TRITON_INTERPRET=1) checks the kernels' math in CI, but none of what hardware
enforces. This tool calls the public launchers on meta tensors over a grid of arguments with
launch() replaced by a recorder (and the dispatcher forced down each path), so every signature,
stride, integer and constexpr is exactly the launchers'; expands each autotuned launch into every
config that the kernel's own pruner keeps for the target; binds it with Triton's own binder (the
JIT's specialization: 16-byte aligned pointers, integers divisible by 16 or equal to 1); compiles
it through Triton's whole pipeline to a cubin; and checks, per compiled kernel and target:
  compiles      it compiles, and the launcher and the pruner accept the launch;
  spills        ptxas -v (the ptxas and flags Triton uses) reports no spill stores or loads;
  registers     registers x threads fit the 64K register file;
  smem          Triton's dynamic shared memory fits the block limit (sm_80 163 KB, sm_90 227 KB);
  tensor cores  every dot on bf16/fp16 (or TF32) operands is on tensor cores: mma.sync on sm_80;
                on sm_90 wgmma when the tile has 64+ rows (a warpgroup's minimum), else mma.sync;
  loads         global loads (ld.global, cp.async) from a big operand are 128 bits wide where its
                tensor allows it: 16-byte aligned, unit stride along a dimension whose size is a
                multiple of 16, other strides multiples of 16 (what Triton specializes on), and
                where the tile gives each thread 128 bits (a 16x64 tile over 256 threads cannot);
  atomics       no atomic instruction in the PTX (the gradients' reductions run in a fixed order,
                so torch.use_deterministic_algorithms holds on every backend).
A load's operand is the kernel parameter its address derives from (followed through the PTX's
registers; the TTGIR's values give the tile per thread). An operand is big when it spans at least
1/16 of the bytes of the largest operand the kernel loads (x, W, dY, h, the residual; A and B at
ranks where they rival them).

The grid: each launcher's arguments as factors (dtype, rows, sizes, rank, flags, gradients
needed; FACTORS), every pair of values of two factors in some case, and every combination of
dtype, rows, rank and dropout (CHOOSERS). --full compiles all of it (thousands of compiles).
The default, quick, compiles a subset of those compiles, a greedy set cover that still holds
every config of every kernel on every target and gives every kernel on every target each dtype,
constant value and specialization that the full grid gives it, the heaviest compile (widest
dtype, largest BLOCK_R) first among equals. The tool prints a table, and exits non-zero after a
summary of the failures by kernel and check; --json writes every row, with the directory of its
TTGIR, PTX and cubin in Triton's cache.

Run it without TRITON_INTERPRET (the kernels must be real JIT functions). It uses private APIs of
Triton, written against Triton 3.9; where they moved, it says so.

The modules, each built on those before it: factors (the launchers' arguments), recording (the
launches the launchers make on meta tensors), grid (the cases), triton_internals (the private APIs
of Triton used), jit_functions (the kernels the package defines; what a launch compiles, bound as
the JIT binds it), analysis (reading ptxas's log, the TTGIR and the PTX), plan (the rows to compile
and the quick grid's subset), measure (compiling in worker processes, measurements cached), report
(the checks, the table, the failure summary) and __main__ (the command).
"""

from .analysis import (
    atomic_instructions,
    dots,
    elements_per_thread,
    global_loads,
    ptxas_numbers,
)
from .factors import (
    ACTIVATIONS,
    ADAPTER_NEEDS,
    BOTTLENECKS,
    DORA_NEEDS,
    DTYPES,
    FACTORS,
    IN_FEATURES,
    LORA_NEEDS,
    LORA_RANKS,
    OUT_FEATURES,
    ROWS,
    Case,
)
from .grid import CHOOSERS, chooser_cases, distinct_values, each_pair, full_grid
from .jit_functions import (
    PACKAGE,
    bind,
    defined_kernels,
    function_name,
    kernel_modules,
    launch_name,
    variants,
)
from .measure import ANALYSIS_VERSION, compile_and_measure, compile_rows, ptxas_log
from .plan import REGISTER_FILE, SHARED_MEMORY_LIMIT, Plan, Row, covering_rows, make_plan
from .recording import CALLS, Launch, record, recording
from .report import (
    big_operand_loads,
    check,
    failure_summary,
    narrow_loads,
    table,
    tensor_core_kinds,
)

__all__ = [
    "ACTIVATIONS",
    "ADAPTER_NEEDS",
    "ANALYSIS_VERSION",
    "BOTTLENECKS",
    "CALLS",
    "CHOOSERS",
    "DORA_NEEDS",
    "DTYPES",
    "FACTORS",
    "IN_FEATURES",
    "LORA_NEEDS",
    "LORA_RANKS",
    "OUT_FEATURES",
    "PACKAGE",
    "REGISTER_FILE",
    "ROWS",
    "SHARED_MEMORY_LIMIT",
    "Case",
    "Launch",
    "Plan",
    "Row",
    "atomic_instructions",
    "big_operand_loads",
    "bind",
    "check",
    "chooser_cases",
    "compile_and_measure",
    "compile_rows",
    "covering_rows",
    "defined_kernels",
    "distinct_values",
    "dots",
    "each_pair",
    "elements_per_thread",
    "failure_summary",
    "full_grid",
    "function_name",
    "global_loads",
    "kernel_modules",
    "launch_name",
    "make_plan",
    "narrow_loads",
    "ptxas_log",
    "ptxas_numbers",
    "record",
    "recording",
    "table",
    "tensor_core_kinds",
    "variants",
]
