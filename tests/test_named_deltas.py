"""Several named delta models on one backbone: names and the active set (one, several or no
name runs, without detaching), log() and the structure graph, saving and loading per name
(PEFT's multi-adapter directories too), hot-swapping LoRA weights under torch.compile without a
recompile, and the weighted merge of LoRAs, against PEFT's results.

References are computed independently: a delta model alone on a fresh copy of the backbone,
the backbone itself, or PEFT's model with the same adapters.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import pickle
import warnings

import pytest
import torch
from composition import owned_parameters, randomize
from rich.console import Console
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastdelta
from fastdelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    LoraModel,
    Visualization,
    active_deltas,
    add_weighted_lora,
    set_active,
)
from fastdelta.delta_models.auto import DELTA_MODELS
from fastdelta.injection import RUNNING_DELTAS
from fastdelta.saving import CONFIG_NAME

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

QUERY = "encoder.layer.0.attention.self.query"


@functools.cache
def _pristine(arch: str) -> nn.Module:
    return tiny_model(arch)


def fresh(arch: str = "bert") -> nn.Module:
    return copy.deepcopy(_pristine(arch)).eval()


@torch.no_grad()
def output(model: nn.Module, arch: str = "bert") -> torch.Tensor:
    return first_output(model(**tiny_inputs(arch)))


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def nudged(delta_model, seed: int):
    """`delta_model`, frozen for training, with every delta parameter nudged (LoRA's B starts
    at zero)."""
    delta_model.freeze_module()
    randomize(owned_parameters(delta_model), seed, std=0.2)
    return delta_model


BUILDERS = {
    "default": lambda model: LoraModel(model, modified_modules=["query", "value"]),
    "small": lambda model: LoraModel(
        model, modified_modules=["query", "key"], lora_r=2, lora_alpha=6, name="small"
    ),
    "adapter": lambda model: AdapterModel(model, bottleneck_dim=8, name="adapter"),
}


def three_named(model: nn.Module) -> dict:
    """A LoRA named "default", a LoRA "small" sharing its query layers, and an adapter."""
    return {name: nudged(build(model), seed) for seed, (name, build) in enumerate(BUILDERS.items())}


def alone(name: str, delta_model, arch: str = "bert") -> torch.Tensor:
    """The output of a fresh backbone carrying only a copy of `delta_model` (saved tensors
    copied into a delta model built alike: the reference, without the stacking)."""
    model = fresh(arch)
    copied = BUILDERS[name](model)
    state = {
        key.replace("lora_1.", "lora."): value for key, value in delta_model.state_dict().items()
    }
    copied.load_state_dict(state)
    return output(model, arch)


# 1. Names and the active set


@pytest.mark.parametrize("delta_type", sorted(DELTA_MODELS))
def test_every_delta_model_takes_a_name_and_its_config_saves_it(delta_type):
    config = AutoDeltaConfig.from_dict({"delta_type": delta_type, "name": "task_a"})
    assert config.name == "task_a"
    assert config.to_dict()["name"] == "task_a"
    assert AutoDeltaConfig.from_dict({"delta_type": delta_type}).name == "default"


@pytest.mark.parametrize("bad", ["", "1st", "my-lora", "a b", 3, None])
def test_a_name_that_is_no_identifier_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match=r"non-empty identifier .* rename it, e\.g\. name="):
        LoraModel(fresh(), modified_modules=["query"], name=bad)


def test_set_active_runs_one_several_or_no_name_without_detaching():
    model = fresh()
    models = three_named(model)
    expected_alone = {name: alone(name, delta_model) for name, delta_model in models.items()}
    everything = output(model)
    assert active_deltas(model) == ["default", "small", "adapter"]

    for name, expected in expected_alone.items():
        set_active(model, name)
        assert active_deltas(model) == [name]
        assert_same(output(model), expected)
        assert all(attachment.attached for m in models.values() for attachment in m.attachments)

    # Two LoRAs on one layer: their updates add up, as when both were built.
    set_active(model, ["default", "small"])
    both = output(model)
    set_active(model, ["small", "default", "adapter"])
    assert_same(output(model), everything)
    assert not torch.allclose(both, everything)
    set_active(model, None)
    assert torch.equal(output(model), output(_pristine("bert")))
    set_active(model, [])
    assert active_deltas(model) == []


def test_an_inactive_delta_is_never_called_and_a_lone_active_lora_runs_fused(monkeypatch):
    model = fresh()
    models = three_named(model)
    host = model.get_submodule(QUERY)
    assert models["small"].attachments[0].delta is host.lora_1
    calls = []
    for attribute in ("lora", "lora_1"):
        for method in ("forward", "replace_forward"):
            original = getattr(getattr(host, attribute), method)

            def recorded(*args, _original=original, _name=f"{attribute}.{method}", **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(getattr(host, attribute), method, recorded)
    set_active(model, "small")  # the stacked lora_1, whose layer's first LoRA is switched off
    assert host.__dict__[RUNNING_DELTAS] == (("lora_1", "replace"),)
    output(model)
    assert calls == ["lora_1.replace_forward"]  # the fused op, computing the layer itself
    assert "stacked" not in host.lora_1.backend_name()  # log() says what runs it
    calls.clear()
    set_active(model, "adapter")
    output(model)
    assert calls == []  # neither LoRA ran: the query layer ran its own forward
    set_active(model, ["default", "small"])
    assert "stacked" in host.lora_1.backend_name()  # behind the first LoRA's fused op again


def test_a_lone_lora_takes_the_fused_place_only_where_the_order_allows():
    # On one layer: a LoRA, an adapter after it, and a second LoRA, whose update OpenDelta's
    # stacking adds after the adapter; with the first LoRA off, it must still come after it.
    model = fresh()
    for name, build in (
        ("default", lambda: LoraModel(model, modified_modules=["query"])),
        ("after", lambda: AdapterModel(model, modified_modules=["query"], name="after")),
        ("x", lambda: LoraModel(model, modified_modules=["query"], lora_r=3, name="x")),
    ):
        nudged(build(), len(name))
    host = model.get_submodule(QUERY)
    h = torch.randn(2, 5, 36)
    with torch.no_grad():
        base = nn.functional.linear(h, host.weight, host.bias)
        set_active(model, ["after", "x"])
        assert host.__dict__[RUNNING_DELTAS] == (("adapter", "after"), ("lora_1", "parallel"))
        assert_same(host(h), host.lora_1(h, host.adapter(base)))
        set_active(model, "x")
        assert host.__dict__[RUNNING_DELTAS] == (("lora_1", "replace"),)
        assert_same(host(h), host.lora_1(h, base))


def test_a_new_delta_model_is_active_and_attach_keeps_the_active_set():
    model = fresh()
    models = three_named(model)
    set_active(model, "default")
    extra = LoraModel(model, modified_modules=["value"], name="extra")
    assert active_deltas(model) == ["default", "extra"]
    assert extra.active and not models["small"].active

    models["small"].detach()
    models["small"].attach()  # back on, and still off: its name is not in the active set
    assert not models["small"].active
    assert active_deltas(model) == ["default", "extra"]
    models["small"].set_active()  # the convenience: this name alone
    assert active_deltas(model) == ["small"]


def test_two_unnamed_lora_models_stack_as_default_and_switch_together():
    model = fresh()
    first, second = nudged(BUILDERS["default"](model), 0), nudged(BUILDERS["default"](model), 1)
    stacked = output(model)
    assert [a.delta_name for a in second.attachments][:1] == ["lora_1"]
    other = nudged(LoraModel(model, modified_modules=["value"], name="other"), 2)
    set_active(model, "other")
    only_other = output(model)
    set_active(model, "default")
    assert_same(output(model), stacked)
    assert first.active and second.active and not other.active
    assert not torch.allclose(only_other, stacked)


class Doubling(nn.Module):
    """An OpenDelta-style sequential module: post_forward doubles its host's output."""

    def post_forward(self, output):
        return output * 2


class ManualDeltas(fastdelta.DeltaBase):
    def add_all_delta_to_backbone(self, targets: list[str]) -> None:
        self.insert_sequential_module(targets[0], Doubling(), "doubling")


def test_an_opendelta_style_module_is_skipped_when_its_name_is_inactive():
    model = fresh()
    ManualDeltas(model, fastdelta.BaseDeltaConfig(modified_modules=[QUERY], name="manual"))
    lora = nudged(LoraModel(model, modified_modules=["value"], name="lora"), 0)
    set_active(model, "lora")
    with_lora = output(model)
    lora.detach()
    assert torch.equal(output(model), output(_pristine("bert")))
    lora.attach()
    set_active(model, ["lora", "manual"])
    assert not torch.allclose(output(model), with_lora)
    set_active(model, "lora")
    assert torch.equal(output(model), with_lora)


def test_unknown_names_are_refused_listing_the_attached_ones():
    model = fresh()
    three_named(model)
    with pytest.raises(ValueError, match=r"'smal'.*named 'default', 'small', 'adapter'"):
        set_active(model, ["default", "smal"])
    assert active_deltas(model) == ["default", "small", "adapter"]
    with pytest.raises(TypeError, match="a list of names, or None"):
        set_active(model, 3)


def test_switching_off_a_merged_lora_or_a_bitfit_is_refused():
    model = fresh()
    lora = nudged(BUILDERS["default"](model), 0)
    BitFitModel(model, modified_modules=["output.LayerNorm"], name="biases")
    with pytest.raises(ValueError, match=r"'biases' cannot be switched off by name"):
        set_active(model, "default")
    lora.merge()
    with pytest.raises(RuntimeError, match=r"merged into its layer's weight.*unmerge"):
        set_active(model, "biases")
    lora.unmerge()
    set_active(model, ["biases"])
    with pytest.raises(RuntimeError, match=r"merge\(\) would fold .*'default'.* not active"):
        lora.merge()
    with pytest.raises(RuntimeError, match=r"merge_and_unload\(\) would fold"):
        lora.merge_and_unload()


def test_inactive_deltas_get_no_gradient_and_keep_their_trainability():
    model = fresh()
    models = three_named(model)
    models["default"].freeze_module()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    set_active(model, "small")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    first_output(model(**tiny_inputs("bert"))).square().mean().backward()
    for name, parameter in owned_parameters(models["small"]).items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for other in ("default", "adapter"):
        for name, parameter in owned_parameters(models[other]).items():
            assert parameter.requires_grad and parameter.grad is None, name


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_copies_keep_the_active_set(copy_with):
    model = fresh()
    three_named(model)
    set_active(model, ["small", "adapter"])
    expected = output(model)
    copies = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m))}
    copied = copies[copy_with](model)
    assert active_deltas(copied) == ["small", "adapter"]
    assert torch.equal(output(copied), expected)


def test_log_and_the_structure_graph_show_names_and_states(capsys):
    model = fresh()
    models = three_named(model)
    set_active(model, ["small"])
    models["default"].log(visualization=False)
    printed = capsys.readouterr().out
    assert "default (inactive)" in printed
    assert "default (inactive), small, adapter (inactive)" in printed
    graph = rendered(Visualization(model).structure_graph(printTree=False))
    assert "lora(LoraDelta)[default, inactive]" in graph
    assert "lora_1(LoraDelta)[small]" in graph
    assert "adapter(AdapterDelta)[adapter, inactive]" in graph


def test_an_unnamed_backbone_draws_as_before():
    model = fresh()
    nudged(BUILDERS["default"](model), 0)
    graph = rendered(Visualization(model).structure_graph(printTree=False))
    assert "lora(LoraDelta) lora_A" in graph and "[default" not in graph


def rendered(tree) -> str:
    console = Console(file=io.StringIO(), width=1000, color_system=None)
    console.print(tree)
    return console.file.getvalue()


# 2. Saving and loading per name


def test_named_checkpoints_load_side_by_side_under_their_names(tmp_path):
    model = fresh()
    models = three_named(model)
    expected = {}
    for name in models:
        set_active(model, name)
        expected[name] = output(model)
    set_active(model, list(models))
    expected["all"] = output(model)
    paths = {name: m.save_finetuned(tmp_path / name) for name, m in models.items()}
    assert json.loads((paths["small"] / CONFIG_NAME).read_text())["name"] == "small"

    loaded_model = fresh()
    loaded = {name: AutoDeltaModel.from_finetuned(p, loaded_model) for name, p in paths.items()}
    assert {name: m.name for name, m in loaded.items()} == {name: name for name in models}
    assert_same(output(loaded_model), expected["all"])
    for name in models:
        set_active(loaded_model, name)
        assert_same(output(loaded_model), expected[name])

    renamed = AutoDeltaModel.from_finetuned(paths["small"], fresh(), name="renamed")
    assert renamed.name == "renamed"
    assert AutoDeltaConfig.from_finetuned(paths["small"]).name == "small"


def test_a_checkpoint_saved_before_names_loads_as_default(tmp_path):
    saved = nudged(LoraModel(fresh(), modified_modules=["query"], name="x"), 0)
    path = saved.save_finetuned(tmp_path / "old")
    config = json.loads((path / CONFIG_NAME).read_text())
    del config["name"], config["max_rank"]  # as fastdelta wrote it before names
    (path / CONFIG_NAME).write_text(json.dumps(config))
    model = fresh()
    loaded = AutoDeltaModel.from_finetuned(path, model)
    assert loaded.name == "default" and loaded.config.max_rank is None
    assert_same(output(model), output(saved.backbone_model))


def peft_two_adapters(path):
    """PEFT's model with adapters "default" (query, value; r=4) and "x" (query, key; r=2, its
    own alpha), saved with save_pretrained at `path` (x in `path`/x/)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        default = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
        )
        peft_model = peft.get_peft_model(fresh(), default)
        x = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "key"])
        peft_model.add_adapter("x", x)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B.x" in name:
                    parameter.normal_(0, 0.3)
        peft_model.save_pretrained(path)
    return peft_model.eval()


@torch.no_grad()
def peft_output(peft_model, adapter: str) -> torch.Tensor:
    peft_model.set_adapter(adapter)
    return first_output(peft_model(**tiny_inputs("bert")))


def test_a_peft_directory_of_several_adapters_loads_each_by_name(tmp_path):
    peft_model = peft_two_adapters(tmp_path / "peft")
    assert (tmp_path / "peft" / "x" / "adapter_config.json").is_file()
    model = fresh()
    default = AutoDeltaModel.from_finetuned(tmp_path / "peft", model)
    x = LoraModel.from_finetuned(tmp_path / "peft", model, name="x")
    assert (default.name, x.name) == ("default", "x")
    assert x.config.lora_r == 2 and x.config.lora_alpha == 5
    for adapter in ("x", "default"):
        set_active(model, adapter)
        assert_same(output(model), peft_output(peft_model, adapter))
    assert AutoDeltaConfig.from_finetuned(tmp_path / "peft", name="x").lora_r == 2

    with pytest.raises(ValueError, match=r"'default' \(at the top\), 'x' \(in x/\).* named 'y'"):
        AutoDeltaModel.from_finetuned(tmp_path / "peft", fresh(), name="y")


def test_named_loras_export_to_peft_as_its_multi_adapter_directory(tmp_path):
    model = fresh()
    models = three_named(model)
    models["default"].save_finetuned(tmp_path / "export", format="peft")
    models["small"].save_finetuned(tmp_path / "export" / "small", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(fresh(), tmp_path / "export").eval()
        peft_model.load_adapter(tmp_path / "export" / "small", adapter_name="small")
    for name in ("default", "small"):
        set_active(model, name)
        assert_same(peft_output(peft_model, name), output(model))
    # and back: the directory loads by name into fastdelta
    loaded = fresh()
    AutoDeltaModel.from_finetuned(tmp_path / "export", loaded)
    AutoDeltaModel.from_finetuned(tmp_path / "export", loaded, name="small")
    set_active(model, ["default", "small"])
    assert_same(output(loaded), output(model))


# 3. max_rank and hot-swapping


def test_max_rank_pads_with_zeros_that_change_nothing_and_get_no_gradient():
    inputs = tiny_inputs("bert")
    # A loss whose gradient is not near zero (a LayerNorm output's mean square is about 1).
    projection = torch.randn(2, 7, 36, generator=torch.Generator().manual_seed(0))
    results = {}
    for max_rank in (None, 8):
        model = fresh()
        torch.manual_seed(5)
        lora = LoraModel(model, modified_modules=["query", "value"], lora_r=3, max_rank=max_rank)
        lora.freeze_module()
        optimizer = torch.optim.AdamW(lora.parameters(), lr=0.05, weight_decay=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            (first_output(model(**inputs)) * projection).sum().backward()
            optimizer.step()
        results[max_rank] = (lora, output(model))
    (unpadded, expected), (padded, actual) = results[None], results[8]
    assert_same(actual, expected)
    for attachment, reference in zip(padded.attachments, unpadded.attachments, strict=True):
        A, B = attachment.delta.lora_A, attachment.delta.lora_B
        assert A.shape[0] == 8 and B.shape[1] == 8
        assert A.grad is not None and B.grad is not None
        assert torch.all(A.grad[3:] == 0) and torch.all(B.grad[:, 3:] == 0)
        assert torch.all(A[3:] == 0) and torch.all(B[:, 3:] == 0)
        assert_same(A[:3], reference.delta.lora_A)
        assert_same(B[:, :3], reference.delta.lora_B)


TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_proj"]}


def swapped(arch: str) -> list:
    """(format, LoraModel arguments) of the checkpoints swapped in: ranks up to 8, their own
    alphas, rsLoRA and a rank_pattern."""
    return [
        ("fastdelta", {"lora_r": 2, "lora_alpha": 7}),
        ("peft", {"lora_r": 8, "lora_alpha": 3, "use_rslora": True}),
        ("fastdelta", {"lora_r": 4, "lora_alpha": 16, "rank_pattern": {TARGETS[arch][1]: 6}}),
    ]


def swappable_checkpoints(tmp_path, arch: str) -> list:
    """(path, the output of a fresh backbone that loaded it) for each of `swapped(arch)`."""
    checkpoints = []
    for index, (format, arguments) in enumerate(swapped(arch)):
        built = LoraModel(fresh(arch), modified_modules=TARGETS[arch], **arguments)
        path = nudged(built, index).save_finetuned(tmp_path / f"{index}", format=format)
        loaded = fresh(arch)
        AutoDeltaModel.from_finetuned(path, loaded)
        checkpoints.append((path, output(loaded, arch)))
    return checkpoints


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_hot_swap_under_torch_compile_gives_each_checkpoint_s_outputs_without_recompiling(
    tmp_path, arch
):
    checkpoints = swappable_checkpoints(tmp_path, arch)
    model = fresh(arch)
    lora = LoraModel(model, modified_modules=TARGETS[arch], lora_r=4, lora_alpha=8, max_rank=8)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    inputs = tiny_inputs(arch)
    try:
        with torch.no_grad():
            for _ in range(2):  # the steady state: what a second identical call compiles
                compiled(**inputs)
            compiles = counter.frame_count
            assert compiles >= 1
            for path, expected in checkpoints:
                lora.hot_swap(path)
                assert_same(first_output(compiled(**inputs)), expected)
            assert counter.frame_count == compiles  # no recompilation
    finally:
        torch._dynamo.reset()
    assert all(a.delta.scaling == 2.0 for a in lora.attachments)  # the layers' own, kept


def test_a_hot_swapped_model_saves_and_reloads_to_the_same_outputs(tmp_path):
    (path, expected), *_ = swappable_checkpoints(tmp_path, "bert")
    model = fresh()
    # Layers of two scalings (rank 8 and 2, alpha 32): PEFT's export needs an alpha_pattern.
    lora = LoraModel(
        model,
        modified_modules=["query", "value"],
        lora_alpha=32,
        rank_pattern={"value": 2},
        max_rank=8,
    )
    lora.freeze_module()
    lora.hot_swap(path)
    assert_same(output(model), expected)
    for format in ("fastdelta", "peft"):
        saved = lora.save_finetuned(tmp_path / f"swapped_{format}", format=format)
        reloaded = fresh()
        AutoDeltaModel.from_finetuned(saved, reloaded)
        assert_same(output(reloaded), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(fresh(), tmp_path / "swapped_peft").eval()
    assert_same(peft_output(peft_model, "default"), expected)


def test_hot_swap_from_a_state_dict_takes_it_at_the_model_s_scaling():
    source = nudged(LoraModel(fresh(), modified_modules=["query"], lora_r=2, lora_alpha=8), 3)
    model = fresh()
    lora = LoraModel(model, modified_modules=["query"], lora_r=2, lora_alpha=8, max_rank=4)
    lora.hot_swap(source.state_dict())
    assert_same(output(model), output(source.backbone_model))


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"lora_r": 16}, r"rank 16 in the checkpoint .* more than the 8 it was built with"),
        ({"modified_modules": ["query", "key"]}, r"holds tensors that are not this LoraModel's"),
        ({"modified_modules": ["query"]}, r"lacks encoder\.layer\.0\.attention\.self\.value"),
        ({"use_dora": True}, "holds DoRA deltas"),
    ],
)
def test_hot_swap_refuses_a_checkpoint_that_does_not_fit_before_copying(tmp_path, arguments, match):
    arguments = {"modified_modules": ["query", "value"], **arguments}
    path = nudged(LoraModel(fresh(), **arguments), 0).save_finetuned(tmp_path / "misfit")
    lora = nudged(LoraModel(fresh(), modified_modules=["query", "value"], max_rank=8), 1)
    before = {name: tensor.clone() for name, tensor in lora.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lora.hot_swap(path)
    assert all(torch.equal(lora.state_dict()[name], value) for name, value in before.items())


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"lora_r": 8, "max_rank": 4}, r"max_rank=4 .* lora_r=8 exceeds it"),
        ({"rank_pattern": {"value": 12}, "max_rank": 8}, r"rank_pattern\['value'\]=12"),
        ({"use_dora": True, "max_rank": 8}, "use_dora makes deltas"),
        ({"max_rank": 0}, "max_rank must be a positive integer"),
    ],
)
def test_max_rank_that_cannot_pad_is_refused(arguments, match):
    with pytest.raises(ValueError, match=match):
        LoraModel(fresh(), modified_modules=["query", "value"], **arguments)


# 4. Weighted merges, against PEFT's add_weighted_adapter


def peft_pair(path, second_rank: int):
    """PEFT's model with adapters "a" (r=4) and "b" (r=`second_rank`) on query and value, their
    own alphas, saved with save_pretrained (b in `path`/b/)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        first = peft.LoraConfig(
            r=4, lora_alpha=12, target_modules=["query", "value"], init_lora_weights=False
        )
        peft_model = peft.get_peft_model(fresh(), first, adapter_name="a")
        second = peft.LoraConfig(
            r=second_rank, lora_alpha=3, target_modules=["query", "value"], init_lora_weights=False
        )
        peft_model.add_adapter("b", second)
        peft_model.save_pretrained(path)
    return peft_model.eval()


@pytest.mark.parametrize(
    ("combination_type", "second_rank"), [("linear", 4), ("cat", 4), ("cat", 2), ("svd", 2)]
)
def test_a_weighted_merge_equals_peft_s_add_weighted_adapter(
    tmp_path, combination_type, second_rank
):
    peft_model = peft_pair(tmp_path / "peft", second_rank)
    weights = [0.7, -1.3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.add_weighted_adapter(["a", "b"], weights, "mixed", combination_type)
    expected = peft_output(peft_model, "mixed")

    model = fresh()
    a = AutoDeltaModel.from_finetuned(tmp_path / "peft", model, name="a")
    b = AutoDeltaModel.from_finetuned(tmp_path / "peft", model, name="b")
    mixed = add_weighted_lora([a, b], weights, "mixed", combination_type=combination_type)
    assert mixed.name == "mixed" and active_deltas(model) == ["a", "b", "mixed"]
    set_active(model, "mixed")
    assert_same(output(model), expected)
    if combination_type == "cat":  # exact: the weighted sum of the two updates
        sum_reference = fresh()
        for name, weight in zip(("a", "b"), weights, strict=True):
            loaded = AutoDeltaModel.from_finetuned(tmp_path / "peft", sum_reference, name=name)
            with torch.no_grad():
                for attachment in loaded.attachments:
                    attachment.delta.lora_B.mul_(weight)
        assert_same(output(model), output(sum_reference))
        assert mixed.attachments[0].delta.lora_A.shape[0] == 4 + second_rank


def test_a_weighted_merge_saves_and_reloads(tmp_path):
    model = fresh()
    first = nudged(LoraModel(model, modified_modules=["query"], lora_r=2, name="first"), 0)
    second = nudged(LoraModel(model, modified_modules=["query", "value"], lora_r=3), 1)
    mixed = add_weighted_lora([first, second], [0.5, 2.0], "mixed")
    set_active(model, "mixed")
    expected = output(model)
    reloaded = fresh()
    AutoDeltaModel.from_finetuned(mixed.save_finetuned(tmp_path / "mixed"), reloaded)
    assert_same(output(reloaded), expected)
    ranks = {a.host_name: a.delta.lora_A.shape[0] for a in mixed.attachments}
    assert len(ranks) == 4  # the query and value layers of both transformer layers
    assert ranks == {host: 5 if host.endswith("query") else 3 for host in ranks}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda a, b: add_weighted_lora([a, b], [1.0], "m"), "one weight per LoRA model"),
        (lambda a, b: add_weighted_lora([a, b], [1.0, 1.0], "b"), "already carries .* 'b'"),
        (lambda a, b: add_weighted_lora([a, b], [1.0, 1.0], "m", "ties"), "combination_type"),
        (lambda a, b: add_weighted_lora([a, b], [1.0, 1.0], "m", "linear"), "ranks 2, 4"),
    ],
)
def test_a_weighted_merge_that_cannot_be_made_is_refused(call, match):
    model = fresh()
    a = LoraModel(model, modified_modules=["query"], lora_r=2, name="a")
    b = LoraModel(model, modified_modules=["query"], lora_r=4, name="b")
    with pytest.raises((ValueError, TypeError), match=match):
        call(a, b)
    assert fastdelta.delta_names(model) == ["a", "b"]
