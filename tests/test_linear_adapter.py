"""`fastdelta.ops.linear_adapter`, a linear layer and its adapter as one op, and the adapter
layers that run as it: an adapter on a plain nn.Linear or Conv1D host computes the host too.

The op must equal its two parts, `F.linear` then `ops.adapter_bottleneck` (sequential: the
adapter reads the layer's output; parallel: its input), on every backend, output and every
gradient, against a float64 oracle; the layer must equal the unfused host-then-adapter forward,
which a hook on the adapter module forces (a module with hooks is always called).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn

import fastdelta
from fastdelta import AdapterModel, LoraModel, ParallelAdapterModel, injection, ops
from fastdelta.layers.adapter import AdapterDelta
from fastdelta.ops import reference

BACKENDS = ("torch", "triton", "cpp")
NAMES = ("x", "weight", "bias", "down_weight", "down_bias", "up_weight", "up_bias")
K, N, M = 11, 9, 5  # in and out features of the linear layer, the bottleneck
# A parallel adapter from the input of tiny BERT's first intermediate layer to its FFN output.
SPANNING_PAIR = ["layer.0.intermediate.dense", "layer.0.output.dense"]


def make_inputs(parallel, fan_in_fan_out, bias=True, dtype=torch.float32, seed=0, rows=(2, 3)):
    """Random inputs of the op drawn in float64 and rounded to `dtype`, and an upstream
    gradient. A sequential adapter reads the layer's N outputs; a parallel one its K inputs."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        values = torch.randn(size, generator=generator, dtype=torch.float64) * scale
        return values.to(dtype)

    adapter_in = K if parallel else N
    weight = rand(N, K, scale=K**-0.5)
    return {
        "x": rand(*rows, K),
        "weight": weight.t().contiguous() if fan_in_fan_out else weight,
        "bias": rand(N, scale=0.5) if bias else None,
        "down_weight": rand(M, adapter_in, scale=adapter_in**-0.5),
        "down_bias": rand(M, scale=0.5) if bias else None,
        "up_weight": rand(N, M, scale=M**-0.5),
        "up_bias": rand(N, scale=0.5) if bias else None,
        "grad": rand(*rows, N),
    }


def composed(x, weight, bias, down_weight, down_bias, up_weight, up_bias, scaling, activation,
             parallel, fan_in_fan_out, adapter=ops.adapter_bottleneck):  # fmt: skip
    """The op's two parts: the linear layer, then the adapter on its output or input."""
    h = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)
    parts = (down_weight, down_bias, up_weight, up_bias, scaling, activation)
    return adapter(x, *parts, h) if parallel else adapter(h, *parts)


def run(function, inputs, trainable, parallel, fan_in_fan_out, dtype=None, scaling=0.7,
        activation="gelu_new"):  # fmt: skip
    """Output and gradients of `function` on fresh leaf copies of `inputs` (in `dtype`)."""
    leaves = {
        name: None
        if inputs[name] is None
        else inputs[name].to(dtype or inputs[name].dtype).clone().requires_grad_(name in trainable)
        for name in NAMES
    }
    out = function(*(leaves[name] for name in NAMES), scaling, activation, parallel, fan_in_fan_out)
    out.backward(inputs["grad"].to(out.dtype))
    return {"out": out.detach()} | {
        name: leaf.grad for name, leaf in leaves.items() if leaf is not None
    }


def assert_close_all(got: dict, expected: dict, **tolerance) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, f"{name}: a gradient where none is expected"
            continue
        assert got[name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(
            got[name], value.to(got[name].dtype), msg=lambda m, n=name: f"{n}: {m}", **tolerance
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "parallel, fan_in_fan_out, bias",
    [(False, False, True), (True, False, True), (False, True, False), (True, True, True)],
)
def test_matches_the_float64_reference(use_backend, backend, parallel, fan_in_fan_out, bias):
    use_backend(backend)
    inputs = make_inputs(parallel, fan_in_fan_out, bias)
    trainable = NAMES  # the host's weight and bias too (unfrozen modules)
    got = run(ops.linear_adapter, inputs, trainable, parallel, fan_in_fan_out)
    expected = run(
        lambda *args: composed(*args, adapter=reference.adapter_bottleneck),
        inputs, trainable, parallel, fan_in_fan_out, dtype=torch.float64,
    )  # fmt: skip
    assert_close_all(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ("torch", "cpp"))
@pytest.mark.parametrize("parallel", (False, True))
def test_float64_and_bfloat16_equal_the_two_ops(use_backend, backend, parallel):
    use_backend(backend)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.bfloat16, 1e-2)):
        inputs = make_inputs(parallel, False, dtype=dtype, seed=3)
        got = run(ops.linear_adapter, inputs, NAMES, parallel, False)
        expected = run(composed, inputs, NAMES, parallel, False)
        assert got["out"].dtype == dtype
        assert_close_all(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("parallel", (False, True))
@pytest.mark.parametrize("trainable", (("x",), ("down_weight", "up_bias"), ("weight",), ()))
def test_frozen_parts_get_no_gradient(use_backend, parallel, trainable):
    use_backend("cpp")
    inputs = make_inputs(parallel, False)
    if not trainable:
        with torch.no_grad():
            out = ops.linear_adapter(*(inputs[n] for n in NAMES), 0.7, "relu", parallel)
        torch.testing.assert_close(
            out, composed(*(inputs[n] for n in NAMES), 0.7, "relu", parallel, False)
        )
        return
    got = run(ops.linear_adapter, inputs, trainable, parallel, False)
    expected = run(composed, inputs, trainable, parallel, False)
    assert_close_all(got, expected)
    for name in NAMES:
        if name not in trainable and inputs[name] is not None:
            assert got[name] is None


def saved_bytes(function, inputs, parallel) -> int:
    """Bytes of the distinct storages one forward saves for backward, the inputs' left out."""
    leaves = [None if t is None else t.clone().requires_grad_(n != "weight")
              for n, t in ((n, inputs[n]) for n in NAMES)]  # fmt: skip
    own = {t.untyped_storage().data_ptr() for t in leaves if t is not None}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*leaves, 0.7, "gelu", parallel, False)
    return sum(storages.values())


@pytest.mark.parametrize("parallel", (False, True))
def test_saves_what_the_two_ops_save(use_backend, parallel):
    use_backend("cpp")
    inputs = make_inputs(parallel, False)
    assert saved_bytes(ops.linear_adapter, inputs, parallel) == saved_bytes(
        composed, inputs, parallel
    )


def test_the_cpp_backend_records_one_node(use_backend):
    use_backend("cpp")
    inputs = make_inputs(False, False)
    x = inputs["x"].requires_grad_()
    out = ops.linear_adapter(x, *(inputs[n] for n in NAMES[1:]), 1.0, "gelu")
    assert out.grad_fn.name() == "LinearAdapterBackward"
    assert out.grad_fn.next_functions[0][0].variable is x


@pytest.mark.parametrize("backend", ("torch", "cpp"))
def test_under_inference_mode(use_backend, backend):
    use_backend(backend)
    inputs = make_inputs(True, False)
    arguments = [inputs[n] for n in NAMES]
    with torch.no_grad():
        expected = ops.linear_adapter(*arguments, 0.5, "silu", True)
    with torch.inference_mode():
        got = ops.linear_adapter(*arguments, 0.5, "silu", True)
    assert got.is_inference()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weight": torch.zeros(N, K + 1)}, "x has 11 features but weight (9, 12)"),
        ({"bias": torch.zeros(N + 1)}, "bias (10,) must be [9]"),
        ({"down_weight": torch.zeros(M, K)}, "h has 9 features but down_weight (5, 11)"),
        ({"up_bias": torch.zeros(3)}, "up_bias (3,) must be [9]"),
        ({"weight": torch.zeros(N, K, dtype=torch.float64)}, "weight is torch.float64"),
    ],
)
@pytest.mark.parametrize("backend", ("torch", "cpp"))
def test_bad_arguments_raise_an_error_naming_them(use_backend, backend, change, message):
    use_backend(backend)
    inputs = make_inputs(False, False) | change
    with pytest.raises((ValueError, RuntimeError), match=message.replace("(", r"\(").replace(
        ")", r"\)").replace("[", r"\[").replace("]", r"\]")):  # fmt: skip
        ops.linear_adapter(*(inputs[n] for n in NAMES), 1.0, "gelu")


@pytest.mark.parametrize("parallel", (False, True))
def test_torch_compile_fullgraph_matches_eager(use_backend, parallel):
    use_backend("cpp")
    inputs = make_inputs(parallel, False)
    arguments = [inputs[n] for n in NAMES]
    compiled = torch.compile(ops.linear_adapter, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(*arguments, 0.7, "gelu", parallel),
        ops.linear_adapter(*arguments, 0.7, "gelu", parallel),
    )


# --------------------------------------------------------------------------------------------
# Adapter layers that compute their host


def fused_deltas(model: nn.Module) -> list[nn.Module]:
    """The adapters of `model` that run as the fused op."""
    return [m for m in model.modules() if injection.RUNS_ITS_HOST in m.__dict__]


def adapters(model: nn.Module) -> list[AdapterDelta]:
    return [m for m in model.modules() if isinstance(m, AdapterDelta)]


def outputs_and_grads(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    output = first_output(model(**inputs))
    output.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.detach(), grads


def unfused(model: nn.Module):
    """A no-op forward hook on each adapter: hooked modules are always called, so the hosts run
    their own forward and then the adapter."""
    return [delta.register_forward_hook(lambda *_: None) for delta in adapters(model)]


def assert_fused_equals_unfused(model: nn.Module, inputs: dict) -> None:
    with torch.random.fork_rng():
        output, grads = outputs_and_grads(model, inputs)
    handles = unfused(model)
    with torch.random.fork_rng():
        expected_output, expected_grads = outputs_and_grads(model, inputs)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(output, expected_output)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ("torch", "cpp"))
@pytest.mark.parametrize("architecture", ("bert", "gpt2"))
def test_adapter_models_compute_their_linear_hosts(use_backend, backend, architecture):
    use_backend(backend)
    model = tiny_model(architecture)
    modules = ["output.dense"] if architecture == "bert" else ["mlp.c_proj", "attn.c_proj"]
    delta_model = AdapterModel(model, bottleneck_dim=5, modified_modules=modules)
    delta_model.freeze_module()
    fused = fused_deltas(model)
    assert fused and len(fused) == len(adapters(model))
    # GPT-2's c_proj is a Conv1D: its weight is [in, out].
    marks = [delta.__dict__[injection.RUNS_ITS_HOST] for delta in fused]
    assert all(layout == (architecture == "gpt2") for _, layout in marks)
    for delta in adapters(model):  # away from the identity, so the adapters count
        nn.init.normal_(delta.up_weight, std=0.3)
        nn.init.normal_(delta.up_bias, std=0.3)
    model.train()
    assert_fused_equals_unfused(model, tiny_inputs(architecture))


def test_a_parallel_adapter_across_one_linear_layer_computes_it(use_backend):
    use_backend("cpp")
    model = tiny_model("bert")
    ParallelAdapterModel(
        model, bottleneck_dim=4, scaled=2.0, modified_modules=["intermediate.dense"] * 2
    ).freeze_module()
    marks = [delta.__dict__[injection.RUNS_ITS_HOST] for delta in fused_deltas(model)]
    assert marks and all(parallel for parallel, _ in marks)
    for delta in adapters(model):
        nn.init.normal_(delta.up_weight, std=0.3)
    assert_fused_equals_unfused(model, tiny_inputs("bert"))


def test_unfrozen_host_weights_train_through_the_fused_op(use_backend):
    use_backend("cpp")
    model = tiny_model("bert")
    AdapterModel(model, bottleneck_dim=4, modified_modules=["output.dense"]).freeze_module(
        exclude=["deltas", "output.dense"]
    )
    assert fused_deltas(model)
    assert_fused_equals_unfused(model, tiny_inputs("bert"))


def test_what_does_not_run_fused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8))

    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model.append(OwnForward(8, 8))
    AdapterModel(model, bottleneck_dim=3, modified_modules=["0", "1", "2", "3"])
    # A LoRA on the same layer: the host runs its deltas one by one.
    LoraModel(model, lora_r=2, modified_modules=["1"], name="lora")
    fused = {id(d) for d in fused_deltas(model)}
    assert [id(model[i].adapter) in fused for i in range(4)] == [True, False, False, False]
    # A spanning parallel adapter reads another module's input.
    spanning = tiny_model("bert")
    ParallelAdapterModel(spanning, bottleneck_dim=3, modified_modules=SPANNING_PAIR)
    assert not fused_deltas(spanning)


def test_switching_and_detaching_keep_the_mark_right():
    model = nn.Sequential(nn.Linear(8, 8))
    first = AdapterModel(model, bottleneck_dim=3, modified_modules=["0"])
    delta = model[0].adapter
    assert injection.RUNS_ITS_HOST in delta.__dict__
    second = AdapterModel(model, bottleneck_dim=3, modified_modules=["0"], name="other")
    assert not fused_deltas(model)  # two adapters run: not one op
    fastdelta.set_active(model, "other")
    assert fused_deltas(model) == [model[0].get_submodule(second.attachments[0].delta_name)]
    fastdelta.set_active(model, [])
    assert not fused_deltas(model)
    fastdelta.set_active(model, "default")
    second.detach()
    assert fused_deltas(model) == [delta]
    first.detach()
    assert not fused_deltas(model) and injection.RUNS_ITS_HOST not in delta.__dict__
    first.attach()
    assert fused_deltas(model) == [delta]


def test_a_hooked_adapter_is_called(use_backend):
    use_backend("cpp")
    model = nn.Sequential(nn.Linear(8, 8))
    AdapterModel(model, bottleneck_dim=3, modified_modules=["0"])
    seen = []
    model[0].adapter.register_forward_hook(lambda module, args, output: seen.append(output))
    output = model(torch.randn(2, 8))
    assert len(seen) == 1 and seen[0] is output


@pytest.mark.parametrize("copy_with", ("deepcopy", "pickle"))
def test_copies_run_fused_and_equal_the_original(use_backend, copy_with):
    use_backend("cpp")
    model = tiny_model("bert")
    AdapterModel(model, bottleneck_dim=4, modified_modules=["output.dense"])
    for delta in adapters(model):
        nn.init.normal_(delta.up_weight, std=0.3)
    clone = copy.deepcopy(model) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert len(fused_deltas(clone)) == len(fused_deltas(model)) > 0
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(first_output(clone(**inputs)), first_output(model(**inputs)))
