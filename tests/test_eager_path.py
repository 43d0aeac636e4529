"""The ops' eager path: outside torch.compile, on plain tensors, `fastdelta.ops` runs the
backend functions through an autograd.Function instead of the custom op's dispatch. It must
compute exactly what the custom op computes, and leave the op to compile and subclasses."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.utils.checkpoint

import fastdelta.ops as ops
from fastdelta.ops import eager


def lora_inputs(requires_grad=True):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=generator)
    weight = torch.randn(20, 24, generator=generator)
    bias = torch.randn(20, generator=generator)
    lora_A = torch.randn(4, 24, generator=generator)
    lora_B = torch.randn(20, 4, generator=generator)
    tensors = [x, weight, bias, lora_A, lora_B]
    for tensor in (x, lora_A, lora_B) if requires_grad else ():
        tensor.requires_grad_()
    return tensors


def adapter_inputs():
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, 24, generator=generator, requires_grad=True)
    down_weight = torch.randn(6, 24, generator=generator, requires_grad=True)
    down_bias = torch.randn(6, generator=generator, requires_grad=True)
    up_weight = torch.randn(24, 6, generator=generator, requires_grad=True)
    up_bias = torch.randn(24, generator=generator, requires_grad=True)
    return [h, down_weight, down_bias, up_weight, up_bias]


def lora_call(tensors):
    return ops.lora_linear(*tensors, 1.5, dropout_p=0.25, seed=torch.tensor(7))


def adapter_call(tensors):
    return ops.adapter_bottleneck(*tensors, 0.5, "gelu")


def outputs_and_grads(call, tensors):
    out = call(tensors)
    trainable = [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad(out, trainable, torch.ones_like(out).cumsum(-1))
    return out, grads


@pytest.mark.parametrize(
    ("call", "make"),
    [(lora_call, lora_inputs), (adapter_call, adapter_inputs)],
    ids=["lora", "adapter"],
)
def test_the_eager_path_matches_the_custom_op_bitwise(call, make, monkeypatch):
    calls = []
    original = eager.eager_path
    monkeypatch.setattr(ops, "eager_path", lambda *t: calls.append(original(*t)) or calls[-1])
    eager_out, eager_grads = outputs_and_grads(call, make())
    assert calls == [True]
    monkeypatch.setattr(ops, "eager_path", lambda *t: False)
    op_out, op_grads = outputs_and_grads(call, make())
    assert torch.equal(eager_out, op_out)
    for eager_grad, op_grad in zip(eager_grads, op_grads, strict=True):
        assert torch.equal(eager_grad, op_grad)


def test_without_gradients_the_eager_path_saves_nothing():
    tensors = lora_inputs(requires_grad=False)
    out = lora_call(tensors)
    assert out.grad_fn is None
    with torch.no_grad():
        out = lora_call(lora_inputs())
    assert out.grad_fn is None


def test_plain_tensors_and_parameters_take_the_eager_path_subclasses_do_not():
    class Subclass(torch.Tensor):
        pass

    plain = torch.ones(2)
    assert eager.eager_path(plain, torch.nn.Parameter(plain), None)
    assert not eager.eager_path(plain, plain.as_subclass(Subclass))


def test_torch_compile_traces_the_custom_op():
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    tensors = lora_inputs(requires_grad=False)
    compiled = torch.compile(lambda *t: ops.lora_linear(*t, 1.5), backend=capture, fullgraph=True)
    assert torch.allclose(compiled(*tensors), ops.lora_linear(*tensors, 1.5))
    targets = {node.target for graph in graphs for node in graph.graph.nodes}
    assert torch.ops.fastdelta.lora_linear.default in targets


@pytest.mark.parametrize(
    ("call", "make", "name"),
    [(lora_call, lora_inputs, "lora_linear"), (adapter_call, adapter_inputs, "adapter_bottleneck")],
    ids=["lora", "adapter"],
)
def test_the_eager_path_shows_under_the_ops_name_in_a_profile(call, make, name):
    tensors = make()
    with torch.profiler.profile() as profile:
        call(tensors).sum().backward()
    names = {event.name for event in profile.events()}
    assert {f"fastdelta::{name}", f"fastdelta::{name}_backward"} <= names


@pytest.fixture
def cpp(use_backend):
    use_backend("cpp")


def test_on_the_cpp_backend_the_eager_path_is_one_cpp_autograd_node(cpp):
    out = ops.lora_linear(*lora_inputs(), 1.5, dropout_p=0.25)
    assert out.grad_fn.name() == "LoraLinearBackward"
    out = adapter_call(adapter_inputs())
    assert out.grad_fn.name() == "AdapterBottleneckBackward"


def test_the_cpp_eager_path_draws_the_dropout_seed_as_the_custom_op_does(cpp, monkeypatch):
    """Without a seed, both paths draw one from torch's generator: the same manual_seed gives
    the same mask."""
    torch.manual_seed(123)
    eager_out, eager_grads = outputs_and_grads(
        lambda t: ops.lora_linear(*t, 1.5, dropout_p=0.5), lora_inputs()
    )
    monkeypatch.setattr(ops, "eager_path", lambda *t: False)
    torch.manual_seed(123)
    op_out, op_grads = outputs_and_grads(
        lambda t: ops.lora_linear(*t, 1.5, dropout_p=0.5), lora_inputs()
    )
    assert torch.equal(eager_out, op_out)
    for eager_grad, op_grad in zip(eager_grads, op_grads, strict=True):
        assert torch.equal(eager_grad, op_grad)


def linear_adapter_inputs():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 24, generator=generator, requires_grad=True)
    weight = torch.randn(20, 24, generator=generator)
    bias = torch.randn(20, generator=generator)
    adapter = [torch.randn(6, 20), torch.randn(6), torch.randn(20, 6), torch.randn(20)]
    return [x, weight, bias, *(t.div(4).requires_grad_() for t in adapter)]


def linear_adapter_call(tensors):
    return ops.linear_adapter(*tensors, 0.5, "silu")


NODE_CASES = pytest.mark.parametrize(
    ("call", "make"),
    [
        (lora_call, lora_inputs),
        (adapter_call, adapter_inputs),
        (linear_adapter_call, linear_adapter_inputs),
    ],
    ids=["lora", "adapter", "linear_adapter"],
)


@NODE_CASES
def test_the_cpp_nodes_keep_autograd_s_contract(cpp, call, make):
    """The C++ backward nodes behave as autograd's own: a second backward needs retain_graph,
    a saved tensor changed in place is refused, saved_tensors_hooks see every saved tensor, and
    asking for some gradients computes those alone, equal to the full backward's."""
    tensors = make()
    trainable = [t for t in tensors if t.requires_grad]
    out = call(tensors)
    grad = torch.ones_like(out).cumsum(-1)
    first = torch.autograd.grad(out, trainable, grad, retain_graph=True)
    again = torch.autograd.grad(out, trainable, grad)
    for one, other in zip(first, again, strict=True):
        torch.testing.assert_close(one, other, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out, trainable, grad)

    some = torch.autograd.grad(call(tensors), trainable[-1:], grad)
    torch.testing.assert_close(some[0], first[-1], rtol=0, atol=0)

    out = call(tensors)
    with torch.no_grad():
        trainable[1].add_(1.0)  # a saved weight (lora_A, down_weight)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(grad)

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = call(make())
    assert packed and all(isinstance(t, torch.Tensor) for t in packed)
    out.backward(grad)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@NODE_CASES
def test_the_cpp_nodes_under_anomaly_detection_and_checkpointing(cpp, call, make):
    tensors = make()
    trainable = [t for t in tensors if t.requires_grad]
    expected = torch.autograd.grad(call(tensors).square().sum(), trainable)
    with torch.autograd.detect_anomaly():
        got = torch.autograd.grad(call(tensors).square().sum(), trainable)
    checkpointed = torch.utils.checkpoint.checkpoint(
        lambda *t: call(list(t)).square().sum(), *tensors, use_reentrant=False
    )
    through_checkpoint = torch.autograd.grad(checkpointed, trainable)
    for results in (got, through_checkpoint):
        for one, other in zip(results, expected, strict=True):
            torch.testing.assert_close(one, other)


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_compiled_autograd_takes_the_custom_ops(cpp, kind):
    """Under torch._dynamo's compiled autograd the ops take their custom op, whose backward
    formula it traces (it cannot trace the cpp backend's C++ nodes); gradients are eager's."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    import fastdelta

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    if kind == "lora":
        fastdelta.LoraModel(model, modified_modules=["0"], lora_r=2, lora_dropout=0.1)
    else:
        fastdelta.AdapterModel(model, modified_modules=["0"], bottleneck_dim=2)
    x = torch.randn(3, 8)
    grads = []
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with (
            compiled_autograd._enable(torch.compile(backend="eager"))
            if compiled
            else (contextlib.nullcontext())
        ):
            out = model(x).square().sum()
            out.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for eager_grad, compiled_grad in zip(*grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)
    torch._dynamo.reset()


@NODE_CASES
def test_an_in_place_op_on_the_output_reaches_the_cpp_node(cpp, call, make):
    """The output of a 3-D input is reshaped below autograd: not a view autograd tracks, whose
    in-place change would miss the node (or be refused as a view of a leaf)."""
    tensors = make()
    trainable = [t for t in tensors if t.requires_grad]
    grad = torch.ones_like(call(tensors)).cumsum(-1)
    expected = torch.autograd.grad(call(tensors) * 2, trainable, grad)
    out = call(tensors)
    assert out.dim() == 3 and not out._is_view()
    got = torch.autograd.grad(out.mul_(2), trainable, grad)
    for one, other in zip(got, expected, strict=True):
        torch.testing.assert_close(one, other)
