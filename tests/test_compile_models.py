"""torch.compile on models with deltas: LoRA and adapters together compile and give the outputs
and gradients of eager mode; each delta layer compiles as one graph (`fullgraph=True`); and a
compiled model does not recompile from one batch to the next, dropout included.

(test_injection.py compiles a model with one delta type and a LoRA linear; these add the
combinations, every delta layer kind and recompilation.)
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn

from fastdelta import AdapterModel, BitFitModel, LoraModel, ParallelAdapterModel
from fastdelta.layers.base import delta_parameter_names

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
IN_FEATURES, OUT_FEATURES = 20, 12


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def nudge_deltas(model: nn.Module) -> None:
    """Give every delta parameter a random nudge, as training would (LoRA's B starts at 0)."""
    generator = torch.Generator().manual_seed(0)
    names = delta_parameter_names(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in names:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def every_delta_type(model: nn.Module) -> None:
    """LoRA on the attention's query and value, sequential adapters after the attention output
    and the feed-forward, a parallel adapter on the feed-forward's first layer, and BitFit."""
    LoraModel(model, modified_modules=["query", "value"])
    AdapterModel(model)
    ParallelAdapterModel(model, modified_modules=["intermediate.dense"] * 2)
    BitFitModel(model, modified_modules=["output.LayerNorm"]).freeze_module()
    nudge_deltas(model)


def output_and_gradients(model: nn.Module, runner, inputs: dict):
    model.zero_grad()
    output = first_output(runner(**inputs))
    output.square().mean().backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return output.detach(), gradients


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_model_with_every_delta_type_compiles_to_eager_results(backend):
    model = tiny_model("bert", num_hidden_layers=1, **NO_DROPOUT).train()
    every_delta_type(model)
    inputs = tiny_inputs("bert")
    expected_output, expected_gradients = output_and_gradients(model, model, inputs)

    compiled = torch.compile(model, backend=backend)
    output, gradients = output_and_gradients(model, compiled, inputs)

    torch.testing.assert_close(output, expected_output)
    assert gradients.keys() == expected_gradients.keys()
    assert {name for name in gradients if ".lora." in name}  # the deltas are all there
    assert {name for name in gradients if ".adapter." in name}
    assert {name for name in gradients if ".parallel_adapter." in name}
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, msg=name)


def test_parallel_adapters_across_two_modules_compile_to_eager_results():
    # OpenDelta's default pairs: one adapter across each attention block, one from the
    # feed-forward's first layer's input to its second layer's output (an input tap on one
    # module, the adapter on another).
    model = tiny_model("bert", num_hidden_layers=1, **NO_DROPOUT).train()
    delta_model = ParallelAdapterModel(model)
    delta_model.freeze_module()
    assert any(attachment.group for attachment in delta_model.attachments)
    nudge_deltas(model)
    inputs = tiny_inputs("bert")
    expected_output, expected_gradients = output_and_gradients(model, model, inputs)

    compiled = torch.compile(model, backend="aot_eager")
    output, gradients = output_and_gradients(model, compiled, inputs)

    torch.testing.assert_close(output, expected_output)
    assert {name for name in gradients if ".parallel_adapter." in name}
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, msg=name)


# kind: (the host module, the delta model that puts that kind of delta on it).
DELTA_LAYERS = {
    "lora-conv1d": (
        lambda: transformers.pytorch_utils.Conv1D(OUT_FEATURES, IN_FEATURES),
        lambda backbone: LoraModel(backbone, modified_modules=["host"], lora_r=4),
    ),
    "adapter": (
        lambda: nn.Linear(IN_FEATURES, IN_FEATURES),
        lambda backbone: AdapterModel(backbone, modified_modules=["host"]),
    ),
    "parallel_adapter": (
        lambda: nn.Linear(IN_FEATURES, OUT_FEATURES),
        lambda backbone: ParallelAdapterModel(backbone, modified_modules=["host", "host"]),
    ),
    "bitfit-new-bias": (
        lambda: nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False),
        lambda backbone: BitFitModel(backbone, modified_modules=["host"]),
    ),
}


@pytest.mark.parametrize(
    "kind, backend",
    [(kind, "aot_eager") for kind in DELTA_LAYERS]
    + [("adapter", "inductor"), ("parallel_adapter", "inductor")],
)
def test_delta_layer_compiles_as_one_graph(kind, backend):
    torch.manual_seed(0)
    make_host, make_delta_model = DELTA_LAYERS[kind]
    host = make_host()
    backbone = nn.ModuleDict({"host": host})
    make_delta_model(backbone).freeze_module()
    nudge_deltas(backbone)
    x = torch.randn(3, 5, IN_FEATURES)
    expected = host(x)
    expected.square().sum().backward()
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    expected_gradients = [p.grad.clone() for p in trainable]
    backbone.zero_grad()

    output = torch.compile(host, backend=backend, fullgraph=True)(x)
    output.square().sum().backward()

    torch.testing.assert_close(output, expected)
    torch.testing.assert_close([p.grad for p in trainable], expected_gradients)


def test_compiled_model_does_not_recompile_between_batches():
    """New token ids, LoRA dropout's new seed and a training step change no guard."""
    model = tiny_model("bert", num_hidden_layers=1).train()
    LoraModel(model, lora_dropout=0.1)
    delta_model = AdapterModel(model)
    delta_model.freeze_module()
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(delta_model.trainable_parameters(), lr=0.1)

    def step(seed: int) -> None:
        first_output(compiled(**tiny_inputs("bert", seed=seed))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step(seed=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        step(seed=2)
        step(seed=3)


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic-dynamic"])
def test_compiled_lora_model_compiles_once_for_new_seeds_and_batch_sizes(dynamic):
    """A compiled LoRA model keeps running its graph while each step draws a new dropout seed
    and brings a new batch size: one graph with dynamic=True; with dynamo's automatic dynamic
    shapes, one static graph and one dynamic graph at the first new size, then none. (Counted
    by a backend that records each graph it is given, as a recompile would call it again.)"""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.ReLU(), nn.Linear(16, OUT_FEATURES))
    delta_model = LoraModel(model, modified_modules=["0", "2"], lora_r=4, lora_dropout=0.1)
    delta_model.freeze_module()
    nudge_deltas(model)
    model.train()
    compiled = torch.compile(model, backend=counting_backend, dynamic=dynamic, fullgraph=True)
    optimizer = torch.optim.SGD(delta_model.trainable_parameters(), lr=0.1)

    def step(batch: int) -> None:
        compiled(torch.randn(batch, 5, IN_FEATURES)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    for batch in (3, 4):  # the first new size makes automatic dynamic shapes recompile once
        step(batch)
    assert len(graphs) == (1 if dynamic else 2)
    with torch.compiler.set_stance("fail_on_recompile"):
        for batch in (6, 2, 9, 4, 7):
            step(batch)
    assert len(graphs) == (1 if dynamic else 2)
