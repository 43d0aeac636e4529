"""Planning the compiles: the rows (one kernel compiled for one target) that the grid's launches
compile, and the quick grid's subset of them, a greedy set cover."""

from __future__ import annotations

import ast
import dataclasses
import heapq
import inspect
import itertools
import re
import textwrap
from collections import defaultdict

import torch

from .. import dispatch
from ..configs import assume_shared_memory
from .factors import Case
from .jit_functions import _unwrap, bind, function_name, launch_name, variants
from .recording import Launch, record

# Per block: the dynamic shared memory a kernel may opt into, and the register file.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
REGISTER_FILE = 65536


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
