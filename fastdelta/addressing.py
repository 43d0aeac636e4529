"""Name-based addressing: which submodules of a model a list of names selects.

An entry selects a module by its full dotted name (`bert.encoder.layer.0.attention.self.query`):
- a plain entry matches when the name equals it or ends with "." + entry, so it always covers
  whole dot-segments (`attn` does not match `c_attn`);
- an entry starting with `[r]` is a regular expression that matches when one of its matches ends
  at the end of the name and starts at the start of the name or right after a dot;
- an entry holding `@` is written in common-structure names (`attn@.q@`) and is matched against
  the common names of the module (see `fastdelta.structures`) instead of its own name.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from fastdelta.layers.base import attached_deltas
from fastdelta.structures import common_structure_names

REGEX_PREFIX = "[r]"
COMMON_STRUCTURE_MARK = "@"


def is_common_structure_entry(entry: str) -> bool:
    return COMMON_STRUCTURE_MARK in entry


def name_matches(name: str, entry: str) -> bool:
    """Whether the dotted `name` is selected by one addressing `entry`."""
    if entry.startswith(REGEX_PREFIX):
        pattern = _compile(entry)
        starts = [0] + [index + 1 for index, char in enumerate(name) if char == "."]
        return any(pattern.fullmatch(name, start) for start in starts)
    return name == entry or name.endswith("." + entry)


def pattern_matches(pattern: str, name: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule: the regex `pattern` matches the end of the module
    name `name` at a dot boundary."""
    return re.match(rf"(?:.*\.)?(?:{pattern})$", name) is not None


def _compile(entry: str) -> re.Pattern:
    try:
        return re.compile(entry[len(REGEX_PREFIX) :])
    except re.error as error:
        raise ValueError(
            f"Module entry {entry!r} is not a valid regular expression: {error}"
        ) from None


def check_entries(entries: Sequence[str] | None, argument: str) -> list[str]:
    """Validate a user's list of addressing entries and return it as a list of strings."""
    if entries is None:
        return []
    if isinstance(entries, str):
        raise TypeError(
            f"{argument} must be a list of names, got the string {entries!r}; write [{entries!r}]"
        )
    if not isinstance(entries, (list, tuple)):
        raise TypeError(
            f"{argument} must be a list of module names such as ['query', 'value'], got "
            f"{entries!r} ({type(entries).__name__})"
        )
    entries = list(entries)
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"{argument} must hold non-empty strings, got {entry!r}")
        if entry.startswith(REGEX_PREFIX):
            _compile(entry)
    return entries


class ModuleAddresses:
    """The names under which the modules of one model can be addressed.

    Common-structure names are computed only when an entry asks for them, so a model without a
    common-structure map works with plain and regex entries. Modules inside attached deltas are
    left out unless `include_deltas` (a delta's own layers are never targets of another delta).
    """

    def __init__(self, model: nn.Module, include_deltas: bool = False):
        self.model = model
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        if not include_deltas:
            delta_roots = tuple(
                f"{host_name}.{delta_name}" if host_name else delta_name
                for host_name, host in self.modules.items()
                for delta_name, _ in attached_deltas(host)
            )
            self.modules = {
                name: module
                for name, module in self.modules.items()
                if not any(name == root or name.startswith(root + ".") for root in delta_roots)
            }
        self._common: Mapping[str, tuple[str, ...]] | None = None

    @property
    def common(self) -> Mapping[str, tuple[str, ...]]:
        if self._common is None:
            self._common = common_structure_names(self.model)
        return self._common

    def names_of(self, module_name: str, entry: str) -> Iterable[str]:
        if is_common_structure_entry(entry):
            return self.common.get(module_name, ())
        return (module_name,)

    def matches(self, module_name: str, entry: str) -> bool:
        return any(name_matches(name, entry) for name in self.names_of(module_name, entry))

    def matches_any(self, module_name: str, entries: Iterable[str]) -> bool:
        return any(self.matches(module_name, entry) for entry in entries)

    def select(
        self, entries: Sequence[str], exclude: Sequence[str] = (), every_entry_must_match=True
    ) -> list[str]:
        """Names of the modules that match one of `entries` and none of `exclude`, in model order.

        Raises `ValueError` when the selection comes out empty, naming the entries that match
        nothing. Otherwise an entry (of either list) that matches no module is ignored with a
        warning naming the closest names, as OpenDelta ignores it (its own configs name modules
        that some models lack); with `every_entry_must_match=False` (a delta model's default
        targets, such as an LM head a model may lack) missing entries of `entries` are silent.
        """
        selected = [
            name
            for name in self.modules
            if name and self.matches_any(name, entries) and not self.matches_any(name, exclude)
        ]
        if not selected:
            raise ValueError(
                f"modified_modules {list(entries)} minus exclude_modules {list(exclude)} select no "
                f"module of {type(self.model).__name__}"
                + "".join(f"; {entry!r}{self.suggest(entry)}" for entry in self.unmatched(entries))
            )
        if every_entry_must_match:
            self.warn_unmatched(entries, "modified_modules")
        self.warn_unmatched(exclude, "exclude_modules")
        return selected

    def unmatched(self, entries: Iterable[str]) -> list[str]:
        return [
            entry
            for entry in entries
            if not any(self.matches(name, entry) for name in self.modules)
        ]

    def warn_unmatched(self, entries: Iterable[str], argument: str) -> None:
        """Warn about each entry that matches no module, with the closest names."""
        missing = self.unmatched(entries)
        if missing:
            warnings.warn(
                f"{argument}: no module of {type(self.model).__name__} matches "
                + "; ".join(f"{entry!r}{self.suggest(entry)}" for entry in missing)
                + (" (ignored)" if len(missing) == 1 else " (each ignored)"),
                stacklevel=4,
            )

    def suggest(self, entry: str) -> str:
        """A hint naming the real module names closest to a mistyped entry."""
        if is_common_structure_entry(entry):
            candidates = {
                suffix
                for names in self.common.values()
                for name in names
                for suffix in _suffixes(name)
            }
        else:
            candidates = {suffix for name in self.modules for suffix in _suffixes(name)}
        plain = entry[len(REGEX_PREFIX) :] if entry.startswith(REGEX_PREFIX) else entry
        close = difflib.get_close_matches(plain, sorted(candidates), n=5, cutoff=0.5)
        if not close:
            return (
                " (and no module name is close to it; see Visualization(model).structure_graph())"
            )
        return " (closest names: " + ", ".join(close) + ")"


def _suffixes(name: str) -> list[str]:
    """Every whole-segment suffix of a dotted name, without the pure layer-index ones."""
    segments = name.split(".")
    suffixes = [".".join(segments[i:]) for i in range(len(segments))]
    return [suffix for suffix in suffixes if not suffix.split(".")[0].isdigit()]
