"""DoRA (LoraModel(use_dora=True)): the same outputs and gradients as PEFT's DoRA and as an
fp64 reference that forms W + s B A, with and without dropout, on Linear and Conv1D layers;
merge / unmerge; PEFT DoRA adapters load and exports load in PEFT.

The fused op `fastdelta::dora_linear` (`ops.dora_linear`) on every backend (triton through the
interpreter) against `reference.dora_linear` in float64, output and every gradient, by the LoRA
op tests' accuracy rule (tests/test_lora_op.py); its dropout mask, what it saves, opcheck and
torch.compile; and the layer's options: dora_dropout ("peft" / "low_rank"), dora_exact_norm,
the kept ||W||^2.
"""

from __future__ import annotations

import copy
import json
import pickle

import peft
import pytest
import torch
import torch.nn.functional as F
from test_lora_op import BACKENDS, FLOAT64_BACKENDS, assert_accurate, make_inputs
from tiny_models import tiny_inputs, tiny_model
from torch import nn

from fastdelta import AutoDeltaConfig, AutoDeltaModel, LoraModel, ops
from fastdelta.ops import reference
from fastdelta.ops.backend import backend_module

RANK, ALPHA = 4, 8


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 6))


def both(dropout: float = 0.0, model: nn.Module | None = None, targets=("0", "2")):
    """(fastdelta's delta model, PEFT's model) of DoRA on copies of one base, with the same
    random A, B and magnitude."""
    model = base_model() if model is None else model
    theirs = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(
            target_modules=list(targets), r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
            use_dora=True,
        ),
    )  # fmt: skip
    ours = LoraModel(
        model, modified_modules=list(targets), lora_r=RANK, lora_alpha=ALPHA,
        lora_dropout=dropout, use_dora=True,
    )  # fmt: skip
    ours.freeze_module()
    torch.manual_seed(1)
    with torch.no_grad():
        for attachment in ours.attachments:
            delta = attachment.delta
            peft_layer = theirs.base_model.model.get_submodule(attachment.host_name)
            for parameter in (delta.lora_A, delta.lora_B):
                parameter.normal_(0, 0.2)
            delta.lora_magnitude_vector.mul_(
                1 + 0.1 * torch.randn_like(delta.lora_magnitude_vector)
            )
            peft_layer.lora_A["default"].weight.copy_(delta.lora_A)
            peft_layer.lora_B["default"].weight.copy_(delta.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(delta.lora_magnitude_vector)
    return ours, theirs


def dora_parameters(delta_model) -> list[nn.Parameter]:
    return [
        p
        for a in delta_model.attachments
        for p in (a.delta.lora_A, a.delta.lora_B, a.delta.lora_magnitude_vector)
    ]


def peft_parameters(model, hosts) -> list[nn.Parameter]:
    layers = [model.base_model.model.get_submodule(host) for host in hosts]
    return [
        p
        for layer in layers
        for p in (
            layer.lora_A["default"].weight,
            layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight,
        )
    ]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_outputs_and_every_gradient_equal_peft_s(dropout):
    ours, theirs = both(dropout)
    hosts = [a.host_name for a in ours.attachments]
    x = torch.randn(5, 20, requires_grad=True)
    x_peft = x.detach().clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout mask: both draw it with one F.dropout on x
    y = ours.backbone_model(x)
    torch.manual_seed(7)
    y_peft = theirs(x_peft)
    torch.testing.assert_close(y, y_peft)
    grad = torch.randn_like(y)
    mine = torch.autograd.grad(y, [x, *dora_parameters(ours)], grad)
    reference = torch.autograd.grad(y_peft, [x_peft, *peft_parameters(theirs, hosts)], grad)
    for a, b in zip(mine, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_equals_an_fp64_dora_that_forms_w_plus_s_b_a():
    ours, _ = both()
    layer = ours.backbone_model[0]
    delta = layer.lora
    x = torch.randn(7, 20, dtype=torch.float64)
    weight = layer.weight.double()
    combined = weight + (ALPHA / RANK) * delta.lora_B.double() @ delta.lora_A.double()
    k = delta.lora_magnitude_vector.double() / torch.linalg.norm(combined, dim=1)
    expected = (x @ combined.t()) * k + layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), expected, rtol=1e-5, atol=1e-5)


def test_a_fresh_dora_delta_changes_nothing():
    model = base_model()
    x = torch.randn(3, 20)
    expected = model(x)
    LoraModel(model, modified_modules=["0", "2"], lora_r=RANK, use_dora=True)
    torch.testing.assert_close(model(x), expected)


def test_dora_on_gpt2_s_conv1d_equals_peft_s():
    model = tiny_model("gpt2")
    ours, theirs = both(model=model, targets=("c_attn", "c_fc"))
    inputs = tiny_inputs("gpt2")
    torch.testing.assert_close(
        ours.backbone_model(**inputs).last_hidden_state, theirs(**inputs).last_hidden_state
    )


def test_merge_and_unmerge():
    ours, _ = both()
    model = ours.backbone_model
    x = torch.randn(4, 20)
    weights = [model[i].weight.detach().clone() for i in (0, 2)]
    with torch.no_grad():
        expected = model(x)
        ours.merge()
        torch.testing.assert_close(model(x), expected)
        ours.unmerge()
    for index, weight in zip((0, 2), weights, strict=True):
        torch.testing.assert_close(model[index].weight, weight)


def test_peft_dora_adapters_load_and_exports_load_in_peft(tmp_path):
    ours, theirs = both()
    pristine = base_model()
    x = torch.randn(4, 20)
    expected = ours.backbone_model(x)
    ours.save_finetuned(tmp_path / "ours", format="peft")
    torch.testing.assert_close(
        peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "ours")(x), expected
    )
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "theirs", copy.deepcopy(pristine))
    assert loaded.config.use_dora
    torch.testing.assert_close(loaded.backbone_model(x), expected)
    ours.save_finetuned(tmp_path / "fastdelta")
    again = AutoDeltaModel.from_finetuned(tmp_path / "fastdelta", copy.deepcopy(pristine))
    torch.testing.assert_close(again.backbone_model(x), expected)


def test_dora_stacked_on_another_lora_is_refused():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6))
    LoraModel(model, modified_modules=["1"], lora_r=2)
    with pytest.raises(ValueError, match="takes a layer of its own"):
        LoraModel(model, modified_modules=["1"], lora_r=2, use_dora=True)


def test_dora_with_a_base_changing_initialisation_is_refused():
    with pytest.raises(ValueError, match="use_dora with init_lora_weights='pissa'"):
        LoraModel(base_model(), modified_modules=["0"], use_dora=True, init_lora_weights="pissa")


# --------------------------------------------------------------------------------------------
# The fused op against the float64 reference.

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
SCALING = 1.5
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")
P = 0.3


def dora_inputs(shape, k, n, r, dtype, *, bias=True, fan_in_fan_out=False, seed=0):
    """make_inputs' (test_lora_op.py) tensors and a magnitude near 1, rounded to `dtype`."""
    inputs, grad_out = make_inputs(
        shape, k, n, r, dtype, bias=bias, fan_in_fan_out=fan_in_fan_out, seed=seed
    )
    generator = torch.Generator().manual_seed(seed + 1000)
    magnitude = 1 + 0.2 * torch.randn(n, generator=generator, dtype=F64)
    inputs["magnitude"] = magnitude.to(dtype)
    return inputs, grad_out


def exact_norm_of(inputs, fan_in_fan_out):
    """||W + s B A|| per row, computed in float64 from the (rounded) inputs, in the op's norm
    dtype (float32, float64 for float64)."""
    weight, lora_A, lora_B = (inputs[name].double() for name in ("weight", "lora_A", "lora_B"))
    base = weight.t() if fan_in_fan_out else weight
    norm = torch.linalg.vector_norm(base + SCALING * (lora_B @ lora_A), dim=1)
    return norm.to(torch.promote_types(inputs["x"].dtype, F32))


def run(fn, inputs, trainable, grad_out, dtype=None):
    """y and the gradients of fn(**leaves), the leaves fresh copies of `inputs` (cast to `dtype`
    when given), those in `trainable` requiring grad."""
    leaves = {
        name: None
        if tensor is None
        else tensor.detach().to(dtype or tensor.dtype).clone().requires_grad_(name in trainable)
        for name, tensor in inputs.items()
    }
    y = fn(**leaves)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), {name: None if leaf is None else leaf.grad for name, leaf in leaves.items()}


def check_dora(
    inputs, grad_out, dtype, trainable=NAMES, *, fan_in_fan_out=False, dropout_p=0.0,
    seed=None, keep_mask=None, exact_norm=False, given_norm=True, dora_linear=None,
):  # fmt: skip
    """`dora_linear` (ops.dora_linear by default, on the backend set) against
    reference.dora_linear in float64 (and, for the tolerance, in `dtype`): output and the
    gradients of `trainable`; frozen tensors get none."""
    dora_linear = dora_linear or ops.dora_linear
    norm = exact_norm_of(inputs, fan_in_fan_out) if given_norm else None

    def fast(x, weight, bias, lora_A, lora_B, magnitude):
        return dora_linear(
            x, weight, bias, lora_A, lora_B, magnitude, SCALING, dropout_p, fan_in_fan_out, seed,
            norm=norm, exact_norm=exact_norm,
        )  # fmt: skip

    def oracle(x, weight, bias, lora_A, lora_B, magnitude):
        return reference.dora_linear(
            x, weight, bias, lora_A, lora_B, magnitude, SCALING, dropout_p, fan_in_fan_out,
            keep_mask, exact_norm,
        )  # fmt: skip

    y, grads = run(fast, inputs, trainable, grad_out)
    y64, grads64 = run(oracle, inputs, trainable, grad_out, dtype=F64)
    if dtype == F64:
        results = [("output", y, y64)]
        results += [
            (f"grad of {n}", grads[n], grads64[n]) for n in trainable if inputs[n] is not None
        ]
        for what, got, expected in results:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=what)
    else:
        y_eager, grads_eager = run(oracle, inputs, trainable, grad_out)
        assert_accurate("output", y, y64, y_eager, dtype)
        for name in trainable:
            if inputs[name] is not None:
                got, eager = grads[name], grads_eager[name]
                assert_accurate(f"grad of {name}", got, grads64[name], eager, dtype)
    for name in set(NAMES) - set(trainable):
        assert grads[name] is None, f"{name} is frozen but got a gradient"


def keep_mask_of(backend_name, shape, p=P, seed=4242):
    seed = torch.tensor(seed, dtype=torch.int64)
    return seed, backend_module(backend_name).dropout_keep_mask(seed, tuple(shape), p)


# (x's leading shape, K, N, r, dtype, bias, fan_in_fan_out, dropout, exact_norm, trainable base):
# odd sizes, a 3-D x, both layouts, each dtype with and without dropout and exact_norm.
OP_CASES = [
    (7, 13, 9, 3, F32, True, False, False, False, False),
    (7, 13, 9, 3, F32, True, True, True, True, True),
    ((2, 5), 13, 9, 3, F32, False, True, False, True, False),
    ((3, 4), 20, 17, 4, BF16, True, False, True, False, False),
    (7, 13, 9, 3, BF16, False, True, False, True, True),
    (33, 16, 24, 4, F16, True, False, True, True, False),
]


def op_case_id(case):
    shape, k, n, r, dtype, bias, fan_in_fan_out, dropout, exact_norm, train_base = case
    rows = "x".join(map(str, shape)) if isinstance(shape, tuple) else str(shape)
    return "-".join(
        [
            f"M{rows}K{k}N{n}r{r}", str(dtype).removeprefix("torch."),
            "bias" if bias else "nobias", "conv1d" if fan_in_fan_out else "linear",
            "dropout" if dropout else "nodropout", "exact" if exact_norm else "constnorm",
            "trainbase" if train_base else "frozenbase",
        ]
    )  # fmt: skip


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", OP_CASES, ids=op_case_id)
def test_the_op_matches_the_float64_reference(use_backend, backend_name, case):
    use_backend(backend_name)
    shape, k, n, r, dtype, bias, fan_in_fan_out, dropout, exact_norm, train_base = case
    inputs, grad_out = dora_inputs(shape, k, n, r, dtype, bias=bias, fan_in_fan_out=fan_in_fan_out)
    seed = keep_mask = None
    if dropout:
        seed, keep_mask = keep_mask_of(backend_name, inputs["x"].shape)
    check_dora(
        inputs, grad_out, dtype, NAMES if train_base else ("x", "lora_A", "lora_B", "magnitude"),
        fan_in_fan_out=fan_in_fan_out, dropout_p=P if dropout else 0.0, seed=seed,
        keep_mask=keep_mask, exact_norm=exact_norm,
    )  # fmt: skip


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
@pytest.mark.parametrize("exact_norm", [False, True], ids=["constnorm", "exact"])
def test_float64_is_exact(use_backend, backend_name, exact_norm):
    """The torch and cpp backends in float64, dropout on, the norm computed by the op itself:
    every gradient to float64 precision, the norm's own included."""
    use_backend(backend_name)
    inputs, grad_out = dora_inputs((3, 5), 13, 9, 3, F64, fan_in_fan_out=True)
    seed, keep_mask = keep_mask_of(backend_name, inputs["x"].shape)
    check_dora(
        inputs, grad_out, F64, fan_in_fan_out=True, dropout_p=P, seed=seed, keep_mask=keep_mask,
        exact_norm=exact_norm, given_norm=False,
    )  # fmt: skip


def test_the_norm_gradient_is_autograd_s_through_w_plus_s_b_a():
    """exact_norm's closed forms (dB, dA and dW through the norm, without forming W + s B A)
    against autograd of the float64 reference that forms it, on the norm's term alone: the
    difference of the exact and the constant-norm gradients."""
    inputs, grad_out = dora_inputs(6, 11, 7, 3, F64)
    exact = run(
        lambda **t: ops.dora_linear(**t, scaling=SCALING, exact_norm=True),
        inputs, NAMES, grad_out,
    )[1]  # fmt: skip
    constant = run(lambda **t: ops.dora_linear(**t, scaling=SCALING), inputs, NAMES, grad_out)[1]

    def norm_term(**t):
        """The loss through the norm only: (m / ||V||) (x) . z, the z held fixed."""
        base = t["weight"] + SCALING * (t["lora_B"] @ t["lora_A"])
        z = reference.lora_linear(
            *(inputs[n] for n in ("x", "weight")), None, inputs["lora_A"], inputs["lora_B"], SCALING
        )
        return z * (t["magnitude"].detach() / torch.linalg.vector_norm(base, dim=1))

    through_norm = run(norm_term, inputs, ("weight", "lora_A", "lora_B"), grad_out)[1]
    for name in ("weight", "lora_A", "lora_B"):
        torch.testing.assert_close(exact[name] - constant[name], through_norm[name])
    assert not torch.allclose(exact["lora_A"], constant["lora_A"])


# Paths of the triton forward: fused with the scale in the GEMM's epilogue (one launch for
# decode-sized x with K and N multiples of 16, two elsewhere) and composed (cuBLAS's x W^T,
# then the low-rank pass scales); z kept or not.
TRITON_PATHS = [
    ("fused", 33, 20, 24, True),
    ("fused", 4, 32, 48, True),
    ("fused", 7, 13, 9, False),
    ("composed", 7, 13, 9, True),
]


@pytest.mark.parametrize(
    "path, m, k, n, train_magnitude", TRITON_PATHS, ids=lambda v: str(v).lower()
)
def test_every_triton_path(use_backend, path, m, k, n, train_magnitude):
    use_backend("triton")
    from fastdelta.kernels import dispatch

    inputs, grad_out = dora_inputs(m, k, n, 4, BF16, seed=5)
    seed, keep_mask = keep_mask_of("triton", inputs["x"].shape)
    trainable = ("x", "lora_A", "lora_B", "bias") + (("magnitude",) if train_magnitude else ())
    with dispatch.force_path(path):
        check_dora(inputs, grad_out, BF16, trainable, dropout_p=P, seed=seed, keep_mask=keep_mask)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_the_dropout_mask_is_the_lora_op_s(use_backend, backend_name):
    """The same seed drops the same elements in the DoRA op as in the LoRA op: their xa agree."""
    use_backend(backend_name)
    inputs, _ = dora_inputs((2, 9), 20, 12, 4, F32, seed=6)
    seed = torch.tensor(777, dtype=torch.int64)
    x, weight, bias, lora_A, lora_B, magnitude = inputs.values()
    norm = exact_norm_of(inputs, False)
    _, xa_lora = torch.ops.fastdelta.lora_linear(
        x, weight, bias, lora_A, lora_B, seed, SCALING, P, False, backend_name
    )
    _, xa_dora, _ = torch.ops.fastdelta.dora_linear(
        x, weight, bias, lora_A, lora_B, magnitude, norm, seed, SCALING, P, False, False, False,
        backend_name,
    )  # fmt: skip
    assert torch.equal(xa_dora, xa_lora)
    keep_mask = backend_module(backend_name).dropout_keep_mask(seed, tuple(x.shape), P)
    assert 0 < keep_mask.sum() < keep_mask.numel()
    dropped = reference.dora_linear(
        x, weight, bias, lora_A, lora_B, magnitude, SCALING, P, False, keep_mask
    )
    y = ops.dora_linear(
        x, weight, bias, lora_A, lora_B, magnitude, SCALING, P, seed=seed, norm=norm
    )
    torch.testing.assert_close(y, dropped, rtol=1e-5, atol=1e-5)


def saved_for_backward(function):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return saved, result


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "train_magnitude, exact_norm", [(False, False), (True, False), (False, True)],
    ids=["frozen_magnitude", "trained_magnitude", "exact_norm"],
)  # fmt: skip
def test_z_is_saved_only_when_a_gradient_needs_it(
    use_backend, backend_name, train_magnitude, exact_norm
):
    """What the LoRA op saves, plus the magnitude and the norm; and one [M, N] tensor, z, only
    where the magnitude (or, with exact_norm, the norm) needs a gradient."""
    use_backend(backend_name)
    m, n = 6, 11
    inputs, grad_out = dora_inputs(m, 10, n, 3, F32, seed=7)
    trainable = ("x", "lora_A", "lora_B") + (("magnitude",) if train_magnitude else ())
    leaves = {k: v.requires_grad_(k in trainable) for k, v in inputs.items()}
    saved, y = saved_for_backward(
        lambda: ops.dora_linear(**leaves, scaling=SCALING, exact_norm=exact_norm)
    )
    outputs_sized = [t for t in saved if t.numel() == m * n]
    assert len(outputs_sized) == (1 if train_magnitude or exact_norm else 0)
    assert all(t.dtype == F32 for t in outputs_sized)
    y.backward(grad_out)
    assert all(leaves[name].grad is not None for name in trainable)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "bias, dropout, fan_in_fan_out, exact_norm, keep_z",
    [(True, True, True, True, True), (False, False, False, False, False)],
    ids=["all_flags", "no_flags"],
)
def test_opcheck(use_backend, backend_name, bias, dropout, fan_in_fan_out, exact_norm, keep_z):
    use_backend(backend_name)
    inputs, grad_out = dora_inputs(5, 8, 6, 2, F32, bias=bias, fan_in_fan_out=fan_in_fan_out)
    norm = exact_norm_of(inputs, fan_in_fan_out)
    trainable = NAMES if keep_z else ("x", "weight", "bias", "lora_A", "lora_B")
    tensors = [None if t is None else t.requires_grad_(n in trainable) for n, t in inputs.items()]
    seed = torch.tensor(11, dtype=torch.int64) if dropout else None
    p = 0.2 if dropout else 0.0
    flags = (SCALING, p, fan_in_fan_out, exact_norm, keep_z, backend_name)
    torch.library.opcheck(
        torch.ops.fastdelta.dora_linear.default, (*tensors[:6], norm, seed, *flags)
    )
    x, weight, _, lora_A, lora_B, magnitude = (None if t is None else t.detach() for t in tensors)
    _, xa, z = torch.ops.fastdelta.dora_linear(
        x, weight, None, lora_A, lora_B, magnitude, norm, seed, *flags
    )
    arguments = (
        grad_out, x, weight, lora_A, lora_B, magnitude, norm, xa, z if keep_z else None, seed,
        SCALING, p, fan_in_fan_out, exact_norm, bias, backend_name, True, True, bias, True, True,
        keep_z,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.fastdelta.dora_linear_backward.default, arguments)


class DoraLinear(nn.Module):
    def __init__(self, k=16, n=12, r=4):
        super().__init__()
        inputs, _ = dora_inputs(1, k, n, r, F32, seed=12)
        for name in ("weight", "bias", "lora_A", "lora_B", "magnitude"):
            setattr(self, name, nn.Parameter(inputs[name]))

    def forward(self, x, seed=None):
        return ops.dora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude, SCALING, 0.25,
            seed=seed, exact_norm=True,
        )  # fmt: skip


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(use_backend, backend_name):
    use_backend(backend_name)
    torch._dynamo.reset()
    module = DoraLinear()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(13))
    seed = torch.tensor(42, dtype=torch.int64)

    def forward_backward(function):
        module.zero_grad()
        leaf = x.clone().requires_grad_()
        y = function(leaf, seed)
        y.square().sum().backward()
        return [y.detach(), leaf.grad, *(p.grad.clone() for p in module.parameters())]

    got = forward_backward(torch.compile(module, fullgraph=True))
    for g, e in zip(got, forward_backward(module), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


ARGUMENT_ERRORS = {
    "magnitude_shape": ({"magnitude": torch.ones(5)}, r"magnitude \(5,\) must be \[4\]"),
    "norm_shape": ({"norm": torch.ones(4, 1)}, r"norm \(4, 1\) must be \[4\]"),
    "x_features": ({"x": torch.randn(3, 6)}, r"x has 6 features .*takes 5"),
    "dropout": ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
}


@pytest.mark.parametrize("problem", sorted(ARGUMENT_ERRORS))
def test_bad_arguments_raise_a_value_error_naming_them(problem):
    changes, message = ARGUMENT_ERRORS[problem]
    arguments = {
        "x": torch.randn(3, 5), "weight": torch.randn(4, 5), "bias": torch.randn(4),
        "lora_A": torch.randn(2, 5), "lora_B": torch.randn(4, 2), "magnitude": torch.ones(4),
        "scaling": 1.0,
    } | changes  # fmt: skip
    with pytest.raises(ValueError, match=r"^fastdelta\.ops\.dora_linear: .*" + message):
        ops.dora_linear(**arguments)


def test_a_magnitude_gradient_without_z_is_refused():
    """The op keeps z only when told (keep_z); a backward that needs it without says so."""
    inputs, grad_out = dora_inputs(4, 6, 5, 2, F32)
    tensors = [t.requires_grad_() for t in inputs.values()]
    norm = exact_norm_of(inputs, False)
    y, _, _ = torch.ops.fastdelta.dora_linear(
        *tensors, norm, None, SCALING, 0.0, False, False, False, "torch"
    )
    with pytest.raises(RuntimeError, match="keep_z=True"):
        y.backward(grad_out)


# --------------------------------------------------------------------------------------------
# The layer's options.


def regression_base() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def regression_model(dora_dropout: str, **options):
    model = regression_base()
    delta_model = LoraModel(
        model, modified_modules=["0", "2"], lora_r=4, lora_dropout=0.2, use_dora=True,
        dora_dropout=dora_dropout, **options,
    )  # fmt: skip
    delta_model.freeze_module()
    return model, delta_model


@pytest.mark.parametrize("options", [{}, {"dora_exact_norm": True}], ids=["constnorm", "exact"])
def test_the_low_rank_dropout_form_trains(options):
    model, delta_model = regression_model("low_rank", **options)
    assert set(delta_model.backends()) != {"eager (DoRA with dropout)"}
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(64, 16, generator=generator)
    target = torch.randn(64, 4, generator=generator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_low_rank_form_drops_the_low_rank_path_only():
    """With B = 0 the low-rank form's output in training is the base layer's, scaled by k = 1:
    the base product sees the whole x (PEFT's form would not)."""
    model, _ = regression_model("low_rank")
    model.train()
    x = torch.randn(8, 16)
    expected = model[2](torch.tanh(F.linear(x, model[0].weight, model[0].bias)))
    torch.testing.assert_close(model(x), expected)


def test_the_peft_form_is_the_default_and_equals_peft_s_with_exact_norm_off():
    """test_outputs_and_every_gradient_equal_peft_s runs the default; it is "peft"."""
    ours, _ = both(0.3)
    assert ours.config.dora_dropout == "peft" and not ours.config.dora_exact_norm
    assert all(a.delta.dora_dropout == "peft" for a in ours.attachments)


def test_the_peft_form_with_exact_norm_differentiates_the_norm():
    """PEFT's dropout form with dora_exact_norm: autograd through a norm formed from W + s B A
    (the same dropout mask: one F.dropout on x after the same seed)."""
    model, _ = regression_model("peft", dora_exact_norm=True)
    layer = model[0]
    delta = layer.lora
    with torch.no_grad():
        delta.lora_B.normal_(0, 0.3)
    model.train()
    x = torch.randn(5, 16)
    torch.manual_seed(9)
    y = layer(x)
    torch.manual_seed(9)
    dropped = F.dropout(x, 0.2, True)
    combined = layer.weight + delta.scaling * (delta.lora_B @ delta.lora_A)
    k = delta.lora_magnitude_vector / torch.linalg.vector_norm(combined, dim=1)
    update = F.linear(F.linear(dropped, delta.lora_A), delta.lora_B) * delta.scaling
    expected = F.linear(x, layer.weight, layer.bias) + (k - 1) * F.linear(dropped, layer.weight)
    expected = expected + k * update
    torch.testing.assert_close(y, expected)
    parameters = [delta.lora_A, delta.lora_B, delta.lora_magnitude_vector]
    grad = torch.randn_like(y)
    for got, want in zip(
        torch.autograd.grad(y, parameters, grad),
        torch.autograd.grad(expected, parameters, grad),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_exact_norm_on_the_layer_equals_the_reference(dropout):
    """dora_exact_norm=True, the fused op (no dropout, or the low-rank form) against the fp64
    reference with autograd through W + s B A."""
    model = base_model()
    delta_model = LoraModel(
        model, modified_modules=["0"], lora_r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
        use_dora=True, dora_dropout="low_rank", dora_exact_norm=True,
    )  # fmt: skip
    delta_model.freeze_module()
    layer = model[0]
    delta = layer.lora
    with torch.no_grad():
        delta.lora_B.normal_(0, 0.3)
    layer.eval() if dropout == 0 else layer.train()
    x = torch.randn(7, 20)
    parameters = (delta.lora_A, delta.lora_B, delta.lora_magnitude_vector)
    grad = torch.randn(7, 12)
    torch.manual_seed(5)
    got = torch.autograd.grad(layer(x), parameters, grad)
    if dropout:
        torch.manual_seed(5)
        seed = torch.randint(2**62, (), dtype=torch.int64)  # what ops.dora_linear draws
        backend = delta.backend_name().split()[0]
        mask = backend_module(backend).dropout_keep_mask(seed, tuple(x.shape), dropout)
    else:
        mask = None
    leaves = [p.detach().double().requires_grad_() for p in parameters]
    expected = reference.dora_linear(
        x.double(), layer.weight.double(), layer.bias.double(), *leaves, delta.scaling, dropout,
        False, mask, exact_norm=True,
    )  # fmt: skip
    for a, b in zip(got, torch.autograd.grad(expected, leaves, grad.double()), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_the_dora_options_are_saved_and_loaded(tmp_path):
    _, delta_model = regression_model("low_rank", dora_exact_norm=True)
    delta_model.save_finetuned(tmp_path)
    loaded = AutoDeltaModel.from_finetuned(tmp_path, regression_base())
    assert loaded.config.dora_dropout == "low_rank" and loaded.config.dora_exact_norm
    assert all(a.delta.dora_dropout == "low_rank" for a in loaded.attachments)


def test_a_checkpoint_saved_before_the_dora_options_loads_with_their_old_defaults(tmp_path):
    """Checkpoints written before dora_dropout and dora_exact_norm existed computed PEFT's form
    with a constant norm: their defaults."""
    ours, _ = both()
    x = torch.randn(4, 20)
    expected = ours.backbone_model(x)
    ours.save_finetuned(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    del config["dora_dropout"], config["dora_exact_norm"]
    config_path.write_text(json.dumps(config))
    loaded = AutoDeltaModel.from_finetuned(tmp_path, base_model())
    assert loaded.config.dora_dropout == "peft" and not loaded.config.dora_exact_norm
    torch.testing.assert_close(loaded.backbone_model(x), expected)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            {"use_dora": True, "dora_dropout": "paper"},
            "dora_dropout must be 'peft' .* or 'low_rank'",
        ),
        ({"dora_dropout": "low_rank"}, "dora_dropout configure DoRA deltas.*use_dora=True"),
        ({"use_dora": True, "dora_exact_norm": "yes"}, "dora_exact_norm must be True or False"),
    ],
    ids=["unknown_form", "without_use_dora", "not_a_bool"],
)
def test_bad_dora_options_are_refused_naming_the_fix(arguments, message):
    with pytest.raises((ValueError, TypeError), match=message):
        AutoDeltaConfig.from_dict({"delta_type": "lora", **arguments})


def test_the_base_row_norms_are_kept_until_the_weight_changes(monkeypatch):
    ours, _ = both()
    model = ours.backbone_model
    calls = []
    original = ops.dora_row_norms_squared

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "dora_row_norms_squared", counted)
    x = torch.randn(4, 20)
    with torch.no_grad():
        expected = model(x)
        calls.clear()
        for _ in range(3):
            torch.testing.assert_close(model(x), expected)
        assert calls == []  # kept from the first forward
        ours.merge()  # changes the weights in place: their versions move
        torch.testing.assert_close(model(x), expected)
        ours.unmerge()
        assert calls == []  # merged layers compute no norm
        torch.testing.assert_close(model(x), expected)
        assert len(calls) == 2  # both layers' weights changed
        model[0].weight.mul_(2)
        changed = model(x)
    assert not torch.allclose(changed, expected) and len(calls) == 3
    model.double()  # new tensors
    calls.clear()
    model(x.double())
    assert len(calls) == 2


def test_a_dora_model_pickles_and_deep_copies():
    ours, _ = both()
    model = ours.backbone_model
    x = torch.randn(3, 20)
    expected = model(x)
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(copied(x), expected)
        with torch.no_grad():
            copied[0].weight.add_(1.0)
        assert not torch.allclose(copied(x), expected)
    torch.testing.assert_close(model(x), expected)


def test_a_dora_model_compiles_with_fullgraph():
    """The layer under torch.compile(fullgraph=True): ||W||^2 computed in the graph, not kept."""
    torch._dynamo.reset()
    model, delta_model = regression_model("low_rank", dora_exact_norm=True)
    with torch.no_grad():
        for attachment in delta_model.attachments:
            attachment.delta.lora_B.normal_(0, 0.3)
    model.eval()
    x = torch.randn(8, 16)

    def forward_backward(function):
        model.zero_grad()
        y = function(x)
        y.square().sum().backward()
        return [y.detach(), *(p.grad.clone() for p in model.parameters() if p.requires_grad)]

    got = forward_backward(torch.compile(model, fullgraph=True))
    for g, e in zip(got, forward_backward(model), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
