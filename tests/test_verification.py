"""First-use verification (fastdelta.ops.verification): each kernel variant is checked against
the torch reference the first time it runs; a wrong one warns once and moves to the next
backend, forward and backward alike; verdicts are kept on disk for later processes.

No GPU runs this suite, so the checks are forced on for CPU tensors, where the triton backend runs
under Triton's interpreter, and kernels are made wrong on purpose by monkeypatching the triton
backend's functions. "A fresh state" (empty in-memory routes and verdicts) stands for a new
process.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import triton
from tiny_models import tiny_inputs, tiny_model

import fastdelta.kernels
from fastdelta import LoraModel, ops
from fastdelta.layers.lora import LoraDelta
from fastdelta.ops import backend as backend_selection
from fastdelta.ops import kernel_check, variants, verdicts, verification
from fastdelta.ops.verification import KernelVerificationWarning

LORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
ADAPTER_NAMES = ("h", "down_weight", "down_bias", "up_weight", "up_bias")


def fresh_state(monkeypatch):
    """What a new process knows: no routes, no verdicts in memory (the disk cache stays)."""
    monkeypatch.setattr(verification, "_routes", {})
    monkeypatch.setattr(verdicts, "_verdicts", {})
    monkeypatch.setattr(verdicts, "_environments", {})


@pytest.fixture
def checked(monkeypatch, tmp_path, use_backend):
    """First uses checked on every device, verdicts kept under tmp_path, the triton backend
    forced (skipping where it cannot run on CPU tensors)."""
    monkeypatch.setenv("FASTDELTA_CACHE", str(tmp_path))
    monkeypatch.setattr(verification, "_mode", True)
    fresh_state(monkeypatch)
    use_backend("triton")
    return tmp_path


def lora_step(seed=None, dropout_p=0.0):
    """y and the gradients of a small LoRA linear (fixed inputs), by the ops as a model runs."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"x": (3, 5, 24), "weight": (20, 24), "bias": (20,), "lora_A": (4, 24)}
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    tensors["lora_B"] = torch.randn(20, 4, generator=generator)
    leaves = {name: tensor.requires_grad_() for name, tensor in tensors.items()}
    y = ops.lora_linear(*leaves.values(), 1.5, dropout_p, seed=seed)
    y.backward(torch.randn(y.shape, generator=generator))
    return [y.detach(), *(leaves[name].grad for name in LORA_NAMES)]


def dora_step(seed=None, dropout_p=0.0):
    """y and the gradients of a small DoRA linear (lora_step's inputs and a magnitude)."""
    generator = torch.Generator().manual_seed(2)
    shapes = {"x": (3, 5, 24), "weight": (20, 24), "bias": (20,), "lora_A": (4, 24)}
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    tensors["lora_B"] = torch.randn(20, 4, generator=generator)
    tensors["magnitude"] = torch.rand(20, generator=generator) + 0.5
    leaves = {name: tensor.requires_grad_() for name, tensor in tensors.items()}
    y = ops.dora_linear(*leaves.values(), 1.5, dropout_p, seed=seed)
    y.backward(torch.randn(y.shape, generator=generator))
    return [y.detach(), *(leaves[name].grad for name in (*LORA_NAMES, "magnitude"))]


def adapter_step():
    """out and the gradients of a small adapter (fixed inputs)."""
    generator = torch.Generator().manual_seed(1)
    shapes = {"h": (3, 5, 24), "down_weight": (8, 24), "down_bias": (8,), "up_weight": (24, 8)}
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    tensors["up_bias"] = torch.randn(24, generator=generator)
    tensors["down_weight"] /= 24**0.5  # pre-activations O(1): gelu_new's exp does not overflow
    leaves = {name: tensor.requires_grad_() for name, tensor in tensors.items()}
    out = ops.adapter_bottleneck(*leaves.values(), 0.5, "gelu_new")
    out.backward(torch.randn(out.shape, generator=generator))
    return [out.detach(), *(leaves[name].grad for name in ADAPTER_NAMES)]


STEPS = {"lora": lora_step, "dora": dora_step, "adapter": adapter_step}


def spy_on_checks(monkeypatch):
    """The (backend, op) of every check that runs."""
    checks = []
    original = kernel_check.check

    def spy(backend, variant):
        checks.append((backend.__name__.rsplit(".", 1)[-1], variant[0]))
        return original(backend, variant)

    monkeypatch.setattr(kernel_check, "check", spy)
    return checks


def verification_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, KernelVerificationWarning)]


def stored_verdicts(directory) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(directory.rglob("*.json"))]


# --------------------------------------------------------------------------------------------
# 1. A correct kernel passes, once.


@pytest.mark.parametrize("op", sorted(STEPS))
def test_a_correct_kernel_passes_and_its_verdict_is_kept(checked, op, monkeypatch):
    checks = spy_on_checks(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        STEPS[op]()
        STEPS[op]()
    assert verification_warnings(record) == []
    assert checks == [("kernels", op)]  # the first use only
    (stored,) = stored_verdicts(checked / "verified")
    assert stored["passed"] and stored["error"] is None and stored["variant"]["op"] == op
    assert stored["environment"]["backend"] == "triton"
    kernels = f"triton {triton.__version__}, kernels {verdicts.kernel_sources_hash()}"
    assert stored["environment"]["sources"].startswith(kernels)
    assert list((checked / "verified").rglob(".*.tmp")) == []  # written atomically
    # A later process reads the verdict instead of checking again.
    fresh_state(monkeypatch)
    STEPS[op]()
    assert checks == [("kernels", op)]
    assert set(verification._routes.values()) == {"triton"}


# --------------------------------------------------------------------------------------------
# 2. A wrong kernel moves its variant to the next backend.


def scaled_output(function, index):
    """`function` with its result's `index`-th tensor 1% too large."""

    def wrong(*args):
        results = list(function(*args))
        results[index] = results[index] * 1.01
        return tuple(results)

    return wrong


def raising(function, index):
    def fails(*args):
        raise RuntimeError("out of resources: shared memory (made up by the test)")

    return fails


BREAKAGES = {
    # name: (op, triton function, change, what the warning names)
    "lora-forward-output": ("lora", "lora_forward", scaled_output, "output"),
    "adapter-backward-grad": ("adapter", "adapter_backward", scaled_output, "grad of down_weight"),
    "lora-backward-raises": ("lora", "lora_backward", raising, "RuntimeError: out of resources"),
    "dora-backward-grad": ("dora", "dora_backward", scaled_output, "grad of weight"),
}


@pytest.fixture(params=["cpp", "torch"])
def fallback(request, monkeypatch):
    """The backend a failed triton variant goes to: cpp where the extension is built (built
    here first, if it can be), else torch."""
    if request.param == "torch":
        real = verification.unavailable_reason
        monkeypatch.setattr(
            verification,
            "unavailable_reason",
            lambda name, *args, **kwargs: "not here (test)" if name == "cpp" else real(name),
        )
    elif backend_selection.unavailable_reason("cpp", "cpu"):
        pytest.skip(f"no cpp extension here: {backend_selection.unavailable_reason('cpp')}")
    return request.param


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_wrong_kernel_warns_once_and_its_variant_runs_on_the_next_backend(
    checked, fallback, breakage, path, monkeypatch, use_backend
):
    op, function, change, named = BREAKAGES[breakage]
    index = 1 if function.endswith("backward") else 0
    original = getattr(fastdelta.kernels, function)
    monkeypatch.setattr(fastdelta.kernels, function, change(original, index))
    if path == "custom_op":
        monkeypatch.setattr(ops, "eager_path", lambda *tensors: False)
    seed = torch.tensor(77, dtype=torch.int64)
    dropout = {"seed": seed, "dropout_p": 0.3} if op in ("lora", "dora") else {}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = STEPS[op](**dropout)
        second = STEPS[op](**dropout)
    (message,) = verification_warnings(record)
    assert f"the triton kernels of {op} on cpu" in message and named in message
    assert f"runs on the {fallback} backend" in message and "fastdelta doctor" in message
    # Forward and backward both ran on the fallback: its results, bit for bit (with dropout:
    # its mask in both).
    use_backend(fallback)
    expected = STEPS[op](**dropout)
    for got in (first, second):
        for value, reference in zip(got, expected, strict=True):
            assert torch.equal(value, reference)
    (stored,) = [v for v in stored_verdicts(checked / "verified") if not v["passed"]]
    assert named in stored["error"] and stored["variant"]["op"] == op
    # A later process honours the verdict without checking again, and says so once.
    use_backend("triton")
    fresh_state(monkeypatch)
    checks = spy_on_checks(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = STEPS[op](**dropout)
    assert checks == []
    assert len(verification_warnings(record)) == 1
    for value, reference in zip(again, expected, strict=True):
        assert torch.equal(value, reference)


def test_the_variant_is_as_fine_as_the_autotune_keys(checked, monkeypatch):
    """Another row-count bucket, rank or dropout setting is another variant, checked on its own
    first use; another row count in the same bucket is not."""
    checks = spy_on_checks(monkeypatch)
    weight, lora_B = torch.randn(20, 24), torch.randn(20, 4)
    for rows, rank, dropout_p in ((5, 4, 0.0), (7, 4, 0.0), (8, 4, 0.0), (5, 2, 0.0), (5, 4, 0.1)):
        x, lora_A = torch.randn(rows, 24), torch.randn(rank, 24)
        ops.lora_linear(x, weight, None, lora_A, lora_B[:, :rank], 1.0, dropout_p)
    assert len(checks) == 4  # 7 rows share 5's bucket [4, 8)
    assert [variant[-1] for _, variant in verification._routes] == [3, 4, 3, 3]
    for m in (1, 2, 3, 4, 4095, 4096, 32767, 32768, 10**6):
        variant = variants.lora_variant("cpu", torch.float32, True, False, False, 8, 8, 4, m)
        assert variant[-1] == fastdelta.kernels._common.m_bucket(m)
        rows = variants.bucket_rows(variant[-1])
        assert fastdelta.kernels._common.m_bucket(rows) == variant[-1] and rows <= m


def test_a_verdict_holds_for_the_kernel_sources_it_was_given(checked, monkeypatch):
    checks = spy_on_checks(monkeypatch)
    lora_step()
    fresh_state(monkeypatch)
    monkeypatch.setattr(verdicts, "kernel_sources_hash", lambda: "edited kernels")
    lora_step()
    assert checks == [("kernels", "lora")] * 2


# --------------------------------------------------------------------------------------------
# 3. When checks run.


@pytest.mark.parametrize(
    ("value", "on_cpu", "on_cuda"), [(None, False, True), ("0", False, False), ("1", True, True)]
)
def test_checks_run_on_cuda_devices_unless_the_environment_says_otherwise(
    monkeypatch, value, on_cpu, on_cuda
):
    monkeypatch.setattr(verification, "_mode", verification._UNSET)
    if value is None:
        monkeypatch.delenv(verification.ENVIRONMENT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(verification.ENVIRONMENT_VARIABLE, value)
    assert verification.verification_enabled(torch.device("cpu")) is on_cpu
    assert verification.verification_enabled(torch.device("cuda", 0)) is on_cuda


def test_a_bad_environment_value_says_what_it_takes(monkeypatch):
    monkeypatch.setattr(verification, "_mode", verification._UNSET)
    monkeypatch.setenv(verification.ENVIRONMENT_VARIABLE, "yes")
    with pytest.raises(ValueError, match=r"FASTDELTA_VERIFY must be 1 .*, 0 .* or unset"):
        verification.verification_enabled(torch.device("cpu"))


def test_with_checks_off_nothing_is_checked(checked, monkeypatch):
    verification.set_verification(False)
    checks = spy_on_checks(monkeypatch)
    lora_step()
    assert checks == [] and verification._routes == {}


# --------------------------------------------------------------------------------------------
# 4. log() shows what moved.


def test_log_shows_the_variants_moved_off_their_backend(checked, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells to the terminal's width
    monkeypatch.setattr(
        verification, "unavailable_reason", lambda name, *args, **kwargs: "not here (test)"
    )
    monkeypatch.setattr(
        fastdelta.kernels, "lora_forward", scaled_output(fastdelta.kernels.lora_forward, 0)
    )
    model = tiny_model("bert")
    delta_model = LoraModel(model, modified_modules=["query"], lora_r=4)
    delta = LoraDelta(36, 36, 4, 8.0)
    assert delta.backend_name() == "triton"
    with pytest.warns(KernelVerificationWarning):
        model(**tiny_inputs("bert"))
    assert delta.backend_name() == "triton (torch for 1 variant that failed verification)"
    assert LoraDelta(36, 52, 4, 8.0).backend_name() == "triton"  # other sizes: not moved
    delta_model.log(visualization=False)
    assert "triton (torch for 1 variant that failed verification)" in capsys.readouterr().out
