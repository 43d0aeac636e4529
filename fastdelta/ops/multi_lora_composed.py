"""The mixed-batch LoRA in ATen: the torch backend's (csrc/multi_lora.cpp is the cpp backend's,
the same steps in C++ with the extension's mask).

The rows are grouped once, by the segments the functional computed (`order`, `starts`: see
`fastdelta.ops.multi_lora`): the rows that have an adapter are gathered in adapter order, each
adapter's low-rank products run on its contiguous slice of them (one matmul each, written in
place with out=), and the low-rank term goes back to its rows with one index_add_. The base GEMM
runs once, over the whole batch. The backward gathers dY the same way: per adapter dB_j =
s_j dY_j^T xa_j, dxa_j = s_j dY_j B_j, dA_j = dxa_j^T drop(x_j) and dx_j = drop'(dxa_j A_j),
scattered back with one index_add_ onto dY W.

The per-adapter loop needs the segments' bounds on the host: one read of n + 1 integers per
forward and per backward, free on the CPU; on a GPU, where these functions are the last resort
(the triton backend reads nothing on the host), it waits for the queued kernels.

The dropout mask is the backend's LoRA mask for x's shape (`keep_mask`), drawn once per pass
over the whole [M, K] input, so every row is dropped as `lora_linear` would drop it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def _precise(dtype: torch.dtype) -> torch.dtype:
    """xa's dtype: float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _base_weight(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as nn.Linear holds it, [N, K]. (The torch backend imports this module, so it
    has its own copy of torch_backend.base_weight and base_grads.)"""
    return weight.t() if fan_in_fan_out else weight


def _base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias):
    """The gradients of the base weight and bias, None when not needed; the bias's summed in
    at least float32."""
    grad_weight = grad_bias = None
    if need_weight:
        grad_weight = x2d.t() @ grad2d if fan_in_fan_out else grad2d.t() @ x2d
    if need_bias:
        grad_bias = grad2d.sum(0, dtype=_precise(grad2d.dtype)).to(grad2d.dtype)
    return grad_weight, grad_bias


def _segments(starts: torch.Tensor) -> tuple[list[tuple[int, int, int]], int]:
    """([(adapter, first, last)] of the adapters with rows, positions in the sorted order), and
    the number of rows that have an adapter; one host read."""
    bounds = starts.tolist()
    spans = [
        (j, first, last)
        for j, (first, last) in enumerate(itertools.pairwise(bounds))
        if last > first
    ]
    return spans, bounds[-1]


def multi_lora_forward_using(
    keep_mask, x, weight, bias, lora_A, lora_B, scalings, order, starts, seed, dropout_p,
    fan_in_fan_out,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, xa) of the mixed batch; `keep_mask(seed, shape, p)` draws the dropout mask."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    rank, n = lora_A.shape[1], lora_B.shape[1]
    y = F.linear(x2d, _base_weight(weight, fan_in_fan_out), bias)
    xa = x2d.new_zeros((m, rank), dtype=_precise(x.dtype))
    spans, used = _segments(starts) if m else ([], 0)
    if used:
        rows = order[:used]
        source = x2d if seed is None else torch.where(keep_mask(seed, (m, k), dropout_p), x2d, 0)
        gathered = source.index_select(0, rows)
        xa_sorted = gathered.new_empty((used, rank))
        delta = y.new_empty((used, n))
        for j, first, last in spans:
            torch.mm(gathered[first:last], lora_A[j].t(), out=xa_sorted[first:last])
        if seed is not None:
            # The 1 / (1 - p) of inverted dropout scales the [M, r] product, as lora_linear's.
            xa_sorted *= 1.0 / (1.0 - dropout_p)
        for j, first, last in spans:
            scaled = xa_sorted[first:last] * scalings[j]
            torch.mm(scaled, lora_B[j].t(), out=delta[first:last])
        y.index_add_(0, rows, delta)
        xa.index_copy_(0, rows, xa_sorted.to(xa.dtype))
    leading = x.shape[:-1]
    return y.view(*leading, n), xa.view(*leading, rank)


def multi_lora_backward_using(
    keep_mask, grad_y, x, weight, lora_A, lora_B, scalings, order, starts, xa, seed, dropout_p,
    fan_in_fan_out, needs,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients of (x, weight, bias, lora_A, lora_B); None for those not needed. An adapter
    with no rows gets a zero gradient."""
    need_x, need_weight, need_bias, need_A, need_B = needs
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    grad2d = grad_y.reshape(-1, grad_y.shape[-1])
    m = x2d.shape[0]
    grad_x = grad2d @ _base_weight(weight, fan_in_fan_out) if need_x else None
    grad_A = torch.zeros_like(lora_A) if need_A else None
    grad_B = torch.zeros_like(lora_B) if need_B else None
    spans, used = _segments(starts) if m and (need_x or need_A or need_B) else ([], 0)
    if used:
        rows = order[:used]
        gathered = grad2d.index_select(0, rows)
        keep = None
        if seed is not None and (need_A or need_x):
            keep = keep_mask(seed, (m, k), dropout_p).index_select(0, rows)  # drawn once for both
        dropout_scale = 1.0 / (1.0 - dropout_p) if seed is not None else 1.0
        if need_B:
            xa_sorted = xa.reshape(m, -1).index_select(0, rows).to(gathered.dtype)
        if need_A:
            x_sorted = x2d.index_select(0, rows)
            if keep is not None:
                x_sorted = torch.where(keep, x_sorted, 0)
        if need_x:
            low_rank = gathered.new_empty((used, k))
        for j, first, last in spans:
            grad_j = gathered[first:last]
            if need_B:
                torch.mm(grad_j.t(), xa_sorted[first:last] * scalings[j], out=grad_B[j])
            if not (need_A or need_x):
                continue
            # With dropout, grad_xa carries the 1 / (1 - p) scale and `keep` the mask.
            grad_xa = (grad_j @ lora_B[j]) * (scalings[j] * dropout_scale)
            if need_A:
                torch.mm(grad_xa.t(), x_sorted[first:last], out=grad_A[j])
            if need_x:
                torch.mm(grad_xa, lora_A[j], out=low_rank[first:last])
        if need_x:
            if keep is not None:
                low_rank = torch.where(keep, low_rank, 0)
            grad_x.index_add_(0, rows, low_rank)
    if need_x:
        grad_x = grad_x.view(x.shape)
    grad_weight, grad_bias = _base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B
