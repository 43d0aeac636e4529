"""Reading what a compile leaves: registers and spills from the ptxas log; the dots and each
thread's share of a tile from the TTGIR; global load widths per pointer and atomic instructions
from the PTX."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path


def atomic_instructions(ptx: str) -> int:
    """The atomic read-modify-write instructions in `ptx` (atom.*, and red.*, the reduction
    without a result that atomic adds lower to)."""
    return len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.", ptx, flags=re.MULTILINE))


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
    from it (the tile's elements over the block's threads): no load of it can be wider. A copy
    into shared memory whose contiguous dimension is not the tile's in global memory moves one
    element at a time: sm_90's wgmma reads 32-bit (TF32) operands only K-major, so Triton stores
    an operand that runs along M or N in memory transposed (the hardware transpose of 16-bit
    operands has no 32-bit form).

    The TTGIR is in SSA form with the parameters by name, so a value's parameters are those of
    the values it is computed from; a loop's carried values start from their initial values."""
    warps = int(re.search(r'"ttg\.num-warps" = (\d+)', ttgir).group(1))
    contiguous = _contiguous_dimensions(ttgir)
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
            layouts = re.findall(r"(#\w+)[,>]", rest)
            if op == "ttg.async_copy_global_to_local" and _transposing(layouts, contiguous):
                share = 1
            for name in of([pointer]):
                fewest[name] = min(fewest.get(name, share), share)
    return fewest


def _contiguous_dimensions(ttgir: str) -> dict[str, int]:
    """The dimension that runs contiguously in each 2-D layout the TTGIR defines: a blocked or
    swizzled layout's first `order` entry; an NVMMA shared layout's last dimension, or its
    first when `transposed`."""
    found = {}
    for name, body in re.findall(r"^(#\w+) = #ttg\.\w+<\{(.*)\}>", ttgir, re.M):
        order = re.search(r"order = \[(\d+), \d+\]", body)
        transposed = re.search(r"transposed = (true|false)", body)
        if order:
            found[name] = int(order.group(1))
        elif transposed:
            found[name] = 0 if transposed.group(1) == "true" else 1
    return found


def _transposing(layouts: list[str], contiguous: dict[str, int]) -> bool:
    """Whether a copy from the first of `layouts` (the pointers') to the next one it names
    (shared memory's) changes the contiguous dimension."""
    known = [contiguous[name] for name in layouts if name in contiguous]
    return len(known) >= 2 and known[0] != known[1]
