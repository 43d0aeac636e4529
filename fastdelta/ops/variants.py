"""Kernel variants: what first-use verification checks one at a time, and names.

A variant is a tuple (plain, so that building and hashing one per call costs little): the op's
name and then its fields, LORA_FIELDS, DORA_FIELDS or ADAPTER_FIELDS. It is at least as fine
as every Triton autotune key, so that each autotuned configuration is checked: op, device, dtype,
bias, dropout, layout (fan_in_fan_out) or activation and sequential, the sizes, and the row-count
bucket min(M.bit_length(), 16) of the kernels (`fastdelta.kernels`' m_bucket).
"""

from __future__ import annotations

# The kernels' row-count buckets (fastdelta.kernels' m_bucket) stop at 2^15 rows and more.
MAX_M_BUCKET = 16
LORA_FIELDS = (
    "op",
    "device",
    "dtype",
    "has_bias",
    "dropout",
    "fan_in_fan_out",
    "out_features",
    "in_features",
    "rank",
    "m_bucket",
)
ADAPTER_FIELDS = (
    "op",
    "device",
    "dtype",
    "has_down_bias",
    "has_up_bias",
    "activation",
    "sequential",
    "in_features",
    "out_features",
    "bottleneck",
    "m_bucket",
)
# DoRA's kernels are LoRA's with the column scale in the forward's epilogue (and z written when
# the backward needs it: keep_z, a constant of the kernel) and a scaling pass in the backward;
# exact_norm adds ATen products only, and is a field so that the check runs the call as made.
DORA_FIELDS = (*LORA_FIELDS[:6], "keep_z", "exact_norm", *LORA_FIELDS[6:])
# Mixed-batch LoRA (fastdelta.ops.multi_lora): LoRA's fields and the number of adapters stacked,
# which sizes its grids and its weight gradients' reductions.
MULTI_LORA_FIELDS = (*LORA_FIELDS[:9], "adapters", LORA_FIELDS[9])
FIELDS = {
    "lora": LORA_FIELDS,
    "dora": DORA_FIELDS,
    "adapter": ADAPTER_FIELDS,
    "multi_lora": MULTI_LORA_FIELDS,
}


def bucket_rows(m_bucket: int) -> int:
    """The smallest row count M with min(M.bit_length(), MAX_M_BUCKET) == m_bucket."""
    return 1 << (m_bucket - 1)


def lora_variant(
    device, dtype, has_bias, dropout, fan_in_fan_out, out_features, in_features, rank, m
) -> tuple:
    """The variant of a LoRA call (fields: LORA_FIELDS) on an x of m rows."""
    bucket = min(m.bit_length(), MAX_M_BUCKET)
    return (
        "lora", device, dtype, has_bias, dropout, fan_in_fan_out,
        out_features, in_features, rank, bucket,
    )  # fmt: skip


def dora_variant(
    device, dtype, has_bias, dropout, fan_in_fan_out, keep_z, exact_norm, out_features,
    in_features, rank, m,
) -> tuple:  # fmt: skip
    """The variant of a DoRA call (fields: DORA_FIELDS) on an x of m rows."""
    bucket = min(m.bit_length(), MAX_M_BUCKET)
    return (
        "dora", device, dtype, has_bias, dropout, fan_in_fan_out, keep_z, exact_norm,
        out_features, in_features, rank, bucket,
    )  # fmt: skip


def multi_lora_variant(
    device, dtype, has_bias, dropout, fan_in_fan_out, out_features, in_features, rank, adapters,
    m,
) -> tuple:  # fmt: skip
    """The variant of a mixed-batch LoRA call (fields: MULTI_LORA_FIELDS) on an x of m rows;
    rank is the stack's (the largest adapter's)."""
    bucket = min(m.bit_length(), MAX_M_BUCKET)
    return (
        "multi_lora", device, dtype, has_bias, dropout, fan_in_fan_out,
        out_features, in_features, rank, adapters, bucket,
    )  # fmt: skip


def adapter_variant(
    device,
    dtype,
    has_down_bias,
    has_up_bias,
    activation,
    sequential,
    in_features,
    out_features,
    bottleneck,
    m,
) -> tuple:
    """The variant of an adapter call (fields: ADAPTER_FIELDS) on an h of m rows."""
    bucket = min(m.bit_length(), MAX_M_BUCKET)
    return (
        "adapter", device, dtype, has_down_bias, has_up_bias, activation, sequential,
        in_features, out_features, bottleneck, bucket,
    )  # fmt: skip


def variant_fields(variant: tuple) -> dict:
    """The variant as a JSON object: its field names and values (device and dtype as text)."""
    fields = dict(zip(FIELDS[variant[0]], variant, strict=True))
    fields["device"], fields["dtype"] = str(fields["device"]), str(fields["dtype"])
    return fields


def describe(variant: tuple) -> str:
    """A variant in words: "lora on cuda:0 (torch.float16, 4096 -> 4096, M 2048-4095,
    has_bias=True, dropout=False, fan_in_fan_out=False, rank=16)"."""
    fields = variant_fields(variant)
    low = bucket_rows(fields["m_bucket"])
    rows = f"M {low}-{2 * low - 1}" if fields["m_bucket"] < MAX_M_BUCKET else f"M >= {low}"
    rows = "M 1" if low == 1 else rows
    flags = ", ".join(
        f"{name}={value}"
        for name, value in fields.items()
        if name not in ("op", "device", "dtype", "in_features", "out_features", "m_bucket")
    )
    sizes = f"{fields['in_features']} -> {fields['out_features']}"
    return f"{fields['op']} on {fields['device']} ({fields['dtype']}, {sizes}, {rows}, {flags})"
