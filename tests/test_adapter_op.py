"""`fastdelta::adapter_bottleneck`: every backend against a float64 oracle, and its contract.

The triton backend runs on CPU tensors through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 without a GPU) and the cpp backend through the C++ extension's CPU kernels
(built just in time on first use, once), so every check here covers all three backends; the
interpreter is slow, so the accuracy sweep is a covering set of shapes, not their cartesian
product.

Accuracy rule (TOLERANCES, one entry per dtype): float32 results must be within a fixed
tolerance of the float64 reference; a float16 or bfloat16 result's largest error against the
float64 reference must be at most twice that of eager PyTorch (`reference.adapter_bottleneck`)
run in the same dtype on the same inputs, plus a tiny floor. The reference runs on float64
copies of the rounded inputs, with the same upstream gradient. NaN never passes.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn

from fastdelta import AdapterModel, ParallelAdapterModel, ops
from fastdelta.layers.adapter import AdapterDelta
from fastdelta.ops import backend as backend_selection
from fastdelta.ops import reference
from fastdelta.ops.backend import (
    ENVIRONMENT_VARIABLE,
    backend_module,
    set_backend,
    unavailable_reason,
)

BACKENDS = ("torch", "triton", "cpp")
# The backends that compute in float64 too (Triton's kernels do not).
FLOAT64_BACKENDS = ("torch", "cpp")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
# The op's tensor arguments, in the order of ops.adapter_bottleneck's signature.
NAMES = ("h", "down_weight", "down_bias", "up_weight", "up_bias", "residual")
PARAMETERS = ("down_weight", "down_bias", "up_weight", "up_bias")
# Bottlenecks above this take the split kernels (MAX_FUSED_RANK in fastdelta/kernels/adapter.py).
FUSED_LIMIT = 128
CUDA = torch.cuda.is_available()

# How close each dtype's results must be to the float64 reference (see the module docstring);
# `scale` is a tensor's largest reference magnitude, at least 1.
# float32: |got - ref| <= atol * scale + rtol * |ref|, elementwise.
# float16 / bfloat16: max|got - ref| <= eager_factor * max|eager - ref| + floor * scale. The
# floor is half a unit in the last place at that scale, one rounding of the largest value:
# Triton 3.9's interpreter truncates float32 to bfloat16 instead of rounding to nearest, which
# costs up to that much (measured: up to 2.35x eager's error on the output without the floor).
TOLERANCES = {
    F32: {"rtol": 1e-5, "atol": 1e-5},
    F16: {"eager_factor": 2.0, "floor": 2.0**-11},
    BF16: {"eager_factor": 2.0, "floor": 2.0**-8},
}

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def use_backend(monkeypatch):
    """A function that forces a backend (skipping the test where it cannot run on `device`).

    Afterwards the setting goes back to "auto", then to whatever it was before the test, and
    $FASTDELTA_BACKEND is unset during the test.
    """
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backend_selection, "_setting", backend_selection._setting)
    monkeypatch.setattr(backend_selection, "_environment", None)

    def use(name: str, device: str = "cpu"):
        reason = unavailable_reason(name, device)
        if reason:
            pytest.skip(f"the {name} backend cannot run on {device} here: {reason}")
        set_backend(name)
        return backend_module(name)

    yield use
    set_backend("auto")


@pytest.fixture(params=BACKENDS)
def backend(request, use_backend):
    """Each backend in turn, forced, on CPU tensors; yields its name."""
    use_backend(request.param)
    return request.param


def make_inputs(
    shape,
    d_in,
    d_out,
    bottleneck,
    dtype,
    *,
    bias=True,
    parallel=False,
    activation=None,
    device="cpu",
    seed=0,
) -> dict:
    """Random op inputs (h of `shape` + (d_in,)) and an upstream gradient "grad", drawn in
    float64 from a fixed seed and rounded to `dtype`; the weights are scaled by 1/sqrt(fan-in)
    so every value stays O(1). residual is None unless `parallel`. For relu, checks that the
    pre-activations take both signs."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    generator = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        values = torch.randn(size, generator=generator, dtype=torch.float64) * scale
        return values.to(device=device, dtype=dtype)

    inputs = {
        "h": rand(*shape, d_in),
        "down_weight": rand(bottleneck, d_in, scale=d_in**-0.5),
        "down_bias": rand(bottleneck, scale=0.5) if bias else None,
        "up_weight": rand(d_out, bottleneck, scale=bottleneck**-0.5),
        "up_bias": rand(d_out, scale=0.5) if bias else None,
        "residual": rand(*shape, d_out) if parallel else None,
        "grad": rand(*shape, d_out),
    }
    if activation == "relu":
        pre = torch.nn.functional.linear(
            *(None if inputs[n] is None else inputs[n].double() for n in NAMES[:3])
        )
        assert (pre > 0).any() and (pre < 0).any(), "relu pre-activations all of one sign"
    return inputs


def run(function, inputs, scaling, activation, trainable=NAMES, dtype=None, grad="grad"):
    """The output and gradients of function(h, down_weight, down_bias, up_weight, up_bias,
    scaling, activation, residual) on fresh leaf copies of `inputs` (cast to `dtype` when
    given); only the names in `trainable` require grad. Returns {"out": ..., name: gradient}
    for every input that is not None (the gradient None where there is none).

    grad=None backpropagates out.sum(), whose gradient is a stride-0 expanded tensor."""
    leaves = {
        name: None
        if inputs[name] is None
        else inputs[name]
        .detach()
        .to(dtype or inputs[name].dtype)
        .clone()
        .requires_grad_(name in trainable)
        for name in NAMES
    }
    out = function(*(leaves[name] for name in NAMES[:5]), scaling, activation, leaves["residual"])
    if out.requires_grad:
        if grad is None:
            out.sum().backward()
        else:
            out.backward(inputs[grad].to(out.dtype))
    results = {"out": out.detach()}
    results.update({name: leaf.grad for name, leaf in leaves.items() if leaf is not None})
    return results


def reference64(inputs, scaling, activation, trainable=NAMES, grad="grad"):
    """The float64 oracle: reference.adapter_bottleneck on float64 copies of `inputs`."""
    return run(
        reference.adapter_bottleneck, inputs, scaling, activation, trainable, torch.float64, grad
    )


def assert_accurate(what, got, expected64, eager, dtype):
    """`got` against the float64 `expected64`, by the rule of TOLERANCES[dtype]; `eager` is the
    same quantity from eager PyTorch in `dtype` (used for float16 and bfloat16)."""
    assert got is not None, f"{what}: no result"
    assert got.shape == expected64.shape, f"{what}: shape {got.shape}, expected {expected64.shape}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    expected64 = expected64.cpu()
    error = (got.detach().cpu().double() - expected64).abs()
    scale = max(expected64.abs().max().item(), 1.0) if expected64.numel() else 1.0
    tolerance = TOLERANCES[dtype]
    if "eager_factor" in tolerance:
        eager_error = (eager.detach().cpu().double() - expected64).abs().max().item()
        bound = tolerance["eager_factor"] * eager_error + tolerance["floor"] * scale
        worst = error.max().item()
        # A NaN error or bound fails this comparison too.
        assert worst <= bound, (
            f"{what}: max error {worst:.3g} exceeds {tolerance['eager_factor']} x eager's "
            f"{eager_error:.3g} + floor {tolerance['floor'] * scale:.3g}"
        )
    else:
        bound = tolerance["atol"] * scale + tolerance["rtol"] * expected64.abs()
        assert (error <= bound).all(), (
            f"{what}: max error {error.max().item():.3g} (at scale {scale:.3g}) exceeds "
            f"rtol {tolerance['rtol']} / atol {tolerance['atol']}"
        )


def assert_all_accurate(results, expected64, eager, dtype, trainable=NAMES):
    """Output and gradients; inputs not in `trainable` must have got no gradient."""
    assert results.keys() == expected64.keys()
    for name, got in results.items():
        if name == "out" or name in trainable:
            what = "output" if name == "out" else f"grad of {name}"
            baseline = None if eager is None else eager[name]
            assert_accurate(what, got, expected64[name], baseline, dtype)
        else:
            assert got is None, f"{name} is frozen but got a gradient"


def check_against_reference(inputs, dtype, scaling, activation, trainable=NAMES, grad="grad"):
    """Run ops.adapter_bottleneck (whatever backend is set) and compare its output and
    gradients with reference.adapter_bottleneck in float64 (and, for the tolerance, in
    `dtype`)."""
    got = run(ops.adapter_bottleneck, inputs, scaling, activation, trainable, grad=grad)
    eager = None
    if "eager_factor" in TOLERANCES[dtype]:
        eager = run(reference.adapter_bottleneck, inputs, scaling, activation, trainable, grad=grad)
    expected64 = reference64(inputs, scaling, activation, trainable, grad)
    assert_all_accurate(got, expected64, eager, dtype, trainable)


# --------------------------------------------------------------------------------------------
# 1. Accuracy: a covering set of (rows, d_in, d_out (None: sequential), bottleneck, activation,
# dtype, biases, scaling). Every row count, bottleneck, activation, dtype and form appears; each
# dtype meets every activation, the split path (bottleneck > 128), a sequential adapter and a
# parallel one with d_out != d_in; 1025 rows only with small sizes. The last two rows are the
# kernels' tile edges: the largest fused bottleneck with sizes that are multiples of the
# interpreter's 32-wide tiles, and the smallest split one over an odd number of row tiles.
CASES = [
    (1, 5, None, 1, "gelu", F32, True, 1.0),
    (1, 33, 17, 8, "relu", F16, False, 1.0),
    (1, 70, None, 300, "silu", BF16, True, 0.5),
    (7, 5, None, 8, "relu", F32, False, 2.0),
    (7, 33, 33, 24, "gelu_new", F16, True, 1.0),
    (7, 70, 40, 64, "gelu", BF16, True, 1.0),
    (7, 33, None, 300, "relu", F16, True, 0.25),
    (7, 70, None, 1, "silu", F32, False, 1.0),
    (97, 33, None, 24, "silu", F32, True, 1.0),
    (97, 70, 70, 300, "gelu_new", F32, False, 0.5),
    (97, 5, 33, 64, "silu", F16, False, 2.0),
    (97, 70, None, 64, "relu", BF16, False, 1.0),
    (97, 33, 5, 1, "gelu", F16, True, 1.0),
    (97, 33, None, 8, "gelu_new", BF16, True, -0.5),
    (97, 33, 17, 300, "silu", BF16, True, 1.0),
    (97, 70, 45, 24, "relu", F32, False, 1.0),
    (1025, 5, None, 8, "gelu", F16, True, 1.0),
    (1025, 5, 7, 1, "silu", BF16, False, 1.0),
    (1025, 5, 5, 24, "gelu_new", F32, True, 1.0),
    (1025, 8, None, 8, "relu", BF16, True, 0.5),
    (64, 32, None, 128, "gelu", BF16, True, 1.0),
    (70, 64, 40, 129, "gelu_new", F32, True, 1.5),
]


def case_id(case):
    m, d_in, d_out, bottleneck, activation, dtype, bias, scaling = case
    return "-".join(
        [
            f"M{m}-d{d_in}" + ("-seq" if d_out is None else f"-par{d_out}"),
            f"m{bottleneck}",
            activation,
            str(dtype).removeprefix("torch."),
            "bias" if bias else "nobias",
            f"s{scaling:g}",
        ]
    )


def test_the_covering_set_covers_every_value():
    columns = list(zip(*CASES, strict=True))
    assert {1, 7, 97, 1025} <= set(columns[0])
    assert {5, 33, 70} <= set(columns[1])
    assert {1, 8, 24, 64, 300} <= set(columns[3])
    for dtype in DTYPES:
        rows = [case for case in CASES if case[5] == dtype]
        assert {case[4] for case in rows} == set(ACTIVATIONS), dtype
        assert any(case[3] > FUSED_LIMIT for case in rows), dtype
        assert any(case[2] is None for case in rows), dtype
        assert any(case[2] not in (None, case[1]) for case in rows), dtype
        assert {case[6] for case in rows} == {True, False}, dtype
    assert all(case[1] <= 8 and case[3] <= 24 for case in CASES if case[0] > 97)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_float64_reference(backend, case):
    m, d_in, d_out, bottleneck, activation, dtype, bias, scaling = case
    inputs = make_inputs(
        m,
        d_in,
        d_in if d_out is None else d_out,
        bottleneck,
        dtype,
        bias=bias,
        parallel=d_out is not None,
        activation=activation,
        seed=m + d_in + bottleneck,
    )
    check_against_reference(inputs, dtype, scaling, activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "d_in, d_out", [(33, 33), (33, 200), (200, None)], ids=["par33", "par200", "seq200"]
)
def test_both_sides_of_the_small_cpu_loops(backend, d_in, d_out, dtype):
    """Up to 2**14 elements the cpp backend writes the bias gradients' sums, the addmms'
    initial values and residual + s * up_bias with loops of its own (csrc/common.h,
    kSmallCpuLoop), above with ATen's kernels: 97 x 33 elements, and 97 x 200. (Its
    activations take loops up to a [M, m] bottleneck of that size: CASES has both sides.)"""
    inputs = make_inputs(97, d_in, d_out or d_in, 8, dtype, parallel=d_out is not None, seed=d_in)
    check_against_reference(inputs, dtype, 1.0, "gelu")


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
def test_float64_is_float64_exact(use_backend, backend_name):
    use_backend(backend_name)
    inputs = make_inputs((3, 4), 12, 9, 8, torch.float64, parallel=True, seed=1)
    got = run(ops.adapter_bottleneck, inputs, 0.5, "gelu")
    expected = reference64(inputs, 0.5, "gelu")
    for name, value in got.items():
        assert value.dtype == torch.float64, name
        torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-12)
    tensors = (inputs[name] for name in NAMES)
    _, pre = torch.ops.fastdelta.adapter_bottleneck(*tensors, 0.5, "gelu", backend_name)
    assert pre.dtype == torch.float64 and pre.shape == (3, 4, 8)


def test_forced_triton_refuses_float64(use_backend):
    use_backend("triton")
    inputs = make_inputs(3, 8, 8, 4, torch.float64)
    with pytest.raises(RuntimeError, match=r"float16, bfloat16 or float32, not torch.float64"):
        run(ops.adapter_bottleneck, inputs, 1.0, "relu")


# --------------------------------------------------------------------------------------------
# 2. Strides, leading dimensions, scaling and the residual.


@pytest.mark.parametrize("bottleneck", [24, 300])
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_stride0_upstream_gradient_with_leading_dimensions(backend, parallel, bottleneck):
    d_out = 17 if parallel else 33
    inputs = make_inputs((2, 3, 5), 33, d_out, bottleneck, F32, parallel=parallel, seed=2)
    # out.sum().backward(): the upstream gradient is a stride-0 expansion of a scalar.
    got = run(ops.adapter_bottleneck, inputs, 0.7, "gelu_new", grad=None)
    assert got["out"].shape == (2, 3, 5, d_out)
    assert_all_accurate(got, reference64(inputs, 0.7, "gelu_new", grad=None), None, F32)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_stride0_upstream_gradient_in_half_precision(backend, dtype):
    inputs = make_inputs((4, 9), 33, 33, 24, dtype, seed=3)
    check_against_reference(inputs, dtype, 0.5, "silu", grad=None)


def _transposed(tensor, layout):
    """(a contiguous leaf holding `tensor`'s values in another order, a non-contiguous view of
    it equal to `tensor`): a transposed matrix of all rows, or the first two dimensions
    swapped."""
    if layout == "transposed-2d":
        leaf = tensor.reshape(-1, tensor.shape[-1]).t().contiguous().requires_grad_()
        return leaf, leaf.t()
    leaf = tensor.transpose(0, 1).contiguous().requires_grad_()
    return leaf, leaf.transpose(0, 1)


def _untransposed(grad, layout, shape):
    return (grad.t() if layout == "transposed-2d" else grad.transpose(0, 1)).reshape(shape)


@pytest.mark.parametrize("bottleneck", [8, 300])
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("layout", ["transposed-2d", "transposed-3d"])
def test_non_contiguous_inputs(backend, layout, parallel, bottleneck):
    """h, the residual and the weights as transposed views; the result in h's row order."""
    d_out = 20 if parallel else 33
    inputs = make_inputs((6, 7), 33, d_out, bottleneck, F32, parallel=parallel, seed=4)
    h_leaf, h = _transposed(inputs["h"], layout)
    residual_leaf, residual = (None, None)
    if parallel:
        residual_leaf, residual = _transposed(inputs["residual"], layout)
    down_leaf = inputs["down_weight"].t().contiguous().requires_grad_()
    up_leaf = inputs["up_weight"].t().contiguous().requires_grad_()
    biases = {name: inputs[name].clone().requires_grad_() for name in ("down_bias", "up_bias")}
    assert not h.is_contiguous()
    out = ops.adapter_bottleneck(
        h, down_leaf.t(), biases["down_bias"], up_leaf.t(), biases["up_bias"], 1.5, "silu", residual
    )
    grad = inputs["grad"]
    out.reshape(grad.shape).backward(grad)
    got = {
        "out": out.detach().reshape(grad.shape),
        "h": _untransposed(h_leaf.grad, layout, inputs["h"].shape),
        "down_weight": down_leaf.grad.t(),
        "up_weight": up_leaf.grad.t(),
        **{name: bias.grad for name, bias in biases.items()},
    }
    if parallel:
        got["residual"] = _untransposed(residual_leaf.grad, layout, grad.shape)
    assert_all_accurate(got, reference64(inputs, 1.5, "silu"), None, F32)


def test_an_expanded_residual(backend):
    """A residual broadcast from one row (stride 0): its gradient is the sum of the rows'."""
    inputs = make_inputs(9, 12, 10, 8, F32, parallel=True, seed=5)
    row = inputs["residual"][:1].clone().requires_grad_()
    inputs["residual"] = row.detach().expand(9, 10)
    expected = reference64(inputs, 0.5, "gelu")
    leaves = {name: inputs[name].clone().requires_grad_() for name in NAMES[:5]}
    out = ops.adapter_bottleneck(*leaves.values(), 0.5, "gelu", row.expand(9, 10))
    out.backward(inputs["grad"])
    got = {"out": out.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}
    assert_accurate("grad of residual", row.grad, expected.pop("residual").sum(0, True), None, F32)
    assert_all_accurate(got, expected, None, F32)


@pytest.mark.parametrize("scaling", [0.0, -2.0, 3])
def test_scaling(backend, scaling):
    inputs = make_inputs((2, 5), 20, 20, 300, F32, seed=6)
    check_against_reference(inputs, F32, scaling, "gelu")


def test_residual_h_itself_is_the_sequential_adapter(backend):
    inputs = make_inputs((4, 9), 12, 12, 8, F32, seed=7)
    expected = reference64(inputs, 0.5, "gelu")

    def with_h_as_residual(h, down_weight, down_bias, up_weight, up_bias, scaling, act, _):
        return ops.adapter_bottleneck(
            h, down_weight, down_bias, up_weight, up_bias, scaling, act, residual=h
        )

    got = run(with_h_as_residual, inputs, 0.5, "gelu")
    assert_all_accurate(got, expected, None, F32)


@pytest.mark.parametrize(
    "alias, canonical", [("swish", "silu"), ("gelu_tanh", "gelu_new"), ("GELU", "gelu")]
)
def test_activation_aliases(backend, alias, canonical):
    inputs = make_inputs(5, 12, 12, 8, F32, seed=8)
    got = run(ops.adapter_bottleneck, inputs, 1.0, alias)
    assert_all_accurate(got, reference64(inputs, 1.0, canonical), None, F32)


def test_an_empty_batch(backend):
    inputs = make_inputs((0, 3), 6, 5, 300, F32, parallel=True)
    got = run(ops.adapter_bottleneck, inputs, 1.0, "gelu")
    assert got["out"].shape == (0, 3, 5)
    assert got["h"].shape == (0, 3, 6) and got["residual"].shape == (0, 3, 5)
    for name in PARAMETERS:
        assert torch.equal(got[name], torch.zeros_like(inputs[name])), name


# --------------------------------------------------------------------------------------------
# 3. Frozen parts get no gradient; the rest get the right one.

TRAINABLE_SETS = {
    "weights": ("down_weight", "up_weight"),
    "up_weight": ("up_weight",),
    "down_weight": ("down_weight",),
    "biases": ("down_bias", "up_bias"),
    "h": ("h",),
    "h+up_bias": ("h", "up_bias"),
    "residual": ("residual",),
    "nothing": (),
}


@pytest.mark.parametrize("bottleneck", [8, 300])
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("trainable", sorted(TRAINABLE_SETS))
def test_frozen_parts_get_no_gradient(backend, trainable, parallel, bottleneck):
    inputs = make_inputs(9, 20, 11 if parallel else 20, bottleneck, F32, parallel=parallel)
    check_against_reference(inputs, F32, 0.5, "gelu", TRAINABLE_SETS[trainable])


def test_a_bfloat16_model_with_frozen_parameters(backend):
    inputs = make_inputs((3, 11), 33, 33, 24, BF16, seed=9)
    check_against_reference(inputs, BF16, 1.0, "gelu_new", ("h", "up_weight"))


# --------------------------------------------------------------------------------------------
# 4. Autocast and mixed dtypes.


def test_float32_adapter_weights_with_a_bfloat16_model(backend):
    inputs = make_inputs(33, 20, 20, 8, BF16, activation="relu", seed=10)
    for name in PARAMETERS:
        inputs[name] = inputs[name].float() * 1.01  # not bfloat16-exact
    got = run(ops.adapter_bottleneck, inputs, 1.0, "relu")
    assert got["out"].dtype == got["h"].dtype == BF16
    assert all(got[name].dtype == F32 for name in PARAMETERS)
    # The op casts the adapter weights to bfloat16: that is what the reference gets.
    rounded = {name: None if t is None else t.to(BF16) for name, t in inputs.items()}
    eager = run(reference.adapter_bottleneck, rounded, 1.0, "relu")
    got = {name: t.to(BF16) for name, t in got.items()}
    assert_all_accurate(got, reference64(rounded, 1.0, "relu"), eager, BF16)


def test_autocast_to_bfloat16(backend):
    inputs = make_inputs((2, 9), 33, 20, 24, F32, parallel=True, seed=11)
    inputs["grad"] = inputs["grad"].to(BF16)

    def under_autocast(*args):
        with torch.autocast("cpu", dtype=BF16):
            return ops.adapter_bottleneck(*args)

    got = run(under_autocast, inputs, 0.5, "gelu")
    assert got["out"].dtype == BF16
    assert all(got[name].dtype == F32 for name in NAMES)
    # The same as the op on bfloat16 copies: compare with the reference on those copies.
    rounded = {name: t.to(BF16) for name, t in inputs.items()}
    eager = run(reference.adapter_bottleneck, rounded, 0.5, "gelu")
    got = {name: t.to(BF16) for name, t in got.items()}
    assert_all_accurate(got, reference64(rounded, 0.5, "gelu"), eager, BF16)


# --------------------------------------------------------------------------------------------
# 5. What the op saves for backward.


def saved_for_backward(function):
    """The tensors autograd saved while running `function`, and its result."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return saved, result


def check_saved_tensors(dtype, parallel, bottleneck, device="cpu"):
    leading, d_in, d_out = (3, 5), 20, 13 if parallel else 20
    inputs = make_inputs(
        leading, d_in, d_out, bottleneck, dtype, parallel=parallel, device=device, seed=12
    )
    leaves = {
        name: None if inputs[name] is None else inputs[name].requires_grad_() for name in NAMES
    }
    saved, out = saved_for_backward(
        lambda: ops.adapter_bottleneck(
            *(leaves[name] for name in NAMES[:5]), 1.0, "gelu", leaves["residual"]
        )
    )
    remaining = list(saved)

    def saved_by_reference(name):
        """The positions in `remaining` of tensors that are `name`'s storage and shape."""
        tensor = leaves[name]
        return [
            i
            for i, t in enumerate(remaining)
            if t.data_ptr() == tensor.data_ptr() and t.shape == tensor.shape
        ]

    for name in ("h", "down_weight", "up_weight"):
        matches = saved_by_reference(name)
        assert len(matches) == 1, f"{name} saved {len(matches)} times (not by reference?)"
        del remaining[matches[0]]
    # The Python backends keep down_bias too (by reference), so that a double backward towards
    # it reaches the refusal (fastdelta.ops.eager.once_differentiable).
    if leaves["down_bias"] is not None:
        for i in saved_by_reference("down_bias")[:1]:
            del remaining[i]
    assert len(remaining) == 1, [(tuple(t.shape), t.dtype) for t in remaining]
    (pre,) = remaining
    assert pre.shape == (*leading, bottleneck) and pre.dtype == torch.float32
    # Nothing of the output's size besides h itself (sequential): not out, not the residual.
    assert all(t.numel() != out.numel() for t in (pre, leaves["down_weight"], leaves["up_weight"]))
    others = [out] + [leaves[name] for name in ("up_bias", "residual")]
    assert not {t.data_ptr() for t in others if t is not None} & {t.data_ptr() for t in saved}
    out.backward(inputs["grad"])  # and the saved tensors suffice for the backward
    assert all(leaf.grad is not None for leaf in leaves.values() if leaf is not None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bottleneck", [8, 300])
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_saves_h_the_pre_activation_and_the_weights_only(backend, parallel, bottleneck, dtype):
    check_saved_tensors(dtype, parallel, bottleneck)


# --------------------------------------------------------------------------------------------
# 6. opcheck.


@pytest.mark.parametrize(
    "m, d_out, bottleneck, bias",
    [
        (5, None, 8, True),
        (5, None, 8, False),
        (5, 11, 8, True),
        (5, 11, 8, False),
        (3, 11, 300, True),
    ],
    ids=["seq-bias", "seq-nobias", "par-bias", "par-nobias", "par-bias-m300"],
)
def test_opcheck(backend, m, d_out, bottleneck, bias):
    parallel = d_out is not None
    inputs = make_inputs(m, 9, d_out or 9, bottleneck, F32, bias=bias, parallel=parallel, seed=13)
    tensors = [None if inputs[n] is None else inputs[n].requires_grad_() for n in NAMES]
    torch.library.opcheck(
        torch.ops.fastdelta.adapter_bottleneck.default, (*tensors, 0.5, "gelu_new", backend)
    )


@pytest.mark.parametrize(
    "needs", [(True,) * 5, (False, True, False, True, False), (True, False, True, False, True)]
)
@pytest.mark.parametrize("bottleneck", [8, 300])
@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "parallel"])
def test_opcheck_backward_op(backend, sequential, bottleneck, needs):
    inputs = make_inputs(4, 9, 9 if sequential else 6, bottleneck, F32, parallel=not sequential)
    h, down_weight, down_bias, up_weight, up_bias, residual = (inputs[n] for n in NAMES)
    _, pre = torch.ops.fastdelta.adapter_bottleneck(
        h, down_weight, down_bias, up_weight, up_bias, residual, 0.5, "silu", backend
    )
    biases = (down_bias is not None, up_bias is not None)
    args = (inputs["grad"], h, down_weight, up_weight, pre, 0.5, "silu", sequential, *biases)
    args = (*args, backend, *needs)
    torch.library.opcheck(torch.ops.fastdelta.adapter_bottleneck_backward.default, args)


# --------------------------------------------------------------------------------------------
# 7. torch.compile.


class Bottleneck(nn.Module):
    def __init__(self, d_in=12, d_out=12, bottleneck=8):
        super().__init__()
        inputs = make_inputs(1, d_in, d_out, bottleneck, F32, seed=14)
        for name in PARAMETERS:
            setattr(self, name, nn.Parameter(inputs[name]))

    def forward(self, h, residual=None):
        return ops.adapter_bottleneck(
            h, self.down_weight, self.down_bias, self.up_weight, self.up_bias, 0.5, "silu", residual
        )


def forward_backward(module, h, residual):
    module.zero_grad()
    h = h.detach().clone().requires_grad_()
    residual = None if residual is None else residual.detach().clone().requires_grad_()
    out = module(h, residual)
    out.square().sum().backward()
    grads = [h.grad, *(p.grad.clone() for p in module.parameters())]
    return [out.detach(), *grads, *([] if residual is None else [residual.grad])]


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_torch_compile_fullgraph_matches_eager(backend, parallel):
    torch._dynamo.reset()
    d_out = 10 if parallel else 12
    module = Bottleneck(12, d_out, 8)
    inputs = make_inputs((2, 5), 12, d_out, 8, F32, parallel=parallel, seed=15)
    compiled = torch.compile(module, fullgraph=True)
    got = forward_backward(compiled, inputs["h"], inputs["residual"])
    expected = forward_backward(module, inputs["h"], inputs["residual"])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["eager", "custom_op", "compiled"])
def test_the_backward_runs_on_its_forwards_backend(backend, path, monkeypatch):
    """The backend is chosen once per forward: a set_backend() between a forward and its
    backward does not reach that backward."""
    other = next(name for name in BACKENDS if name != backend and not unavailable_reason(name))
    calls = []
    functions = ("adapter_forward", "adapter_backward", "adapter_bottleneck")
    for name in (backend, other):
        for function in (f for f in functions if hasattr(backend_module(name), f)):
            original = getattr(backend_module(name), function)

            def spy(*args, _original=original, _call=(name, function)):
                calls.append(_call)
                return _original(*args)

            monkeypatch.setattr(backend_module(name), function, spy)
    if path != "eager":
        monkeypatch.setattr(ops, "eager_path", lambda *tensors: False)
    module = Bottleneck()
    torch._dynamo.reset()
    call = torch.compile(module, fullgraph=True) if path == "compiled" else module
    out = call(make_inputs((2, 5), 12, 12, 8, F32, seed=15)["h"].requires_grad_())
    set_backend(other)
    out.sum().backward()
    if backend == "cpp" and path == "eager":  # one C++ op runs the forward and the backward
        assert calls == [(backend, "adapter_bottleneck")]
    else:
        assert calls == [(backend, "adapter_forward"), (backend, "adapter_backward")]
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 8. Argument errors: a ValueError naming the argument.


def _arguments(**changes):
    generator = torch.Generator().manual_seed(16)
    arguments = {
        "h": torch.randn(4, 10, generator=generator),
        "down_weight": torch.randn(8, 10, generator=generator),
        "down_bias": torch.randn(8, generator=generator),
        "up_weight": torch.randn(10, 8, generator=generator),
        "up_bias": torch.randn(10, generator=generator),
        "scaling": 1.0,
        "activation": "relu",
        "residual": None,
    }
    return {**arguments, **changes}


ARGUMENT_ERRORS = {
    "d_in": ({"h": torch.randn(4, 12)}, r"h has 12 features but down_weight \(8, 10\) takes 10"),
    "down_weight-3d": (
        {"down_weight": torch.randn(8, 10, 1)},
        r"down_weight must be 2-D, got shape \(8, 10, 1\)",
    ),
    "up_weight-1d": ({"up_weight": torch.randn(10)}, r"up_weight must be 2-D, got shape \(10,\)"),
    "up-down-mismatch": (
        {"up_weight": torch.randn(10, 7)},
        r"up_weight \(10, 7\) must be \[out, 8\] to follow down_weight \(8, 10\)",
    ),
    "down_bias": ({"down_bias": torch.randn(7)}, r"down_bias \(7,\) must be \[8\]"),
    "up_bias": ({"up_bias": torch.randn(8)}, r"up_bias \(8,\) must be \[10\]"),
    "sequential-d_out": (
        {"up_weight": torch.randn(6, 8), "up_bias": None},
        r"sequential adapter \(no residual\) needs out_features == in_features, got 6 and 10",
    ),
    "residual-shape": ({"residual": torch.randn(4, 9)}, r"residual \(4, 9\) must be \[4, 10\]"),
    "residual-rows": ({"residual": torch.randn(5, 10)}, r"residual \(5, 10\) must be \[4, 10\]"),
    "residual-dtype": (
        {"residual": torch.randn(4, 10, dtype=torch.float64)},
        r"residual is torch.float64 but h is torch.float32",
    ),
    "devices": ({"down_bias": torch.randn(8, device="meta")}, r"different devices"),
    "activation": ({"activation": "tanhh"}, r"Unknown non_linearity 'tanhh'"),
}


@pytest.mark.parametrize("problem", sorted(ARGUMENT_ERRORS))
def test_bad_arguments_raise_a_value_error_naming_them(problem, backend):
    """On every backend: the cpp backend's C++ op checks the arguments itself, and its error
    is replaced by this one."""
    changes, match = ARGUMENT_ERRORS[problem]
    with pytest.raises(ValueError, match=match):
        ops.adapter_bottleneck(**_arguments(**changes))


def test_h_as_the_residual_with_other_out_features_is_rejected(backend):
    arguments = _arguments(up_weight=torch.randn(6, 8), up_bias=None)
    arguments["residual"] = arguments["h"]
    with pytest.raises(ValueError, match=r"sequential adapter"):
        ops.adapter_bottleneck(**arguments)


def test_a_non_string_activation_is_a_type_error():
    with pytest.raises(TypeError, match=r"non_linearity must be a string"):
        ops.adapter_bottleneck(**_arguments(activation=None))


# --------------------------------------------------------------------------------------------
# 9. The adapter delta models run the same on every backend.


# Large pre-activations overflow exp() in the interpreter's sigmoid, which then is exactly 0.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("fast", ["triton", "cpp"])
@pytest.mark.parametrize("delta_class", [AdapterModel, ParallelAdapterModel])
def test_delta_models_agree_across_backends(use_backend, delta_class, fast):
    use_backend(fast)  # skips where the backend cannot run on CPU tensors
    model = tiny_model("bert")
    delta_model = delta_class(model, bottleneck_dim=12, non_linearity="gelu_new")
    delta_model.freeze_module()
    deltas = [module for module in model.modules() if isinstance(module, AdapterDelta)]
    generator = torch.Generator().manual_seed(17)
    with torch.no_grad():  # far from the near-identity initialisation, so the adapters count
        for delta in deltas:
            for parameter in delta.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    inputs = tiny_inputs("bert")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert deltas and len(trainable) == 4 * len(deltas)

    def forward_backward_on(name):
        use_backend(name)
        assert delta_model.backends() == {name}
        model.zero_grad(set_to_none=True)
        output = first_output(model(**inputs))
        weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(18))
        (output * weights).sum().backward()
        return output.detach(), {name: p.grad.clone() for name, p in trainable}

    torch_output, torch_grads = forward_backward_on("torch")
    fast_output, fast_grads = forward_backward_on(fast)
    torch.testing.assert_close(fast_output, torch_output, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == torch_grads.keys()
    for name, grad in torch_grads.items():
        scale = max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(
            fast_grads[name],
            grad,
            rtol=1e-4,
            atol=1e-5 * scale,
            msg=lambda message, name=name: f"grad of {name}: {message}",
        )


# --------------------------------------------------------------------------------------------
# 10. On a GPU.

GPU_CASES = [
    (7, 33, None, 8, "relu", 1.0),
    (97, 70, 40, 64, "gelu_new", 0.5),
    (1025, 33, 33, 300, "silu", 1.0),
    (4096, 256, None, 24, "gelu", 2.0),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: "M{}-d{}-d_out{}-m{}".format(*case))
def test_gpu_matches_the_float64_reference(use_backend, name, dtype, case):
    use_backend(name, "cuda")
    m, d_in, d_out, bottleneck, activation, scaling = case
    inputs = make_inputs(
        m,
        d_in,
        d_in if d_out is None else d_out,
        bottleneck,
        dtype,
        parallel=d_out is not None,
        activation=activation,
        device="cuda",
        seed=19,
    )
    check_against_reference(inputs, dtype, scaling, activation)
    check_against_reference(inputs, dtype, scaling, activation, ("h", "up_weight"), grad=None)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_gpu_saves_h_the_pre_activation_and_the_weights_only(use_backend, name, parallel):
    use_backend(name, "cuda")
    check_saved_tensors(BF16, parallel, 24, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_tensors_on_two_devices_are_a_value_error():
    arguments = _arguments(h=torch.randn(4, 10, device="cuda"))
    with pytest.raises(ValueError, match=r"different devices"):
        ops.adapter_bottleneck(**arguments)
