"""Adapters whose weights are built from factors: OpenDelta's low-rank and Compacter (PHM) adapters.

A factored adapter is the sequential adapter h + up(act(down(h))) of `fastdelta.layers.adapter`,
except that its down and up weights are not parameters themselves: each is computed, inside
autograd, from the trainable factors of a sampler module (a product of two thin matrices, or a
sum of Kronecker products), and then the same fused `ops.adapter_bottleneck` op runs, so every
compute backend runs these adapters too and the factors get their gradients through the product.

The samplers keep OpenDelta's parameter names and layouts (`W_left`, `W_right`, `W`, `phm_rule`,
`phm_rule_left`, `phm_rule_right`, `b`; a weight maps inputs to outputs as `x @ W`), so that a
delta's tensors are named `<host>.<delta>.down_sampler.W_left` and so on, as OpenDelta names them
under its delta module, and they are initialised in OpenDelta's order with OpenDelta's
distributions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastdelta import ops
from fastdelta.layers.adapter import _wider_than_autocast
from fastdelta.layers.base import DeltaLayer

# OpenDelta's "glorot" initialisations: Xavier with gain sqrt(2).
GLOROT_GAIN = math.sqrt(2)
# OpenDelta's range of the PHM rule's initialisation (normal std, or uniform bound).
PHM_RULE_INIT_RANGE = 0.01
LOW_RANK_INITS = ("glorot-uniform", "glorot-normal")
PHM_WEIGHT_INITS = ("glorot-uniform", "glorot-normal", "normal")
PHM_RULE_INITS = ("normal", "uniform")


def glorot_(tensor: torch.Tensor, init: str) -> None:
    """Initialise the 2-d `tensor` in place by OpenDelta's "glorot-uniform" or "glorot-normal"."""
    if init == "glorot-uniform":
        nn.init.xavier_uniform_(tensor, gain=GLOROT_GAIN)
    elif init == "glorot-normal":
        nn.init.xavier_normal_(tensor, gain=GLOROT_GAIN)
    else:
        raise ValueError(f"Unknown glorot initialisation {init!r}; choose one of {LOW_RANK_INITS}")


def reduced_features(features: int, reduction_factor: int, host_name: str) -> int:
    """The bottleneck width of an adapter on `features` features: features // reduction_factor,
    as OpenDelta computes it; an error naming `host_name` when that leaves no bottleneck."""
    width = features // reduction_factor
    if width < 1:
        raise ValueError(
            f"reduction_factor={reduction_factor} leaves no bottleneck on {host_name}, whose "
            f"output has {features} features ({features} // {reduction_factor} = 0): use a "
            f"reduction_factor of at most {features}, or leave this module out of "
            "modified_modules"
        )
    return width


class LowRankSampler(nn.Module):
    """OpenDelta's LowRankLinear as a weight: W = W_left W_right ([in, rank] @ [rank, out]) and
    the bias b ([out], zeros).

    Both factors start with the glorot initialisation `w_init`. At rank 1 (OpenDelta's default)
    W is the outer product OpenDelta computes as the broadcast W_left * W_right; at a higher
    rank it is the sum of `rank` outer products, which is what the broadcast was meant to be
    (in OpenDelta 0.3.2 it raises a shape error for a rank above 1).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        w_init: str,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.W_left = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.W_right = nn.Parameter(torch.empty(rank, out_features, **factory))
        self.b = nn.Parameter(torch.zeros(out_features, **factory))
        glorot_(self.W_left.data, w_init)
        glorot_(self.W_right.data, w_init)

    def weight(self) -> torch.Tensor:
        """The [out_features, in_features] weight (nn.Linear's layout), differentiable."""
        return (self.W_left @ self.W_right).t()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.W_left.shape[1]}"
        )


class PHMSampler(nn.Module):
    """OpenDelta's PHMLinear (parameterised hypercomplex multiplication) as a weight:
    H = sum_i kron(C_i, W_i), [in, out], and the bias b ([out], zeros) if `bias`.

    n = `phm_dim` rules C_i ([n, n]; `phm_rule` [n, n, n], or the product of `phm_rule_left`
    [n, n, 1] and `phm_rule_right` [n, 1, n] when `factorized_phm_rule`) and n blocks W_i
    ([in / n, out / n]; `W` [n, in / n, out / n], or the product of `W_left` [n, in / n, rank] and
    `W_right` [n, rank, out / n] when `factorized_phm`). The rules train only if `learn_phm`.
    Initialisation, in OpenDelta's order: each block's factors by `w_init` ("glorot-uniform",
    "glorot-normal", or "normal" with std `phm_init_range`), then the rules by `c_init`
    ("normal": std 0.01; "uniform": within +-0.01).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        phm_dim: int,
        *,
        bias: bool,
        w_init: str,
        c_init: str,
        learn_phm: bool,
        factorized_phm: bool,
        factorized_phm_rule: bool,
        phm_rank: int,
        phm_init_range: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if in_features % phm_dim or out_features % phm_dim:
            raise ValueError(
                f"A PHM weight of {in_features} -> {out_features} features cannot be split "
                f"into hypercomplex_division={phm_dim} blocks along each side"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.phm_dim = phm_dim
        factory = {"device": device, "dtype": dtype}
        n, block_in, block_out = phm_dim, in_features // phm_dim, out_features // phm_dim
        if factorized_phm_rule:
            self.phm_rule_left = nn.Parameter(torch.empty(n, n, 1, **factory), learn_phm)
            self.phm_rule_right = nn.Parameter(torch.empty(n, 1, n, **factory), learn_phm)
        else:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n, **factory), learn_phm)
        if factorized_phm:
            self.W_left = nn.Parameter(torch.empty(n, block_in, phm_rank, **factory))
            self.W_right = nn.Parameter(torch.empty(n, phm_rank, block_out, **factory))
        else:
            self.W = nn.Parameter(torch.empty(n, block_in, block_out, **factory))
        if bias:
            self.b = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("b", None)
        self._init_blocks(w_init, phm_init_range)
        self._init_rules(c_init)

    def rule_parameters(self) -> list[nn.Parameter]:
        """The parameters of the rules C_i (trained only with learn_phm)."""
        names = ("phm_rule", "phm_rule_left", "phm_rule_right")
        return [parameter for name, parameter in self.named_parameters() if name in names]

    def _block_factors(self) -> list[nn.Parameter]:
        return [self.W_left, self.W_right] if hasattr(self, "W_left") else [self.W]

    def _init_blocks(self, w_init: str, std: float) -> None:
        factors = self._block_factors()
        for index in range(factors[0].shape[0]):
            for factor in factors:
                block = factor.data[index]
                if w_init == "normal":
                    block.normal_(mean=0.0, std=std)
                else:
                    glorot_(block, w_init)

    def _init_rules(self, c_init: str) -> None:
        for rule in self.rule_parameters():
            if c_init == "normal":
                rule.data.normal_(mean=0.0, std=PHM_RULE_INIT_RANGE)
            else:
                rule.data.uniform_(-PHM_RULE_INIT_RANGE, PHM_RULE_INIT_RANGE)

    def rules(self) -> torch.Tensor:
        """The n rules C_i, [n, n, n]."""
        if hasattr(self, "phm_rule_left"):
            return torch.bmm(self.phm_rule_left, self.phm_rule_right)
        return self.phm_rule

    def blocks(self) -> torch.Tensor:
        """The n blocks W_i, [n, in / n, out / n]."""
        if hasattr(self, "W_left"):
            return torch.bmm(self.W_left, self.W_right)
        return self.W

    def weight(self) -> torch.Tensor:
        """The [out_features, in_features] weight (nn.Linear's layout, H transposed),
        differentiable: element [c * q + l, a * p + k] is sum_i C_i[a, c] W_i[k, l], with
        W_i of shape [p, q]."""
        rules, blocks = self.rules(), self.blocks()
        n, p, q = blocks.shape
        return torch.einsum("iac,ikl->clak", rules, blocks).reshape(n * q, n * p)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"phm_dim={self.phm_dim}, bias={self.b is not None}"
        )


class FactoredAdapterDelta(DeltaLayer):
    """h + up(act(down(h))) with the down and up weights of two samplers (`LowRankSampler`,
    `PHMSampler`), computed from their factors on every call and run by the fused adapter op.
    A sequential delta: `delta(h)`, h the output of its host module."""

    def __init__(
        self, down_sampler: nn.Module, up_sampler: nn.Module, activation: str, delta_name: str
    ):
        super().__init__()
        self.delta_name = delta_name
        self.activation = activation
        self.down_sampler = down_sampler
        self.up_sampler = up_sampler

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., features]."""
        down_weight, up_weight = self.down_sampler.weight(), self.up_sampler.weight()
        arguments = (down_weight, self.down_sampler.b, up_weight, self.up_sampler.b)
        if _wider_than_autocast(h):
            # As AdapterDelta does: add the bottleneck in the residual's own (wider) dtype.
            zeros = torch.zeros(
                h.shape[:-1] + up_weight.shape[:1],
                dtype=torch.get_autocast_dtype(h.device.type),
                device=h.device,
            )
            return h + ops.adapter_bottleneck(h, *arguments, 1.0, self.activation, zeros)
        return ops.adapter_bottleneck(h, *arguments, 1.0, self.activation)

    def backend_name(self) -> str:
        factor = next(self.down_sampler.parameters())
        return ops.backend_description(
            "adapter",
            factor.device,
            factor.dtype,
            in_features=self.down_sampler.in_features,
            out_features=self.up_sampler.out_features,
            bottleneck=self.down_sampler.out_features,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
