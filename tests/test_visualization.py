"""`Visualization(model).structure_graph()`: folding, parameter states, common-structure names."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from rich.text import Text
from rich.tree import Tree
from tiny_models import HIDDEN, tiny_model
from torch import nn

from fastdelta.injection import attach_delta
from fastdelta.layers.base import DeltaLayer
from fastdelta.structures import UnsupportedArchitectureError
from fastdelta.visualization import (
    DELTA_MODULE_STYLE,
    STATE_STYLES,
    STATE_TAGS,
    Visualization,
    output_console,
)


class TinyLora(DeltaLayer):
    delta_name = "lora"

    def __init__(self, features: int, rank: int = 2):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, features))
        self.lora_B = nn.Parameter(torch.zeros(features, rank))


class TinyBitFit(DeltaLayer):
    """Trains its host's own bias; has no parameter of its own."""

    delta_name = "bitfit"
    host_parameter_names = ("bias",)


def query_of(model: nn.Module, layer: int) -> nn.Module:
    return model.encoder.layer[layer].attention.self.query


def attach_lora(model: nn.Module, layer: int = 1) -> None:
    attach_delta(query_of(model, layer), TinyLora(HIDDEN), TinyLora.delta_name, "parallel")


def attach_bitfit(model: nn.Module, layer: int = 1) -> None:
    attach_delta(query_of(model, layer), TinyBitFit(), TinyBitFit.delta_name, role=None)


def attach_plain_module(model: nn.Module, layer: int = 1) -> None:
    """A delta need not be a DeltaLayer: any module attached as one counts."""
    attach_delta(query_of(model, layer), nn.Linear(HIDDEN, HIDDEN), "adapter", "parallel")


def train_only_one_bias(model: nn.Module, layer: int = 1) -> None:
    model.requires_grad_(False)
    query_of(model, layer).bias.requires_grad_(True)


def freeze_everything(model: nn.Module) -> None:
    model.requires_grad_(False)


def attach_frozen_lora(model: nn.Module) -> None:
    attach_lora(model)
    model.requires_grad_(False)


def render(tree: Tree) -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(tree)
    return console.export_text()


def graph_text(model: nn.Module, **options) -> str:
    return render(Visualization(model).structure_graph(printTree=False, **options))


def labels(tree: Tree):
    yield tree.label
    for child in tree.children:
        yield from labels(child)


def label_starting(tree: Tree, prefix: str) -> Text:
    return next(label for label in labels(tree) if label.plain.startswith(prefix))


def style_of(label: Text, fragment: str) -> str:
    """The style of the span of `label` where `fragment` starts."""
    start = label.plain.index(fragment)
    return next(str(span.style) for span in label.spans if span.start <= start < span.end)


@pytest.fixture
def bert() -> nn.Module:
    return tiny_model("bert")


@pytest.mark.parametrize("layers", [2, 12])
def test_identical_siblings_fold(layers):
    text = graph_text(tiny_model("bert", num_hidden_layers=layers))
    assert f"0-{layers - 1}(BertLayer)" in text
    assert "query,key,value(Linear)" in text
    assert text.count("(BertLayer)") == 1


def test_parameter_shapes_follow_their_module(bert):
    freeze_everything(bert)  # frozen parameters carry no tag
    text = graph_text(bert)
    assert "word_embeddings(Embedding) weight:[96, 36]" in text
    assert "intermediate(BertIntermediate)" in text
    assert "dense(Linear) weight:[52, 36] bias:[52]" in text


def test_expand_params_gives_each_parameter_its_own_line(bert):
    freeze_everything(bert)
    lines = [line.rstrip() for line in graph_text(bert, expand_params=True).splitlines()]
    module_line = next(i for i, line in enumerate(lines) if line.endswith("dense(Linear)"))
    assert lines[module_line + 1].endswith("weight:[36, 36]")
    assert lines[module_line + 2].endswith("bias:[36]")


@pytest.mark.parametrize(
    "make_layer_differ", [attach_lora, attach_bitfit, attach_plain_module, train_only_one_bias]
)
def test_a_layer_that_differs_is_not_folded(make_layer_differ):
    model = tiny_model("bert", num_hidden_layers=3)
    make_layer_differ(model)
    text = graph_text(model)
    assert "0,2(BertLayer)" in text
    assert "1(BertLayer)" in text
    assert "0-2" not in text


@pytest.mark.parametrize(
    "prepare, node, fragment, state",
    [
        (freeze_everything, "query,key,value(Linear)", "weight", "frozen"),
        (None, "query,key,value(Linear)", "weight", "trainable"),
        (attach_lora, "lora(TinyLora)", "lora_A", "delta"),
        (attach_frozen_lora, "lora(TinyLora)", "lora_B", "frozen delta"),
        (attach_bitfit, "query(Linear)", "bias", "delta"),
        (attach_plain_module, "adapter(Linear)", "weight", "delta"),
    ],
)
def test_parameter_styled_by_state(bert, prepare, node, fragment, state):
    if prepare is not None:
        prepare(bert)
    tree = Visualization(bert).structure_graph(printTree=False)
    assert style_of(label_starting(tree, node), fragment) == STATE_STYLES[state]


@pytest.mark.parametrize(
    "attach, name",
    [(attach_lora, "lora"), (attach_bitfit, "bitfit"), (attach_plain_module, "adapter")],
)
def test_delta_module_name_stands_out(bert, attach, name):
    attach(bert)
    tree = Visualization(bert).structure_graph(printTree=False)
    assert style_of(label_starting(tree, name + "("), name) == DELTA_MODULE_STYLE


def test_legend_is_printed_under_the_tree(bert):
    last_line = graph_text(bert).rstrip().splitlines()[-1]
    assert last_line.startswith("Legend:")
    for state in STATE_STYLES:
        assert state in last_line


def test_modules_without_parameters_are_hidden_unless_kept(bert):
    assert "dropout" not in graph_text(bert)
    assert "dropout(Dropout)" in graph_text(bert, keep_non_params=True)


def test_common_structure_names_replace_mapped_names(bert):
    text = graph_text(bert, common_structure=True)
    for shown in [
        "block@(ModuleList)",
        "0-1(BertLayer)",
        "attn@(BertAttention)",
        "q@,k@,v@(Linear)",
        "w1@(Linear)",
        "pooler(BertPooler)",
    ]:
        assert shown in text


def test_only_common_keeps_just_the_paths_to_mapped_modules(bert):
    text = graph_text(bert, common_structure=True, only_common=True)
    assert "q@,k@,v@(Linear)" in text
    assert "self(BertSelfAttention)" in text  # unmapped, but on the path to q@
    assert "word_embeddings" not in text
    assert "pooler" not in text


def test_common_structure_of_an_unmapped_model_raises():
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(UnsupportedArchitectureError, match="no common-structure map"):
        Visualization(model).structure_graph(common_structure=True, printTree=False)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"mapping": {}}, ValueError, "common_structure=True"),
        ({"only_common": True}, ValueError, "common_structure=True"),
    ],
)
def test_unsupported_options_raise(bert, options, error, message):
    with pytest.raises(error, match=message):
        Visualization(bert).structure_graph(printTree=False, **options)


@pytest.mark.parametrize("print_tree", [True, False])
def test_print_tree_prints_only_when_asked(bert, capsys, print_tree):
    tree = Visualization(bert).structure_graph(rootname="bert", printTree=print_tree)
    printed = capsys.readouterr().out
    assert isinstance(tree, Tree)
    assert render(tree).startswith("bert(BertModel)")
    if print_tree:
        assert "0-1(BertLayer)" in printed
        assert "Legend:" in printed
    else:
        assert printed == ""


# Off a terminal: states as text tags, lines not wrapped


def colour_render(tree: Tree) -> str:
    console = Console(record=True, width=200, file=io.StringIO(), color_system="truecolor")
    console.print(tree)
    return console.export_text()


def test_states_read_as_tags_without_colour(bert):
    train_only_one_bias(bert)
    attach_lora(bert, layer=0)
    text = graph_text(bert)  # a StringIO console: no colour
    assert "bias:[36](trainable)" in text
    assert "lora_A:[2, 36](delta) lora_B:[36, 2](delta)" in text
    assert "word_embeddings(Embedding) weight:[96, 36]\n" in text  # frozen: no tag
    last_line = text.rstrip().splitlines()[-1]
    for state, tag in STATE_TAGS.items():
        assert f"{state} {tag or '(no tag)'}" in last_line


def test_frozen_delta_has_its_own_tag(bert):
    attach_frozen_lora(bert)
    assert "lora_A:[2, 36](frozen delta)" in graph_text(bert)


def test_colour_consoles_show_no_tags(bert):
    attach_lora(bert)
    text = colour_render(Visualization(bert).structure_graph(printTree=False))
    assert "lora_A:[2, 36] lora_B:[36, 2]" in text
    assert "(delta)" not in text
    assert "(trainable)" not in text


def test_no_colour_environment_gets_tags_on_a_terminal(bert, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    attach_lora(bert)
    console = Console(record=True, width=200, file=io.StringIO(), force_terminal=True)
    console.print(Visualization(bert).structure_graph(printTree=False))
    assert "lora_A:[2, 36](delta)" in console.export_text()


def test_output_console_does_not_wrap_off_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    console = output_console()
    assert not console.is_terminal
    assert console.width > 300


def test_columns_still_sets_the_width_off_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "123")
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert output_console().width == 123


def test_a_printed_graph_keeps_long_lines_whole_in_a_file(bert, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    attach_lora(bert)
    Visualization(bert).structure_graph(rootname="a_long_root_name_" * 6)
    lines = stdout.getvalue().splitlines()
    assert lines[0] == "a_long_root_name_" * 6 + "(BertModel)"  # 113 characters, one line
    assert "\x1b[" not in stdout.getvalue()  # no colour codes in the file
