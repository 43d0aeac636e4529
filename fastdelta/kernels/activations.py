"""The adapter's activations and their derivatives, in float32, for the kernels.

The constants are `tl.constexpr(...)` values: a global annotated `NAME: tl.constexpr = 0.5` is a
plain float, which Triton's interpreter accepts and its compiler refuses ("Cannot access global
variable ... from within @jit'ed function"), so only a real-GPU compile can tell them apart.
Each constant stands to the right of a tensor: the interpreter cannot multiply a constexpr by a
tensor on its right.
"""

import triton
import triton.language as tl

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_K = tl.constexpr(0.044715)
_TANH_3K = tl.constexpr(3 * 0.044715)


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def activate(z, ACT: tl.constexpr):
    """act(z) for ACT in relu, gelu (erf), gelu_new (tanh), silu; float32 in and out."""
    if ACT == "relu":
        a = tl.maximum(z, 0.0)
    elif ACT == "gelu":
        a = 0.5 * z * (1.0 + tl.erf(z * _SQRT_HALF))
    elif ACT == "gelu_new":
        a = 0.5 * z * (1.0 + _tanh((z + z * z * z * _TANH_K) * _TANH_C))
    else:
        a = z * tl.sigmoid(z)
    return a


@triton.jit
def activate_grad(z, ACT: tl.constexpr):
    """d act / dz, float32."""
    if ACT == "relu":
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == "gelu":
        g = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == "gelu_new":
        t = _tanh((z + z * z * z * _TANH_K) * _TANH_C)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _TANH_C * (1.0 + z * z * _TANH_3K)
    else:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    return g
