"""The triton backend's own choices, each checked against the float64 reference.

- Measured dispatch: the LoRA forward and dX run fused (one GEMM kernel with the low-rank
  product in its epilogue) or composed (cuBLAS's GEMM, then a Triton pass that adds it). On a
  GPU the faster is kept per shape bucket; here each is forced in turn. Float32 always
  composes (Triton's float32 dot would run the GEMM on FMA units, or with TF32 on sm_90 copy
  its transposed tiles 4 bytes at a time).
- Rank chunks: a rank wider than one tile (MAX_BLOCK_R: 32 under the interpreter, 128 on a
  GPU) is split over programs or loops; rank 512 is checked on every backend.
- Weight gradients are reductions over row ranges summed in a fixed order: they repeat bit for
  bit, under torch.use_deterministic_algorithms too, and no kernel uses atomics.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from test_adapter_op import check_against_reference as check_adapter
from test_adapter_op import make_inputs as make_adapter_inputs
from test_lora_op import BACKENDS, F16, F32, NAMES, check_against_reference, make_inputs, run

from fastdelta import ops

kernels = pytest.importorskip("fastdelta.kernels")
if not kernels.INTERPRETED:
    pytest.skip(
        "these tests run the kernels on CPU tensors (TRITON_INTERPRET=1)", allow_module_level=True
    )

from fastdelta.kernels import _common, dispatch, lora, reduction  # noqa: E402

BF16 = torch.bfloat16


@pytest.fixture
def tf32(monkeypatch):
    """TF32 allowed for float32 matmuls (torch's setting, which the kernels follow)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)


# (M, K, N, r, dtype, bias, fan_in_fan_out, dropout_p): every path meets each dtype, both
# layouts, dropout, decode-sized M (the one-launch fused forward where K and N are multiples of
# 16, two launches elsewhere) and a rank of two chunks.
PATH_CASES = [
    (1, 33, 20, 4, F32, True, False, 0.0),
    (7, 20, 33, 40, BF16, True, True, 0.3),
    (97, 33, 20, 16, F16, False, False, 0.3),
    (40, 20, 33, 40, F32, False, True, 0.0),
    (16, 40, 24, 8, BF16, True, False, 0.0),
    (5, 32, 48, 8, F16, True, False, 0.3),
    (16, 64, 32, 16, BF16, False, True, 0.3),
]


def path_case_id(case):
    m, k, n, r, dtype, bias, fan_in_fan_out, dropout_p = case
    layout = "conv1d" if fan_in_fan_out else "linear"
    return f"M{m}K{k}N{n}r{r}-{str(dtype)[6:]}-{layout}-{'bias' if bias else 'nobias'}-p{dropout_p}"


@pytest.mark.parametrize("path", dispatch.PATHS)
@pytest.mark.parametrize("case", PATH_CASES, ids=path_case_id)
def test_each_lora_path_matches_the_reference(use_backend, tf32, path, case):
    use_backend("triton")
    m, k, n, r, dtype, bias, fan_in_fan_out, dropout_p = case
    inputs, grad_out = make_inputs(m, k, n, r, dtype, bias=bias, fan_in_fan_out=fan_in_fan_out)
    seed = torch.tensor(77, dtype=torch.int64)
    mask = kernels.dropout_keep_mask(seed, (m, k), dropout_p) if dropout_p else None
    with dispatch.force_path(path):
        check_against_reference(
            inputs, grad_out, dtype, fan_in_fan_out=fan_in_fan_out, dropout_p=dropout_p,
            seed=seed if dropout_p else None, keep_mask=mask,
        )  # fmt: skip


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_float32_always_composes(use_backend, monkeypatch, allow_tf32):
    use_backend("triton")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    paths = []
    original = lora.forward_on_path

    def spy(path, *args):
        paths.append(path)
        return original(path, *args)

    monkeypatch.setattr(lora, "forward_on_path", spy)
    inputs, grad_out = make_inputs(9, 20, 24, 4, F32)
    with dispatch.force_path("fused"):
        check_against_reference(inputs, grad_out, F32)
    assert set(paths) == {"composed"}


@pytest.mark.parametrize(
    ("k", "n", "one_launch"), [(32, 48, True), (33, 48, False), (32, 20, False)]
)
def test_decode_forward_is_one_launch_on_aligned_operands(
    use_backend, monkeypatch, k, n, one_launch
):
    """The one-launch decode forward's tile fits registers only with vectorised loads (the
    compile suite's measure); elsewhere xa comes from its own kernel first."""
    use_backend("triton")
    launched = []
    original = lora.launch

    def spy(kernel, grid, *args, **constants):
        launched.append((kernel, constants.get("COMPUTE_XA")))
        return original(kernel, grid, *args, **constants)

    monkeypatch.setattr(lora, "launch", spy)
    inputs, grad_out = make_inputs(3, k, n, 8, BF16)
    with dispatch.force_path("fused"):
        check_against_reference(inputs, grad_out, BF16)
    forward = [entry for entry in launched if entry[0] is lora._forward_small]
    assert forward == [(lora._forward_small, one_launch)]
    assert (lora._down_kernel in {kernel for kernel, _ in launched}) is not one_launch


def test_an_unknown_path_is_refused():
    with (
        pytest.raises(ValueError, match="Unknown Triton path 'cublas'"),
        dispatch.force_path("cublas"),
    ):
        pass


# --------------------------------------------------------------------------------------------
# Ranks wider than a tile


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_rank_512(use_backend, name, dtype):
    use_backend(name)
    assert _common.MAX_BLOCK_R < 512
    inputs, grad_out = make_inputs(7, 33, 20, 512, dtype, seed=11)
    check_against_reference(inputs, grad_out, dtype)


def test_adapter_bottleneck_512(use_backend):
    use_backend("triton")
    inputs = make_adapter_inputs(9, 20, 20, 512, F32, seed=12)
    check_adapter(inputs, F32, 1.0, "gelu_new")


# --------------------------------------------------------------------------------------------
# Weight gradients: fixed-order reductions


def reference_product(left, right, transform, activation="relu", keep=None):
    right = right.double()
    if transform == "activation":
        right = {"relu": torch.relu, "silu": torch.nn.functional.silu}[activation](right)
    elif transform == "dropout":
        right = torch.where(keep, right, 0)
    return left.double().t() @ right


@pytest.mark.parametrize(
    "transform, activation", [("none", "relu"), ("activation", "silu"), ("dropout", "relu")]
)
@pytest.mark.parametrize("m", [5, 97, 300])
def test_transposed_product_over_row_splits(transform, activation, m):
    """left^T f(right) and left's column sums, over 1 to 10 row splits, strided inputs."""
    generator = torch.Generator().manual_seed(m)
    left = torch.randn(m, 2 * 19, generator=generator)[:, ::2]
    right = torch.randn(23, m, generator=generator).t()
    seed = torch.tensor(5, dtype=torch.int64)
    keep = lora.dropout_keep_mask(seed, (m, 23), 0.4) if transform == "dropout" else None
    product, sums = reduction.transposed_product(
        left, right, left_scale=0.5, transform=transform, activation=activation, seed=seed,
        dropout_p=0.4 if keep is not None else 0.0, column_sums=True,
    )  # fmt: skip
    expected = reference_product(left, right, transform, activation, keep) * 0.5
    torch.testing.assert_close(product.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.double(), left.double().sum(0) * 0.5, rtol=1e-5, atol=1e-5)
    assert reduction.split_count(300, 19, 23) > 1


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_repeat_bitwise_under_deterministic_algorithms(use_backend, deterministic, name):
    use_backend(name)
    inputs, grad_out = make_inputs(300, 33, 20, 8, F32, seed=13)
    seed = torch.tensor(3, dtype=torch.int64)

    def lora_run():
        return run(lambda *a: ops.lora_linear(*a, 1.5, 0.2, seed=seed), inputs, NAMES, grad_out)

    first, second = lora_run(), lora_run()
    assert torch.equal(first[0], second[0])
    for key in NAMES:
        assert torch.equal(first[1][key], second[1][key]), key
    adapter = make_adapter_inputs(300, 20, 24, 8, F32, bias=True, parallel=True, seed=14)

    def adapter_run():
        leaves = {
            key: None if value is None else value.clone().requires_grad_(key != "grad")
            for key, value in adapter.items()
        }
        out = ops.adapter_bottleneck(
            leaves["h"], leaves["down_weight"], leaves["down_bias"], leaves["up_weight"],
            leaves["up_bias"], 1.0, "gelu", leaves["residual"],
        )  # fmt: skip
        out.backward(adapter["grad"])
        return [out.detach()] + [leaf.grad for key, leaf in leaves.items() if key != "grad"]

    for one, two in zip(adapter_run(), adapter_run(), strict=True):
        assert torch.equal(one, two)


def test_no_kernel_uses_atomics():
    """Atomic adds make float sums depend on the order programs run in."""
    for module in (kernels.lora, kernels.adapter, reduction, _common):
        assert "tl.atomic_" not in inspect.getsource(module), module.__name__


def test_measured_dispatch_times_each_path_once_per_bucket(monkeypatch):
    """On a GPU, the first call of a shape bucket times every path and later calls run the
    faster; nothing is timed (or remembered) inside a CUDA graph capture; a forced path wins."""
    timings = {"fused": 2.0, "composed": 1.0}
    timed = []

    def do_bench(run):
        path = run()
        timed.append(path)
        return timings[path]

    capturing = [False]
    monkeypatch.setattr(dispatch.triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(dispatch.torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(dispatch, "_chosen", {})
    monkeypatch.setattr(dispatch, "_timings", {})
    monkeypatch.setattr(dispatch, "_forced", None)
    gpu = torch.device("cuda")
    candidates = {path: lambda path=path: path for path in dispatch.PATHS}
    assert dispatch.choose(("bucket",), gpu, candidates) == "composed"
    assert dispatch.choose(("bucket",), gpu, candidates) == "composed"
    assert sorted(timed) == sorted(dispatch.PATHS)
    assert dispatch.measurements() == {("bucket",): timings}
    capturing[0] = True
    assert dispatch.choose(("captured",), gpu, candidates) == "fused"
    assert ("captured",) not in dispatch.measurements()
    with dispatch.force_path("fused"):
        assert dispatch.choose(("bucket",), gpu, candidates) == "fused"
    assert dispatch.choose(("only",), gpu, {"composed": candidates["composed"]}) == "composed"
    assert len(timed) == len(dispatch.PATHS)
