"""The LoRA delta: a low-rank update computed together with the linear layer it modifies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdelta import ops
from fastdelta.injection import RUNS_IN_PLACE, original_class
from fastdelta.layers.base import DeltaLayer, linear_parameters
from fastdelta.layers.dora_norm import BaseRowNorms

# How a DoRA delta applies dropout: "peft", PEFT's form (the base product takes the dropped
# input too: a second base GEMM); "low_rank", the DoRA paper's (the low-rank path only: one
# fused op).
DORA_DROPOUT_FORMS = ("peft", "low_rank")


class _LowRank:
    """What LoRA's deltas share: rank, alpha and scaling, and merge / unmerge (`_low_rank()`
    gives (A, B, whether the host's weight holds (B A)^T))."""

    def _set_scaling(self, r: int, alpha: float, use_rslora: bool) -> None:
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        """Add scaling * B A to the host's weight (computed in float32, rounded once)."""
        if not self.merged:
            self._add_to_weight(host, 1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        """Subtract what merge() added: the weight comes back to within its dtype's rounding."""
        if self.merged:
            self._add_to_weight(host, -1.0)
            self.merged = False

    def _add_to_weight(self, host: nn.Module, sign: float) -> None:
        if self.lora_magnitude_vector is not None:
            self._add_to_weight_dora(host, sign)
            return
        lora_A, lora_B, transposed = self._low_rank()
        delta = (lora_B.float() @ lora_A.float()) * (sign * self.scaling)
        weight = host.weight
        weight.copy_(weight.float() + (delta.t() if transposed else delta))

    def _add_to_weight_dora(self, host: nn.Module, sign: float) -> None:
        """DoRA: W' = k (W + s B A) row-wise (rows of B A: output features), k = m / ||W + s B
        A|| kept while merged to take it back out exactly as it went in."""
        lora_A, lora_B, transposed = self._low_rank()
        weight = host.weight
        base = weight.float()
        base = base.t() if transposed else base
        delta = (lora_B.float() @ lora_A.float()) * self.scaling
        if sign > 0:
            combined = base + delta
            factor = self.lora_magnitude_vector.float() / torch.linalg.norm(combined, dim=1)
            self.dora_factor = factor
            new = combined * factor[:, None]
        else:
            new = base / self.dora_factor[:, None] - delta
            self.dora_factor = None
        weight.copy_(new.t() if transposed else new)

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| of each output feature (row of B A), [out] float32, without forming the
        sum (`ops.dora_weight_norm`), ||W||^2 kept between calls (`BaseRowNorms`).
        Differentiable in A and B where grad mode is on (and in W, if it trains)."""
        lora_A, lora_B, transposed = self._low_rank()
        if torch.is_grad_enabled() and weight.requires_grad:
            base_squared = None
        else:
            base_squared = self.base_row_norms.get(weight, transposed)
        return ops.dora_weight_norm(weight, lora_A, lora_B, self.scaling, transposed, base_squared)

    def on_detach(self, host: nn.Module) -> None:
        self.unmerge(host)

    def _check_not_training_merged(self) -> None:
        lora_A, lora_B, _ = self._low_rank()
        if (
            self.training
            and torch.is_grad_enabled()
            and (lora_A.requires_grad or lora_B.requires_grad)
        ):
            raise RuntimeError(
                "This LoRA delta is merged into its layer's weight, so training it would "
                "change nothing: call unmerge() on the delta model before training (or "
                "model.eval() / torch.no_grad() for inference)"
            )


class LoraDelta(_LowRank, DeltaLayer):
    """LoRA on a linear layer (loralib's vocabulary): y = base(x) + scaling * (drop(x) A^T) B^T.

    lora_A: [r, in_features], kaiming-uniform; lora_B: [out_features, r], zeros, so a fresh
    delta leaves the output unchanged (`init`, PEFT's init_lora_weights: True; "gaussian" draws
    A from N(0, 1/r); False draws B kaiming-uniform too, as nn.Linear would).
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
    It replaces its host's forward so the host's matmul and the delta run as one op.
    `merge(host)` folds scaling * B A into the host's weight for inference (the host then runs
    as a plain linear layer) and `unmerge(host)` takes it back out.
    """

    delta_name = "lora"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        init: bool | str = True,
    ):
        super().__init__()
        self._set_scaling(r, alpha, use_rslora)
        self.dropout = dropout
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        # PiSSA / OLoRA (`initialise_from_weight`): the first A and B, in float32, which the
        # host's weight had subtracted (scaled) while the delta is attached.
        self.register_buffer("lora_A_init", None, persistent=False)
        self.register_buffer("lora_B_init", None, persistent=False)
        # A second LoRA on its layer, whose forward the first one's fused op replaces: it
        # adds its update to that output (forward), in eager PyTorch.
        self.stacked = False
        # DoRA (`use_dora`): the magnitude of each output row, set by `initialise_magnitude`.
        self.register_parameter("lora_magnitude_vector", None)
        self.register_buffer("dora_factor", None, persistent=False)  # while merged
        self.dora_dropout = "peft"
        self.dora_exact_norm = False
        self.base_row_norms = BaseRowNorms()  # the host weight's ||W||^2, kept between forwards

    def initialise_magnitude(
        self, weight: torch.Tensor, dropout_form: str = "peft", exact_norm: bool = False
    ) -> None:
        """Make this a DoRA delta (Liu et al., 2024): a magnitude per output feature, started
        at the row norms of W + scaling * B A (the host's `weight`), which scales the layer's
        output row-wise: y = b + m / ||W + s B A||_row * (x W^T + s drop(x) A^T B^T).
        `dropout_form`: one of DORA_DROPOUT_FORMS; `exact_norm`: the norm's gradient reaches A
        and B (else it is a constant of the backward, as in the paper's section 4.3 and PEFT)."""
        if dropout_form not in DORA_DROPOUT_FORMS:
            raise ValueError(
                f"dropout_form must be one of {DORA_DROPOUT_FORMS}, got {dropout_form!r}"
            )
        self.dora_dropout, self.dora_exact_norm = dropout_form, exact_norm
        with torch.no_grad():
            norm = self._weight_norm(weight)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.dtype))

    def replace_forward(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The host's output with the delta: x: [..., in_features] -> [..., out_features]."""
        if self.merged:
            self._check_not_training_merged()
            weight = host.weight.t() if self.fan_in_fan_out else host.weight
            return F.linear(x, weight, host.bias)
        # Straight from the parameter dictionaries (see layers.base.parameter); a DataParallel
        # replica holds its parameters as attributes.
        own = self._parameters
        if "lora_A" in own:
            lora_A, lora_B = own["lora_A"], own["lora_B"]
            magnitude = own.get("lora_magnitude_vector")
        else:
            lora_A, lora_B, magnitude = self.lora_A, self.lora_B, self.lora_magnitude_vector
        if magnitude is not None:
            return self._dora_forward(host, x)
        return ops.lora_linear(
            x,
            *linear_parameters(host),
            lora_A,
            lora_B,
            self.scaling,
            self.dropout if self.training else 0.0,
            self.fan_in_fan_out,
        )

    def _dora_forward(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """DoRA: b + k (x W^T + s drop(x) A^T B^T), k = m / norm, the norm a constant of the
        backward (the DoRA paper's section 4.3, as in PEFT) unless `dora_exact_norm`. Without
        dropout, or with the "low_rank" dropout form, the fused `ops.dora_linear`; with dropout
        in PEFT's form (the default), eager PyTorch, whose base product takes the dropped input
        too: x W^T + b + (k - 1) drop(x) W^T + k s drop(x) A^T B^T."""
        weight, bias = linear_parameters(host)
        magnitude = self.lora_magnitude_vector
        dropout = self.dropout if self.training else 0.0
        if dropout == 0 or self.dora_dropout == "low_rank":
            with torch.no_grad():
                norm = self._weight_norm(weight)
            return ops.dora_linear(
                x, weight, bias, self.lora_A, self.lora_B, magnitude, self.scaling, dropout,
                self.fan_in_fan_out, norm=norm, exact_norm=self.dora_exact_norm,
            )  # fmt: skip
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.dora_exact_norm):
            norm = self._weight_norm(weight)
        k = (magnitude / norm.to(magnitude.dtype)).to(x.dtype)
        linear_weight = weight.t() if self.fan_in_fan_out else weight
        dropped = F.dropout(x, dropout, True)
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        update = F.linear(F.linear(dropped, lora_A), lora_B) * self.scaling
        base = F.linear(x, linear_weight, bias)
        return base + (k - 1) * F.linear(dropped, linear_weight) + k * update

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """A stacked LoRA's output: the host's `output` plus scaling * (drop(x) A^T) B^T, the
        weights cast to x's dtype."""
        if self.merged:
            self._check_not_training_merged()
            return output
        dropped = F.dropout(x, self.dropout, self.training) if self.dropout else x
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return output + F.linear(F.linear(dropped, lora_A), lora_B) * self.scaling

    def _low_rank(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return self.lora_A, self.lora_B, self.fan_in_fan_out

    @torch.no_grad()
    def initialise_from_weight(self, weight: torch.Tensor, method: str) -> None:
        """PEFT's PiSSA ("pissa", or "pissa_niter_K": K subspace iterations of a randomized
        SVD) or OLoRA ("olora") initialisation from the host's `weight`: A and B from its top
        singular triplets (PiSSA: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T) or from its
        QR factors (OLoRA: B = Q_r, A = R_r), computed in float32. `subtract_initial` then takes
        scaling * B A out of the weight, so the model computes what it did."""
        base = weight.float()
        base = base.t() if self.fan_in_fan_out else base  # [out, in]
        r = self.lora_A.shape[0]
        if method == "olora":
            q, upper = torch.linalg.qr(base)
            lora_A, lora_B = upper[:r], q[:, :r]
        else:
            if method == "pissa":
                u, singular, vh = torch.linalg.svd(base, full_matrices=False)
                u, singular, vh = u[:, :r], singular[:r], vh[:r]
            else:
                iterations = int(method.split("_niter_")[1])
                u, singular, v = torch.svd_lowrank(base, r, niter=iterations)
                vh = v.t()
            root = torch.sqrt(singular / self.scaling)
            lora_A, lora_B = root[:, None] * vh, u * root
        self.lora_A_init, self.lora_B_init = lora_A.contiguous(), lora_B.contiguous()
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)

    @torch.no_grad()
    def subtract_initial(self, host: nn.Module, sign: float = 1.0) -> None:
        """Take scaling * B_0 A_0 out of the host's weight (sign -1: put it back), in float32."""
        if self.lora_A_init is None:
            return
        delta = (self.lora_B_init @ self.lora_A_init) * (sign * self.scaling)
        weight = host.weight
        weight.copy_(weight.float() - (delta.t() if self.fan_in_fan_out else delta))

    def on_detach(self, host: nn.Module) -> None:
        super().on_detach(host)
        self.subtract_initial(host, -1.0)  # the host's own weight again (to float rounding)

    def on_attach(self, host: nn.Module) -> None:
        self.subtract_initial(host)

    def backend_name(self) -> str:
        if self.merged:
            return "merged"
        if self.stacked and not self.__dict__.get(RUNS_IN_PLACE):
            return "eager (stacked on another LoRA)"
        dora = self.lora_magnitude_vector is not None
        if dora and self.dropout and self.dora_dropout == "peft":
            return "eager (DoRA with dropout)"
        (out_features, rank), in_features = self.lora_B.shape, self.lora_A.shape[1]
        return ops.backend_description(
            "dora" if dora else "lora",
            self.lora_A.device,
            self.lora_A.dtype,
            in_features=in_features,
            out_features=out_features,
            rank=rank,
        )

    def extra_repr(self) -> str:
        out_features, r = self.lora_B.shape
        return (
            f"in_features={self.lora_A.shape[1]}, out_features={out_features}, r={r}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}"
            + (", merged" if self.merged else "")
        )


class LoraEmbeddingDelta(_LowRank, DeltaLayer):
    """LoRA on an nn.Embedding, as PEFT computes it: y = embed(ids) + scaling *
    A^T[ids] B^T, the lookup in A^T taking the host's padding_idx, max_norm and other options,
    and an `embed_scale` the host multiplies its output by (Gemma 3) applied to the update too.

    lora_embedding_A: [r, num_embeddings], lora_embedding_B: [embedding_dim, r] (PEFT's names
    and layout). PEFT's initialisations: True and "gaussian" give A zeros and B ~ N(0, 1), so a
    fresh delta changes nothing; False, both N(0, 1). PEFT applies no dropout to it, nor does
    this. The lookup and the [..., r] x [r, dim] product are PyTorch's own (an embedding
    layer's update is a gather, not a GEMM to fuse).
    DoRA (`initialise_magnitude`): lora_magnitude_vector [embedding_dim] scales each column of
    the looked-up rows, as PEFT's DoraEmbeddingLayer does (see `_dora_scale`).
    """

    delta_name = "lora"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int,
        alpha: float,
        use_rslora: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        init: bool | str = True,
    ):
        super().__init__()
        self._set_scaling(r, alpha, use_rslora)
        factory = {"device": device, "dtype": dtype}
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, **factory))
        nn.init.normal_(self.lora_embedding_B)
        if init is False:
            nn.init.normal_(self.lora_embedding_A)
        # DoRA (`use_dora`): the magnitude of each embedding column, set by
        # `initialise_magnitude`.
        self.register_parameter("lora_magnitude_vector", None)
        self.register_buffer("dora_factor", None, persistent=False)  # while merged
        self.dora_exact_norm = False
        self.base_row_norms = BaseRowNorms()  # the table's column ||W||^2, kept between forwards

    def initialise_magnitude(self, weight: torch.Tensor, exact_norm: bool = False) -> None:
        """Make this a DoRA delta, as PEFT's DoraEmbeddingLayer: a magnitude per embedding
        column (output feature), started at the norms of the columns of the host's `weight` +
        scaling * (B A)^T ([num_embeddings, dim]: each norm runs over the vocabulary).
        `exact_norm`: the norm's gradient reaches A and B (else it is a constant of the
        backward, as in the DoRA paper's section 4.3 and PEFT)."""
        self.dora_exact_norm = exact_norm
        with torch.no_grad():
            norm = self._weight_norm(weight)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_embedding_A.dtype))

    def replace_forward(self, host: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The host's output (its own class's forward, embed_scale included) plus the update;
        with DoRA, k * output + k * update, k = `_dora_scale`."""
        output = original_class(host).forward(host, ids)
        if self.merged:
            self._check_not_training_merged()
            return output
        # Before the lookup, as PEFT: a host with max_norm renormalises A's looked-up columns.
        dora_scale = self._dora_scale(host) if self.lora_magnitude_vector is not None else None
        after_A = F.embedding(
            ids,
            self.lora_embedding_A.t(),
            padding_idx=host.padding_idx,
            max_norm=host.max_norm,
            norm_type=host.norm_type,
            scale_grad_by_freq=host.scale_grad_by_freq,
            sparse=host.sparse,
        )
        update = after_A @ self.lora_embedding_B.t()
        # PEFT's order of operations (k first), so that the outputs agree to the last bit.
        update = (update if dora_scale is None else dora_scale * update) * self.scaling
        embed_scale = getattr(host, "embed_scale", None)
        if embed_scale is not None:
            update = update * torch.as_tensor(embed_scale, device=update.device).to(update.dtype)
        if dora_scale is None:
            return output + update.to(output.dtype)
        return (dora_scale * output + update).to(output.dtype)

    def _dora_scale(self, host: nn.Module) -> torch.Tensor:
        """k = m / ||W + s (B A)^T||, [embedding_dim]: the norm of each column of the table with
        the update, over the vocabulary (PEFT's DoraEmbeddingLayer, which forms the [dim,
        num_embeddings] sum; `_weight_norm` does not), a constant of the backward unless
        `dora_exact_norm`. It scales the host's output (embed_scale included) and the update."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.dora_exact_norm):
            norm = self._weight_norm(host.weight)
        magnitude = self.lora_magnitude_vector
        return magnitude / norm.to(magnitude.dtype)

    def _low_rank(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        # The embedding table is [num_embeddings, dim]: it holds (B A)^T.
        return self.lora_embedding_A, self.lora_embedding_B, True

    def backend_name(self) -> str:
        if self.merged:
            return "merged"
        dora = self.lora_magnitude_vector is not None
        return f"torch ({'DoRA ' if dora else ''}embedding lookup)"

    def extra_repr(self) -> str:
        dim, r = self.lora_embedding_B.shape
        return (
            f"num_embeddings={self.lora_embedding_A.shape[1]}, embedding_dim={dim}, r={r}, "
            f"scaling={self.scaling:g}" + (", merged" if self.merged else "")
        )
