"""A model's module tree as a `rich` tree: repeated siblings folded, parameters coloured by state.

`Visualization(model).structure_graph()` replaces OpenDelta's call of the same name. Each node
reads `name(ClassName)` followed by the module's own parameters and their shapes
(`query,key,value(Linear) weight:[36, 36] bias:[36]`). Siblings with identical subtrees, parameter
states included, share one node (`0-11(BertLayer)`), so a layer that carries a delta or was
unfrozen differently gets a node of its own.

Where a backbone carries named delta models (or some are switched off), each delta node also
shows its delta model's name and whether it runs: `lora_1(LoraDelta)[sql, inactive]`.

Parameter states are colours on a terminal. Where there is no colour (a log file, a pipe,
NO_COLOR) each parameter that is not frozen carries its state as a tag instead
(`weight:[2, 36](trainable)`, `lora_A:[8, 36](delta)`), and `output_console()` gives stdout a
console that does not wrap lines at 80 columns there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text
from rich.tree import Tree
from torch import nn

from fastdelta.injection import DEFAULT_NAME, delta_model_name, is_active
from fastdelta.layers.base import attached_deltas, delta_parameter_names
from fastdelta.structures import common_structure_names

# Parameter state -> rich style. A delta is told apart from the backbone even when frozen, so a
# delta loaded for inference still shows where it sits.
STATE_STYLES = {
    "frozen": "dim",
    "trainable": "green",
    "delta": "bold red",
    "frozen delta": "dim red",
}
# Parameter state -> the tag it carries where there is no colour; a frozen one carries none.
STATE_TAGS = {
    "frozen": "",
    "trainable": "(trainable)",
    "delta": "(delta)",
    "frozen delta": "(frozen delta)",
}
DELTA_MODULE_STYLE = STATE_STYLES["delta"]
CLASS_STYLE = "cyan"
# The width lines are laid out in off a terminal: wide enough that no line of a structure graph
# or a table wraps (rich's default there is 80 columns). A COLUMNS variable still decides.
UNWRAPPED_WIDTH = 1000


def output_console() -> Console:
    """A rich Console on stdout: rich's own on a terminal; off one (stdout is a file or a
    pipe), one that does not wrap lines, unless $COLUMNS sets a width."""
    console = Console()
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(width=UNWRAPPED_WIDTH)


def has_colour(console: Console) -> bool:
    """Whether `console` shows colours (not a file or pipe, not NO_COLOR)."""
    return console.color_system is not None and not console.no_color


@dataclass
class _Node:
    """One module as shown: its label, its own parameters and its visible children."""

    label: str  # the module's own name, or its common-structure name relative to its ancestors
    module_class: type
    is_delta: bool  # attached to its parent as a delta
    parameters: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, state)
    children: list[_Node] = field(default_factory=list)
    has_parameters: bool = False  # anywhere in the subtree, shown or not
    visible: bool = True
    # Equal for siblings with identical subtrees (names, classes, shapes, states); computed once
    # bottom-up, so folding compares one int instead of walking two subtrees.
    signature: int = 0
    # A delta's delta model name and state ("x", "x, inactive"), shown where names matter.
    delta_label: str = ""


class StructureTree(Tree):
    """A rich `Tree` that renders the legend of parameter styles under itself, and, on a
    console without colour, its `tagged` twin (parameter states as text tags) instead."""

    tagged: Tree | None = None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.tagged is not None and not has_colour(console):
            yield self.tagged
            yield legend(tags=True)
            return
        yield from super().__rich_console__(console, options)
        yield legend()


def legend(tags: bool = False) -> Text:
    """The line naming each parameter style, e.g. `Legend: frozen  trainable  delta  ...`;
    with `tags`, the tag of each state: `Legend: frozen (no tag)  trainable (trainable) ...`."""
    parts: list[str | tuple[str, str]] = ["Legend: "]
    for state, style in STATE_STYLES.items():
        shown = f"{state} {STATE_TAGS[state] or '(no tag)'}" if tags else state
        parts += [(shown, style), "  "]
    return Text.assemble(*parts[:-1])


class Visualization:
    """Draws the module tree of `model` (see `structure_graph`)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def structure_graph(
        self,
        rootname: str = "root",
        expand_params: bool = False,
        keep_non_params: bool = False,
        common_structure: bool = False,
        mapping: dict | None = None,
        only_common: bool = False,
        printTree: bool = True,  # OpenDelta's keyword, kept for its scripts
    ) -> Tree:
        """The module tree of the model, printed to stdout when `printTree`.

        `expand_params` puts each parameter on a line of its own under its module instead of
        beside it; `keep_non_params` also shows modules without any parameter (dropout,
        activations); `common_structure` shows common-structure names (`attn@`, `q@`) where a
        module has one, and `only_common` hides the modules that have none, except on the path
        to one that has. The common names are those of the built-in map of the model's
        architecture, or of `mapping`, a map in OpenDelta's format (see `mapping_names`), for a
        model that has none. Delta modules are always shown. Returns a `StructureTree` (a
        `rich.tree.Tree` that prints its legend).
        """
        if mapping is not None and not common_structure:
            raise ValueError(
                "mapping is a common-structure map, used with common_structure=True: pass "
                "common_structure=True to show its names, or leave mapping out"
            )
        if only_common and not common_structure:
            raise ValueError("only_common=True needs common_structure=True.")
        if mapping is not None:
            common_names = mapping_names(self.model, mapping)
        elif common_structure:
            common_names = common_structure_names(self.model)
        else:
            common_names = {}
        describer = _Describer(
            delta_names=delta_parameter_names(self.model),
            common_names=common_names,
            keep_non_params=keep_non_params,
            only_common=only_common,
            show_names=_has_named_deltas(self.model),
        )
        root = describer.describe(self.model, "", rootname, ancestor_common=(), is_delta=False)
        tree = StructureTree(_node_label(rootname, root, expand_params))
        _add_node_contents(tree, root, expand_params)
        tree.tagged = Tree(_node_label(rootname, root, expand_params, tags=True))
        _add_node_contents(tree.tagged, root, expand_params, tags=True)
        if printTree:
            output_console().print(tree)
        return tree


def _has_named_deltas(model: nn.Module) -> bool:
    """Whether a delta of `model` has a name other than "default" or is inactive: then each
    delta shows its delta model's name and state (`lora(LoraDelta)[sql, inactive]`)."""
    return any(
        delta_model_name(host._modules[name]) != DEFAULT_NAME or not is_active(host._modules[name])
        for host in model.modules()
        for name, _ in attached_deltas(host)
    )


def mapping_names(model: nn.Module, mapping: dict) -> dict[str, tuple[str, ...]]:
    """Module name -> its common name, for each module of `model` that OpenDelta's
    common-structure `mapping` names.

    OpenDelta's format is nested: each key is a child's name, or a dotted path through children
    that have no common name of their own (`"self.query"`), and its value a dict whose
    `"__name__"` is the common name (`"attn"`; "" for a module with none), holding the map of
    what lies inside; a `"$"` key stands for any child (a layer index), kept as it is. So
    `encoder.layer.0.attention.self.query` of BERT's map is `encoder@.block@.0.attn@.q@`."""
    _check_mapping(mapping, "mapping")
    names = {}
    for name, _ in model.named_modules():
        common = _mapped_name(name, mapping) if name else None
        if common:
            names[name] = (common,)
    return names


def _check_mapping(mapping, where: str) -> None:
    """Every level of an OpenDelta map is a dict, and every named entry has a `__name__`."""
    if not isinstance(mapping, dict):
        raise TypeError(
            f"{where} must be a dict in OpenDelta's common-structure format, such as "
            f"{{'encoder': {{'__name__': 'encoder', ...}}}}, got {type(mapping).__name__}"
        )
    for key, value in mapping.items():
        if key == "__name__":
            if not isinstance(value, str):
                raise TypeError(f"{where}['__name__'] must be a string, got {value!r}")
            continue
        if key != "$" and (not isinstance(value, dict) or "__name__" not in value):
            raise ValueError(
                f"{where}[{key!r}] must be a dict with a '__name__' (the common name, '' for "
                f"none), got {value!r}"
            )
        _check_mapping(value, f"{where}[{key!r}]")


def _mapped_name(name: str, mapping: dict) -> str | None:
    """The common name `mapping` gives the module `name`, or None where it gives none."""
    node, query, chain = mapping, "", []
    for segment in name.split("."):
        query += segment
        if query in node:
            node = node[query]
            if not node["__name__"]:
                return None
            chain.append(".".join(part + "@" for part in node["__name__"].split(".")))
            query = ""
        elif "$" in node:
            node = node["$"]
            chain.append(query)
            query = ""
        else:
            query += "."
    return None if query else ".".join(chain)


class _Describer:
    """Builds the `_Node` tree of a model bottom-up, deciding what is shown."""

    def __init__(
        self,
        delta_names: set[str],
        common_names: dict[str, tuple[str, ...]],
        keep_non_params: bool,
        only_common: bool,
        show_names: bool = False,
    ):
        self.show_names = show_names  # the backbone has named or inactive deltas
        self.delta_names = delta_names
        self.common_names = common_names
        self.keep_non_params = keep_non_params
        self.only_common = only_common
        self.signatures: dict[tuple, int] = {}  # structural key -> small int, shared by equals

    def describe(
        self,
        module: nn.Module,
        name: str,
        label: str,
        ancestor_common: tuple[str, ...],
        is_delta: bool,
    ) -> _Node:
        """The node of `module`, whose full name is `name` ("" for the model itself), shown as
        `label` unless it has a common name; `ancestor_common` is the common name of its
        nearest mapped ancestor."""
        common = self.common_names.get(name, ())
        if common:
            label = _relative_common_name(common, ancestor_common)
            ancestor_common = common
        prefix = name + "." if name else ""
        parameters = tuple(
            (parameter_name, tuple(parameter.shape), self.state(prefix + parameter_name, parameter))
            for parameter_name, parameter in module.named_parameters(recurse=False)
        )
        delta_names = {delta_name for delta_name, _ in attached_deltas(module)}
        children = [
            self.describe(
                child, prefix + child_name, child_name, ancestor_common, child_name in delta_names
            )
            for child_name, child in module.named_children()
        ]
        node = _Node(label, type(module), is_delta, parameters)
        if is_delta and self.show_names:
            state = "" if is_active(module) else ", inactive"
            node.delta_label = delta_model_name(module) + state
        node.children = [child for child in children if child.visible]
        node.has_parameters = bool(parameters) or any(child.has_parameters for child in children)
        # A delta is always shown, even one without parameters of its own (BitFit's marker).
        node.visible = is_delta or (
            (node.has_parameters or self.keep_non_params)
            and (not self.only_common or bool(common) or bool(node.children))
        )
        key = (
            node.module_class,
            is_delta,
            node.delta_label,
            parameters,
            tuple((child.label, child.signature) for child in node.children),
        )
        node.signature = self.signatures.setdefault(key, len(self.signatures))
        return node

    def state(self, full_name: str, parameter: nn.Parameter) -> str:
        """One of the keys of `STATE_STYLES`."""
        if full_name in self.delta_names:
            return "delta" if parameter.requires_grad else "frozen delta"
        return "trainable" if parameter.requires_grad else "frozen"


def _relative_common_name(common: tuple[str, ...], ancestor_common: tuple[str, ...]) -> str:
    """`common` without the common name of the nearest mapped ancestor: `q@`, not
    `encoder@.block@.0.attn@.q@`, so that layers fold; alternatives joined by "|"."""
    relative = []
    for name in common:
        for ancestor in ancestor_common:
            if name.startswith(ancestor + "."):
                name = name[len(ancestor) + 1 :]
                break
        relative.append(name)
    return "|".join(dict.fromkeys(relative))


def _fold_names(names: list[str]) -> str:
    """Names of folded siblings as one label: runs of consecutive indices become ranges, so
    ["0", "1", "2", "3", "5"] -> "0-3,5" and ["query", "key", "value"] -> "query,key,value"."""
    parts = []
    start = 0
    while start < len(names):
        end = start
        while (
            names[end].isdigit()
            and end + 1 < len(names)
            and names[end + 1].isdigit()
            and int(names[end + 1]) == int(names[end]) + 1
        ):
            end += 1
        parts.append(names[start] if end == start else f"{names[start]}-{names[end]}")
        start = end + 1
    return ",".join(parts)


def _parameter_text(name: str, shape: tuple[int, ...], state: str, tags: bool = False) -> Text:
    """`weight:[36, 52]` in the style of its state, followed by its tag when `tags`."""
    tag = STATE_TAGS[state] if tags else ""
    return Text(f"{name}:{list(shape)}{tag}", style=STATE_STYLES[state])


def _node_label(name: str, node: _Node, expand_params: bool, tags: bool = False) -> Text:
    """`name(ClassName)`, followed by the node's own parameters unless they get lines of their
    own; a delta module's name is styled like a delta parameter."""
    name_style = DELTA_MODULE_STYLE if node.is_delta else ""
    label = Text.assemble((name, name_style), (f"({node.module_class.__name__})", CLASS_STYLE))
    if node.delta_label:
        label.append(f"[{node.delta_label}]", style="dim" if "inactive" in node.delta_label else "")
    if not expand_params:
        for parameter in node.parameters:
            label.append(" ")
            label.append_text(_parameter_text(*parameter, tags=tags))
    return label


def _add_node_contents(tree: Tree, node: _Node, expand_params: bool, tags: bool = False) -> None:
    """Adds under `tree` the parameters of `node` (when expanded) and its children, identical
    siblings folded into one branch in order of first appearance."""
    if expand_params:
        for parameter in node.parameters:
            tree.add(_parameter_text(*parameter, tags=tags))
    groups: dict[int, list[_Node]] = {}
    for child in node.children:
        groups.setdefault(child.signature, []).append(child)
    for members in groups.values():
        name = _fold_names([member.label for member in members])
        branch = tree.add(_node_label(name, members[0], expand_params, tags))
        _add_node_contents(branch, members[0], expand_params, tags)
