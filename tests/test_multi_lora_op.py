"""`fastdelta::multi_lora_linear`: many LoRAs in one mixed batch, on every backend.

Row i of x runs adapter adapter_ids[i] (or none, -1). Each backend's output and every gradient
are checked against the float64 eager reference (`reference.multi_lora_linear`, each adapter's
rows run separately) by test_lora_op's accuracy rule, and against running each adapter through
`fastdelta.ops.lora_linear` on the same backend with the same seed: that is where the dropout
mask must be lora_linear's, row for row, and where the zero-padding of the lower ranks must be
exact (each adapter's lora_linear gets its unpadded weights). The triton backend runs through
Triton's interpreter, so the shapes stay tiny.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_lora_op import F16, F32, NAMES, assert_accurate, run
from test_verification import checked, verification_warnings  # noqa: F401 (a fixture)

from fastdelta import ops
from fastdelta.ops import kernel_check, multi_lora_functional, reference
from fastdelta.ops.backend import backend_module, unavailable_reason
from fastdelta.ops.variants import multi_lora_variant

BACKENDS = ("torch", "triton", "cpp")
FLOAT64_BACKENDS = ("torch", "cpp")
BF16, F64 = torch.bfloat16, torch.float64
# Adapter 1 has no rows, two rows have no adapter.
IDS_7 = (2, -1, 0, 0, 2, 2, -1)


@pytest.fixture(params=BACKENDS)
def backend(request, use_backend):
    """Each backend in turn, forced, on CPU tensors; yields its name."""
    use_backend(request.param)
    return request.param


def make_problem(leading, k, n, ranks, dtype, ids, *, bias=True, fan_in_fan_out=False, seed=0):
    """Inputs (lora_A [len(ranks), max rank, K] and lora_B [., N, max rank], adapter j's rank
    ranks[j], zero beyond it), scalings, ids and an upstream gradient, drawn in float64 and
    rounded to `dtype`."""
    leading = (leading,) if isinstance(leading, int) else tuple(leading)
    generator = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        values = torch.randn(size, generator=generator, dtype=F64) * scale
        return values.to(dtype)

    adapters, rank = len(ranks), max(ranks)
    lora_A, lora_B = rand(adapters, rank, k, scale=k**-0.5), rand(adapters, n, rank, scale=0.5)
    for j, rank_j in enumerate(ranks):
        lora_A[j, rank_j:] = 0
        lora_B[j, :, rank_j:] = 0
    inputs = {
        "x": rand(*leading, k),
        "weight": rand(k, n, scale=k**-0.5) if fan_in_fan_out else rand(n, k, scale=k**-0.5),
        "bias": rand(n) if bias else None,
        "lora_A": lora_A,
        "lora_B": lora_B,
    }
    scalings = torch.linspace(0.5, 2.0, adapters, dtype=F32)
    adapter_ids = torch.tensor(ids, dtype=torch.int64).view(leading)
    return inputs, scalings, adapter_ids, rand(*leading, n)


def fast(scalings, adapter_ids, dropout_p=0.0, fan_in_fan_out=False, seed=None):
    """fastdelta.ops.multi_lora_linear as a function of (x, weight, bias, lora_A, lora_B)."""

    def function(x, weight, bias, lora_A, lora_B):
        return ops.multi_lora_linear(
            x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, fan_in_fan_out,
            seed,
        )  # fmt: skip

    return function


def oracle(scalings, adapter_ids, dropout_p=0.0, fan_in_fan_out=False, keep_mask=None):
    def function(x, weight, bias, lora_A, lora_B):
        return reference.multi_lora_linear(
            x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, fan_in_fan_out,
            keep_mask,
        )  # fmt: skip

    return function


def per_adapter_lora_linear(scalings, adapter_ids, ranks, dropout_p, fan_in_fan_out, seed):
    """Each adapter through fastdelta.ops.lora_linear on the whole batch with its own,
    unpadded weights and the same seed, each row's output taken from its adapter's call (the
    base alone for -1): the LoRA op's mask and arithmetic, row for row."""

    def function(x, weight, bias, lora_A, lora_B):
        ids = adapter_ids.unsqueeze(-1)
        y = torch.where(
            ids == -1, torch.nn.functional.linear(x, _base(weight, fan_in_fan_out), bias), 0
        )
        for j, rank in enumerate(ranks):
            y_j = ops.lora_linear(
                x, weight, bias, lora_A[j, :rank], lora_B[j, :, :rank], float(scalings[j]),
                dropout_p, fan_in_fan_out, seed,
            )  # fmt: skip
            y = y + torch.where(ids == j, y_j, 0)
        return y

    return function


def _base(weight, fan_in_fan_out):
    return weight.t() if fan_in_fan_out else weight


def keep_mask_of(backend, seed, shape, p):
    return None if p == 0 else backend_module(backend).dropout_keep_mask(seed, shape, p)


def assert_padding_and_idle_adapters_get_zeros(grads, ranks, adapter_ids):
    for j, rank in enumerate(ranks):
        assert torch.count_nonzero(grads["lora_A"][j, rank:]) == 0, f"padding of adapter {j}"
        assert torch.count_nonzero(grads["lora_B"][j, :, rank:]) == 0, f"padding of adapter {j}"
        if not (adapter_ids == j).any():
            assert torch.count_nonzero(grads["lora_A"][j]) == 0, f"adapter {j} has no rows"
            assert torch.count_nonzero(grads["lora_B"][j]) == 0, f"adapter {j} has no rows"


# --------------------------------------------------------------------------------------------
# 1. Accuracy against the float64 reference.

# (leading, K, N, ranks, dtype, bias, fan_in_fan_out, trainable base, dropout_p, ids): odd
# sizes, 2-D and 3-D x, ranks that differ (padded), an adapter with no rows, rows of none,
# each dtype with dropout on or off. The half types take a few hundred outputs: on fewer, the
# largest error (the accuracy rule's statistic) is noise even for lora_linear's own kernels.
CASES = [
    (7, 13, 9, (5, 3, 2), F32, True, False, True, 0.0, IDS_7),
    ((2, 7), 13, 9, (5, 1, 4), F32, False, True, False, 0.3, IDS_7 * 2),
    (40, 33, 20, (4, 2, 3), BF16, True, False, False, 0.3, [i % 4 - 1 for i in range(40)]),
    ((4, 10), 33, 20, (2, 4, 4), F16, True, True, True, 0.0, [(5 * i) % 3 for i in range(40)]),
    # One adapter's rows span several row blocks and reduction splits (32 rows each, here).
    (97, 13, 9, (3,), F32, False, False, True, 0.3, [0 if i % 7 else -1 for i in range(97)]),
    # Ranks wider than one rank chunk (32 columns, here).
    (13, 20, 9, (40, 33), F32, True, False, False, 0.3, [i % 3 - 1 for i in range(13)]),
]


def case_id(case):
    leading, k, n, ranks, dtype, bias, fan_in_fan_out, _, p, _ = case
    rows = "x".join(map(str, leading)) if isinstance(leading, tuple) else leading
    ranks = ",".join(map(str, ranks))
    layout = "conv1d" if fan_in_fan_out else "linear"
    return f"M{rows}K{k}N{n}r{ranks}-{str(dtype)[6:]}-{layout}-bias{int(bias)}-p{p}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_float64_reference(backend, case):
    leading, k, n, ranks, dtype, bias, fan_in_fan_out, train_base, p, ids = case
    inputs, scalings, adapter_ids, grad_out = make_problem(
        leading, k, n, ranks, dtype, ids, bias=bias, fan_in_fan_out=fan_in_fan_out, seed=1
    )
    seed = torch.tensor(2024, dtype=torch.int64) if p else None
    mask = keep_mask_of(backend, seed, inputs["x"].shape, p)
    trainable = NAMES if train_base else ("x", "lora_A", "lora_B")
    y, grads = run(
        fast(scalings, adapter_ids, p, fan_in_fan_out, seed), inputs, trainable, grad_out
    )
    expected = oracle(scalings, adapter_ids, p, fan_in_fan_out, mask)
    y64, grads64 = run(expected, inputs, trainable, grad_out, dtype=F64)
    y_eager, grads_eager = run(expected, inputs, trainable, grad_out)
    assert_accurate("output", y, y64, y_eager, dtype)
    for name in NAMES:
        if inputs[name] is None:
            continue
        if name in trainable:
            assert_accurate(f"grad of {name}", grads[name], grads64[name], grads_eager[name], dtype)
        else:
            assert grads[name] is None, f"{name} is frozen but got a gradient"
    assert_padding_and_idle_adapters_get_zeros(grads, ranks, adapter_ids)


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_float64_matches_the_reference_to_float64_precision(use_backend, backend_name, p):
    use_backend(backend_name)
    inputs, scalings, adapter_ids, grad_out = make_problem(7, 13, 9, (5, 3, 2), F64, IDS_7)
    seed = torch.tensor(5, dtype=torch.int64)
    mask = keep_mask_of(backend_name, seed, inputs["x"].shape, p)
    y, grads = run(fast(scalings, adapter_ids, p, seed=seed), inputs, NAMES, grad_out)
    y64, grads64 = run(oracle(scalings, adapter_ids, p, keep_mask=mask), inputs, NAMES, grad_out)
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    for name in NAMES:
        torch.testing.assert_close(grads[name], grads64[name], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 2. Parity with each adapter's rows through lora_linear: the same mask, exact padding.


def assert_close_to(what, got, expected, dtype):
    """got within float rounding of `expected` (the same math by another route)."""
    scale = max(expected.abs().max().item(), 1e-30)
    tolerance = 1e-12 if dtype == F64 else 2e-6
    error = (got - expected).abs().max().item()
    assert error <= tolerance * scale, (
        f"{what}: max difference {error:.3g} at magnitude {scale:.3g}"
    )


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_each_adapter_through_lora_linear(backend, path, p, monkeypatch):
    dtype = F32
    ranks = (5, 3, 2)
    leading, ids = ((2, 7), IDS_7 * 2) if path == "eager" else (7, IDS_7)
    inputs, scalings, adapter_ids, grad_out = make_problem(
        leading, 13, 9, ranks, dtype, ids, seed=2
    )
    seed = torch.tensor(99, dtype=torch.int64)
    if path == "custom_op":
        monkeypatch.setattr(multi_lora_functional, "eager_path", lambda *tensors: False)
    y, grads = run(fast(scalings, adapter_ids, p, seed=seed), inputs, NAMES, grad_out)
    separately = per_adapter_lora_linear(scalings, adapter_ids, ranks, p, False, seed)
    y_lora, grads_lora = run(separately, inputs, NAMES, grad_out)
    assert_close_to("output", y, y_lora, dtype)
    for name in NAMES:
        assert_close_to(f"grad of {name}", grads[name], grads_lora[name], dtype)
    assert_padding_and_idle_adapters_get_zeros(grads, ranks, adapter_ids)


def test_one_adapter_for_every_row_is_lora_linear(backend):
    inputs, scalings, _, grad_out = make_problem(7, 13, 9, (4,), F32, [0] * 7, seed=3)
    seed = torch.tensor(7, dtype=torch.int64)
    adapter_ids = torch.zeros(7, dtype=torch.int64)
    y, grads = run(fast(scalings, adapter_ids, 0.3, seed=seed), inputs, NAMES, grad_out)

    def single(x, weight, bias, lora_A, lora_B):
        return ops.lora_linear(
            x, weight, bias, lora_A[0], lora_B[0], float(scalings[0]), 0.3, seed=seed
        )

    y_lora, grads_lora = run(single, inputs, NAMES, grad_out)
    assert_close_to("output", y, y_lora, F32)
    for name in NAMES:
        assert_close_to(f"grad of {name}", grads[name], grads_lora[name], F32)


def test_stacked_weights_train_each_adapter(backend):
    """stack_lora_weights pads and stacks per-adapter weights; their gradients are the
    per-adapter lora_linear's."""
    ranks = (2, 5, 3)
    inputs, scalings, adapter_ids, grad_out = make_problem(
        7, 13, 9, ranks, F32, IDS_7[::-1], seed=4
    )
    own_A = [inputs["lora_A"][j, :r].clone().requires_grad_() for j, r in enumerate(ranks)]
    own_B = [inputs["lora_B"][j, :, :r].clone().requires_grad_() for j, r in enumerate(ranks)]
    lora_A, lora_B = ops.stack_lora_weights(own_A, own_B)
    assert lora_A.shape == (3, 5, 13) and lora_B.shape == (3, 9, 5)
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    y = ops.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_ids)
    y.backward(grad_out)
    for j in range(len(ranks)):
        if not (adapter_ids == j).any():
            assert torch.count_nonzero(own_A[j].grad) == 0
            continue
        a = own_A[j].detach().requires_grad_()
        b = own_B[j].detach().requires_grad_()
        rows = adapter_ids == j
        y_j = ops.lora_linear(x[rows], weight, bias, a, b, float(scalings[j]))
        torch.testing.assert_close(y[rows], y_j, rtol=1e-6, atol=1e-6)
        y_j.backward(grad_out[rows])
        torch.testing.assert_close(own_A[j].grad, a.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(own_B[j].grad, b.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 3. Edge cases.


@pytest.mark.parametrize("ids", [[-1] * 7, []], ids=["no_adapter_anywhere", "empty_batch"])
def test_rows_without_adapters(backend, ids):
    m = len(ids)
    inputs, scalings, adapter_ids, grad_out = make_problem(m, 13, 9, (3, 2), F32, ids, seed=5)
    y, grads = run(fast(scalings, adapter_ids), inputs, NAMES, grad_out)
    y_base, grads_base = run(
        lambda x, weight, bias, *_: torch.nn.functional.linear(x, weight, bias),
        inputs, ("x", "weight", "bias"), grad_out,
    )  # fmt: skip
    torch.testing.assert_close(y, y_base, rtol=1e-6, atol=1e-6)
    for name in ("x", "weight", "bias"):
        torch.testing.assert_close(grads[name], grads_base[name], rtol=1e-6, atol=1e-6)
    for name in ("lora_A", "lora_B"):
        assert torch.count_nonzero(grads[name]) == 0


def test_segments_computed_once_serve_every_layer(backend):
    inputs, scalings, adapter_ids, _ = make_problem(7, 13, 9, (5, 3, 2), F32, IDS_7, seed=6)
    segments = ops.adapter_segments(adapter_ids, 3)
    assert segments.order.tolist() == [2, 3, 0, 4, 5, 1, 6]
    assert segments.starts.tolist() == [0, 2, 2, 5]
    tensors = list(inputs.values())
    by_ids = ops.multi_lora_linear(*tensors, scalings, adapter_ids)
    torch.testing.assert_close(ops.multi_lora_linear(*tensors, scalings, segments), by_ids)


def test_the_triton_path_reads_nothing_on_the_host(use_backend, monkeypatch):
    """A layer's call with the batch's segments, forward and backward, on the triton backend:
    no host read, so nothing waits for the GPU and a CUDA graph can capture the step (the
    interpreter's own reads are not counted; test_host_sync.py has the guard). The torch and
    cpp backends read the segments' bounds, by design (ops/multi_lora_composed.py,
    csrc/multi_lora.cpp)."""
    from test_host_sync import HostReadGuard, assert_no_host_reads
    from triton.runtime.interpreter import InterpretedFunction

    use_backend("triton")
    guard = HostReadGuard()
    tolist = torch.Tensor.tolist

    def noted_tolist(tensor):
        guard.note("Tensor.tolist()")
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", noted_tolist)
    run_kernel = InterpretedFunction.run

    def run_paused(self, *args, **kwargs):
        with guard.paused():
            return run_kernel(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run_paused)
    inputs, scalings, adapter_ids, _ = make_problem(7, 13, 9, (5, 3, 2), F32, IDS_7, seed=10)
    tensors = [t.requires_grad_() for t in inputs.values()]
    segments = ops.adapter_segments(adapter_ids, 3)  # once per batch

    def step():
        ops.multi_lora_linear(*tensors, scalings, segments, 0.1).sum().backward()

    assert_no_host_reads(guard, step, "cpu")


# --------------------------------------------------------------------------------------------
# 4. opcheck and torch.compile.


@pytest.mark.parametrize("dropout", [False, True], ids=["nodropout", "dropout"])
def test_opcheck(backend, dropout):
    inputs, scalings, adapter_ids, grad_out = make_problem(7, 10, 6, (3, 2, 1), F32, IDS_7, seed=7)
    segments = ops.adapter_segments(adapter_ids, 3)
    tensors = [t.requires_grad_() for t in inputs.values()]
    seed = torch.tensor(11, dtype=torch.int64) if dropout else None
    p = 0.2 if dropout else 0.0
    arguments = (*tensors, scalings, segments.order, segments.starts, seed, p, False, backend)
    torch.library.opcheck(torch.ops.fastdelta.multi_lora_linear.default, arguments)
    x, weight, _, lora_A, lora_B = (t.detach() for t in tensors)
    _, xa = torch.ops.fastdelta.multi_lora_linear(*(t.detach() for t in tensors), *arguments[5:])
    backward = (grad_out, x, weight, lora_A, lora_B, scalings, segments.order, segments.starts, xa)
    flags = (seed, p, False, True, backend, *[True] * 5)
    torch.library.opcheck(
        torch.ops.fastdelta.multi_lora_linear_backward.default, (*backward, *flags)
    )


def test_torch_compile_does_not_recompile_for_new_ids_or_scalings(backend):
    torch._dynamo.reset()
    inputs, scalings, adapter_ids, grad_out = make_problem(
        (2, 7), 13, 9, (5, 3, 2), F32, IDS_7 * 2, seed=8
    )
    seed = torch.tensor(3, dtype=torch.int64)

    def step(x, weight, bias, lora_A, lora_B, scalings, adapter_ids):
        return ops.multi_lora_linear(
            x, weight, bias, lora_A, lora_B, scalings, adapter_ids, 0.25, seed=seed
        )

    compiled = torch.compile(step, fullgraph=True)
    other_ids = torch.tensor([0, 1, 2, -1, 1, 1, 0] * 2).view(2, 7)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ids, scales in (
            (adapter_ids, scalings),
            (other_ids, scalings),
            (other_ids, scalings * 3),
        ):
            got = run(lambda *t, s=scales, i=ids: compiled(*t, s, i), inputs, NAMES, grad_out)
            expected = run(lambda *t, s=scales, i=ids: step(*t, s, i), inputs, NAMES, grad_out)
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
            for name in NAMES:
                torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 5. Argument errors.


def _arguments(**changes):
    arguments = {
        "x": torch.randn(3, 5),
        "weight": torch.randn(4, 5),
        "bias": torch.randn(4),
        "lora_A": torch.randn(2, 3, 5),
        "lora_B": torch.randn(2, 4, 3),
        "scalings": torch.tensor([1.0, 2.0]),
        "adapter_ids": torch.tensor([0, -1, 1]),
    }
    arguments.update(changes)
    return arguments


ARGUMENT_ERRORS = {
    "ids_float": (
        _arguments(adapter_ids=torch.tensor([0.0, 1.0, 1.0])),
        r"integer tensor .*long\(\)",
    ),
    "ids_list": (
        _arguments(adapter_ids=[0, 1, 1]),
        r"adapter_ids must be an integer tensor .*torch.tensor",
    ),
    "ids_too_large": (_arguments(adapter_ids=torch.tensor([0, 2, 1])), r"in \[-1, 2\) .*got \[2\]"),
    "ids_below_none": (
        _arguments(adapter_ids=torch.tensor([-2, 0, 1])),
        r"in \[-1, 2\) .*got \[-2\]",
    ),
    "ids_count": (
        _arguments(adapter_ids=torch.tensor([0, 1])),
        r"adapter_ids \(2,\) must hold one id per row",
    ),
    "lora_A_2d": (_arguments(lora_A=torch.randn(3, 5)), r"lora_A must be 3-D .*stack_lora_weights"),
    "lora_B_rank": (
        _arguments(lora_B=torch.randn(2, 4, 2)),
        r"lora_B \(2, 4, 2\) must be \[n, 4, r\]",
    ),
    "lora_B_adapters": (
        _arguments(lora_B=torch.randn(3, 4, 3)),
        r"lora_B \(3, 4, 3\) must be \[n, 4, r\]",
    ),
    "lora_A_features": (
        _arguments(lora_A=torch.randn(2, 3, 6)),
        r"lora_A \(2, 3, 6\) must be \[n, r, 5\]",
    ),
    "scalings_list": (
        _arguments(scalings=[1.0, 2.0]),
        r"scalings must be a float tensor \[2\].*torch.tensor",
    ),
    "scalings_shape": (
        _arguments(scalings=torch.ones(3)),
        r"scalings must be a float tensor \[2\], one per",
    ),
    "scalings_grad": (
        _arguments(scalings=torch.ones(2, requires_grad=True)),
        r"scalings.detach\(\)",
    ),
    "dropout": (_arguments(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
}


@pytest.mark.parametrize("problem", sorted(ARGUMENT_ERRORS))
def test_bad_arguments_raise_a_value_error_naming_them(problem, use_backend):
    use_backend("torch")
    arguments, message = ARGUMENT_ERRORS[problem]
    with pytest.raises(ValueError, match=r"^fastdelta\.ops\.multi_lora_linear: .*" + message):
        ops.multi_lora_linear(**arguments)


def test_segments_for_another_adapter_count_are_refused(use_backend):
    use_backend("torch")
    segments = ops.adapter_segments(torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"grouped for 3 adapters but lora_A stacks 2"):
        ops.multi_lora_linear(**_arguments(adapter_ids=segments))


# --------------------------------------------------------------------------------------------
# 6. First-use verification.


@pytest.mark.parametrize("dropout", [False, True], ids=["nodropout", "dropout"])
def test_the_first_use_check_passes_each_backend(backend, dropout):
    variant = multi_lora_variant(torch.device("cpu"), F32, True, dropout, False, 9, 13, 5, 3, 7)
    assert kernel_check.check(backend_module(backend), variant) is None


def test_a_wrong_triton_variant_runs_on_the_next_backend(checked, monkeypatch, use_backend):  # noqa: F811
    import fastdelta.kernels

    fallback = "cpp" if unavailable_reason("cpp", "cpu", build=False) is None else "torch"
    original = fastdelta.kernels.multi_lora_forward

    def wrong(*args):
        y, xa = original(*args)
        return y * 1.01, xa

    monkeypatch.setattr(fastdelta.kernels, "multi_lora_forward", wrong)
    inputs, scalings, adapter_ids, grad_out = make_problem(7, 13, 9, (5, 3, 2), F32, IDS_7, seed=9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = run(fast(scalings, adapter_ids), inputs, NAMES, grad_out)
    (message,) = verification_warnings(record)
    assert "the triton kernels of multi_lora on cpu" in message and "output" in message
    use_backend(fallback)
    expected = run(fast(scalings, adapter_ids), inputs, NAMES, grad_out)
    assert torch.equal(got[0], expected[0])
    for name in NAMES:
        assert torch.equal(got[1][name], expected[1][name])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scalings": torch.ones(2)}, r"scalings must be \[n\]"),
        ({"lora_A": torch.zeros(3, 2, 5)}, r"lora_A must be \[n, r, K\]"),
        ({"order": torch.arange(3)}, r"order must be an integer \[M\]"),
        ({"starts": torch.tensor([0, 2, 1, 4])}, "starts must not decrease"),
        ({"starts": torch.tensor([0, 1, 2, 9])}, "starts must rise from 0 to at most x's rows"),
        ({"seed": torch.tensor(1.0)}, "seed must be an int64 scalar tensor"),
    ],
)
def test_the_cpp_ops_refuse_arguments_that_do_not_fit(use_backend, change, message):
    """Direct calls of torch.ops.fastdelta_C.multi_lora_* (fastdelta.ops checks first, for
    users) raise for what would index out of bounds, forward and backward alike."""
    use_backend("cpp")
    x, weight = torch.randn(4, 6), torch.randn(5, 6)
    lora_A, lora_B = torch.randn(3, 2, 6), torch.randn(3, 5, 2)
    segments = ops.adapter_segments(torch.tensor([0, 2, -1, 2]), 3)
    arguments = {
        "x": x, "weight": weight, "bias": None, "lora_A": lora_A, "lora_B": lora_B,
        "scalings": torch.ones(3), "order": segments.order, "starts": segments.starts,
        "seed": None,
    }  # fmt: skip
    arguments.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastdelta_C.multi_lora_forward(*arguments.values(), 0.0, False)
    backward = {key: value for key, value in arguments.items() if key != "bias"}
    grad_y, xa = torch.randn(4, 5), torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastdelta_C.multi_lora_backward(
            grad_y, *list(backward.values())[:7], xa, backward["seed"], 0.0, False, [True] * 5
        )
