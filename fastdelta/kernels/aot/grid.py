"""The grid's cases: for each launcher, every pair of distinct values of two factors in some
case, and every combination of the values of the factors that choose kernels (CHOOSERS)."""

from __future__ import annotations

import itertools

import torch

from .. import dispatch
from .factors import FACTORS, Case
from .recording import record


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
