"""The doctor's checks: the first-use verification of a representative set of kernel variants,
and the public ops against the reference (parity)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from fastdelta import ops
from fastdelta.ops import backend as backend_selection
from fastdelta.ops import kernel_check, verification
from fastdelta.ops.variants import (
    adapter_variant,
    describe,
    dora_variant,
    lora_variant,
    variant_fields,
)
from fastdelta.ops.verdicts import check_variant

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHECKED_BACKENDS = ("triton", "cpp")
# LoRA: (in_features, out_features, rank, bias, dropout, fan_in_fan_out, M); each rank, layout,
# flag and row-count regime appears, GPT-2's fused Conv1D c_attn among them.
GPU_LORA = [
    (4096, 4096, 8, True, True, False, 4096),
    (4096, 4096, 16, False, True, False, 1),
    (4096, 4096, 64, False, False, False, 1),
    (4096, 4096, 256, True, False, False, 4096),
    (768, 2304, 8, True, True, True, 512),
    (4096, 11008, 64, False, True, False, 4096),
]
# DoRA: (in_features, out_features, rank, bias, dropout, trained magnitude (z kept), exact_norm,
# M): the training step (the scale and z in the forward's epilogue, the backward's scaling
# pass) and a decode-sized forward without z.
GPU_DORA = [
    (4096, 4096, 16, True, True, True, False, 4096),
    (4096, 4096, 16, False, False, False, False, 1),
]
# Adapter: (in_features, out_features, bottleneck, activation, sequential, bias, M); bottlenecks
# up to 256 run fused in one tile, larger ones split.
GPU_ADAPTER = [
    (4096, 4096, 24, "gelu_new", True, True, 4096),
    (4096, 4096, 64, "relu", True, True, 1),
    (4096, 4096, 256, "silu", True, False, 4096),
    (4096, 4096, 512, "gelu", True, True, 4096),
    (4096, 1024, 24, "gelu_new", False, True, 1),
]
# The same regimes at sizes the interpreter runs in seconds.
CPU_LORA = [
    (48, 40, 8, True, True, False, 100),
    (33, 70, 64, False, False, True, 1),
    (40, 33, 256, True, True, False, 100),
]
CPU_DORA = [(48, 40, 8, True, True, True, True, 100)]
CPU_ADAPTER = [
    (40, 40, 24, "gelu_new", True, True, 100),
    (40, 33, 300, "silu", False, True, 1),
]


def representative_variants(device: torch.device) -> list[tuple]:
    """The kernel variants the doctor checks on `device`, in each dtype."""
    on_gpu = device.type == "cuda"
    variants = []
    for dtype in DTYPES:
        for k, n, rank, bias, dropout, fan_in_fan_out, m in GPU_LORA if on_gpu else CPU_LORA:
            variants.append(
                lora_variant(device, dtype, bias, dropout, fan_in_fan_out, n, k, rank, m)
            )
        for k, n, rank, bias, dropout, keep_z, exact_norm, m in GPU_DORA if on_gpu else CPU_DORA:
            variants.append(
                dora_variant(device, dtype, bias, dropout, False, keep_z, exact_norm, n, k, rank, m)
            )
        for d_in, d_out, bottleneck, activation, sequential, bias, m in (
            GPU_ADAPTER if on_gpu else CPU_ADAPTER
        ):
            variants.append(
                adapter_variant(
                    device, dtype, bias, bias, activation, sequential, d_in, d_out, bottleneck, m
                )
            )
    return variants


def checked_devices() -> list[torch.device]:
    """The devices whose kernels the doctor checks: every CUDA GPU, and the CPU where the
    triton kernels run under the interpreter."""
    found = [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    if backend_selection.unavailable_reason("triton", "cpu") is None:
        found.append(torch.device("cpu"))
    return found


def verify(
    targets: list[torch.device], deadline: float, progress: Callable[[str], None]
) -> list[dict]:
    """Check every representative variant with every backend that can run it on each device;
    variants left when `deadline` (time.monotonic()) passes are reported as skipped."""
    records = []
    for device in targets:
        for name in CHECKED_BACKENDS:
            if backend_selection.unavailable_reason(name, device, build=False):
                continue
            for variant in representative_variants(device):
                if name == "triton" and variant[2] not in backend_selection.TRITON_DTYPES:
                    continue
                record = {
                    "device": str(device),
                    "backend": name,
                    "variant": variant_fields(variant),
                    "description": describe(variant),
                }
                if time.monotonic() > deadline:
                    records.append(record | {"result": "skipped", "error": "out of time"})
                    continue
                progress(f"checking {name}: {record['description']}")
                found = check_variant(name, variant)
                result = {True: "passed", False: "FAILED"}[found.passed]
                if found.source == "unchecked":
                    result = "unchecked"
                records.append(
                    record
                    | {"result": result, "error": found.error, "seconds": round(found.seconds, 3)}
                )
    return records


def _public_op(op: str, problem) -> Callable:
    """function(leaves, dtype) running the public op on the problem's inputs, as a model does."""
    if op == "lora":
        return lambda leaves, dtype: ops.lora_linear(
            *leaves.values(), kernel_check.SCALING, 0.0, problem.fan_in_fan_out
        )
    return lambda leaves, dtype: ops.adapter_bottleneck(
        *leaves.values(), kernel_check.SCALING, problem.activation, problem.residual
    )


# The parity problems: (op, GPU variant fields, CPU variant fields) after (device, dtype); no
# dropout, whose mask is each backend's own.
PARITY = [
    ("lora", (True, False, False, 768, 1024, 16, 257), (True, False, False, 40, 48, 8, 33)),
    (
        "adapter",
        (True, True, "gelu_new", True, 1024, 1024, 24, 257),
        (True, True, "gelu_new", True, 48, 48, 24, 33),
    ),
]


def parity(targets: list[torch.device], progress: Callable[[str], None]) -> list[dict]:
    """The public ops (the path a model takes: the backend choice, the routing, the op) against
    the reference on a transformer layer's shapes, in each dtype, on each device."""
    records = []
    for device in targets:
        for dtype in DTYPES:
            for op, gpu_fields, cpu_fields in PARITY:
                fields = gpu_fields if device.type == "cuda" else cpu_fields
                make = lora_variant if op == "lora" else adapter_variant
                problem = kernel_check.PROBLEMS[op](make(device, dtype, *fields))
                progress(f"parity: {op} on {device}, {dtype}")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", verification.KernelVerificationWarning)
                    got = problem.results(_public_op(op, problem), dtype)
                eager = problem.reference_results(dtype)
                with kernel_check.tf32(False):
                    precise = problem.reference_results(problem.precise)
                rule = kernel_check.tolerance(dtype, torch.backends.cuda.matmul.allow_tf32)
                error = kernel_check.first_mismatch(got, precise, eager, rule)
                records.append(
                    {
                        "device": str(device),
                        "op": op,
                        "dtype": str(dtype).removeprefix("torch."),
                        "rows": problem.rows,
                        "backend": _runs_on(op, device, dtype),
                        "result": "passed" if error is None else "FAILED",
                        "error": error,
                    }
                )
    return records


def _runs_on(op: str, device: torch.device, dtype: torch.dtype) -> str:
    try:
        return ops.backend_description(op, device, dtype)
    except RuntimeError as error:  # a forced backend that cannot run here
        return f"error: {error}"
