"""ParallelAdapterModel's (input module, output module) pairs, as OpenDelta reads them: parity
with an eager reference, detach/attach, saving, the format-2 migration and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import first_output, tiny_inputs, tiny_model

from fastdelta import AutoDeltaModel, ParallelAdapterModel
from fastdelta.layers.adapter import InputTap, SpanningAdapterDelta

# Explicit pairs across two modules where the architecture has a two-layer feed-forward.
EXPLICIT_PAIRS = {
    "bert": ["intermediate.dense", "[r]layer\\.\\d+\\.output\\.dense"],
    "gpt2": ["c_fc", "mlp.c_proj"],
    "llama": ["up_proj", "down_proj"],
    "t5": ["DenseReluDense.wi", "DenseReluDense.wo"],
}


def nudged(delta_model, seed: int = 0) -> None:
    """Random adapter weights (a fresh up projection is small), as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def reference_output(model, delta_model, architecture):
    """The backbone's output and the adapter gradients computed with plain hooks on a detached
    backbone: x_in -> scaled * up(gelu_new(down(x_in))) added to the output module's output."""
    adapters = {a.target: a.delta for a in delta_model.attachments if a.role != "before"}
    delta_model.detach()
    handles, kept = [], {}
    modules = dict(model.named_modules())
    for target, delta in adapters.items():
        source, _, output_module = target.partition(" -> ")
        output_module = output_module or source

        def keep(_, args, kwargs, target=target):
            kept[target] = args[0] if args else next(iter(kwargs.values()))

        def add(_, args, kwargs, output, target=target, delta=delta):
            x = kept.pop(target)
            hidden = F.linear(x, delta.down_weight, delta.down_bias)
            added = delta.scaling * F.linear(
                F.gelu(hidden, approximate="tanh"), delta.up_weight, delta.up_bias
            )
            if isinstance(output, tuple):
                return (output[0] + added, *output[1:])
            return output + added

        handles.append(modules[source].register_forward_pre_hook(keep, with_kwargs=True))
        handles.append(modules[output_module].register_forward_hook(add, with_kwargs=True))
    try:
        output = first_output(model(**tiny_inputs(architecture)))
        output.square().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        delta_model.attach()
    gradients = {name: p.grad.clone() for name, p in delta_model.named_parameters()}
    delta_model.backbone_model.zero_grad()
    return output.detach(), gradients


@pytest.mark.parametrize("explicit", [False, True], ids=["default", "explicit"])
@pytest.mark.parametrize("architecture", sorted(EXPLICIT_PAIRS))
def test_pairs_match_an_eager_reference(architecture, explicit):
    torch.manual_seed(0)
    model = tiny_model(architecture).float()
    arguments = {"modified_modules": EXPLICIT_PAIRS[architecture]} if explicit else {}
    delta_model = ParallelAdapterModel(model, scaled=0.7, **arguments)
    assert any(isinstance(a.delta, SpanningAdapterDelta) for a in delta_model.attachments)
    nudged(delta_model)
    expected, expected_gradients = reference_output(model, delta_model, architecture)

    output = first_output(model(**tiny_inputs(architecture)))
    output.square().sum().backward()
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    for name, parameter in delta_model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_gradients[name], rtol=1e-4, atol=1e-4)
    # The kept input is dropped once the output module read it.
    assert all(t.held is None for t in model.modules() if isinstance(t, InputTap))


def test_explicit_pair_counts_and_names_on_bert():
    model = tiny_model("bert")
    delta_model = ParallelAdapterModel(model, modified_modules=EXPLICIT_PAIRS["bert"])
    h, bottleneck = 36, 24
    assert delta_model.num_delta_parameters() == 2 * (2 * h * bottleneck + bottleneck + h)
    assert sorted(delta_model.state_dict()) == sorted(
        f"encoder.layer.{i}.output.dense.parallel_adapter.{name}"
        for i in range(2)
        for name in ("down_weight", "down_bias", "up_weight", "up_bias")
    )


@pytest.mark.parametrize("scope", [None, "encoder.layer.0.output", "encoder.layer.0.intermediate"])
def test_detach_and_attach_take_both_halves_together(scope):
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        before = first_output(model(**inputs))
    delta_model = ParallelAdapterModel(model, modified_modules=EXPLICIT_PAIRS["bert"])
    nudged(delta_model)
    with torch.no_grad():
        with_deltas = first_output(model(**inputs))
    module = None if scope is None else model.get_submodule(scope)
    delta_model.detach(module)
    layer = model.encoder.layer[0]
    assert not hasattr(layer.intermediate.dense, "parallel_adapter_input")
    assert not hasattr(layer.output.dense, "parallel_adapter")
    if scope is None:
        with torch.no_grad():
            assert torch.equal(first_output(model(**inputs)), before)
    delta_model.attach(module)
    with torch.no_grad():
        assert torch.equal(first_output(model(**inputs)), with_deltas)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("bert")
    delta_model = ParallelAdapterModel(model)
    nudged(delta_model)
    path = delta_model.save_finetuned(tmp_path / "pa")
    config = json.loads((path / "config.json").read_text())
    assert "encoder.layer.0.intermediate.dense -> encoder.layer.0.output.dense" in config["targets"]
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = first_output(model(**inputs))
        loaded_model = tiny_model("bert")
        loaded = AutoDeltaModel.from_finetuned(path, backbone_model=loaded_model)
        assert torch.equal(first_output(loaded_model(**inputs)), expected)
    assert loaded.state_dict().keys() == delta_model.state_dict().keys()


def test_a_format_2_checkpoint_loads_one_adapter_per_module(tmp_path):
    """Before format 3 each modified_modules entry was one module's adapter."""
    model = tiny_model("bert")
    delta_model = ParallelAdapterModel(model, modified_modules=["intermediate", "intermediate"])
    nudged(delta_model)
    path = delta_model.save_finetuned(tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    config.update(format_version=2, modified_modules=["intermediate"])
    (path / "config.json").write_text(json.dumps(config))
    loaded_model = tiny_model("bert")
    loaded = ParallelAdapterModel.from_finetuned(path, loaded_model)
    assert loaded.config.modified_modules == ["intermediate", "intermediate"]
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(first_output(loaded_model(**inputs)), first_output(model(**inputs)))


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="odd number of entries"):
        ParallelAdapterModel(tiny_model("bert"), modified_modules=["attention"])
    with pytest.raises(ValueError, match=r"selects 2 and 'output\.dense' selects 4"):
        ParallelAdapterModel(tiny_model("bert"), modified_modules=["intermediate", "output.dense"])
    with pytest.raises(ValueError, match="comes before it in model order"):
        ParallelAdapterModel(
            tiny_model("bert"),
            modified_modules=["[r]layer\\.\\d+\\.output\\.dense", "intermediate"],
        )
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="odd number"):
        ParallelAdapterModel(model, modified_modules=["attention", "attention", "intermediate"])
    assert not any("parallel_adapter" in name for name, _ in model.named_modules())
