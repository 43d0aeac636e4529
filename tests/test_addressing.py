"""Name-based addressing: the matching rules of OPENDELTA_API.md, exactly."""

import pytest
from tiny_models import tiny_model
from torch import nn

from fastdelta.addressing import ModuleAddresses, check_entries, name_matches
from fastdelta.injection import attach_delta


@pytest.mark.parametrize(
    "name, entry, expected",
    [
        ("bert.encoder.layer.0.attention.self.query", "query", True),
        ("bert.encoder.layer.0.attention.self.query", "self.query", True),
        (
            "bert.encoder.layer.0.attention.self.query",
            "bert.encoder.layer.0.attention.self.query",
            True,
        ),
        ("query", "query", True),
        ("transformer.h.0.attn.c_attn", "attn", False),  # whole segments only
        ("transformer.h.0.attn.c_attn", "c_attn", True),
        ("transformer.h.0.attn", "attn", True),
        ("bert.encoder.layer.0.attention.self.query", "uery", False),
        ("bert.encoder.layer.0.attention.self.query", "attention", False),  # suffix, not infix
        ("encoder.layer.3.attention", r"[r][0-5]\.attention", True),
        ("encoder.layer.7.attention", r"[r][0-5]\.attention", False),
        ("encoder.layer.13.attention", r"[r][0-5]\.attention", False),  # starts after a dot only
        ("encoder.layer.3.attention.self", r"[r][0-5]\.attention", False),  # ends at the end only
        ("encoder.layer.3.attention", r"[r]encoder\.layer\.\d+\.attention", True),
        ("encoder.layer.3.attention", r"[r]ncoder\.layer\.\d+\.attention", False),
        ("q_proj", r"[r](q|v)_proj", True),
        ("model.layers.0.self_attn.v_proj", r"[r](q|v)_proj", True),
        ("model.layers.0.self_attn.k_proj", r"[r](q|v)_proj", False),
    ],
)
def test_name_matches_follows_the_opendelta_rules(name, entry, expected):
    assert name_matches(name, entry) is expected


def test_invalid_regex_is_rejected_where_it_enters():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        check_entries(["[r](unclosed"], "modified_modules")


@pytest.mark.parametrize("entries", ["query", ["query", ""], ["query", 3]])
def test_entries_must_be_a_list_of_strings(entries):
    with pytest.raises(TypeError, match="modified_modules"):
        check_entries(entries, "modified_modules")


def test_select_keeps_model_order_and_applies_exclude():
    addresses = ModuleAddresses(tiny_model("bert"))
    selected = addresses.select(["query", "value"], exclude=[r"[r]layer\.0\..*"])
    assert selected == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]


def test_common_structure_entries_match_through_the_map():
    addresses = ModuleAddresses(tiny_model("llama", "lm"))
    assert addresses.select(["attn@.q@"]) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert addresses.select(["lm_head@.proj@"]) == ["lm_head"]


def test_unmatched_entry_names_the_closest_real_names():
    addresses = ModuleAddresses(tiny_model("bert"))
    with pytest.warns(UserWarning, match=r"'querry'.*closest names: .*query.*\(ignored\)"):
        assert addresses.select(["querry", "value"]) == addresses.select(["value"])
    with pytest.raises(ValueError, match=r"select no module.*'querry'.*closest names: .*query"):
        addresses.select(["querry"])


def test_unmatched_common_structure_entry_suggests_common_names():
    addresses = ModuleAddresses(tiny_model("bert"))
    with pytest.raises(ValueError, match=r"'atn@.q@'.*closest names: .*attn@\.q@"):
        addresses.select(["atn@.q@"])


def test_unmatched_exclude_entry_is_ignored_with_a_warning():
    # As OpenDelta ignores it (its shipped configs name modules some models lack), but said.
    addresses = ModuleAddresses(tiny_model("bert"))
    with pytest.warns(UserWarning, match=r"exclude_modules.*.classifer..*\(ignored\)"):
        assert addresses.select(["query"], exclude=["classifer"]) == addresses.select(["query"])


def test_default_targets_need_only_one_entry_to_match():
    addresses = ModuleAddresses(tiny_model("bert"))  # no LM head: lm_head@.proj@ matches nothing
    selected = addresses.select(["attn@.q@", "lm_head@.proj@"], every_entry_must_match=False)
    assert len(selected) == 2
    with pytest.raises(ValueError, match="select no module"):
        addresses.select(["lm_head@.proj@"], every_entry_must_match=False)


def test_selection_that_exclude_empties_is_an_error():
    addresses = ModuleAddresses(tiny_model("bert"))
    with pytest.raises(ValueError, match="select no module"):
        addresses.select(["query"], exclude=["self.query"])


def test_modules_inside_deltas_are_never_targets():
    model = tiny_model("bert")
    host = model.get_submodule("encoder.layer.0.attention.self.query")
    attach_delta(host, nn.Sequential(nn.Linear(36, 36)), "adapter", "after")
    assert "encoder.layer.0.attention.self.query.adapter.0" not in ModuleAddresses(model).modules
    assert (
        "encoder.layer.0.attention.self.query.adapter.0"
        in ModuleAddresses(model, include_deltas=True).modules
    )
