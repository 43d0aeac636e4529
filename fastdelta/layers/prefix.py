"""Prefix tuning's deltas: the learned key/value prefix of one attention layer, and the shared
network that generates every layer's prefix when it is reparameterized (Li & Liang, 2021).

The layout and names are OpenDelta 0.3.2's (opendelta/delta_models/prefix.py): a layer's prefix
is `past_key` and `past_value`, each [prefix_token_num, key_value_heads * head_dim] with head h
in columns h * head_dim ... (h + 1) * head_dim. Reparameterized, the layers hold no parameters:
`reparams` (on the first modified module) maps an embedding of the prefix positions through an
MLP, `control_trans(wte)`, to [prefix_token_num, sum over layers of 2 * width], layer i's key
then value in consecutive column blocks, in the order the layers come in the model.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdelta.layers.base import DeltaLayer

# Where a PrefixDelta keeps the shared reparameterization it reads (in __dict__, not as a child:
# the reparameterization is a child of the first modified module, and one module has one parent).
REPARAMETERIZATION = "_fastdelta_reparameterization"


class PrefixReparameterization(DeltaLayer):
    """OpenDelta's ReparameterizeFunction: control_trans(wte.weight), control_trans being
    Linear(embed_dim, mid_dim), Tanh, Linear(mid_dim, sum of 2 * widths), gives every layer's
    key and value prefix [prefix_token_num, width] at once; layer i's is read by `key_value(i)`."""

    delta_name = "reparams"

    def __init__(
        self,
        prefix_token_num: int,
        embed_dim: int,
        mid_dim: int,
        widths: list[int],
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.widths = list(widths)
        # Column where each layer's key block starts; its value block follows it.
        self.offsets = [2 * sum(self.widths[:index]) for index in range(len(self.widths))]
        self.wte = nn.Embedding(prefix_token_num, embed_dim, **factory)
        self.control_trans = nn.Sequential(
            nn.Linear(embed_dim, mid_dim, **factory),
            nn.Tanh(),
            nn.Linear(mid_dim, 2 * sum(self.widths), **factory),
        )

    def key_value(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s key and value prefixes, each [prefix_token_num, width]. OpenDelta's
        input_tokens are arange(prefix_token_num), so wte(input_tokens) is wte.weight. Only the
        layer's rows of the last Linear are multiplied: the hidden [prefix_token_num, mid_dim],
        computed again per layer, costs prefix_token_num * embed_dim * mid_dim multiply-adds,
        less than a layer's share of the last Linear."""
        project, activation, expand = self.control_trans
        hidden = activation(project(self.wte.weight))
        width, start = self.widths[index], self.offsets[index]
        rows = slice(start, start + 2 * width)
        key_value = nn.functional.linear(hidden, expand.weight[rows], expand.bias[rows])
        return key_value[:, :width], key_value[:, width:]


class PrefixDelta(DeltaLayer):
    """The key and value prefix of one attention layer: `key_value_heads` heads of `head_dim`
    features over `prefix_token_num` positions. It holds `past_key` and `past_value` (OpenDelta
    initialises them with torch.randn), or, reparameterized, reads them from the shared
    `PrefixReparameterization` (`use_reparameterization`) and holds no parameter itself."""

    delta_name = "prefix"

    def __init__(
        self,
        prefix_token_num: int,
        key_value_heads: int,
        head_dim: int,
        reparameterize: bool,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.prefix_token_num = prefix_token_num
        self.key_value_heads = key_value_heads
        self.head_dim = head_dim
        self.layer_index: int | None = None
        if not reparameterize:
            shape = (prefix_token_num, key_value_heads * head_dim)
            self.past_key = nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
            self.past_value = nn.Parameter(torch.randn(shape, device=device, dtype=dtype))

    @property
    def width(self) -> int:
        return self.key_value_heads * self.head_dim

    def use_reparameterization(self, reparameterization: PrefixReparameterization, index: int):
        """Read this layer's prefix as layer `index` of `reparameterization`."""
        self.__dict__[REPARAMETERIZATION] = reparameterization
        self.layer_index = index

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value prefix, each [prefix_token_num, key_value_heads * head_dim]."""
        reparameterization = self.__dict__.get(REPARAMETERIZATION)
        if reparameterization is not None:
            return reparameterization.key_value(self.layer_index)
        return self.past_key, self.past_value

    def prefix_states(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value prefix as attention takes them: [batch, key_value_heads,
        prefix_token_num, head_dim] each (a broadcast view over the batch), in `dtype`."""
        heads, length, features = self.key_value_heads, self.prefix_token_num, self.head_dim
        key, value = (
            states.to(dtype).view(length, heads, features).transpose(0, 1)
            for states in self.key_value()
        )
        return key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
