"""torch.inference_mode through every delta model and the ops: outputs equal torch.no_grad's.

Tensors made under inference mode have no Autograd dispatch key, so an op registered for the
Autograd key alone (the cpp backend's differentiable ops once were) has no kernel for them.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import first_output, tiny_inputs, tiny_model
from torch import nn

import fastdelta
from fastdelta import AdapterModel, LoraModel, ParallelAdapterModel, ops

BACKENDS = ("torch", "cpp")
# A parallel adapter from the input of tiny BERT's first intermediate layer to its FFN output.
SPANNING_PAIR = ["layer.0.intermediate.dense", "layer.0.output.dense"]


DELTA_MODELS = {
    "lora": lambda m: LoraModel(m, lora_r=4, modified_modules=["query", "value"]),
    "dora": lambda m: LoraModel(m, lora_r=4, use_dora=True, modified_modules=["query"]),
    "adapter": lambda m: AdapterModel(m, bottleneck_dim=4, modified_modules=["output.dense"]),
    "parallel_adapter": lambda m: ParallelAdapterModel(
        m, bottleneck_dim=4, modified_modules=SPANNING_PAIR
    ),
    "bitfit": lambda m: fastdelta.BitFitModel(m),
    "prefix": lambda m: fastdelta.PrefixModel(m, prefix_token_num=3),
    "compacter": lambda m: fastdelta.CompacterModel(
        m, reduction_factor=3, modified_modules=["output.dense"]
    ),
    "soft_prompt": lambda m: fastdelta.SoftPromptModel(m, soft_token_num=3),
    "low_rank_adapter": lambda m: fastdelta.LowRankAdapterModel(
        m, reduction_factor=4, modified_modules=["output.dense"]
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(DELTA_MODELS))
def test_delta_models_under_inference_mode(use_backend, backend, kind):
    use_backend(backend)
    model = tiny_model("bert")
    DELTA_MODELS[kind](model)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = first_output(model(**inputs))
    with torch.inference_mode():
        got = first_output(model(**inputs))
    torch.testing.assert_close(got, expected)


def test_a_mixed_batch_under_inference_mode(use_backend):
    use_backend("cpp")
    model = tiny_model("bert")
    for name in ("a", "b"):
        LoraModel(model, lora_r=4, modified_modules=["query"], name=name)
        for delta in model.modules():
            if hasattr(delta, "lora_B"):
                nn.init.normal_(delta.lora_B, std=0.2)
    inputs = tiny_inputs("bert", batch=3)
    with torch.no_grad(), fastdelta.adapter_ids(model, ["a", None, "b"]):
        expected = first_output(model(**inputs))
    with torch.inference_mode(), fastdelta.adapter_ids(model, ["a", None, "b"]):
        got = first_output(model(**inputs))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dropout", (0.0, 0.2))
def test_the_cpp_ops_under_inference_mode(use_backend, dropout):
    use_backend("cpp")
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 8, generator=generator), torch.randn(6, 8, generator=generator)
    lora_A, lora_B = torch.randn(2, 8, generator=generator), torch.randn(6, 2, generator=generator)
    adapter = (torch.randn(3, 6), torch.randn(3), torch.randn(6, 3), torch.randn(6))
    h = torch.randn(3, 6)
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        torch.manual_seed(5)
        with mode():
            results.append((
                ops.lora_linear(x, weight, None, lora_A, lora_B, 2.0, dropout),
                ops.adapter_bottleneck(h, *adapter, 1.0, "relu"),
            ))  # fmt: skip
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)
