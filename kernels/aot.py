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
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import heapq
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import triton

from . import (
    _common,
    adapter_backward,
    adapter_forward,
    dispatch,
    dropout_keep_mask,
    lora_backward,
    lora_forward,
)
from .configs import assume_shared_memory

try:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.cache import get_cache_manager
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as error:
    raise ImportError(
        f"fastdelta.kernels.aot uses private APIs of Triton 3.9 that Triton {triton.__version__} "
        f"moved ({error}); update the imports at the top of kernels/aot.py"
    ) from error
if not hasattr(JITFunction, "_pack_args"):
    raise ImportError(
        f"fastdelta.kernels.aot binds arguments with JITFunction._pack_args (Triton 3.9), which "
        f"Triton {triton.__version__} does not have; follow JITFunction.run in "
        f"triton/runtime/jit.py and update bind() in kernels/aot.py"
    )

# Per block: the dynamic shared memory a kernel may opt into, and the register file.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
REGISTER_FILE = 65536
# Bump when the analysis of a compiled kernel changes: its results are cached beside the kernel.
ANALYSIS_VERSION = 4
PACKAGE = __package__

# ---------------------------------------------------------------------------------------------
# The grid: each launcher's arguments as factors, each a tuple of values, the first the base.

# dtype label -> (torch dtype, torch.backends.cuda.matmul.allow_tf32, which sets dot precision).
DTYPES = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}
# Rows: training, decode (M=1, its own specialization), small (the one-launch LoRA forward).
ROWS = (4096, 1, 13)
# Sizes divisible by 16 (128-bit loads) and odd ones (narrower loads, masked edges).
IN_FEATURES = (1024, 1023)
OUT_FEATURES = (4096, 1025)
# LoRA ranks: 1 (specialized as a constant), below 16 (a masked rank tile), the tile sizes, and
# 512, split into rank chunks.
LORA_RANKS = (16, 1, 8, 32, 64, 128, 256, 512)
# Adapter bottlenecks: 24 (the default), tiles up to the fused limit 256, 129-256 (one 256 tile),
# and above it (the chunked path).
BOTTLENECKS = (24, 8, 64, 128, 200, 256, 512)
ACTIVATIONS = ("gelu_new", "relu", "gelu", "silu")
# The gradients needed: LoRA (x, A, B); adapter (h, D, b_d, U, b_u). At least one.
LORA_NEEDS = tuple(n for n in itertools.product((True, False), repeat=3) if any(n))
ADAPTER_NEEDS = tuple(n for n in itertools.product((True, False), repeat=5) if any(n))

FACTORS = {
    "lora_forward": {
        "dtype": tuple(DTYPES),
        "m": ROWS,
        "k": IN_FEATURES,
        "n": OUT_FEATURES,
        "rank": LORA_RANKS,
        "dropout": (True, False),
        "bias": (True, False),
        "fan_in_fan_out": (False, True),
    },
    "lora_backward": {
        "dtype": tuple(DTYPES),
        "m": ROWS,
        "k": IN_FEATURES,
        "n": OUT_FEATURES,
        "rank": LORA_RANKS,
        "dropout": (True, False),
        "fan_in_fan_out": (False, True),
        "needs": LORA_NEEDS,
        "grad": ("contiguous", "expanded"),  # y.sum().backward() sends a stride-0 gradient
    },
    "adapter_forward": {
        "dtype": tuple(DTYPES),
        "m": ROWS,
        "d_in": IN_FEATURES,
        "d_out": OUT_FEATURES,  # parallel adapters; a sequential one has d_out = d_in
        "rank": BOTTLENECKS,
        "activation": ACTIVATIONS,
        "down_bias": (True, False),
        "up_bias": (True, False),
        "sequential": (True, False),
    },
    "adapter_backward": {
        "dtype": tuple(DTYPES),
        "m": ROWS,
        "d_in": IN_FEATURES,
        "d_out": OUT_FEATURES,
        "rank": BOTTLENECKS,
        "activation": ACTIVATIONS,
        "sequential": (True, False),
        "needs": ADAPTER_NEEDS,
    },
    "dropout_keep_mask": {"m": ROWS, "k": IN_FEATURES},
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a launcher: its name and its arguments, (factor, value) pairs."""

    op: str
    params: tuple

    @property
    def arguments(self) -> dict:
        return dict(self.params)

    @property
    def dtype(self) -> str:
        return self.arguments.get("dtype", "-")

    @property
    def label(self) -> str:
        return f"{self.op}({', '.join(f'{k}={_text(v)}' for k, v in self.params)})"


def _text(value) -> str:
    """A value in a case label: gradients needed as 0/1 digits."""
    return "".join("1" if v else "0" for v in value) if isinstance(value, tuple) else str(value)


def each_pair(factors: dict[str, tuple]) -> list[dict]:
    """Cases in which every pair of values of two factors occurs (greedy, deterministic)."""
    names = list(factors)

    def pairs(case):
        chosen = sorted(case.items(), key=lambda item: names.index(item[0]))
        return set(itertools.combinations(chosen, 2))

    uncovered = {
        ((a, i), (b, j))
        for a, b in itertools.combinations(names, 2)
        for i in range(len(factors[a]))
        for j in range(len(factors[b]))
    }
    cases = []
    while uncovered:
        (a, i), (b, j) = min(uncovered)
        case = {a: i, b: j}
        for name in names:
            if name not in case:
                case[name] = max(
                    range(len(factors[name])),
                    key=lambda v, name=name: len(pairs({**case, name: v}) & uncovered),
                )
        uncovered -= pairs(case)
        cases.append({name: factors[name][case[name]] for name in names})
    return cases


def distinct_values(op: str, factors: dict[str, tuple]) -> dict[str, tuple]:
    """The factors with the gradients needed that launch exactly what an earlier value of them
    launches dropped (at the first value of every other factor): of 31 combinations for an
    adapter, those that differ in launches or constexprs."""
    base = {name: values[0] for name, values in factors.items()}
    distinct = dict(factors)
    if "needs" in factors:
        seen, kept = set(), []
        for value in factors["needs"]:
            identity = _launches_identity(Case(op, tuple({**base, "needs": value}.items())))
            if identity not in seen:
                seen.add(identity)
                kept.append(value)
        distinct["needs"] = tuple(kept)
    return distinct


def _launches_identity(case: Case) -> tuple:
    """What the launcher of `case` launches, on every path: kernels, constants, argument values
    (tensors by dtype, shape, strides and offset); an error by its message."""
    identity = []
    for path in dispatch.PATHS:
        try:
            launches = record(case, path)
        except Exception as error:  # the same refusal is the same behaviour
            identity.append(repr(error))
            continue
        for launch in launches:
            arguments = tuple(
                (a.dtype, tuple(a.shape), a.stride(), a.storage_offset())
                if isinstance(a, torch.Tensor) else a
                for a in launch.args
            )  # fmt: skip
            identity.append((id(launch.kernel), tuple(sorted(launch.constants.items())), arguments))
    return tuple(identity)


# Factors that choose kernels, paths and tiles together (a decode-sized bf16 launch at rank 16
# takes a kernel that neither bf16 at rank 16 nor rank 16 at 13 rows shows): every triple of
# their values is in the grid, with each value of dropout, the others at their base.
CHOOSERS = ("dtype", "m", "rank", "dropout")


def chooser_cases(factors: dict[str, tuple]) -> list[dict]:
    """Every combination of the CHOOSERS' values, the other factors at their first value."""
    names = [name for name in CHOOSERS if name in factors]
    base = {name: values[0] for name, values in factors.items()}
    return [
        {**base, **dict(zip(names, values, strict=True))}
        for values in itertools.product(*(factors[name] for name in names))
    ]


def full_grid() -> list[Case]:
    """Every pair of distinct values of two factors, and every combination of the CHOOSERS'
    values, for each launcher."""
    cases = {}
    for op, factors in FACTORS.items():
        distinct = distinct_values(op, factors)
        for case in (*each_pair(distinct), *chooser_cases(factors)):
            cases.setdefault(Case(op, tuple(case.items())), None)
    return list(cases)


# ---------------------------------------------------------------------------------------------
# Recording the launches the launchers make.


@dataclasses.dataclass
class Launch:
    """A launch as launch() received it, from one grid case."""

    kernel: object
    args: tuple
    constants: dict
    case: Case


@contextlib.contextmanager
def recording():
    """Within it, launch() appends (kernel, args, constants) to the yielded list instead."""
    launches = []
    previous = _common.launch_recorder
    _common.launch_recorder = lambda kernel, grid, args, constants: launches.append(
        (kernel, args, constants)
    )
    try:
        yield launches
    finally:
        _common.launch_recorder = previous


@contextlib.contextmanager
def _tf32(allowed: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _seed(dropout: bool):
    return torch.zeros((), dtype=torch.int64, device="meta") if dropout else None


def _lora_tensors(dtype, m, k, n, rank, fan_in_fan_out):
    weight = _meta(k, n, dtype=dtype) if fan_in_fan_out else _meta(n, k, dtype=dtype)
    x, lora_a, lora_b = (
        _meta(m, k, dtype=dtype),
        _meta(rank, k, dtype=dtype),
        _meta(n, rank, dtype=dtype),
    )
    return x, weight, lora_a, lora_b


def _call_lora_forward(dtype, m, k, n, rank, dropout, bias, fan_in_fan_out):
    x, weight, lora_a, lora_b = _lora_tensors(dtype, m, k, n, rank, fan_in_fan_out)
    bias = _meta(n, dtype=dtype) if bias else None
    lora_forward(x, weight, bias, lora_a, lora_b, _seed(dropout), 2.0, 0.1, fan_in_fan_out)


def _call_lora_backward(dtype, m, k, n, rank, dropout, fan_in_fan_out, needs, grad):
    x, weight, lora_a, lora_b = _lora_tensors(dtype, m, k, n, rank, fan_in_fan_out)
    seed = _seed(dropout)
    with recording():  # the forward only gives xa as the backward receives it
        _, xa = lora_forward(x, weight, None, lora_a, lora_b, seed, 2.0, 0.1, fan_in_fan_out)
    grad_y = (
        _meta(1, 1, dtype=dtype).expand(m, n) if grad == "expanded" else _meta(m, n, dtype=dtype)
    )
    need_x, need_a, need_b = needs
    lora_backward(
        grad_y, x, weight, lora_a, lora_b, xa, seed, 2.0, 0.1, fan_in_fan_out,
        (need_x, False, False, need_a, need_b),
    )  # fmt: skip


def _adapter_tensors(dtype, m, d_in, d_out, rank, sequential):
    d_out = d_in if sequential else d_out
    h, residual = _meta(m, d_in, dtype=dtype), None if sequential else _meta(m, d_out, dtype=dtype)
    return h, _meta(rank, d_in, dtype=dtype), _meta(d_out, rank, dtype=dtype), residual


def _call_adapter_forward(dtype, m, d_in, d_out, rank, activation, down_bias, up_bias, sequential):
    h, down, up, residual = _adapter_tensors(dtype, m, d_in, d_out, rank, sequential)
    down_bias = _meta(rank, dtype=dtype) if down_bias else None
    up_bias = _meta(up.shape[0], dtype=dtype) if up_bias else None
    adapter_forward(h, down, down_bias, up, up_bias, residual, 2.0, activation)


def _call_adapter_backward(dtype, m, d_in, d_out, rank, activation, sequential, needs):
    h, down, up, residual = _adapter_tensors(dtype, m, d_in, d_out, rank, sequential)
    with recording():  # the forward only gives pre as the backward receives it
        out, pre = adapter_forward(h, down, None, up, None, residual, 2.0, activation)
    adapter_backward(torch.empty_like(out), h, down, up, pre, 2.0, activation, sequential, needs)


def _call_dropout_keep_mask(dtype, m, k):
    dropout_keep_mask(_seed(True), (m, k), 0.1)


CALLS = {
    "lora_forward": _call_lora_forward,
    "lora_backward": _call_lora_backward,
    "adapter_forward": _call_adapter_forward,
    "adapter_backward": _call_adapter_backward,
    "dropout_keep_mask": _call_dropout_keep_mask,
}


def record(case: Case, path: str = dispatch.PATHS[0]) -> list[Launch]:
    """The launches the launcher of `case` makes on meta tensors, the dispatcher forced to
    `path` (where the launcher has a choice of paths)."""
    if _common.INTERPRETED:
        raise RuntimeError(
            "the kernels were defined under TRITON_INTERPRET=1, so they are interpreted, not "
            "compiled; run fastdelta.kernels.aot in a process without TRITON_INTERPRET"
        )
    arguments = case.arguments
    dtype, tf32 = DTYPES[arguments.pop("dtype", "bf16")]
    with _tf32(tf32), dispatch.force_path(path), recording() as launches:
        CALLS[case.op](dtype, **arguments)
    return [Launch(kernel, args, constants, case) for kernel, args, constants in launches]


# ---------------------------------------------------------------------------------------------
# Kernels: which JIT functions the package defines, and what a launch compiles.


def _unwrap(kernel):
    """The JIT (or interpreted) function under autotuners and heuristics, or None."""
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel if isinstance(kernel, (JITFunction, InterpretedFunction)) else None


def function_name(function) -> str:
    """module.function of a JIT function, the module relative to the kernels package."""
    return f"{function.fn.__module__.removeprefix(PACKAGE + '.')}.{function.fn.__qualname__}"


def kernel_modules() -> list:
    """Every module of the kernels package but this one."""
    package = importlib.import_module(PACKAGE)
    names = [info.name for info in pkgutil.iter_modules(package.__path__) if info.name != "aot"]
    return [importlib.import_module(f"{PACKAGE}.{name}") for name in names]


def defined_kernels() -> list[str]:
    """The @triton.jit kernels the package defines: its JIT functions that no JIT function of the
    package calls (those are device functions, compiled into their callers)."""
    functions = {}
    for module in kernel_modules():
        for value in vars(module).values():
            function = _unwrap(value)
            if function is not None and function.fn.__module__ == module.__name__:
                functions[function_name(function)] = function
    called = set()
    for function in functions.values():
        tree = ast.parse(textwrap.dedent(inspect.getsource(function.fn)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                callee = _unwrap(_resolve(node.func, function.fn.__globals__))
                if callee is not None:
                    called.add(function_name(callee))
    return sorted(set(functions) - called)


def _resolve(expression, namespace):
    """The object a call's function expression (a name or dotted attribute) refers to."""
    if isinstance(expression, ast.Name):
        return namespace.get(expression.id)
    if isinstance(expression, ast.Attribute):
        return getattr(_resolve(expression.value, namespace), expression.attr, None)
    return None


def launch_name(kernel) -> str:
    """The name the package binds a launched kernel (an autotuner or a JIT function) to, e.g.
    lora._forward_large for one of the autotuners of lora._forward_kernel."""
    function = _unwrap(kernel)
    module = sys.modules[function.fn.__module__]
    names = [name for name, value in vars(module).items() if value is kernel]
    name = function.fn.__qualname__ if function.fn.__qualname__ in names else names[0]
    return f"{module.__name__.removeprefix(PACKAGE + '.')}.{name}"


def variants(kernel, args, constants, config=None):
    """(JIT function, keyword arguments, (index, config)) of every compile a launch can cause: one
    per config the autotuner's pruner keeps (pruned as Autotuner.run prunes), heuristics applied."""
    if isinstance(kernel, Autotuner):
        configs = kernel.configs
        if len(configs) > 1:
            kernel.nargs = dict(zip(kernel.arg_names, args, strict=False))
            try:
                configs = kernel.prune_configs(constants)
            finally:
                kernel.nargs = None
        for chosen in configs:
            index = next((i for i, c in enumerate(kernel.configs) if c is chosen), -1)
            kwargs = {**constants, **chosen.all_kwargs()}
            yield from variants(kernel.fn, args, kwargs, (index, chosen))
    elif isinstance(kernel, Heuristics):
        kwargs = dict(constants)
        for name, rule in kernel.values.items():
            kwargs[name] = rule({**dict(zip(kernel.arg_names, args, strict=False)), **kwargs})
        yield from variants(kernel.fn, args, kwargs, config)
    else:
        yield kernel, constants, config


_binders = {}
_bound = {}


def bind(function, args, kwargs, arch: int):
    """(signature, constexprs, attrs, options) of the kernel the JIT would compile for this
    launch on `arch`, from Triton's own binder, as JITFunction.run binds (and, as the JIT's
    cache, once per specialization and keyword arguments)."""
    if (id(function), arch) not in _binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(function.signature, function.params, backend)
        _binders[id(function), arch] = backend, binder
    backend, binder = _binders[id(function), arch]
    kwargs = {**kwargs, "debug": kwargs.get("debug", function.debug) or knobs.runtime.debug}
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = binder(*args, **kwargs)
    key = (id(function), arch, repr(specialization), repr(sorted(kwargs.items())))
    if key not in _bound:
        options, signature, constexprs, attrs = function._pack_args(
            backend, kwargs, bound, specialization, options
        )
        _bound[key] = signature, constexprs, attrs, options.__dict__
    return _bound[key]


# ---------------------------------------------------------------------------------------------
# Compiling and measuring one kernel (in a worker process).


def compile_and_measure(job: dict) -> dict:
    """Compile `job` for its target and measure it, or {"error": ...} when it does not compile.
    The measurements are cached beside Triton's cached kernel."""
    function = _find_function(job["module"], job["qualname"])
    source = ASTSource(function, job["signature"], job["constexprs"], job["attrs"])
    start = time.perf_counter()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its `ptxas -v` log: no second ptxas run
    with tempfile.TemporaryFile(mode="w+") as output:
        try:
            with _redirected(output):
                compiled = triton.compile(
                    source, target=GPUTarget("cuda", job["arch"], 32), options=job["options"]
                )
        except Exception as error:  # a kernel that does not compile is a finding, reported
            output.seek(0)
            return {"error": _error_summary(error, output.read())}
        finally:
            knobs.nvidia.dump_ptxas_log = previous
        output.seek(0)
        log = output.read()
    cache = get_cache_manager(compiled.hash)
    artifacts = getattr(cache, "cache_dir", None)  # TTGIR, PTX, cubin: where to look closer
    facts_file = f"fastdelta_aot_{ANALYSIS_VERSION}.json"
    cached = cache.get_file(facts_file)
    if cached is not None:
        facts = json.loads(Path(cached).read_text())
        return {**facts, "artifacts": artifacts, "seconds": 0.0, "cached": True}
    asm = compiled.asm
    # PTX drops constexpr parameters; only pointers are operands.
    parameters = [name if kind.startswith("*") else None
                  for name, kind in job["signature"].items() if kind != "constexpr"]  # fmt: skip
    facts = {
        "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        # A compile that Triton's cache answered printed no log: run ptxas as Triton runs it.
        **ptxas_numbers(
            log if "registers" in log else ptxas_log(asm["ptx"], job["arch"], job["options"])
        ),
        "dots": dots(asm["ttgir"]),
        "ptx_mma": len(re.findall(r"\bmma\.sync\b", asm["ptx"])),
        "ptx_wgmma": len(re.findall(r"\bwgmma\.mma_async\b", asm["ptx"])),
        "ptx_atomics": atomic_instructions(asm["ptx"]),
        "loads": global_loads(asm["ptx"], parameters),
        "per_thread": elements_per_thread(asm["ttgir"]),
    }
    cache.put(json.dumps(facts), facts_file, binary=False)
    seconds = time.perf_counter() - start
    return {**facts, "artifacts": artifacts, "seconds": seconds, "cached": False}


def atomic_instructions(ptx: str) -> int:
    """The atomic read-modify-write instructions in `ptx` (atom.*, and red.*, the reduction
    without a result that atomic adds lower to)."""
    return len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.", ptx, flags=re.MULTILINE))


def _find_function(module_name: str, qualname: str):
    for value in vars(importlib.import_module(module_name)).values():
        function = _unwrap(value)
        if function is not None and function.fn.__qualname__ == qualname:
            return function
    raise LookupError(f"no JIT function {qualname} in {module_name}")


@contextlib.contextmanager
def _redirected(file):
    """This process's stdout and stderr (Python's and the compiler's C++) into `file`: a failed
    compile prints its IR or its MLIR diagnostics."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(file.fileno(), 1)
    os.dup2(file.fileno(), 2)
    try:
        with contextlib.redirect_stdout(file), contextlib.redirect_stderr(file):
            yield
    finally:
        file.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _error_summary(error: Exception, output: str) -> str:
    """The error's last line (a CompilationError ends with it) and the source line its caret
    points at, then the compiler's own error lines (MLIR diagnostics) from its output."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    summary = f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"
    caret = [i for i, line in enumerate(lines) if line.strip() == "^"]
    if caret and caret[0] > 0:
        summary += f" (at `{lines[caret[0] - 1].strip()}`)"
    diagnostics = [line.strip() for line in output.splitlines() if "error" in line.lower()]
    return "\n".join([summary, *diagnostics[:3]])


def ptxas_log(ptx: str, arch: int, options: dict) -> str:
    """The log of `ptxas -v` run on `ptx` as Triton's make_cubin runs it."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "kernel.ptx")
        path.write_text(ptx)
        fmad = [] if options["enable_fp_fusion"] else ["--fmad=false"]
        command = [
            get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}", str(path), "-o", f"{path}.cubin",
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def ptxas_numbers(log: str) -> dict:
    """Registers, spills and stack frame from a `ptxas -v` log."""

    def total(pattern):
        return sum(int(value) for value in re.findall(pattern, log))

    return {
        "registers": max(map(int, re.findall(r"Used (\d+) registers", log)), default=0),
        "spill_stores": total(r"(\d+) bytes spill stores"),
        "spill_loads": total(r"(\d+) bytes spill loads"),
        "stack": total(r"(\d+) bytes stack frame"),
    }


def dots(ttgir: str) -> list[dict]:
    """Each dot of the source (dots at one source location are one) as lowered in the TTGIR:
    wgmma (warp_group_dot), mma (tt.dot in an nvidia_mma v2 layout) or fma (any other layout),
    with its tile rows and columns, operand type, input precision and source location."""
    encodings = {}
    for alias, body in re.findall(r"^(#\w+) = #ttg\.\w+<\{(.*)\}>", ttgir, re.M):
        version = re.search(r"versionMajor = (\d+)", body)
        encodings[alias] = {"2": "mma", "3": "wgmma"}.get(version.group(1)) if version else "fma"
    locations = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)$", ttgir, re.M))
    found = {}
    order = ("fma", "mma", "wgmma")
    for line in ttgir.splitlines():
        op = re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", line)
        operand = re.search(r":\s*(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+)", line)
        result = re.search(r"->\s*tensor<\d+x(\d+)x\w+,\s*(#\w+)", line)
        if not (op and operand and result):
            continue
        wgmma = op.group(1) == "ttng.warp_group_dot"
        precision = re.search(r"inputPrecision = (\w+)", line)
        where = re.search(r"loc\((#loc\d*)\)\s*$", line)
        site = _source_location(where.group(1), locations) if where else f"dot {len(found)}"
        dot = {
            "rows": int(operand.group(1)),
            "columns": int(result.group(1)),
            "operand": operand.group(3),
            # tt.dot omits its default, IEEE; warp_group_dot prints the enum (0 is TF32).
            "precision": precision.group(1) if precision else "ieee",
            "kind": "wgmma" if wgmma else encodings.get(result.group(2), "fma"),
            "where": site,
        }
        if site not in found or order.index(dot["kind"]) < order.index(found[site]["kind"]):
            found[site] = dot
    return list(found.values())


def _source_location(label: str, locations: dict, depth: int = 0) -> str:
    """file:line (variable) of a TTGIR location, through call sites to the kernel's own line."""
    body = locations.get(label, "")
    callsite = re.fullmatch(r"callsite\((#loc\d*) at (#loc\d*)\)", body)
    named = re.fullmatch(r'"(\w+)"\((#loc\d*)\)', body)
    place = re.fullmatch(r'"([^"]+)":(\d+):\d+', body)
    if depth > 20 or not (callsite or named or place):
        return label
    if callsite:
        return _source_location(callsite.group(2), locations, depth + 1)
    if named:
        return f"{_source_location(named.group(2), locations, depth + 1)} ({named.group(1)})"
    return f"{Path(place.group(1)).name}:{place.group(2)}"


def global_loads(ptx: str, parameters: list[str]) -> dict[str, list[int]]:
    """The widths in bits of the global loads (ld.global, cp.async) from each pointer parameter
    (`parameters`: the PTX parameters' names in order, None for those that are not pointers).

    A load's parameter is the pointer its address register derives from: registers are followed
    from the ld.param that reads each parameter through every instruction but loads, to a
    fixpoint (loop-carried pointers are reassigned). "?": a load derived from no pointer."""
    statements = _statements(ptx)
    derived: dict[str, frozenset] = {}
    changed = True
    while changed:
        changed = False
        for opcode, result, sources in statements:
            if opcode.startswith("ld.param"):
                origin = frozenset(int(i) for i in re.findall(r"_param_(\d+)\]", sources))
            elif opcode.startswith(("ld.", "atom.", "cp.", "st.", "red.")):
                continue
            else:
                origin = frozenset().union(*(derived.get(r, ()) for r in _registers(sources)))
            for register in _registers(result) if origin else ():
                if not origin <= derived.get(register, frozenset()):
                    derived[register] = derived.get(register, frozenset()) | origin
                    changed = True
    widths = defaultdict(set)
    for opcode, _, sources in statements:
        if opcode.startswith("ld.global"):
            vector = re.search(r"\.v(\d)\b", opcode)
            element = re.findall(r"\.[bufs](8|16|32|64)\b", opcode)
            bits = (int(vector.group(1)) if vector else 1) * int(element[-1] if element else 0)
        elif opcode.startswith("cp.async") and ".global" in opcode:
            size = re.search(r"\]\s*,\s*(0x[0-9a-fA-F]+|\d+)", sources)
            bits = int(size.group(1), 0) * 8 if size else 0
        else:
            continue
        address = re.search(r"\[([^\]]*)\]", sources)
        origins = set()
        for register in _registers(address.group(1) if address else ""):
            origins |= derived.get(register, frozenset())
        pointers = {parameters[i] for i in origins if i < len(parameters) and parameters[i]}
        for name in pointers or {"?"}:
            widths[name].add(bits)
    return {name: sorted(bits) for name, bits in sorted(widths.items())}


def _registers(text: str) -> list[str]:
    return re.findall(r"%[A-Za-z_]\w*", text)


def _statements(ptx: str) -> list[tuple[str, str, str]]:
    """(opcode, first operand, other operands) of each PTX instruction, predicates dropped."""
    lines = []
    for line in ptx.splitlines():
        line = re.sub(r"^\$\w+:", "", line.split("//")[0].strip().strip("{}").strip()).strip()
        if line and (line[0].isalpha() or line[0] == "@"):
            lines.append(line)
    statements = []
    for text in " ".join(lines).split(";"):
        text = re.sub(r"^\s*@!?%\w+\s+", "", text).strip()
        if not text:
            continue
        opcode, _, operands = text.partition(" ")
        operands = operands.strip()
        if operands.startswith("{"):
            result, _, rest = operands[1:].partition("}")
            rest = rest.lstrip(" ,")
        else:
            result, _, rest = operands.partition(",")
        statements.append((opcode, result, rest))
    return statements


def elements_per_thread(ttgir: str) -> dict[str, int]:
    """For each pointer parameter, the fewest elements a thread gets in one global load of a tile
    from it (the tile's elements over the block's threads): no load of it can be wider.

    The TTGIR is in SSA form with the parameters by name, so a value's parameters are those of
    the values it is computed from; a loop's carried values start from their initial values."""
    warps = int(re.search(r'"ttg\.num-warps" = (\d+)', ttgir).group(1))
    signature = re.search(r"tt\.func public @\w+\((.*)$", ttgir, re.M).group(1)
    origin = {name: {name} for name in re.findall(r"%(\w+): !tt\.ptr<", signature)}

    def of(names):
        return set().union(*(origin.get(n, origin.get(n.split("#")[0], set())) for n in names))

    fewest = {}
    for line in ttgir.splitlines():
        assignment = re.match(r"\s*%([\w]+)(?::\d+)? = (\S+)(.*)$", line)
        if not assignment:
            continue
        result, op, rest = assignment.groups()
        operands = rest.split(" : ")[0]
        carried = re.search(r"iter_args\((.*?)\)\s*->", rest)
        if carried:
            pairs = re.findall(r"%(\w+) = (%[\w#]+)", carried.group(1))
            for index, (name, initial) in enumerate(pairs):
                origin[name] = origin[f"{result}#{index}"] = of([initial[1:]])
            continue
        origin[result] = of(re.findall(r"%([\w#]+)", operands))
        tile = re.search(r"tensor<([\dx]+)x!tt\.ptr<", rest)
        if op in ("tt.load", "ttg.async_copy_global_to_local") and tile:
            pointer = re.match(r"\s*%([\w#]+)", rest).group(1)
            size = 1
            for extent in tile.group(1).split("x"):
                size *= int(extent)
            share = max(1, size // (32 * warps))
            for name in of([pointer]):
                fewest[name] = min(fewest.get(name, share), share)
    return fewest


# ---------------------------------------------------------------------------------------------
# Planning the compiles.


@dataclasses.dataclass
class Row:
    """One kernel compiled for one target (or a launch refused before compiling), and every grid
    case whose launches compile it."""

    function: str
    config: str
    order: int
    constants: dict
    specialization: str
    classes: tuple
    arch: int
    job: dict | None
    kernels: set = dataclasses.field(default_factory=set)
    dtypes: set = dataclasses.field(default_factory=set)
    cases: set = dataclasses.field(default_factory=set)
    operands: list = dataclasses.field(default_factory=list)
    result: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)

    @property
    def kernel(self) -> str:
        return "/".join(sorted(self.kernels))

    @property
    def target(self) -> str:
        return f"sm_{self.arch}"

    @property
    def flags(self) -> str:
        """The launch's own constexprs, booleans by name when true. PRECISION is left out (the
        dtype label says it: fp32-tf32 or fp32-ieee); a plain kernel's BLOCKs are its config."""
        parts = []
        for name, value in self.constants.items():
            plain_block = self.order < 0 and name.startswith("BLOCK")
            if value is not False and name != "PRECISION" and not plain_block:
                parts.append(name if value is True else f"{name}={value}")
        return " ".join(parts)


@dataclasses.dataclass
class Plan:
    """The rows to compile, by key; the JIT functions launched; the rows of each case."""

    rows: dict
    recorded: set
    uses: dict


def make_plan(cases: list[Case], targets: list[int], keyword: str = "") -> Plan:
    """The rows of the cases' launches: each case recorded on every path the dispatcher can
    choose, each launch pruned for each target's shared memory. `keyword`: words that a launch's
    kernel, dtype and case label must all contain. A launcher that refuses a case, or a pruner
    that keeps no config, gives a row that fails."""
    plan = Plan({}, set(), defaultdict(set))
    for case, path in itertools.product(cases, dispatch.PATHS):
        try:
            launches = record(case, path)
        except Exception as error:  # a launcher refusing a grid case is a finding, reported
            _add_refusal(plan, case.op, case, targets[0], "records", error, {})
            continue
        for launch in launches:
            name = launch_name(launch.kernel)
            text = f"{name} {case.dtype} {case.label}".lower()
            if all(word in text for word in keyword.lower().split()):
                plan.recorded.add(function_name(_unwrap(launch.kernel)))
                for arch in targets:
                    _add_launch(plan, name, launch, arch)
    return plan


def _add_launch(plan: Plan, name: str, launch: Launch, arch: int) -> None:
    with assume_shared_memory(SHARED_MEMORY_LIMIT[arch]):
        try:
            expanded = list(variants(launch.kernel, launch.args, launch.constants))
        except Exception as error:  # a pruner keeping no config is a finding, reported
            _add_refusal(plan, name, launch.case, arch, "config", error, launch.constants)
            return
    operands = None
    for function, kwargs, config in expanded:
        operands = operands or _operands(function, launch.args)
        signature, constexprs, attrs, options = bind(function, launch.args, kwargs, arch)
        job = {
            "module": function.fn.__module__,
            "qualname": function.fn.__qualname__,
            "arch": arch,
            "signature": signature,
            "constexprs": constexprs,
            "attrs": attrs,
            "options": options,
        }
        key = repr([sorted(v.items()) if isinstance(v, dict) else v for v in job.values()])
        if key not in plan.rows:
            specialization, classes = _specialization(function, signature, attrs)
            plan.rows[key] = Row(
                function=function_name(function),
                config=_config_label(launch.constants, options, config),
                order=config[0] if config else -1,
                constants=launch.constants,
                specialization=specialization,
                classes=classes,
                arch=arch,
                job=job,
            )
        _add_use(plan, key, name, launch.case, operands)


def _add_refusal(plan, name, case, arch, check_name, error, constants) -> None:
    message = f"{type(error).__name__}: {error}"
    key = repr((name, arch, check_name, message))
    if key not in plan.rows:
        plan.rows[key] = Row(
            function=name,
            config="-",
            order=-1,
            constants=constants,
            specialization="-",
            classes=(),
            arch=arch,
            job=None,
            result={"error": message, "check": check_name},
        )
    _add_use(plan, key, name, case, None)


def _add_use(plan: Plan, key: str, name: str, case: Case, operands) -> None:
    row = plan.rows[key]
    row.kernels.add(name)
    row.dtypes.add(case.dtype)
    row.cases.add(case.label)
    if operands is not None and operands not in row.operands:
        row.operands.append(operands)
    plan.uses[case].add(key)


def _config_label(constants, options, config) -> str:
    """'M128 N256 K64 GROUP_M8 w8 s3' (BLOCK_ dropped). A plain kernel's config is its launch's
    BLOCK constants with its warps and stages."""
    blocks = {name: value for name, value in constants.items() if name.startswith("BLOCK")}
    values = config[1].kwargs if config else blocks
    parts = [f"{name.removeprefix('BLOCK_')}{value}" for name, value in values.items()]
    return " ".join([*parts, f"w{options['num_warps']}", f"s{options['num_stages']}"])


_used_names = {}


def _specialization(function, signature, attrs) -> tuple[str, tuple]:
    """What the JIT's specialization says of the integer and pointer arguments the kernel body
    uses: which equal 1 (made constants), which it cannot prove divisible by 16 ("odd"; pointers:
    16-byte aligned); as text and as (name, "1" | "16" | "odd") pairs."""
    if id(function) not in _used_names:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function.fn))).body[0]
        _used_names[id(function)] = {
            node.id for statement in tree.body for node in ast.walk(statement)
            if isinstance(node, ast.Name)
        }  # fmt: skip
    classes = []
    for index, param in enumerate(function.params):
        kind = signature[param.name]
        if param.name not in _used_names[id(function)] or param.is_constexpr:
            continue
        if kind == "constexpr":
            classes.append((param.name, "1"))
        elif re.fullmatch(r"[iu](32|64)|\*.*", kind):
            divisible = any(attr[0] == "tt.divisibility" for attr in attrs.get((index,), []))
            classes.append((param.name, "16" if divisible else "odd"))
    # Unit strides are the norm (contiguous tensors), so only other ones are named.
    ones = [f"{name}=1" for name, c in classes if c == "1" and not name.startswith("stride")]
    odd = [name for name, c in classes if c == "odd"]
    text = " ".join(ones + ([f"odd:{','.join(odd)}"] if odd else [])) or "aligned"
    return text, tuple(classes)


def _operands(function, args) -> dict:
    """For each tensor argument: [bytes it spans, whether 128-bit loads along it are possible,
    bits per element]."""
    operands = {}
    for name, value in zip(function.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            extents = zip(value.shape, value.stride(), strict=True)
            span = 1 + sum((size - 1) * abs(stride) for size, stride in extents)
            bits = 8 * value.element_size()
            operands[name] = [span * bits // 8 if value.numel() else 0, _wide(value), bits]
    return operands


def _wide(tensor: torch.Tensor) -> bool:
    """16-byte aligned, unit stride along one dimension (only one: a [M, 1] tensor's strides are
    (1, 1), and the kernel cannot tell its rows from its columns) whose size is a multiple of 16,
    the other strides multiples of 16: the facts Triton's specialization can pass on."""
    unit = [d for d in range(tensor.dim()) if tensor.stride(d) == 1]
    if tensor.data_ptr() % 16 or len(unit) != 1 or tensor.shape[unit[0]] % 16:
        return False
    others = [d for d in range(tensor.dim()) if d != unit[0] and tensor.shape[d] > 1]
    return all(tensor.stride(d) % 16 == 0 for d in others)


def covering_rows(plan: Plan) -> dict:
    """The quick grid: a subset of the plan's rows that still compiles every config of every
    kernel for every target, and gives every kernel on every target each dtype, constant value
    and specialization that the plan gives it (and keeps every refusal). Greedy set cover, each
    compile one unit of cost; among equals the heaviest row (widest dtype, then largest integer
    constants such as BLOCK_R) first, as it is the likeliest to spill."""
    features = {key: _features(row) for key, row in plan.rows.items()}
    uncovered = set().union(*features.values())
    heap = [(-len(features[key]), _lightness(row), key) for key, row in plan.rows.items()]
    heapq.heapify(heap)
    chosen = {key for key, row in plan.rows.items() if row.job is None}
    while uncovered and heap:
        _, lightness, key = heapq.heappop(heap)
        gain = len(features[key] & uncovered)
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, lightness, key))
        elif gain:
            chosen.add(key)
            uncovered -= features[key]
    return {key: row for key, row in plan.rows.items() if key in chosen}


def _features(row: Row) -> set:
    kernel, arch = row.function, row.arch
    return {
        ("config", kernel, arch, row.config),
        *(("dtype", kernel, arch, dtype) for dtype in row.dtypes),
        *(("constant", kernel, arch, name, repr(v)) for name, v in row.constants.items()),
        *(("specialization", kernel, arch, *pair) for pair in row.classes),
    }


def _lightness(row: Row) -> tuple:
    bits = max((bits for operands in row.operands for _, _, bits in operands.values()), default=0)
    numbers = sum(v for v in row.constants.values() if type(v) is int)
    return -bits, -numbers


# ---------------------------------------------------------------------------------------------
# Compiling, checking, reporting.


def compile_rows(rows: list[Row], jobs: int, progress=None) -> None:
    """Fill each row's result, compiling in `jobs` processes (forked where the platform can: a
    fork inherits the imported modules; no process here has run a kernel or the interpreter)."""
    rows = [row for row in rows if row.job is not None]
    if jobs <= 1:
        for done, row in enumerate(rows, 1):
            row.result = compile_and_measure(row.job)
            if progress:
                progress(done, len(rows))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(compile_and_measure, row.job): row for row in rows}
        for done, future in enumerate(as_completed(futures), 1):
            futures[future].result = future.result()
            if progress:
                progress(done, len(rows))


def check(row: Row) -> list[tuple[str, str]]:
    """(check, detail) of each check the row fails."""
    result = row.result
    if "error" in result:
        return [(result.get("check", "compiles"), result["error"])]
    failures = []
    if result["spill_stores"] or result["spill_loads"]:
        detail = f"{result['spill_stores']} B spill stores, {result['spill_loads']} B spill loads"
        failures.append(("spills", detail))
    threads = 32 * result["num_warps"]
    if result["registers"] * threads > REGISTER_FILE:
        detail = f"{result['registers']} registers x {threads} threads > {REGISTER_FILE}"
        failures.append(("registers", detail))
    if result["shared"] > SHARED_MEMORY_LIMIT[row.arch]:
        detail = f"{result['shared']} B shared memory > {SHARED_MEMORY_LIMIT[row.arch]} B"
        failures.append(("smem", detail))
    for dot in result["dots"]:
        allowed = tensor_core_kinds(dot, row.arch)
        if allowed and dot["kind"] not in allowed:
            detail = (
                f"{dot['where']}: {dot['rows']}x{dot['columns']} {dot['operand']} dot on "
                f"{dot['kind']}, not {'/'.join(allowed)}"
            )
            failures.append(("tensor cores", detail))
    for name, (bits, possible) in narrow_loads(row).items():
        failures.append(("loads", f"{name}: {bits}-bit loads where {possible}-bit are possible"))
    if result["ptx_atomics"]:
        detail = f"{result['ptx_atomics']} atomic instructions (gradients must be deterministic)"
        failures.append(("atomics", detail))
    return failures


def tensor_core_kinds(dot: dict, arch: int) -> tuple[str, ...]:
    """The lowerings a dot may have: any for IEEE float32 (no tensor core computes it)."""
    if dot["operand"] in ("f32", "f64") and dot["precision"] in ("ieee", "2"):
        return ()
    if arch < 90:
        return ("mma",)
    return ("wgmma",) if dot["rows"] >= 64 else ("mma", "wgmma")


def big_operand_loads(row: Row) -> list[tuple[str, int, int]]:
    """(parameter, narrowest load in bits, widest its tensor and tile allow) of each big operand
    the row loads, for each way it was launched."""
    result = row.result
    found = []
    for operands in row.operands:
        loaded = {name: bits for name, bits in result["loads"].items() if name in operands}
        largest = max((operands[name][0] for name in loaded), default=0)
        for name, bits in loaded.items():
            span, wide, element = operands[name]
            if span * 16 >= largest:
                tile = result["per_thread"].get(name, 128) * element
                found.append((name, min(bits), min(128, tile) if wide else min(bits)))
    return found


def narrow_loads(row: Row) -> dict[str, tuple[int, int]]:
    return {
        name: (bits, possible) for name, bits, possible in big_operand_loads(row) if bits < possible
    }


def table(rows: list[Row]) -> str:
    """One line per kernel and config, merged over dtypes, flags and specializations, with each
    target's columns: regs (a range), spills (bytes stored + loaded) and smem (the largest),
    dots (how each dot of the source lowered), loads (the narrowest load of a big operand, bits);
    the verdict names each failed check and its targets. n: the compiles merged."""
    targets = sorted({row.arch for row in rows})
    groups = {}
    for row in sorted(rows, key=lambda r: (r.kernel, r.order, r.config)):
        group = groups.setdefault((row.kernel, row.config), defaultdict(set))
        group["dtype"] |= row.dtypes
        group["flags"].add(row.flags or "-")
        group["spec"].add(row.specialization)
        group["n"].add(id(row))
        for name, _ in row.failures:
            group[f"fail {name}"].add(row.arch)
        result = row.result
        if "error" not in result:
            arch = row.arch
            group[f"regs {arch}"].add(result["registers"])
            group[f"spills {arch}"].add(result["spill_stores"] + result["spill_loads"])
            group[f"smem {arch}"].add(result["shared"])
            kinds = [dot["kind"] for dot in result["dots"]]
            lowered = " ".join(f"{kind}{kinds.count(kind)}" for kind in sorted(set(kinds)))
            group[f"dots {arch}"].add(lowered or "-")
            group[f"loads {arch}"] |= {bits for _, bits, _ in big_operand_loads(row)}
    per_target = ("regs", "spills", "smem", "dots", "loads")
    header = ["kernel", "config", "dtype", "flags", "spec", "n"]
    header += [f"{column}{arch}" for arch in targets for column in per_target] + ["verdict"]
    lines = [header]
    for (kernel, config), group in groups.items():
        line = [
            kernel, config, ",".join(sorted(group["dtype"], key=_dtype_order)),
            " | ".join(sorted(group["flags"])), " | ".join(sorted(group["spec"])),
            str(len(group["n"])),
        ]  # fmt: skip
        for arch in targets:
            regs = sorted(group[f"regs {arch}"])
            line += [
                "-" if not regs else f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}-{regs[-1]}",
                str(max(group[f"spills {arch}"], default="-")),
                f"{max(group[f'smem {arch}']) / 1024:.0f}K" if group[f"smem {arch}"] else "-",
                " | ".join(sorted(group[f"dots {arch}"])) or "-",
                str(min(group[f"loads {arch}"], default="-")),
            ]
        failed = [key.removeprefix("fail ") for key in group if key.startswith("fail ")]
        line.append(
            " ".join(
                f"{name}({','.join(map(str, sorted(group[f'fail {name}'])))})" for name in failed
            )
            or "ok"
        )
        lines.append(line)
    widths = [min(max(len(line[i]) for line in lines), 32) for i in range(len(header))]
    widths[-1] = max(len(line[-1]) for line in lines)
    return "\n".join(
        "  ".join(
            _clip(cell, width).ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _dtype_order(label: str) -> int:
    return list(DTYPES).index(label) if label in DTYPES else len(DTYPES)


def failure_summary(rows: list[Row], uncovered: list[str]) -> str:
    """The failures by kernel and check: config, target, dtypes, flags and a detail."""
    grouped = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for name, detail in row.failures:
            grouped[row.kernel][name].append((row, _clip(detail.splitlines()[0], 200)))
    lines = [
        f"{name}: no launch in the grid compiles it (add it to the grid)" for name in uncovered
    ]
    for kernel in sorted(grouped):
        lines.append(f"{kernel}:")
        for name, failures in grouped[kernel].items():
            lines.append(f"  {name} ({len(failures)} compiles)")
            merged = defaultdict(set)
            for row, detail in failures:
                merged[(row.order, row.config, row.target, row.flags, detail)] |= row.dtypes
            for (_, config, target, flags, detail), dtypes in sorted(merged.items()):
                dtypes = ",".join(sorted(dtypes, key=_dtype_order))
                lines.append(f"    {config}  {target}  {dtypes}  [{flags}]  {detail}")
    return "\n".join(lines)


def _row_json(row: Row) -> dict:
    return {
        "kernel": row.kernel,
        "function": row.function,
        "config": row.config,
        "target": row.target,
        "dtypes": sorted(row.dtypes, key=_dtype_order),
        "flags": row.flags,
        "constants": row.constants,
        "specialization": row.specialization,
        "cases": sorted(row.cases),
        "result": row.result,
        "failures": [{"check": name, "detail": detail} for name, detail in row.failures],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdelta.kernels.aot",
        description="Compile every fastdelta Triton kernel for real GPUs (no GPU needed) and "
        "check registers, spills, shared memory, tensor-core dots and load widths.",
    )
    parser.add_argument(
        "--full", action="store_true", help="the whole grid (thousands of compiles)"
    )
    parser.add_argument("--targets", default="80,90", help="compute capabilities (default 80,90)")
    parser.add_argument("--json", type=Path, help="write every row to this file")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument(
        "-k", dest="keyword", default="",
        help="only launches whose kernel, dtype and case contain all these words, e.g. "
        "'lora._down bf16'",
    )  # fmt: skip
    parser.add_argument(
        "--cache-dir", type=Path,
        help="Triton's cache directory (default: Triton's); an empty one measures a cold run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if _common.INTERPRETED:
        parser.error("TRITON_INTERPRET is set: run without it, so the kernels are compiled")
    targets = [int(target) for target in args.targets.split(",") if target]
    unknown = [target for target in targets if target not in SHARED_MEMORY_LIMIT]
    if unknown:
        parser.error(f"targets {unknown} unknown: choose from {sorted(SHARED_MEMORY_LIMIT)}")
    # Keep Triton's current default (fused multiply-add on) and its warning off every compile.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = str(args.cache_dir)
    start = time.perf_counter()
    cases = full_grid()
    plan = make_plan(cases, targets, args.keyword)
    rows = list((plan.rows if args.full else covering_rows(plan)).values())
    sys.stderr.write(
        f"{len(cases)} cases, {len(rows)} compiles ({time.perf_counter() - start:.0f} s to plan)\n"
    )
    compile_rows(rows, args.jobs, _progress(start))
    for row in rows:
        row.failures = check(row)
    uncovered = [] if args.keyword else sorted(set(defined_kernels()) - plan.recorded)
    elapsed = time.perf_counter() - start
    failing = [row for row in rows if row.failures]
    cached = sum(bool(row.result.get("cached")) for row in rows)
    print(table(rows))
    print(
        f"\n{len(rows)} compiles ({cached} measurements cached) of {len(cases)} cases for "
        f"{', '.join(f'sm_{t}' for t in targets)} in {elapsed:.0f} s with {args.jobs} processes;"
        f" {len(failing)} fail"
    )
    if failing or uncovered:
        print("\nFAILURES\n" + failure_summary(rows, uncovered))
    if args.json:
        report = {
            "triton": triton.__version__,
            "grid": "full" if args.full else "quick",
            "targets": targets,
            "seconds": elapsed,
            "cases": [case.label for case in cases],
            "defined_kernels": defined_kernels(),
            "recorded_kernels": sorted(plan.recorded),
            "uncovered_kernels": uncovered,
            "rows": [_row_json(row) for row in rows],
        }
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 1 if failing or uncovered else 0


def _progress(start: float):
    """Report on stderr at each tenth of the compiles."""
    shown = set()

    def report(done: int, total: int) -> None:
        if done * 10 // total not in shown:
            shown.add(done * 10 // total)
            sys.stderr.write(f"  {done}/{total} compiled, {time.perf_counter() - start:.0f} s\n")

    return report


if __name__ == "__main__":
    sys.exit(main())
