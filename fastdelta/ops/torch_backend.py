"""The torch backend: the fused ops' forward and backward written in plain PyTorch.

It is the CPU path, so it wastes nothing: the only [M, N] tensor it makes is the output (the
low-rank product is added into it in place), and dropout keeps a seed instead of a mask or a
dropped copy of x; the backward draws the same mask again from that seed. It is also the GPU
path where neither Triton nor the C++ extension can run, so on a GPU nothing in it reads a
tensor on the host: the dropout mask is hashed from the seed tensor on the device.
"""

from __future__ import annotations

import math

import torch

from fastdelta.ops import dora_composed, multi_lora_composed
from fastdelta.ops.activations import ACTIVATION_GRADS, ACTIVATIONS

# Dropout bits: one int16 per element, compared with a threshold, so the drop rate is p
# quantised to 1 / 65536.
_INT16_VALUES = 1 << 16

# The CPU's masks come from torch's generator seeded with int(seed): the fastest mask there, and
# a CPU tensor's value is in host memory. On a GPU int(seed) would wait for every queued kernel
# and stop a CUDA graph from capturing the step, so there the mask is hashed from the seed
# tensor on the device. (False hashes on the CPU too: tests/test_host_sync.py runs the device
# path on CPU tensors that way.)
GENERATOR_ON_CPU = True


def _int64(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


# csrc/dropout.h's constants: splitmix64's multipliers, its golden-ratio counter step and the key
# salt. int64 arithmetic wraps as uint64's does, and every device has it (uint64 has few ops).
_MIX_1 = _int64(0xBF58476D1CE4E5B9)
_MIX_2 = _int64(0x94D049BB133111EB)
_GOLDEN_STEP = _int64(0x9E3779B97F4A7C15)
_KEY_SALT = 0x6A09E667F3BCC909
# Flips the top bit of each 16-bit lane, so that the int16 view orders the lanes as the
# unsigned 16-bit values csrc/dropout.h compares.
_LANE_SIGNS = _int64(0x8000800080008000)
# Hash words per pass: two int64 buffers of this many words (16 MiB) are all the hashed mask
# needs besides the mask. Hashed in one pass, they take 4 bytes per element: measured on a
# [4096, 4096] mask, peak 80 MiB in one pass, 32 MiB in chunks (the CPU generator's: 48 MiB).
# A mask of up to 4Mi elements is one pass.
_HASH_CHUNK_WORDS = 1 << 20


def dropout_keep_mask(seed: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The boolean keep-mask that the torch backend's dropout draws from `seed` for `shape`:
    `generator_keep_mask` for a CPU seed, else `hashed_keep_mask`."""
    if seed.is_cpu and GENERATOR_ON_CPU:
        return generator_keep_mask(seed, shape, p)
    return hashed_keep_mask(seed, shape, p)


def _int16_threshold(p: float) -> int:
    """The int16 that lanes of random bits must reach to be kept, for a drop rate p in [0, 1):
    round(p * 65536) in unsigned 16-bit terms, less 32768. A p within 2^-17 of 1 keeps 1 / 65536
    of the elements rather than none (the extension's mask keeps none): an int16 threshold
    cannot pass 32767."""
    return min(math.floor(p * _INT16_VALUES + 0.5), _INT16_VALUES - 1) - _INT16_VALUES // 2


def generator_keep_mask(seed: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The mask from torch's generator seeded with int(seed), a host read of the seed: int64
    words drawn by random_() and viewed as int16. Measured on a 2-core CPU for a [2048, 1024]
    mask: 4-5 ms, against 11-15 ms for torch.rand of the same shape and 19 ms for bernoulli_."""
    numel = math.prod(shape)
    generator = torch.Generator(device=seed.device).manual_seed(int(seed))
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=seed.device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)
    return words.view(torch.int16)[:numel].view(shape) >= _int16_threshold(p)


def _xor_shift(words: torch.Tensor, shift: int, scratch: torch.Tensor) -> torch.Tensor:
    """words ^= words >> shift, a logical shift of int64 words, in place; `scratch` is a buffer
    of their shape."""
    torch.bitwise_right_shift(words, shift, out=scratch)
    scratch.bitwise_and_((1 << (64 - shift)) - 1)  # clear the copies of the sign bit
    return words.bitwise_xor_(scratch)


def _mix64(words: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (csrc/dropout.h's mix64) of int64 `words`, in place."""
    _xor_shift(words, 30, scratch).mul_(_MIX_1)
    _xor_shift(words, 27, scratch).mul_(_MIX_2)
    return _xor_shift(words, 31, scratch)


def hashed_keep_mask(seed: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The mask hashed from the seed tensor on its device, with no host read: the C++
    extension's mask (csrc/dropout.h), bit for bit (but see `_int16_threshold` for p near 1).
    Element i of the flattened shape is kept when 16-bit lane i % 4 of
    mix64(key + (i // 4 + 1) * golden), key = mix64(seed ^ salt), is at least round(p * 65536).
    The lanes are the int16 view of the words: every device torch runs on is little-endian."""
    numel = math.prod(shape)
    words = (numel + 3) // 4
    key = _mix64(torch.bitwise_xor(seed, _KEY_SALT), torch.empty_like(seed))
    threshold = _int16_threshold(p)
    keep = torch.empty(4 * words, dtype=torch.bool, device=seed.device)
    hashed = torch.empty(min(words, _HASH_CHUNK_WORDS), dtype=torch.int64, device=seed.device)
    scratch = torch.empty_like(hashed)
    for first in range(0, words, _HASH_CHUNK_WORDS):
        count = min(_HASH_CHUNK_WORDS, words - first)
        chunk = torch.arange(first + 1, first + 1 + count, out=hashed[:count])
        _mix64(torch.add(key, chunk, alpha=_GOLDEN_STEP, out=chunk), scratch[:count])
        lanes = chunk.bitwise_xor_(_LANE_SIGNS).view(torch.int16)
        torch.ge(lanes, threshold, out=keep[4 * first : 4 * (first + count)])
    return keep[:numel].view(shape)


def base_weight(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as nn.Linear holds it, [N, K]: a transposed view of a Conv1D weight."""
    return weight.t() if fan_in_fan_out else weight


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """Column sums of a 2-D tensor, accumulated in at least float32."""
    return t.sum(0, dtype=torch.promote_types(t.dtype, torch.float32)).to(t.dtype)


def base_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    fan_in_fan_out: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of the base weight and bias (None when not needed). 2-D inputs."""
    grad_weight = grad_bias = None
    if need_weight:
        grad_weight = x.t() @ grad_y if fan_in_fan_out else grad_y.t() @ x
    if need_bias:
        grad_bias = _sum_rows(grad_y)
    return grad_weight, grad_bias


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) for y = x W^T + b + scaling * xa B^T with xa = dropout(x) A^T; xa in float32
    (float64 for float64 x)."""
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.nn.functional.linear(x2d, base_weight(weight, fan_in_fan_out), bias)
    if seed is None:
        xa = x2d @ lora_A.t()
    else:
        # The 1 / (1 - p) of inverted dropout scales the [M, r] product, not the [M, K] input.
        keep = dropout_keep_mask(seed, tuple(x2d.shape), dropout_p)
        xa = (torch.where(keep, x2d, 0) @ lora_A.t()) * (1.0 / (1.0 - dropout_p))
    y.addmm_(xa * scaling, lora_B.t())
    leading = x.shape[:-1]
    xa = xa.to(torch.promote_types(xa.dtype, torch.float32))
    return y.view(*leading, y.shape[-1]), xa.view(*leading, xa.shape[-1])


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, weight, bias, lora_A, lora_B); None for those not needed."""
    need_x, need_weight, need_bias, need_A, need_B = needs
    grad2d = grad_y.reshape(-1, grad_y.shape[-1])
    x2d = x.reshape(-1, x.shape[-1])
    grad_xa = (grad2d @ lora_B) * scaling if need_x or need_A else None
    grad_A = grad_B = grad_x = None
    keep = None
    if seed is not None and (need_A or need_x):
        keep = dropout_keep_mask(seed, tuple(x2d.shape), dropout_p)  # drawn once for both
        grad_xa = grad_xa * (1.0 / (1.0 - dropout_p))
    if need_B:
        grad_B = grad2d.t() @ (xa.reshape(-1, xa.shape[-1]) * scaling).to(grad2d.dtype)
    # With dropout, grad_xa carries the 1 / (1 - p) scale and `keep` the mask.
    if need_A:
        grad_A = grad_xa.t() @ (x2d if keep is None else torch.where(keep, x2d, 0))
    if need_x:
        grad_x = grad2d @ base_weight(weight, fan_in_fan_out)
        if keep is None:
            grad_x.addmm_(grad_xa, lora_A)
        else:
            grad_x += torch.where(keep, grad_xa @ lora_A, 0)
        grad_x = grad_x.view(x.shape)
    grad_weight, grad_bias = base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B


def adapter_forward(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    scaling: float,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, pre): out = residual + scaling * (act(pre) U^T + b_u), pre = h D^T + b_d kept in
    float32 (float64 for float64 h). residual None means h (a sequential adapter)."""
    h2d = h.reshape(-1, h.shape[-1])
    pre = torch.nn.functional.linear(h2d, down_weight, down_bias)
    residual2d = h2d if residual is None else residual.reshape(-1, residual.shape[-1])
    out = torch.addmm(residual2d, ACTIVATIONS[activation](pre) * scaling, up_weight.t())
    if up_bias is not None:
        out += up_bias * scaling
    leading = h.shape[:-1]
    pre = pre.to(torch.promote_types(pre.dtype, torch.float32))
    return out.view(*leading, out.shape[-1]), pre.view(*leading, pre.shape[-1])


def adapter_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    pre: torch.Tensor,
    scaling: float,
    activation: str,
    sequential: bool,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (h, down_weight, down_bias, up_weight, up_bias); None where not needed.
    A sequential adapter's dh includes the residual path."""
    need_h, need_down_weight, need_down_bias, need_up_weight, need_up_bias = needs
    grad2d = grad_out.reshape(-1, grad_out.shape[-1])
    h2d = h.reshape(-1, h.shape[-1])
    pre2d = pre.reshape(-1, pre.shape[-1])
    dtype = grad2d.dtype
    grad_h = grad_down_weight = grad_down_bias = grad_up_weight = grad_up_bias = None
    if need_up_weight:
        grad_up_weight = grad2d.t() @ (ACTIVATIONS[activation](pre2d) * scaling).to(dtype)
    if need_up_bias:
        grad_up_bias = _sum_rows(grad2d) * scaling
    if need_h or need_down_weight or need_down_bias:
        grad_pre = (grad2d @ up_weight).to(pre2d.dtype) * (
            scaling * ACTIVATION_GRADS[activation](pre2d)
        )
        grad_pre = grad_pre.to(dtype)
        if need_down_bias:
            grad_down_bias = _sum_rows(grad_pre)
        if need_down_weight:
            grad_down_weight = grad_pre.t() @ h2d
        if need_h:
            grad_h = (
                torch.addmm(grad2d, grad_pre, down_weight) if sequential else grad_pre @ down_weight
            )
            grad_h = grad_h.view(h.shape)
    return grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias


def dora_forward(
    x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p, fan_in_fan_out,
    keep_z,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(y, xa, z or None) of DoRA, y = k * (x W^T + s drop(x) A^T B^T) + b with k = magnitude /
    norm: this backend's LoRA forward without bias, then ATen (`fastdelta.ops.dora_composed`);
    z (x's dtype) is returned only with `keep_z`."""
    return dora_composed.dora_forward_using(
        lora_forward, x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling,
        dropout_p, fan_in_fan_out, keep_z,
    )  # fmt: skip


def dora_backward(
    grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, z, seed, scaling, dropout_p,
    fan_in_fan_out, exact_norm, needs,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients of (x, weight, bias, lora_A, lora_B, magnitude); None for those not needed."""
    return dora_composed.dora_backward_using(
        lora_backward, dora_composed.scale_grad, grad_y, x, weight, lora_A, lora_B, magnitude,
        norm, xa, z, seed, scaling, dropout_p, fan_in_fan_out, exact_norm, needs,
    )  # fmt: skip


def multi_lora_forward(
    x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p, fan_in_fan_out
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) of the mixed-batch LoRA (`fastdelta.ops.multi_lora`): segmented ATen products
    (`fastdelta.ops.multi_lora_composed`) with this backend's dropout mask."""
    return multi_lora_composed.multi_lora_forward_using(
        dropout_keep_mask, x, weight, bias, lora_A, lora_B, scalings, order, starts, seed,
        dropout_p, fan_in_fan_out,
    )  # fmt: skip


def multi_lora_backward(
    grad_y, x, weight, lora_A, lora_B, scalings, order, starts, xa, seed, dropout_p,
    fan_in_fan_out, needs,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients of (x, weight, bias, lora_A, lora_B) of the mixed-batch LoRA; None for those
    not needed."""
    return multi_lora_composed.multi_lora_backward_using(
        dropout_keep_mask, grad_y, x, weight, lora_A, lora_B, scalings, order, starts, xa, seed,
        dropout_p, fan_in_fan_out, needs,
    )  # fmt: skip
