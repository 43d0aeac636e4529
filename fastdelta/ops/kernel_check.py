"""The check behind first-use verification: one kernel variant against the torch reference.

A variant (see `fastdelta.ops.variants`) names an op, its device, dtype, flags, sizes and
row-count bucket. Its check builds a random problem of exactly that variant, with M the smallest
row count of the bucket (so on a GPU it runs the autotuned configuration the real calls run),
runs a backend's forward and backward on it, and compares the output and every gradient with
`fastdelta.ops.reference` (eager PyTorch with autograd), to which the kernel's own dropout mask
is handed: the torch backend, which the reference checks, would draw another mask from the seed.

Tolerances follow the op tests' (tests/test_lora_op.py, TOLERANCES), whose float64 oracle is
replaced by the reference in float32 with TF32 off (float64 for float64): its own error, about
1e-6 of the magnitude, is far inside every bound. float32 with TF32 on is judged as the half
types are, against eager PyTorch with TF32 on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator

import torch

from fastdelta.ops import reference
from fastdelta.ops.variants import bucket_rows

SEED = 20240611
SCALING = 1.5
DROPOUT_P = 0.25
LORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
ADAPTER_NAMES = ("h", "down_weight", "down_bias", "up_weight", "up_bias")

# Elementwise |got - precise| <= atol * max|precise| + rtol * |precise| ("rtol"/"atol"), or
# max|got - precise| <= eager_factor * max|eager - precise| + floor * max|precise|, where eager is
# the reference computed in the kernel's own dtype (and TF32 setting).
TOLERANCES = {
    "float32": {"rtol": 1e-4, "atol": 1e-4},
    "tf32": {"eager_factor": 2.0, "floor": 1e-4},
    "float16": {"eager_factor": 2.0, "floor": 1e-5},
    "bfloat16": {"eager_factor": 2.0, "floor": 1e-4},
    "float64": {"rtol": 1e-10, "atol": 1e-10},
}


def tolerance(dtype: torch.dtype, allow_tf32: bool) -> dict[str, float]:
    """The TOLERANCES entry of `dtype` (with TF32 allowed or not, for float32)."""
    name = str(dtype).removeprefix("torch.")
    return TOLERANCES["tf32" if name == "float32" and allow_tf32 else name]


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """torch's TF32 setting for matmuls (and so the kernels' precision) inside the block."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class _Problem:
    """Random inputs of one variant, in float32 (float64 for float64) and rounded to its dtype."""

    names: tuple[str, ...] = ()

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.precise = torch.float64 if dtype == torch.float64 else torch.float32
        self.generator = torch.Generator(device=device).manual_seed(SEED)
        self.keep_mask = None

    def random(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        """Normal values times `scale`, already rounded to the variant's dtype."""
        values = torch.randn(
            shape, generator=self.generator, device=self.device, dtype=self.precise
        )
        return (values * scale).to(self.dtype).to(self.precise)

    def cast(self, tensors: dict, dtype: torch.dtype) -> dict:
        return {name: None if t is None else t.to(dtype) for name, t in tensors.items()}

    def reference_results(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Output and gradients of the reference on the inputs cast to `dtype`."""
        return self.results(self.reference, dtype)

    def results(self, function, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Output and gradients, by autograd, of function(leaves, dtype), where leaves are the
        inputs cast to `dtype` (a name -> tensor or None dict, in the op's argument order)."""
        leaves = {
            name: None if t is None else t.to(dtype).requires_grad_()
            for name, t in self.inputs.items()
        }
        output = function(leaves, dtype)
        present = [name for name in self.names if leaves[name] is not None]
        grads = torch.autograd.grad(
            output, [leaves[name] for name in present], self.grad_output.to(dtype)
        )
        return {"output": output.detach()} | {
            f"grad of {name}": grad for name, grad in zip(present, grads, strict=True)
        }

    def named(self, output: torch.Tensor, grads) -> dict[str, torch.Tensor | None]:
        results = {"output": output}
        for name, grad in zip(self.names, grads, strict=True):
            if self.inputs[name] is not None:
                results[f"grad of {name}"] = grad
        return results


class LoraProblem(_Problem):
    names = LORA_NAMES

    def __init__(self, variant: tuple):
        _, device, dtype, has_bias, dropout, fan_in_fan_out, n, k, r, m_bucket = variant
        super().__init__(device, dtype)
        self.rows = m = bucket_rows(m_bucket)
        self.fan_in_fan_out = fan_in_fan_out
        weight_shape = (k, n) if fan_in_fan_out else (n, k)
        self.inputs = {
            "x": self.random(m, k),
            "weight": self.random(*weight_shape, scale=k**-0.5),
            "bias": self.random(n) if has_bias else None,
            "lora_A": self.random(r, k, scale=k**-0.5),
            "lora_B": self.random(n, r, scale=r**-0.5),
        }
        self.grad_output = self.random(m, n)
        self.seed = torch.tensor(SEED, dtype=torch.int64, device=device) if dropout else None
        self.dropout_p = DROPOUT_P if dropout else 0.0

    def run(self, backend) -> dict[str, torch.Tensor | None]:
        """Output and gradients by `backend` (a backend module), on the inputs in the dtype."""
        x, weight, bias, lora_A, lora_B = self.cast(self.inputs, self.dtype).values()
        arguments = (self.seed, SCALING, self.dropout_p, self.fan_in_fan_out)
        y, xa = backend.lora_forward(x, weight, bias, lora_A, lora_B, *arguments)
        needs = (True, True, bias is not None, True, True)
        grad_y = self.grad_output.to(self.dtype)
        grads = backend.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, *arguments, needs)
        if self.seed is not None:
            self.keep_mask = backend.dropout_keep_mask(self.seed, tuple(x.shape), self.dropout_p)
        return self.named(y, grads)

    def reference(self, leaves: dict, dtype: torch.dtype) -> torch.Tensor:
        return reference.lora_linear(
            *leaves.values(), SCALING, self.dropout_p, self.fan_in_fan_out, self.keep_mask
        )


class DoraProblem(LoraProblem):
    """A DoRA variant: LoRA's inputs and a magnitude, trained where the variant keeps z (else a
    constant, as in a call that trains none); the norm from the rounded inputs, in float32
    (float64 for float64), as the DoRA layer gives it."""

    names = (*LORA_NAMES, "magnitude")

    def __init__(self, variant: tuple):
        _, device, dtype, has_bias, dropout, fan_in_fan_out, keep_z, exact_norm = variant[:8]
        super().__init__(("lora", device, dtype, has_bias, dropout, fan_in_fan_out, *variant[8:]))
        # The norm's gradient needs z: without it the call trains none of W, A and B.
        self.keep_z, self.exact_norm = keep_z, exact_norm and keep_z
        magnitude = (1.0 + 0.1 * self.random(variant[8])).to(dtype).to(self.precise)
        self.magnitude = magnitude
        self.inputs["magnitude"] = magnitude if keep_z else None

    def run(self, backend) -> dict[str, torch.Tensor | None]:
        x, weight, bias, lora_A, lora_B, _ = self.cast(self.inputs, self.dtype).values()
        base = weight.t() if self.fan_in_fan_out else weight
        combined = base.to(self.precise) + SCALING * (
            lora_B.to(self.precise) @ lora_A.to(self.precise)
        )
        norm = torch.linalg.vector_norm(combined, dim=1)
        arguments = (self.seed, SCALING, self.dropout_p, self.fan_in_fan_out)
        tensors = (x, weight, bias, lora_A, lora_B, self.magnitude, norm)
        y, xa, z = backend.dora_forward(*tensors, *arguments, self.keep_z)
        needs = (True, True, bias is not None, True, True, self.keep_z)
        grad_y = self.grad_output.to(self.dtype)
        tensors = (x, weight, lora_A, lora_B, self.magnitude, norm, xa, z)
        grads = backend.dora_backward(grad_y, *tensors, *arguments, self.exact_norm, needs)
        if self.seed is not None:
            self.keep_mask = backend.dropout_keep_mask(self.seed, tuple(x.shape), self.dropout_p)
        return self.named(y, grads)

    def reference(self, leaves: dict, dtype: torch.dtype) -> torch.Tensor:
        magnitude = leaves["magnitude"]
        magnitude = self.magnitude.to(dtype) if magnitude is None else magnitude
        return reference.dora_linear(
            *(leaves[name] for name in LORA_NAMES), magnitude, SCALING, self.dropout_p,
            self.fan_in_fan_out, self.keep_mask, self.exact_norm,
        )  # fmt: skip


class AdapterProblem(_Problem):
    names = ADAPTER_NAMES

    def __init__(self, variant: tuple):
        _, device, dtype, has_down_bias, has_up_bias, activation, sequential = variant[:7]
        d_in, d_out, bottleneck, m_bucket = variant[7:]
        super().__init__(device, dtype)
        self.rows = m = bucket_rows(m_bucket)
        self.activation, self.sequential = activation, sequential
        self.inputs = {
            "h": self.random(m, d_in),
            "down_weight": self.random(bottleneck, d_in, scale=d_in**-0.5),
            "down_bias": self.random(bottleneck) if has_down_bias else None,
            "up_weight": self.random(d_out, bottleneck, scale=bottleneck**-0.5),
            "up_bias": self.random(d_out) if has_up_bias else None,
        }
        self.residual = None if sequential else self.random(m, d_out)
        self.grad_output = self.random(m, d_out)

    def run(self, backend) -> dict[str, torch.Tensor | None]:
        h, down_weight, down_bias, up_weight, up_bias = self.cast(self.inputs, self.dtype).values()
        residual = None if self.residual is None else self.residual.to(self.dtype)
        out, pre = backend.adapter_forward(
            h, down_weight, down_bias, up_weight, up_bias, residual, SCALING, self.activation
        )
        needs = (True, True, down_bias is not None, True, up_bias is not None)
        grads = backend.adapter_backward(
            self.grad_output.to(self.dtype),
            h,
            down_weight,
            up_weight,
            pre,
            SCALING,
            self.activation,
            self.sequential,
            needs,
        )
        return self.named(out, grads)

    def reference(self, leaves: dict, dtype: torch.dtype) -> torch.Tensor:
        residual = None if self.residual is None else self.residual.to(dtype)
        return reference.adapter_bottleneck(*leaves.values(), SCALING, self.activation, residual)


class MultiLoraProblem(_Problem):
    """A mixed-batch LoRA variant (fastdelta.ops.multi_lora): adapter j of rank max(1, r - j),
    zero-padded to r in the stack, scaled by SCALING * (1 + j / n); row i goes to adapter
    i mod (n + 1), n standing for no adapter (-1), so row 0 always has one."""

    names = LORA_NAMES

    def __init__(self, variant: tuple):
        _, device, dtype, has_bias, dropout, fan_in_fan_out, n, k, r, adapters, m_bucket = variant
        super().__init__(device, dtype)
        self.rows = m = bucket_rows(m_bucket)
        self.fan_in_fan_out = fan_in_fan_out
        lora_A = self.random(adapters, r, k, scale=k**-0.5)
        lora_B = self.random(adapters, n, r, scale=r**-0.5)
        for j in range(adapters):
            lora_A[j, max(1, r - j) :] = 0
            lora_B[j, :, max(1, r - j) :] = 0
        weight_shape = (k, n) if fan_in_fan_out else (n, k)
        self.inputs = {
            "x": self.random(m, k),
            "weight": self.random(*weight_shape, scale=k**-0.5),
            "bias": self.random(n) if has_bias else None,
            "lora_A": lora_A,
            "lora_B": lora_B,
        }
        self.scalings = SCALING * (1 + torch.arange(adapters, device=device) / adapters)
        ids = torch.arange(m, device=device) % (adapters + 1)
        self.adapter_ids = torch.where(ids == adapters, -1, ids)
        # The segments, as fastdelta.ops.adapter_segments computes them.
        sorted_ids, self.order = torch.sort(ids, stable=True)
        self.starts = torch.searchsorted(sorted_ids, torch.arange(adapters + 1, device=device))
        self.grad_output = self.random(m, n)
        self.seed = torch.tensor(SEED, dtype=torch.int64, device=device) if dropout else None
        self.dropout_p = DROPOUT_P if dropout else 0.0

    def run(self, backend) -> dict[str, torch.Tensor | None]:
        x, weight, bias, lora_A, lora_B = self.cast(self.inputs, self.dtype).values()
        scalings = self.scalings.to(torch.promote_types(self.dtype, torch.float32))
        segments = (scalings, self.order, self.starts)
        arguments = (self.seed, self.dropout_p, self.fan_in_fan_out)
        y, xa = backend.multi_lora_forward(x, weight, bias, lora_A, lora_B, *segments, *arguments)
        needs = (True, True, bias is not None, True, True)
        grad_y = self.grad_output.to(self.dtype)
        grads = backend.multi_lora_backward(
            grad_y, x, weight, lora_A, lora_B, *segments, xa, *arguments, needs
        )
        if self.seed is not None:
            self.keep_mask = backend.dropout_keep_mask(self.seed, tuple(x.shape), self.dropout_p)
        return self.named(y, grads)

    def reference(self, leaves: dict, dtype: torch.dtype) -> torch.Tensor:
        return reference.multi_lora_linear(
            *leaves.values(), self.scalings.to(dtype), self.adapter_ids, self.dropout_p,
            self.fan_in_fan_out, self.keep_mask,
        )  # fmt: skip


PROBLEMS = {
    "lora": LoraProblem,
    "dora": DoraProblem,
    "adapter": AdapterProblem,
    "multi_lora": MultiLoraProblem,
}


def compare(what: str, got, precise, eager, rule: dict[str, float]) -> str | None:
    """Why `got` is not close enough to `precise` by `rule`, or None."""
    if got is None:
        return f"{what}: no result"
    if got.shape != precise.shape:
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(precise.shape)}"
    if not torch.isfinite(got).all():
        return f"{what}: non-finite values"
    error = (got.to(precise.dtype) - precise).abs()
    magnitude = max(precise.abs().max().item(), 1e-30) if precise.numel() else 1.0
    if "eager_factor" in rule:
        eager_error = (eager.to(precise.dtype) - precise).abs().max().item()
        bound = rule["eager_factor"] * eager_error + rule["floor"] * magnitude
        worst = error.max().item()
        if worst > bound:
            return (
                f"{what}: max error {worst:.3g} (at magnitude {magnitude:.3g}) exceeds "
                f"{rule['eager_factor']:g} x eager PyTorch's {eager_error:.3g} + "
                f"{rule['floor'] * magnitude:.3g}"
            )
        return None
    bound = rule["atol"] * magnitude + rule["rtol"] * precise.abs()
    if not (error <= bound).all():
        return (
            f"{what}: max error {error.max().item():.3g} (at magnitude {magnitude:.3g}) exceeds "
            f"rtol {rule['rtol']:g} / atol {rule['atol']:g}"
        )
    return None


def _tf32_settings(device: torch.device, dtype: torch.dtype) -> tuple[bool, ...]:
    """The TF32 settings a variant is checked under: both for float32 on CUDA, where the kernels
    compile another precision for each; elsewhere the setting has no effect on them."""
    if device.type == "cuda" and dtype == torch.float32:
        return (False, True)
    return (torch.backends.cuda.matmul.allow_tf32,)


def _check(backend, variant: tuple) -> str | None:
    problem = PROBLEMS[variant[0]](variant)
    precise = None
    for allow_tf32 in _tf32_settings(problem.device, problem.dtype):
        with tf32(allow_tf32):
            got = problem.run(backend)
            eager = problem.reference_results(problem.dtype)
        if precise is None:  # after the first run, which sets the kernel's dropout mask
            with tf32(False):
                precise = problem.reference_results(problem.precise)
        mismatch = first_mismatch(got, precise, eager, tolerance(problem.dtype, allow_tf32))
        if mismatch:
            setting = " with TF32" if allow_tf32 and problem.dtype == torch.float32 else ""
            return mismatch + setting
    return None


def first_mismatch(got: dict, precise: dict, eager: dict, rule: dict[str, float]) -> str | None:
    """The first of the output and gradients in `got` not close enough to `precise` by `rule`
    (see compare), or None."""
    for what, expected in precise.items():
        mismatch = compare(what, got.get(what), expected, eager[what], rule)
        if mismatch:
            return mismatch
    return None


def check(backend, variant: tuple) -> str | None:
    """Run `backend`'s (a backend module's) kernels on a random problem of `variant` and compare
    with the reference: None when the output and every gradient are close enough, else what is
    off. An exception the kernels raise propagates.

    It runs in a thread of its own, which starts from PyTorch's default thread-local state: the
    caller may be inside a custom op (whose dispatch keys turn autograd off, and the reference
    needs it), under autocast, inference_mode or a dispatch mode, none of which belongs here."""
    device = variant[1]

    def run() -> str | None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return _check(backend, variant)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(run).result()
