"""What the benchmarks measure: the shapes of each op, by grid, and the shapes the targets are
stated at. Plain Python (no torch), so the report reads it without starting torch.

Grids: `full` (decode to training shapes, made for a GPU; hours on a CPU), `quick` (a few
minutes on a 2-core CPU) and `smoke` (minuscule shapes that only prove the suite runs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraCase:
    """LoRA linear: x [M, K], W [N, K], A [r, K], B [N, r]; dropout on the low-rank path."""

    M: int
    K: int
    N: int
    r: int
    dropout: float

    @property
    def id(self) -> str:
        return f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-p{self.dropout:g}"


@dataclass(frozen=True)
class AdapterCase:
    """Adapter bottleneck: h [M, d], down [m, d], up [d, m]."""

    M: int
    d: int
    m: int

    @property
    def id(self) -> str:
        return f"M{self.M}-d{self.d}-m{self.m}"


@dataclass(frozen=True)
class DecoderCase:
    """A Llama-style decoder's sizes and the batch of one training step (batch x seq tokens)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int

    @property
    def id(self) -> str:
        return f"h{self.hidden}-L{self.layers}-b{self.batch}-s{self.seq}"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class HostCase:
    """Host overhead: one call of `op` ("lora" or "adapter") as the functional op or a whole
    layer (`subject`), on an [M, d] input into a d x d linear, rank or bottleneck r; timed in
    `mode` ("forward" or "full", forward and backward), training or evaluating."""

    op: str
    subject: str
    training: bool
    dropout: float
    mode: str
    M: int = 4
    d: int = 64
    r: int = 8

    @property
    def id(self) -> str:
        dropout = f"-p{self.dropout:g}" if self.op == "lora" else ""
        phase = "train" if self.training else "eval"
        mode = "fwd" if self.mode == "forward" else "fwd+bwd"
        return f"{self.op}-{self.subject}-M{self.M}-d{self.d}-r{self.r}{dropout}-{phase}-{mode}"


# The shapes the report's targets are stated at.
GPU_LORA_TARGET = LoraCase(M=8192, K=4096, N=4096, r=16, dropout=0.1)
CPU_LORA_TARGET = LoraCase(M=2048, K=1024, N=1024, r=16, dropout=0.1)
GPU_ADAPTER_TARGET = AdapterCase(M=8192, d=4096, m=64)


def lora_linear_cases(grid: str, device_type: str) -> list[LoraCase]:
    """Decode (M=1..16) to training (M=16384), hidden 1024..8192, ranks 8..128; quick keeps the
    CPU target, its dropout-free twin and two decode shapes (plus the GPU target on CUDA)."""
    if grid == "smoke":
        return [LoraCase(M=8, K=40, N=24, r=4, dropout=0.1)]
    quick = [
        LoraCase(M=1, K=1024, N=1024, r=16, dropout=0.1),
        LoraCase(M=16, K=1024, N=1024, r=16, dropout=0.1),
        CPU_LORA_TARGET,
        LoraCase(M=2048, K=1024, N=1024, r=16, dropout=0.0),
    ]
    if grid == "quick":
        return quick + ([GPU_LORA_TARGET] if device_type == "cuda" else [])
    by_tokens = [LoraCase(M=m, K=4096, N=4096, r=16, dropout=0.1) for m in (1, 16, 512, 2048)]
    by_hidden = [LoraCase(M=8192, K=h, N=h, r=16, dropout=0.1) for h in (1024, 2048)]
    training = [
        GPU_LORA_TARGET,
        LoraCase(M=8192, K=4096, N=4096, r=16, dropout=0.0),
        LoraCase(M=16384, K=4096, N=4096, r=16, dropout=0.1),
        LoraCase(M=8192, K=8192, N=8192, r=16, dropout=0.1),
    ]
    by_rank = [LoraCase(M=8192, K=4096, N=4096, r=r, dropout=0.1) for r in (8, 64, 128)]
    return [*quick[1:2], CPU_LORA_TARGET, *by_tokens, *by_hidden, *training, *by_rank]


def dora_cases(grid: str, device_type: str) -> list[LoraCase]:
    """The LoRA grid's training shapes: the CPU target's, with and without dropout (quick),
    the GPU target's on CUDA, and the GPU training shapes (full)."""
    if grid == "smoke":
        return [LoraCase(M=8, K=40, N=24, r=4, dropout=0.1)]
    quick = [CPU_LORA_TARGET, LoraCase(M=2048, K=1024, N=1024, r=16, dropout=0.0)]
    if grid == "quick":
        return quick + ([GPU_LORA_TARGET] if device_type == "cuda" else [])
    return [
        *quick,
        GPU_LORA_TARGET,
        LoraCase(M=8192, K=4096, N=4096, r=16, dropout=0.0),
        LoraCase(M=2048, K=4096, N=4096, r=16, dropout=0.1),
    ]


def host_overhead_cases(grid: str, device_type: str) -> list[HostCase]:
    """Every combination on the tiny [4, 64] input: op or layer, LoRA with dropout 0 and 0.1
    and the adapter, training (forward, forward+backward) and evaluating (forward); smoke keeps
    the LoRA layer's. Sized for host time, so the same on every grid but smoke."""
    phases = [(True, "forward"), (True, "full"), (False, "forward")]
    every = [
        HostCase(op, subject, training, dropout, mode)
        for op, dropouts in (("lora", (0.0, 0.1)), ("adapter", (0.0,)))
        for subject in ("layer", "op")
        for dropout in dropouts
        for training, mode in phases
        if training or dropout == 0.0  # evaluation runs without dropout
    ]
    if grid == "smoke":
        return [case for case in every if case.op == "lora" and case.subject == "layer"][:2]
    return every


def adapter_cases(grid: str, device_type: str) -> list[AdapterCase]:
    """Decode to training tokens, hidden 1024..8192, bottleneck 16..256."""
    if grid == "smoke":
        return [AdapterCase(M=8, d=40, m=6)]
    quick = [AdapterCase(M=16, d=1024, m=64), AdapterCase(M=2048, d=1024, m=64)]
    if grid == "quick":
        return quick + ([GPU_ADAPTER_TARGET] if device_type == "cuda" else [])
    by_tokens = [AdapterCase(M=m, d=4096, m=64) for m in (1, 16, 2048)]
    by_hidden = [AdapterCase(M=8192, d=d, m=64) for d in (1024, 8192)]
    training = [GPU_ADAPTER_TARGET, AdapterCase(M=16384, d=4096, m=64)]
    by_bottleneck = [AdapterCase(M=8192, d=4096, m=m) for m in (16, 256)]
    return [*quick, *by_tokens, *by_hidden, *training, *by_bottleneck]


def decoder_cases(grid: str, device_type: str) -> list[DecoderCase]:
    """Hidden 2048 on a GPU; 256 (quick) or 512 on the CPU; minuscule for smoke."""
    if grid == "smoke":
        return [DecoderCase(32, 64, layers=1, heads=2, vocab=128, batch=2, seq=16)]
    if device_type == "cuda":
        return [DecoderCase(2048, 5632, layers=4, heads=16, vocab=32000, batch=8, seq=1024)]
    if grid == "quick":
        return [DecoderCase(256, 688, layers=4, heads=4, vocab=4096, batch=4, seq=256)]
    return [DecoderCase(512, 1376, layers=4, heads=8, vocab=8192, batch=4, seq=512)]


@dataclass(frozen=True)
class MultiLoraCase:
    """Mixed-batch LoRA: x [M, K] whose rows are dealt round-robin to `adapters` LoRAs of rank r
    on one W [N, K]; dropout on the low-rank path."""

    M: int
    K: int
    N: int
    r: int
    adapters: int
    dropout: float

    @property
    def id(self) -> str:
        return f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-n{self.adapters}-p{self.dropout:g}"


# The GPU target's case: 16 adapters in one batch, at the LoRA target's shape.
GPU_MULTI_LORA_TARGET = MultiLoraCase(M=8192, K=4096, N=4096, r=16, adapters=16, dropout=0.1)


def multi_lora_cases(grid: str, device_type: str) -> list[MultiLoraCase]:
    """4 and 16 adapters sharing a batch: at a CPU-sized shape (quick), and at the GPU target's
    shape on CUDA (quick and full)."""
    if grid == "smoke":
        return [MultiLoraCase(M=8, K=40, N=24, r=4, adapters=2, dropout=0.1)]
    quick = [MultiLoraCase(M=1024, K=1024, N=1024, r=16, adapters=n, dropout=0.0) for n in (4, 16)]
    gpu = [dataclasses.replace(GPU_MULTI_LORA_TARGET, adapters=n) for n in (4, 16)]
    if grid == "quick":
        return quick + (gpu if device_type == "cuda" else [])
    return [*quick, *gpu]
