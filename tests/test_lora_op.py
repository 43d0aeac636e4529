"""`fastdelta::lora_linear`: every backend against a float64 oracle, and the op's contract.

The triton backend runs on CPU tensors through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 without a GPU) and the cpp backend through the C++ extension's CPU kernels
(built just in time on first use, once, into the cache directory), so every check here covers
all three backends; the interpreter is slow, so the accuracy sweep is a covering set of shapes,
not their cartesian product.

Accuracy rule (TOLERANCES, one entry per dtype): float32 results must be within a fixed
tolerance of the float64 reference; a float16 or bfloat16 result's largest error against the
float64 reference must be at most twice that of eager PyTorch (`reference.lora_linear`) run in
the same dtype on the same inputs, plus a tiny floor. The reference runs on float64 copies of
the rounded inputs, with the same upstream gradient. NaN never passes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdelta
from fastdelta import ops
from fastdelta.ops import backend as backend_selection
from fastdelta.ops import reference
from fastdelta.ops.backend import (
    ENVIRONMENT_VARIABLE,
    backend_module,
    get_backend,
    resolve_backend,
    set_backend,
    unavailable_reason,
)

BACKENDS = ("torch", "triton", "cpp")
# The backends that compute in float64 too (Triton's kernels do not).
FLOAT64_BACKENDS = ("torch", "cpp")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
SCALING = 1.5
CUDA = torch.cuda.is_available()

# How close each dtype's results must be to the float64 reference (see the module docstring).
# float32: |got - ref| <= atol * max|ref| + rtol * |ref|, elementwise.
# float16 / bfloat16: max|got - ref| <= eager_factor * max|eager - ref| + floor * max|ref|.
TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"eager_factor": 2.0, "floor": 1e-5},
    torch.bfloat16: {"eager_factor": 2.0, "floor": 1e-4},
}

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def use_backend(monkeypatch):
    """A function that forces a backend (skipping the test where it cannot run on `device`).

    Afterwards the setting goes back to "auto", then to whatever it was before the test (None
    unless someone set it), and $FASTDELTA_BACKEND is unset (and unread) during the test.
    """
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backend_selection, "_environment", None)
    monkeypatch.setattr(backend_selection, "_setting", backend_selection._setting)

    def use(name: str, device: str = "cpu"):
        reason = None if name == "auto" else unavailable_reason(name, device)
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


def make_inputs(shape, k, n, r, dtype, *, bias=True, fan_in_fan_out=False, device="cpu", seed=0):
    """Random inputs (x of `shape` + (k,)) and an upstream gradient, drawn in float64 from a
    fixed seed and rounded to `dtype`; the weights are scaled by 1/sqrt(fan-in) so every value
    stays O(1)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    generator = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        values = torch.randn(size, generator=generator, dtype=torch.float64) * scale
        return values.to(device=device, dtype=dtype)

    inputs = {
        "x": rand(*shape, k),
        "weight": rand(k, n, scale=k**-0.5) if fan_in_fan_out else rand(n, k, scale=k**-0.5),
        "bias": rand(n) if bias else None,
        "lora_A": rand(r, k, scale=k**-0.5),
        "lora_B": rand(n, r, scale=r**-0.5),
    }
    return inputs, rand(*shape, n)


def run(fn, inputs, trainable, grad_out, x_view=None, dtype=None):
    """y and the gradients of fn(x, weight, bias, lora_A, lora_B) on fresh leaf copies of
    `inputs` (cast to `dtype` when given); only the names in `trainable` require grad.

    grad_out=None backpropagates y.sum(), whose gradient is a stride-0 expanded tensor.
    `x_view` turns the x leaf into the tensor passed to fn (a transposed view, say)."""
    leaves = {
        name: None
        if tensor is None
        else tensor.detach().to(dtype or tensor.dtype).clone().requires_grad_(name in trainable)
        for name, tensor in inputs.items()
    }
    x = leaves["x"] if x_view is None else x_view(leaves["x"])
    y = fn(x, leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"])
    if grad_out is None:
        y.sum().backward()
    else:
        y.backward(grad_out.to(y.dtype))
    grads = {name: None if leaf is None else leaf.grad for name, leaf in leaves.items()}
    return y.detach(), grads


def assert_accurate(what, got, expected64, eager, dtype):
    """`got` against the float64 `expected64`, by the rule of TOLERANCES[dtype]; `eager` is the
    same quantity from eager PyTorch in `dtype` (used for float16 and bfloat16)."""
    assert got is not None, f"{what}: no result"
    assert got.shape == expected64.shape, f"{what}: shape {got.shape}, expected {expected64.shape}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    expected64 = expected64.cpu()
    error = (got.detach().cpu().double() - expected64).abs()
    magnitude = max(expected64.abs().max().item(), 1e-30) if expected64.numel() else 1.0
    tolerance = TOLERANCES[dtype]
    if "eager_factor" in tolerance:
        eager_error = (eager.detach().cpu().double() - expected64).abs().max().item()
        bound = tolerance["eager_factor"] * eager_error + tolerance["floor"] * magnitude
        worst = error.max().item()
        assert worst <= bound, (
            f"{what}: max error {worst:.3g} exceeds {tolerance['eager_factor']} x eager's "
            f"{eager_error:.3g} + floor {tolerance['floor'] * magnitude:.3g}"
        )
    else:
        bound = tolerance["atol"] * magnitude + tolerance["rtol"] * expected64.abs()
        assert (error <= bound).all(), (
            f"{what}: max error {error.max().item():.3g} (at magnitude {magnitude:.3g}) exceeds "
            f"rtol {tolerance['rtol']} / atol {tolerance['atol']}"
        )


def check_against_reference(
    inputs,
    grad_out,
    dtype,
    trainable=NAMES,
    *,
    fan_in_fan_out=False,
    dropout_p=0.0,
    seed=None,
    keep_mask=None,
    x_view=None,
    lora_linear=None,
    after_forward=None,
):
    """Run `lora_linear` (by default ops.lora_linear, on whatever backend is set) and compare
    its output and gradients with reference.lora_linear in float64 (and, for the tolerance, in
    `dtype`). Frozen tensors must get no gradient. `after_forward` runs between the forward and
    the backward."""
    lora_linear = lora_linear or ops.lora_linear

    def fast(x, weight, bias, lora_A, lora_B):
        y = lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, fan_in_fan_out, seed)
        if after_forward is not None:
            after_forward()
        return y

    def oracle(x, weight, bias, lora_A, lora_B):
        mask = None if keep_mask is None else keep_mask.to(x.device)
        return reference.lora_linear(
            x, weight, bias, lora_A, lora_B, SCALING, dropout_p, fan_in_fan_out, mask
        )

    y, grads = run(fast, inputs, trainable, grad_out, x_view)
    y64, grads64 = run(oracle, inputs, trainable, grad_out, x_view, dtype=torch.float64)
    y_eager, grads_eager = run(oracle, inputs, trainable, grad_out, x_view)
    assert_accurate("output", y, y64, y_eager, dtype)
    for name in NAMES:
        if inputs[name] is None:
            continue
        if name in trainable:
            assert_accurate(f"grad of {name}", grads[name], grads64[name], grads_eager[name], dtype)
        else:
            assert grads[name] is None, f"{name} is frozen but got a gradient"


def spy_on(monkeypatch, module):
    """Record the calls to `module`'s lora_forward and lora_backward (and lora_linear, the cpp
    backend's differentiable op, which runs both in C++)."""
    calls = []
    functions = ("lora_forward", "lora_backward", "lora_linear")
    for function in (name for name in functions if hasattr(module, name)):
        original = getattr(module, function)

        def spy(*args, _original=original, _function=function, **kwargs):
            calls.append(_function)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function, spy)
    return calls


def expected_calls(backend: str) -> list[str]:
    """What spy_on records for one eager forward and backward on `backend`."""
    return ["lora_linear"] if backend == "cpp" else ["lora_forward", "lora_backward"]


# --------------------------------------------------------------------------------------------
# 1. Accuracy against the float64 reference: a covering set of shapes, dtypes and layouts.

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (M, K, N, r, dtype, bias, fan_in_fan_out, trainable base): every M, K, N, r and dtype
# appears, and each dtype with and without bias, in both layouts. M=1025 only with small K, N.
CASES = [
    (1, 5, 33, 1, F32, True, False, True),
    (1, 70, 5, 16, BF16, False, True, True),
    (1, 33, 70, 64, F16, True, False, False),
    (7, 33, 70, 4, F16, True, True, True),
    (7, 70, 33, 64, BF16, True, False, True),
    (7, 5, 5, 64, F32, False, True, True),
    (97, 70, 33, 16, F32, True, True, True),
    (97, 33, 70, 64, F16, False, False, True),
    (97, 5, 70, 4, BF16, True, True, False),
    (97, 70, 70, 1, BF16, False, False, True),
    (1025, 5, 33, 4, F32, True, False, True),
    (1025, 33, 5, 1, BF16, True, True, True),
    (1025, 5, 5, 16, F16, False, True, True),
]


def case_id(case):
    m, k, n, r, dtype, bias, fan_in_fan_out, train_base = case
    return "-".join(
        [
            f"M{m}K{k}N{n}r{r}",
            str(dtype).removeprefix("torch."),
            "bias" if bias else "nobias",
            "conv1d" if fan_in_fan_out else "linear",
            "trainbase" if train_base else "frozenbase",
        ]
    )


def test_the_covering_set_covers_every_value():
    columns = list(zip(*CASES, strict=True))
    assert set(columns[0]) == {1, 7, 97, 1025}
    assert set(columns[1]) == set(columns[2]) == {5, 33, 70}
    assert set(columns[3]) == {1, 4, 16, 64}
    for dtype in DTYPES:
        rows = [case for case in CASES if case[4] == dtype]
        assert {case[5] for case in rows} == {True, False}, dtype
        assert {case[6] for case in rows} == {True, False}, dtype
    assert {case[7] for case in CASES} == {True, False}
    assert all(case[1] <= 33 and case[2] <= 33 and case[3] <= 16 for case in CASES if case[0] > 97)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_float64_reference(backend, case):
    m, k, n, r, dtype, bias, fan_in_fan_out, train_base = case
    inputs, grad_out = make_inputs(m, k, n, r, dtype, bias=bias, fan_in_fan_out=fan_in_fan_out)
    trainable = NAMES if train_base else ("x", "lora_A", "lora_B")
    check_against_reference(inputs, grad_out, dtype, trainable, fan_in_fan_out=fan_in_fan_out)


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
def test_float64_matches_the_reference_to_float64_precision(use_backend, backend_name):
    """The torch and cpp backends take float64 (xa is float64 then); their gradients should be
    as exact as autograd's."""
    use_backend(backend_name)
    inputs, grad_out = make_inputs(300, 7, 5, 2, torch.float64)
    y, grads = run(lambda *args: ops.lora_linear(*args, SCALING), inputs, NAMES, grad_out)
    y64, grads64 = run(lambda *args: reference.lora_linear(*args, SCALING), inputs, NAMES, grad_out)
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    for name in ("x", "weight", "lora_A", "lora_B"):
        torch.testing.assert_close(grads[name], grads64[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
def test_float64_bias_gradient_is_float64_exact(use_backend, backend_name):
    use_backend(backend_name)
    inputs, grad_out = make_inputs(300, 7, 5, 2, torch.float64)
    _, grads = run(lambda *args: ops.lora_linear(*args, SCALING), inputs, NAMES, grad_out)
    _, grads64 = run(lambda *args: reference.lora_linear(*args, SCALING), inputs, NAMES, grad_out)
    torch.testing.assert_close(grads["bias"], grads64["bias"], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 2. Upstream gradients and x of any layout.

X_LAYOUTS = {
    # name: (shape of the x leaf, view passed to the op) for an x of K=24 features
    "transposed": ((24, 40), lambda t: t.t()),
    "sliced": ((40, 48), lambda t: t[:, ::2]),
    "batched_3d": ((4, 10, 24), None),
    "permuted_3d": ((10, 4, 24), lambda t: t.transpose(0, 1)),
}


@pytest.mark.parametrize("layout", sorted(X_LAYOUTS))
@pytest.mark.parametrize("stride0_grad", [False, True], ids=["random_grad", "sum_backward"])
def test_any_x_layout_and_an_expanded_upstream_gradient(backend, layout, stride0_grad):
    leaf_shape, x_view = X_LAYOUTS[layout]
    x_leaf = torch.randn(leaf_shape, generator=torch.Generator().manual_seed(2), dtype=F32)
    x = x_leaf if x_view is None else x_view(x_leaf)
    assert x.shape[-1] == 24 and x.is_contiguous() == (x_view is None)
    inputs, grad_out = make_inputs(x.shape[:-1], 24, 18, 4, F32, seed=3)
    inputs["x"] = x_leaf
    if stride0_grad:
        grad_out = None
    check_against_reference(inputs, grad_out, F32, x_view=x_view)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_sum_backward_in_half_precision(backend, dtype):
    """y.sum().backward() hands the backward a stride-0 gradient; 3-D x, Conv1D layout."""
    inputs, _ = make_inputs((3, 11), 33, 20, 4, dtype, fan_in_fan_out=True, seed=4)
    check_against_reference(inputs, None, dtype, fan_in_fan_out=True)


# --------------------------------------------------------------------------------------------
# 3. Frozen base weights, frozen x.

TRAINABLE_SETS = {
    "lora_and_x": ("x", "lora_A", "lora_B"),
    "lora_only": ("lora_A", "lora_B"),
    "x_only": ("x",),
    "lora_B_only": ("lora_B",),
    "base_only": ("weight", "bias"),
}


@pytest.mark.parametrize("trainable", sorted(TRAINABLE_SETS))
@pytest.mark.parametrize("m", [5, 40])
def test_frozen_tensors_get_no_gradient(backend, trainable, m):
    inputs, grad_out = make_inputs(m, 24, 36, 4, F32, seed=5)
    check_against_reference(inputs, grad_out, F32, TRAINABLE_SETS[trainable])


def test_frozen_base_with_lora_weights_from_a_module(backend):
    """The usual fine-tuning setup: nn.Linear frozen, x from an embedding without grad."""
    layer = torch.nn.Linear(16, 12).requires_grad_(False)
    lora_A = torch.nn.Parameter(torch.randn(4, 16) / 4)
    lora_B = torch.nn.Parameter(torch.randn(12, 4) / 2)
    x = torch.randn(2, 9, 16)
    y = ops.lora_linear(x, layer.weight, layer.bias, lora_A, lora_B, SCALING)
    y.square().mean().backward()
    assert layer.weight.grad is None and layer.bias.grad is None and x.grad is None
    assert lora_A.grad is not None and lora_B.grad is not None
    assert torch.isfinite(lora_A.grad).all() and torch.isfinite(lora_B.grad).all()


# --------------------------------------------------------------------------------------------
# 4. Dropout.


def dropout_run(inputs, grad_out, p, seed):
    return run(
        lambda *args: ops.lora_linear(*args, SCALING, dropout_p=p, seed=seed),
        inputs,
        NAMES,
        grad_out,
    )


def assert_bitwise_equal(first, second):
    (y1, grads1), (y2, grads2) = first, second
    assert torch.equal(y1, y2)
    for name in NAMES:
        assert torch.equal(grads1[name], grads2[name]), name


@pytest.mark.parametrize("m", [7, 40])
def test_dropout_is_a_function_of_the_seed(backend, m):
    inputs, grad_out = make_inputs(m, 33, 20, 4, F32, seed=6)
    seed = torch.tensor(1234, dtype=torch.int64)
    first = dropout_run(inputs, grad_out, 0.3, seed)
    assert_bitwise_equal(first, dropout_run(inputs, grad_out, 0.3, seed.clone()))
    other = dropout_run(inputs, grad_out, 0.3, torch.tensor(1235, dtype=torch.int64))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[1]["lora_A"], other[1]["lora_A"])

    torch.manual_seed(0)
    drawn = dropout_run(inputs, grad_out, 0.3, None)
    torch.manual_seed(0)
    assert_bitwise_equal(drawn, dropout_run(inputs, grad_out, 0.3, None))
    torch.manual_seed(1)
    assert not torch.equal(drawn[0], dropout_run(inputs, grad_out, 0.3, None)[0])


@pytest.mark.parametrize(
    "shape, dtype, fan_in_fan_out, trainable",
    [
        (7, F32, False, NAMES),
        ((2, 25), F32, True, NAMES),
        (40, BF16, False, ("x", "lora_A", "lora_B")),
        ((3, 4), F16, True, ("lora_A", "lora_B")),
        # More rows than one of the cpp backend's row blocks (128 rows) holds.
        (300, F32, False, NAMES),
    ],
    ids=["small_m", "3d_conv1d", "bf16", "f16_lora_only", "row_blocks"],
)
def test_backward_uses_the_forward_mask(backend, shape, dtype, fan_in_fan_out, trainable):
    """The backend's own keep-mask for the seed, applied by the eager reference, reproduces the
    op's output and every gradient: the backward drops exactly what the forward dropped."""
    p = 0.3
    inputs, grad_out = make_inputs(shape, 33, 20, 4, dtype, fan_in_fan_out=fan_in_fan_out, seed=7)
    seed = torch.tensor(98765, dtype=torch.int64)
    mask = backend_module(backend).dropout_keep_mask(seed, inputs["x"].shape, p)
    assert mask.dtype == torch.bool and mask.shape == inputs["x"].shape
    assert 0 < mask.sum() < mask.numel()
    check_against_reference(
        inputs,
        grad_out,
        dtype,
        trainable,
        fan_in_fan_out=fan_in_fan_out,
        dropout_p=p,
        seed=seed,
        keep_mask=mask,
    )


def op_keep_mask(p, rows, k, seed):
    """The keep-mask the op itself draws for an [rows, k] x on the seed's device: with x = 1 and
    lora_A = I, the xa it returns is keep / (1 - p)."""
    x = torch.ones(rows, k, device=seed.device)
    weight, lora_B = torch.zeros(1, k, device=seed.device), torch.zeros(1, k, device=seed.device)
    eye = torch.eye(k, device=seed.device)
    backend = resolve_backend(seed.device, x.dtype)
    _, xa = torch.ops.fastdelta.lora_linear(
        x, weight, None, eye, lora_B, seed, 1.0, p, False, backend
    )
    keep = xa != 0
    torch.testing.assert_close(xa[keep], torch.full_like(xa[keep], 1 / (1 - p)))
    return keep


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_drop_rate_is_p(backend, p):
    keep = op_keep_mask(p, 3200, 64, torch.tensor(2024, dtype=torch.int64))  # 204,800 draws
    assert abs((1 - keep.double().mean().item()) - p) < 0.01
    # No structure: each half of the rows and of the columns drops at p too.
    for part in (keep[:1600], keep[1600:], keep[:, :32], keep[:, 32:]):
        assert abs((1 - part.double().mean().item()) - p) < 0.015
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])


def test_the_keep_mask_helper_is_the_op_mask(backend):
    seed = torch.tensor(31337, dtype=torch.int64)
    expected = op_keep_mask(0.4, 20, 40, seed)
    assert torch.equal(backend_module(backend).dropout_keep_mask(seed, (20, 40), 0.4), expected)
    mask_3d = backend_module(backend).dropout_keep_mask(seed, (4, 5, 40), 0.4)
    assert torch.equal(mask_3d.reshape(20, 40), expected)
    # More rows than one of the cpp backend's row blocks holds, an odd row length.
    expected = op_keep_mask(0.4, 300, 37, seed)
    assert torch.equal(backend_module(backend).dropout_keep_mask(seed, (300, 37), 0.4), expected)


def test_dropout_only_touches_the_low_rank_path(backend):
    inputs, grad_out = make_inputs((2, 20), 24, 16, 4, F32, seed=8)
    seed = torch.tensor(5, dtype=torch.int64)
    inputs["lora_B"] = torch.zeros_like(inputs["lora_B"])
    y, grads = dropout_run(inputs, grad_out, 0.5, seed)
    y_plain, grads_plain = run(
        lambda x, weight, bias, *_: F.linear(x, weight, bias),
        inputs,
        ("x", "weight", "bias"),
        grad_out,
    )
    torch.testing.assert_close(y, y_plain, rtol=1e-6, atol=1e-6)
    for name in ("x", "weight", "bias"):
        torch.testing.assert_close(grads[name], grads_plain[name], rtol=1e-6, atol=1e-6)
    assert torch.equal(grads["lora_A"], torch.zeros_like(grads["lora_A"]))
    # With a nonzero lora_B the same dropout does change the output.
    inputs["lora_B"] = torch.ones_like(inputs["lora_B"])
    y_dropped, _ = dropout_run(inputs, grad_out, 0.5, seed)
    y_kept, _ = dropout_run(inputs, grad_out, 0.0, None)
    assert not torch.allclose(y_dropped, y_kept)


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


def check_saved_tensors(dtype, seed_kind, device="cpu"):
    leading, k, n, r = (2, 20), 24, 36, 4  # M*N = 1440: no input has that many elements
    inputs, grad_out = make_inputs(leading, k, n, r, dtype, device=device, seed=9)
    x, weight, bias, lora_A, lora_B = (inputs[name].requires_grad_() for name in NAMES)
    p = 0.0 if seed_kind == "none" else 0.25
    seed = torch.tensor(77, device=device) if seed_kind == "explicit" else None
    saved, y = saved_for_backward(
        lambda: ops.lora_linear(x, weight, bias, lora_A, lora_B, SCALING, p, seed=seed)
    )
    remaining = list(saved)
    for name, tensor in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        matches = [
            t for t in remaining if t.data_ptr() == tensor.data_ptr() and t.shape == tensor.shape
        ]
        assert len(matches) == 1, f"{name} saved {len(matches)} times (not by reference?)"
        remaining.remove(matches[0])
    xa = [t for t in remaining if t.shape == (*leading, r)]
    assert len(xa) == 1, [tuple(t.shape) for t in remaining]
    assert xa[0].dtype == torch.float32
    remaining.remove(xa[0])
    if seed_kind == "none":
        assert remaining == [], [(tuple(t.shape), t.dtype) for t in remaining]
    else:
        assert len(remaining) == 1, [(tuple(t.shape), t.dtype) for t in remaining]
        assert remaining[0].dim() == 0 and remaining[0].dtype == torch.int64
        if seed is not None:
            assert remaining[0].data_ptr() == seed.data_ptr()
    m = leading[0] * leading[1]
    assert all(t.numel() != m * n for t in saved)
    assert all(t.data_ptr() != bias.data_ptr() for t in saved)
    y.backward(grad_out)  # and the saved tensors suffice for the backward
    assert all(t.grad is not None for t in (x, weight, bias, lora_A, lora_B))


@pytest.mark.parametrize("seed_kind", ["none", "explicit", "drawn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saves_x_xa_seed_and_the_parameters_only(backend, dtype, seed_kind):
    check_saved_tensors(dtype, seed_kind)


# --------------------------------------------------------------------------------------------
# 6. opcheck.


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodropout", "dropout"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(backend, bias, dropout, fan_in_fan_out):
    inputs, _ = make_inputs(6, 10, 7, 3, F32, bias=bias, fan_in_fan_out=fan_in_fan_out, seed=10)
    tensors = [None if t is None else t.requires_grad_() for t in inputs.values()]
    seed = torch.tensor(11, dtype=torch.int64) if dropout else None
    p = 0.2 if dropout else 0.0
    args = (*tensors, seed, SCALING, p, fan_in_fan_out, backend)
    torch.library.opcheck(torch.ops.fastdelta.lora_linear.default, args)


@pytest.mark.parametrize("dropout", [False, True], ids=["nodropout", "dropout"])
def test_opcheck_backward_op(backend, dropout):
    inputs, grad_out = make_inputs(6, 10, 7, 3, F32, seed=11)
    x, weight, _, lora_A, lora_B = inputs.values()
    seed = torch.tensor(11, dtype=torch.int64) if dropout else None
    p = 0.2 if dropout else 0.0
    _, xa = torch.ops.fastdelta.lora_linear(
        x, weight, None, lora_A, lora_B, seed, SCALING, p, False, backend
    )
    args = (grad_out, x, weight, lora_A, lora_B, xa, seed, SCALING, p, False, False, backend)
    torch.library.opcheck(torch.ops.fastdelta.lora_linear_backward.default, (*args, *[True] * 5))


# --------------------------------------------------------------------------------------------
# 7. torch.compile.


class LoraLinear(torch.nn.Module):
    def __init__(self, k=16, n=12, r=4, dropout_p=0.25):
        super().__init__()
        generator = torch.Generator().manual_seed(12)
        self.weight = torch.nn.Parameter(torch.randn(n, k, generator=generator) / k**0.5)
        self.bias = torch.nn.Parameter(torch.randn(n, generator=generator))
        self.lora_A = torch.nn.Parameter(torch.randn(r, k, generator=generator) / k**0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(n, r, generator=generator) / r**0.5)
        self.dropout_p = dropout_p

    def forward(self, x, seed=None):
        return ops.lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, SCALING, self.dropout_p, seed=seed
        )


def forward_backward(module, x, seed):
    module.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = module(x, seed)
    y.square().sum().backward()
    return [y.detach(), x.grad, *(p.grad.clone() for p in module.parameters())]


def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    module = LoraLinear()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(13))
    seed = torch.tensor(42, dtype=torch.int64)
    compiled = torch.compile(module, fullgraph=True)
    got = forward_backward(compiled, x, seed)
    expected = forward_backward(module, x, seed)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # A seed drawn inside the compiled graph also compiles without a graph break.
    y = compiled(x)
    assert y.shape == (2, 5, 12) and torch.isfinite(y).all()
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 8. Backend selection.


def available(names=BACKENDS, device="cpu"):
    """The backends among `names` that can run on `device` here."""
    return [name for name in names if unavailable_reason(name, device) is None]


def test_forced_cpp_runs_the_extensions_own_ops(use_backend):
    """fastdelta::lora_linear stays the one public op; with the cpp backend its implementation
    calls the extension's fastdelta_C ops, forward and backward."""
    use_backend("cpp")
    inputs, grad_out = make_inputs(4, 6, 5, 2, F32)
    with torch.autograd.profiler.profile() as profile:
        run(lambda *args: ops.lora_linear(*args, SCALING, 0.1), inputs, NAMES, grad_out)
    names = {event.name for event in profile.function_events}
    assert {"fastdelta::lora_linear", "fastdelta_C::lora_forward"} <= names
    assert {"fastdelta::lora_linear_backward", "fastdelta_C::lora_backward"} <= names


def test_an_unknown_backend_is_a_value_error(use_backend):
    with pytest.raises(ValueError, match=r"'nonsense'.*auto, triton, cpp, torch"):
        set_backend("nonsense")


def _triton_imports():
    try:
        import fastdelta.kernels  # noqa: F401
    except ImportError:
        return False
    return True


def test_auto_runs_cpu_tensors_on_cpp_once_built_else_torch(use_backend, monkeypatch):
    """The C++ extension is the CPU's fastest path: auto takes it once it is built (it never
    builds it), and the torch backend otherwise."""
    built = backend_selection.unavailable_reason("cpp", "cpu", build=False) is None
    expected = "cpp" if built else "torch"
    use_backend("auto")
    assert get_backend() == "auto"
    for dtype in (*DTYPES, torch.float64):
        assert resolve_backend("cpu", dtype) == expected
    calls = {"torch": spy_on(monkeypatch, backend_module("torch"))}
    if _triton_imports():
        calls["triton"] = spy_on(monkeypatch, backend_module("triton"))
    if built:
        calls["cpp"] = spy_on(monkeypatch, backend_module("cpp"))
    inputs, grad_out = make_inputs(4, 6, 5, 2, F32)
    run(lambda *args: ops.lora_linear(*args, SCALING), inputs, NAMES, grad_out)
    assert calls.pop(expected) == expected_calls(expected)
    assert all(not other for other in calls.values())


def test_the_forced_backend_runs_the_op(backend, monkeypatch):
    calls = {name: spy_on(monkeypatch, backend_module(name)) for name in available()}
    inputs, grad_out = make_inputs(4, 6, 5, 2, F32)
    run(lambda *args: ops.lora_linear(*args, SCALING), inputs, NAMES, grad_out)
    assert calls[backend] == expected_calls(backend)
    assert all(not calls[other] for other in calls if other != backend)


def test_forced_triton_refuses_float64(use_backend):
    use_backend("triton")
    with pytest.raises(RuntimeError, match=r"'triton'.*float64"):
        resolve_backend("cpu", torch.float64)
    inputs, _ = make_inputs(4, 6, 5, 2, torch.float64)
    with pytest.raises(RuntimeError, match=r"'triton'.*float64"):
        ops.lora_linear(*inputs.values(), SCALING)


def test_the_environment_variable_chooses_the_backend(use_backend, monkeypatch):
    def new_process_with(value: str) -> None:
        """$FASTDELTA_BACKEND = value, as a process that has not run an op yet sees it."""
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, value)
        monkeypatch.setattr(backend_selection, "_environment", None)

    monkeypatch.setattr(backend_selection, "_setting", None)
    new_process_with("torch")
    assert get_backend() == "torch"
    assert resolve_backend("cpu", F32) == "torch"
    # Read once: a change after the first op does not apply.
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "auto")
    assert get_backend() == "torch"
    for name in available(["triton", "cpp"]):
        new_process_with(name)
        assert get_backend() == name
        assert resolve_backend("cpu", F32) == name
        calls = spy_on(monkeypatch, backend_module(name))
        inputs, grad_out = make_inputs(4, 6, 5, 2, F32)
        run(lambda *args: ops.lora_linear(*args, SCALING), inputs, NAMES, grad_out)
        assert calls == expected_calls(name)
    # set_backend wins over the environment.
    set_backend("torch")
    assert get_backend() == "torch"
    monkeypatch.setattr(backend_selection, "_setting", None)
    new_process_with("bogus")
    with pytest.raises(ValueError, match=rf"'bogus'.*\${ENVIRONMENT_VARIABLE}"):
        get_backend()


def test_the_package_exports_the_backend_switch():
    assert fastdelta.set_backend is set_backend and fastdelta.get_backend is get_backend
    assert ops.set_backend is set_backend and ops.get_backend is get_backend


# How an op runs: the eager autograd.Function (plain tensors), the custom op (tensor subclasses)
# and the custom op in a graph compiled with fullgraph=True.
OP_PATHS = ("eager", "custom_op", "compiled")


@pytest.mark.parametrize("path", OP_PATHS)
def test_the_backward_runs_on_its_forwards_backend(backend, path, monkeypatch):
    """The backend is chosen once per forward: a set_backend() between a forward and its
    backward does not reach that backward, so its dropout mask is the forward's."""
    other = next(name for name in available() if name != backend)
    p, seed = 0.3, torch.tensor(2468, dtype=torch.int64)
    inputs, grad_out = make_inputs((3, 7), 33, 20, 4, F32, seed=18)
    mask = backend_module(backend).dropout_keep_mask(seed, inputs["x"].shape, p)
    assert not torch.equal(mask, backend_module(other).dropout_keep_mask(seed, mask.shape, p))
    lora_linear = ops.lora_linear
    if path != "eager":
        monkeypatch.setattr(ops, "eager_path", lambda *tensors: False)
    if path == "compiled":
        torch._dynamo.reset()
        lora_linear = torch.compile(ops.lora_linear, fullgraph=True)
    check_against_reference(
        inputs,
        grad_out,
        F32,
        dropout_p=p,
        seed=seed,
        keep_mask=mask,
        lora_linear=lora_linear,
        after_forward=lambda: set_backend(other),
    )
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 9. Argument errors.


def _arguments(**changes):
    arguments = {
        "x": torch.randn(3, 5),
        "weight": torch.randn(4, 5),
        "bias": torch.randn(4),
        "lora_A": torch.randn(2, 5),
        "lora_B": torch.randn(4, 2),
        "scaling": 1.0,
        "dropout_p": 0.0,
        "fan_in_fan_out": False,
    }
    arguments.update(changes)
    return arguments


ARGUMENT_ERRORS = {
    "x_features": (_arguments(x=torch.randn(3, 6)), r"x has 6 features .*takes 5"),
    "x_features_conv1d": (
        _arguments(weight=torch.randn(4, 5), fan_in_fan_out=True),
        r"x has 5 features .*fan_in_fan_out.*takes 4",
    ),
    "lora_A_features": (_arguments(lora_A=torch.randn(2, 6)), r"lora_A \(2, 6\) must be \[r, 5\]"),
    "lora_B_rank": (_arguments(lora_B=torch.randn(4, 3)), r"lora_B \(4, 3\) must be \[4, r\]"),
    "lora_B_out": (_arguments(lora_B=torch.randn(5, 2)), r"lora_B \(5, 2\) must be \[4, r\]"),
    "lora_A_1d": (_arguments(lora_A=torch.randn(5)), r"lora_A .*2-D"),
    "bias_shape": (_arguments(bias=torch.randn(5)), r"bias \(5,\) must be \[4\]"),
    "bias_2d": (_arguments(bias=torch.randn(1, 4)), r"bias \(1, 4\) must be \[4\]"),
    "weight_dtype": (_arguments(weight=torch.randn(4, 5, dtype=torch.float64)), r"weight"),
    "bias_dtype": (_arguments(bias=torch.randn(4, dtype=torch.float16)), r"bias"),
    "dropout_one": (_arguments(dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1.0"),
    "dropout_negative": (_arguments(dropout_p=-0.1), r"dropout_p must be in \[0, 1\), got -0.1"),
    "dropout_above_one": (_arguments(dropout_p=1.5), r"dropout_p .*got 1.5"),
}


@pytest.mark.parametrize("problem", sorted(ARGUMENT_ERRORS))
def test_bad_arguments_raise_a_value_error_naming_them(problem, backend):
    """On every backend: the cpp backend's C++ op checks the arguments itself, and its error
    is replaced by this one."""
    arguments, message = ARGUMENT_ERRORS[problem]
    with pytest.raises(ValueError, match=r"^fastdelta\.ops\.lora_linear: .*" + message):
        ops.lora_linear(**arguments)


@pytest.mark.parametrize("shape", [(5,), (4, 5, 1)])
def test_a_weight_that_is_not_2d_is_named(shape, backend):
    with pytest.raises(ValueError, match=r"^fastdelta\.ops\.lora_linear: .*weight"):
        ops.lora_linear(**_arguments(weight=torch.randn(shape)))


# --------------------------------------------------------------------------------------------
# 10. Autocast and mixed dtypes.


def test_autocast_to_bfloat16(backend):
    inputs, grad_out = make_inputs((2, 9), 33, 20, 4, F32, seed=14)
    grad_out = grad_out.to(BF16)

    def under_autocast(*args):
        with torch.autocast("cpu", dtype=BF16):
            return ops.lora_linear(*args, SCALING)

    y, grads = run(under_autocast, inputs, NAMES, grad_out)
    assert y.dtype == BF16
    assert all(grads[name].dtype == F32 for name in NAMES)
    # The same as the op on bfloat16 copies: compare with the reference on those copies.
    rounded = {name: t.to(BF16) for name, t in inputs.items()}
    y_eager, grads_eager = run(
        lambda *args: reference.lora_linear(*args, SCALING), rounded, NAMES, grad_out
    )
    y64, grads64 = run(
        lambda *args: reference.lora_linear(*args, SCALING),
        rounded,
        NAMES,
        grad_out,
        dtype=torch.float64,
    )
    assert_accurate("output", y, y64, y_eager, BF16)
    for name in NAMES:
        # The fp32 leaves' gradients are the bfloat16 copies' gradients, cast.
        assert_accurate(
            f"grad of {name}", grads[name].to(BF16), grads64[name], grads_eager[name], BF16
        )


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_float32_lora_weights_with_a_bfloat16_model(backend, dropout_p):
    inputs, grad_out = make_inputs(24, 33, 20, 4, BF16, seed=15)
    inputs["lora_A"] = inputs["lora_A"].float()
    inputs["lora_B"] = inputs["lora_B"].float() * 1.01  # not bfloat16-exact
    seed = torch.tensor(3, dtype=torch.int64)

    def fast(*args):
        return ops.lora_linear(*args, SCALING, dropout_p, seed=seed)

    y, grads = run(fast, inputs, NAMES, grad_out)
    assert y.dtype == BF16
    assert grads["lora_A"].dtype == grads["lora_B"].dtype == F32
    assert grads["x"].dtype == grads["weight"].dtype == grads["bias"].dtype == BF16
    # The op casts the LoRA weights to bfloat16: that is what the reference gets.
    rounded = {name: t.to(BF16) for name, t in inputs.items()}
    mask = backend_module(backend).dropout_keep_mask(seed, inputs["x"].shape, dropout_p)

    def oracle(*args):
        return reference.lora_linear(*args, SCALING, dropout_p, keep_mask=mask)

    y64, grads64 = run(oracle, rounded, NAMES, grad_out, dtype=torch.float64)
    y_eager, grads_eager = run(oracle, rounded, NAMES, grad_out)
    assert_accurate("output", y, y64, y_eager, BF16)
    for name in NAMES:
        got = grads[name].to(BF16)
        assert_accurate(f"grad of {name}", got, grads64[name], grads_eager[name], BF16)


# --------------------------------------------------------------------------------------------
# Edge cases.


def test_an_empty_batch(backend):
    inputs, grad_out = make_inputs((0, 3), 6, 5, 2, F32)
    y, grads = run(lambda *args: ops.lora_linear(*args, SCALING), inputs, NAMES, grad_out)
    assert y.shape == (0, 3, 5)
    assert grads["x"].shape == (0, 3, 6)
    for name in ("weight", "bias", "lora_A", "lora_B"):
        assert torch.equal(grads[name], torch.zeros_like(inputs[name])), name


# --------------------------------------------------------------------------------------------
# 11. On a GPU.

GPU_CASES = [
    (1, 70, 33, 16, True, False),
    (97, 33, 70, 4, False, True),
    (1025, 64, 48, 64, True, True),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: "M{}K{}N{}r{}".format(*case[:4]))
def test_gpu_matches_the_float64_reference(use_backend, name, dtype, case):
    use_backend(name, "cuda")
    m, k, n, r, bias, fan_in_fan_out = case
    inputs, grad_out = make_inputs(
        m, k, n, r, dtype, bias=bias, fan_in_fan_out=fan_in_fan_out, device="cuda", seed=16
    )
    check_against_reference(inputs, grad_out, dtype, fan_in_fan_out=fan_in_fan_out)
    check_against_reference(
        inputs, None, dtype, ("x", "lora_A", "lora_B"), fan_in_fan_out=fan_in_fan_out
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_backward_uses_the_forward_mask(use_backend, name, dtype):
    use_backend(name, "cuda")
    p = 0.3
    inputs, grad_out = make_inputs((4, 50), 96, 80, 8, dtype, device="cuda", seed=17)
    seed = torch.tensor(4321, dtype=torch.int64, device="cuda")
    mask = backend_module(name).dropout_keep_mask(seed, inputs["x"].shape, p)
    assert abs((1 - mask.double().mean().item()) - p) < 0.02
    check_against_reference(inputs, grad_out, dtype, dropout_p=p, seed=seed, keep_mask=mask)


@pytest.mark.gpu
@needs_cuda
def test_gpu_cpp_draws_the_cpu_mask(use_backend):
    """The extension hashes the same dropout mask from a seed on either device, in its helper
    and in the op."""
    use_backend("cpp", "cuda")
    cpp = backend_module("cpp")
    for shape, p, seed in (((97, 33), 0.1, 2**40 + 7), ((3, 50, 70), 0.5, -5)):
        seed = torch.tensor(seed, dtype=torch.int64)
        on_gpu = cpp.dropout_keep_mask(seed.cuda(), shape, p)
        assert torch.equal(on_gpu.cpu(), cpp.dropout_keep_mask(seed, shape, p))
    seed = torch.tensor(99, dtype=torch.int64)
    on_gpu = op_keep_mask(0.3, 40, 24, seed.cuda())
    assert torch.equal(on_gpu.cpu(), op_keep_mask(0.3, 40, 24, seed))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("seed_kind", ["none", "explicit"])
def test_gpu_saves_x_xa_seed_and_the_parameters_only(use_backend, name, seed_kind):
    use_backend(name, "cuda")
    check_saved_tensors(BF16, seed_kind, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_tensors_on_two_devices_are_a_value_error():
    arguments = _arguments(x=torch.randn(3, 5, device="cuda"))
    with pytest.raises(ValueError, match="different devices"):
        ops.lora_linear(**arguments)
