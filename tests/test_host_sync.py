"""No host read of device memory in the per-call path of the fused ops and the delta layers.

On a GPU, an op that hands a tensor's value to the host (.item(), int(), bool(), a boolean-mask
index, a copy to the CPU) waits until every queued kernel has run, and a CUDA graph
(torch.compile(mode="reduce-overhead")) cannot capture it. No GPU runs this suite, so
`HostReadGuard`, a TorchDispatchMode, records each such op that fastdelta's own code issues
while the ops and the delta layers run forward and backward on CPU tensors, through the path a
CUDA tensor takes: the torch backend's dropout mask drawn on the device from the seed tensor
(its CPU path reads the seed on the host, which is free for a CPU tensor), each backend forced
in turn, and both the eager autograd.Function and the custom op that torch.compile calls.

A read counts when its innermost caller outside PyTorch, Triton and the standard library is
fastdelta's code: the backbone's own host reads (transformers checks its attention masks on the
host) are not this library's. Triton's interpreter runs kernels by reading tensors on the host,
which a compiled kernel does not, so the guard pauses while an interpreted kernel runs. Reads
inside the C++ extension's kernels are below the dispatcher and not seen (its CPU kernel reads
the seed on the host; its CUDA kernels read it on the device).

On a GPU the same tests run on CUDA tensors, after a warm-up call (autotuning and the first
call's path timing synchronize by design, once per shape), with torch.cuda's sync debug mode
set to "error" around the ops.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import triton
from tiny_models import first_output, tiny_inputs, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import fastdelta
import fastdelta.kernels
from fastdelta import AdapterModel, LoraModel, ParallelAdapterModel, ops
from fastdelta.ops import adapter, lora, reference, torch_backend

aten = torch.ops.aten

# Ops that hand a tensor's value to the host (.item(), int(), float(), bool(), torch.equal...).
VALUE_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose}
# Ops whose output size depends on the data: the host reads the size before it can allocate.
DATA_DEPENDENT_SIZES = {
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
    aten.bincount,
}
# Indexing that turns a boolean mask into indices (nonzero) first.
MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Not flagged: aten._assert_async (on CUDA a device-side assert: the host does not wait, and a
# graph captures it), aten.nonzero_static (its size is an argument), random ops (the CUDA
# generator's graph-safe offsets).

# A mode sees a custom op as one op, not the ATen ops inside it: the guard runs the Python
# function each fastdelta op was made from (CustomOpDef._init_fn) under itself instead.
CUSTOM_OP_BODIES = {
    torch.ops.fastdelta.lora_linear.default: lora.lora_linear_op._init_fn,
    torch.ops.fastdelta.lora_linear_backward.default: lora.lora_linear_backward_op._init_fn,
    torch.ops.fastdelta.adapter_bottleneck.default: adapter.adapter_bottleneck_op._init_fn,
    torch.ops.fastdelta.adapter_bottleneck_backward.default: (
        adapter.adapter_bottleneck_backward_op._init_fn
    ),
}


def reads_on_host(func, args, kwargs) -> bool:
    """Whether the ATen op `func` on these arguments reads device memory on the host."""
    packet = func.overloadpacket
    if packet in VALUE_READS or packet in DATA_DEPENDENT_SIZES:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if packet in MASK_INDEXING:
        masked = any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        # x[mask] = one value is a masked_fill, which needs no indices.
        return masked and (packet is aten.index or args[2].numel() != 1)
    if packet is aten._to_copy:
        device = kwargs.get("device")
        return args[0].device.type != "cpu" and device is not None and device.type == "cpu"
    if packet is aten.copy_:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _package_dir(module) -> str:
    return str(Path(module.__file__).resolve().parent) + os.sep


CHECKED_DIRS = (_package_dir(fastdelta), _package_dir(fastdelta.kernels))
LIBRARY_DIRS = (_package_dir(torch), _package_dir(triton))
STDLIB_DIR = str(Path(sysconfig.get_paths()["stdlib"]).resolve()) + os.sep
SITE_DIRS = tuple(
    str(Path(sysconfig.get_paths()[key]).resolve()) + os.sep for key in ("purelib", "platlib")
)


@functools.cache
def _kind_of_file(filename: str) -> str:
    """Whose code `filename` is: "library" (PyTorch, Triton, the standard library and this
    file, whose frames pass a read on to their caller), "fastdelta" or "other"."""
    path = str(Path(filename).resolve())
    stdlib = path.startswith(STDLIB_DIR) and not path.startswith(SITE_DIRS)
    if filename == __file__ or path.startswith(LIBRARY_DIRS) or stdlib:
        return "library"
    return "fastdelta" if path.startswith(CHECKED_DIRS) else "other"


def fastdelta_caller() -> str | None:
    """file:line of the fastdelta code that issued the read being dispatched, or None when its
    innermost caller outside PyTorch, Triton and the standard library is not fastdelta's."""
    frame = sys._getframe(1)
    while frame is not None and _kind_of_file(frame.f_code.co_filename) == "library":
        frame = frame.f_back
    if frame is None or _kind_of_file(frame.f_code.co_filename) != "fastdelta":
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class HostReadGuard(TorchDispatchMode):
    """Records, in `reads`, each host read of a tensor that fastdelta's code issues inside
    `with guard:` (not while `paused()`), with the file and line that issued it."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self._depth = 0
        self._pauses = 0

    def __enter__(self):
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc_info):
        self._depth -= 1
        return super().__exit__(*exc_info)

    @contextlib.contextmanager
    def paused(self):
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1

    def note(self, what: str) -> None:
        if self._depth and not self._pauses:
            site = fastdelta_caller()
            if site is not None:
                self.reads.append(f"{what} from {site}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if reads_on_host(func, args, kwargs):
            self.note(str(func))
        body = CUSTOM_OP_BODIES.get(func)
        if body is not None:
            with self:
                return body(*args, **kwargs)
        return func(*args, **kwargs)


@pytest.fixture
def guard(monkeypatch):
    """A HostReadGuard that also sees Tensor.tolist() and .numpy(), which read a CPU tensor
    without an op (on CUDA tensors they copy to the host first, a flagged op)."""
    guard = HostReadGuard()
    for name in ("tolist", "numpy"):
        method = getattr(torch.Tensor, name)

        def read(tensor, *args, _method=method, **kwargs):
            guard.note(f"Tensor.{_method.__name__}()")
            return _method(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return guard


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    """The device of the tensors; on the CPU the torch backend takes its device path."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if request.param == "cpu":
        monkeypatch.setattr(torch_backend, "GENERATOR_ON_CPU", False)
    return request.param


@pytest.fixture(params=["torch", "triton", "cpp"])
def backend(request, use_backend, device, guard, monkeypatch):
    """Each backend in turn, forced on `device`; the guard pauses in interpreted kernels."""
    use_backend(request.param, device)
    if request.param == "triton" and fastdelta.kernels.INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def run_paused(self, *args, **kwargs):
            with guard.paused():
                return run(self, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", run_paused)
    return request.param


@pytest.fixture(params=["eager", "custom_op"])
def path(request, monkeypatch):
    """The ops' eager autograd.Function, or the custom op that torch.compile calls."""
    if request.param == "custom_op":
        monkeypatch.setattr(ops, "eager_path", lambda *tensors: False)
    return request.param


@contextlib.contextmanager
def cuda_synchronizations_raise(enabled: bool):
    """torch's own check on CUDA, when `enabled`: a synchronizing CUDA call inside the block
    raises."""
    if not enabled:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def assert_no_host_reads(guard, step, device, backbone=False):
    """Run `step` once to warm up (first-call setup may read), then again under the guard, and
    on CUDA under torch's sync check too, unless `step` runs a backbone's own code."""
    step()
    with guard, cuda_synchronizations_raise(device == "cuda" and not backbone):
        step()
    assert not guard.reads, "host reads in the per-call path:\n" + "\n".join(guard.reads)


def leaves(*shapes, device, seed=0):
    """Random float32 leaf tensors that require grad, one per shape (None stays None)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        None
        if shape is None
        else torch.randn(shape, generator=generator).to(device).requires_grad_()
        for shape in shapes
    ]


# (dropout_p, bias, fan_in_fan_out): each pair of settings at least once.
LORA_CASES = [(0.0, True, False), (0.1, False, False), (0.1, True, True), (0.0, False, True)]


@pytest.mark.parametrize("dropout_p, bias, fan_in_fan_out", LORA_CASES)
def test_lora_linear_reads_nothing_on_the_host(
    guard, device, backend, path, dropout_p, bias, fan_in_fan_out
):
    k, n, r = 12, 10, 4
    weight_shape = (k, n) if fan_in_fan_out else (n, k)
    x, weight, b, lora_A, lora_B = leaves(
        (2, 5, k), weight_shape, (n,) if bias else None, (r, k), (n, r), device=device
    )

    def step():
        y = ops.lora_linear(x, weight, b, lora_A, lora_B, 2.0, dropout_p, fan_in_fan_out)
        y.sum().backward()

    assert_no_host_reads(guard, step, device)


# (parallel, biases, activation): a sequential adapter with biases, a parallel one without.
ADAPTER_CASES = [(False, True, "gelu_new"), (True, False, "silu")]


@pytest.mark.parametrize("parallel, biases, activation", ADAPTER_CASES)
def test_adapter_bottleneck_reads_nothing_on_the_host(
    guard, device, backend, path, parallel, biases, activation
):
    d, m = 12, 6
    h, down, down_bias, up, up_bias, output = leaves(
        (2, 5, d), (m, d), (m,), (d, m), (d,), (2, 5, d), device=device
    )
    if not biases:
        down_bias = up_bias = None
    residual = output if parallel else None

    def step():
        out = ops.adapter_bottleneck(h, down, down_bias, up, up_bias, 0.5, activation, residual)
        out.sum().backward()

    assert_no_host_reads(guard, step, device)


# A LoRA with dropout on GPT-2's Conv1D, an adapter after BERT's sublayers, a parallel adapter
# beside Llama's attention and MLP.
DELTA_MODELS = [
    ("gpt2", LoraModel, {"lora_r": 4, "lora_dropout": 0.1}),
    ("bert", AdapterModel, {"bottleneck_dim": 6}),
    ("llama", ParallelAdapterModel, {"bottleneck_dim": 6}),
]


@pytest.mark.parametrize("architecture, delta_class, arguments", DELTA_MODELS)
def test_delta_layers_read_nothing_on_the_host(
    guard, device, backend, architecture, delta_class, arguments
):
    model = tiny_model(architecture).to(device).train()
    delta_class(backbone_model=model, **arguments).freeze_module()
    inputs = {key: value.to(device) for key, value in tiny_inputs(architecture).items()}

    def step():
        first_output(model(**inputs)).sum().backward()

    # The backbone's own code may synchronize; the guard counts fastdelta's reads only.
    assert_no_host_reads(guard, step, device, backbone=True)


def test_the_guard_sees_fastdeltas_reads_only(guard, use_backend, path):
    """The CPU mask's int(seed) (free there) is the read the device path must not make: the
    guard sees it in the forward and the backward, through either path; the caller's own read
    it leaves alone."""
    use_backend("torch")
    x, weight, lora_A, lora_B = leaves((3, 8), (6, 8), (2, 8), (6, 2), device="cpu")
    with guard:
        ops.lora_linear(x, weight, None, lora_A, lora_B, 1.0, 0.5).sum().backward()
        torch.ones(()).item()  # the test's own read: not fastdelta's
    assert len(guard.reads) == 2, guard.reads  # forward and backward
    assert all("torch_backend.py" in read for read in guard.reads), guard.reads


# --------------------------------------------------------------------------------------------
# The torch backend's device mask, which takes the place of the host read of the seed


@pytest.fixture
def device_mask(monkeypatch):
    """The torch backend's dropout mask, hashed on CPU tensors as on a GPU."""
    monkeypatch.setattr(torch_backend, "GENERATOR_ON_CPU", False)
    return torch_backend.dropout_keep_mask


def seed_tensor(value: int, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=device)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_device_mask_drops_at_rate_p(device_mask, p):
    keep = device_mask(seed_tensor(2024), (3200, 64), p)  # 204,800 draws
    assert abs((1 - keep.double().mean().item()) - p) < 0.01
    # No structure: each half of the rows and of the columns drops at p too.
    for part in (keep[:1600], keep[1600:], keep[:, :32], keep[:, 32:]):
        assert abs((1 - part.double().mean().item()) - p) < 0.015
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])


def test_the_device_mask_is_a_function_of_the_seed(device_mask):
    first = device_mask(seed_tensor(7), (40, 33), 0.3)
    torch.manual_seed(1)  # torch's generator plays no part
    assert torch.equal(device_mask(seed_tensor(7), (40, 33), 0.3), first)
    assert torch.equal(device_mask(seed_tensor(7), (4, 10, 33), 0.3).view(40, 33), first)
    # Neighbouring seeds give unrelated masks: they agree where two independent draws would.
    agreement = (device_mask(seed_tensor(8), (40, 33), 0.3) == first).double().mean().item()
    assert abs(agreement - (0.3**2 + 0.7**2)) < 0.05


# (seed, shape, p): extreme seeds, sizes that are not multiples of the 4 lanes of a word.
MASK_CASES = [
    (0, (1,), 0.5),
    (-1, (7, 13), 0.1),
    (2**63 - 1, (3, 4, 9), 0.3),
    (-(2**63), (97, 21), 1 / 65536),
    (123456789, (40, 41), 0.9),
]


def test_the_device_mask_is_the_extensions_mask(device_mask, use_backend, monkeypatch):
    cpp = use_backend("cpp")  # skips where the extension cannot be built
    monkeypatch.setattr(torch_backend, "_HASH_CHUNK_WORDS", 5)  # chunk edges at small sizes
    for seed, shape, p in MASK_CASES:
        expected = cpp.dropout_keep_mask(seed_tensor(seed), shape, p)
        assert torch.equal(device_mask(seed_tensor(seed), shape, p), expected), (seed, shape, p)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_the_device_mask_is_the_same_on_cuda(device_mask):
    for seed, shape, p in MASK_CASES:
        on_gpu = device_mask(seed_tensor(seed, "cuda"), shape, p)
        assert torch.equal(on_gpu.cpu(), device_mask(seed_tensor(seed), shape, p)), (seed, shape)


def test_the_device_mask_is_the_same_forward_and_backward(device_mask, use_backend):
    use_backend("torch")
    x, weight, bias, lora_A, lora_B = (
        tensor.double().detach().requires_grad_()
        for tensor in leaves((3, 7, 12), (10, 12), (10,), (4, 12), (10, 4), device="cpu")
    )
    seed, p = seed_tensor(99), 0.3
    keep = device_mask(seed, (3, 7, 12), p)
    grad_y = torch.randn(3, 7, 10, dtype=torch.float64)
    results = []
    for function, argument in ((ops.lora_linear, seed), (reference.lora_linear, keep)):
        tensors = (x, weight, bias, lora_A, lora_B)
        y = function(*tensors, 1.5, p, False, argument)
        results.append((y, *torch.autograd.grad(y, tensors, grad_y)))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)
