// The adapter bottleneck on the CPU: out = residual + s * (act(h D^T + b_d) U^T + b_u).
//
// The two products are ATen matmuls, and so are the elementwise parts: the activation and its
// gradient on the [M, m] bottleneck, and residual + s * b_u, whose CPU kernels ATen vectorises
// (the scalar loops they replace made this backend 1.5x slower than the torch backend at
// M=2048, d=1024, m=64); only small inputs, where a kernel's set-up costs more than its
// arithmetic, take loops of their own. The residual and the scaled up-bias are written into
// `out` before the up-projection adds into it, so `out` is the only [M, d_out] tensor made.
// The backward recomputes the activation from the saved float32 pre-activation.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../activations.h"
#include "../common.h"

namespace fastdelta {
namespace {

// Whether the [M, m] bottleneck `pre` (and `grad`, when given) is small enough for the
// activation's own loops: ATen's kernels cost about a microsecond each to set up, more than
// the arithmetic on a decode-sized bottleneck (3 of them in a small adapter's forward and
// backward).
bool small_bottleneck(const at::Tensor& pre, const at::Tensor& grad = at::Tensor()) {
  return pre.is_contiguous() && pre.numel() <= kSmallCpuLoop &&
         (!grad.defined() || (grad.is_contiguous() && grad.scalar_type() == pre.scalar_type()));
}

// act(pre) (grad undefined) or grad * act'(pre), by the shared formulas (activations.h), for
// a small float32 or float64 bottleneck.
at::Tensor small_activation(const at::Tensor& pre, const at::Tensor& grad, Activation activation) {
  at::Tensor out = at::empty_like(pre, at::MemoryFormat::Contiguous);
  const int64_t count = pre.numel();
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "fastdelta_C.adapter_activation", [&] {
    const scalar_t* z = pre.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(activation, [&](auto act) {
      constexpr Activation kind = decltype(act)::value;
      if (!grad.defined()) {
        for (int64_t i = 0; i < count; ++i) result[i] = activate<kind>(z[i]);
        return;
      }
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < count; ++i) result[i] = g[i] * activate_grad<kind>(z[i]);
    });
  });
  return out;
}

// act(pre), in pre's dtype: ATen's vectorised kernel, or the shared formula for a small
// bottleneck.
at::Tensor activated(const at::Tensor& pre, Activation activation) {
  if (small_bottleneck(pre)) return small_activation(pre, at::Tensor(), activation);
  switch (activation) {
    case Activation::Relu:
      return at::relu(pre);
    case Activation::Gelu:
      return at::gelu(pre);
    case Activation::GeluTanh:
      return at::gelu(pre, "tanh");
    case Activation::Silu:
      break;
  }
  return at::silu(pre);
}

// grad * act'(pre), in pre's dtype: ATen's vectorised kernel, or the shared formula for a
// small bottleneck.
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& pre,
                               Activation activation) {
  if (small_bottleneck(pre, grad)) return small_activation(pre, grad, activation);
  switch (activation) {
    case Activation::Relu:
      return at::threshold_backward(grad, pre, 0);
    case Activation::Gelu:
      return at::gelu_backward(grad, pre);
    case Activation::GeluTanh:
      return at::gelu_backward(grad, pre, "tanh");
    case Activation::Silu:
      break;
  }
  return at::silu_backward(grad, pre);
}

// (hidden, alpha) with alpha * hidden = s * act(pre), hidden in h's dtype (pre [M, m] is in the
// accumulate type): in float32 and float64 alpha is s, for the GEMM that reads hidden to apply;
// a 16-bit hidden is scaled in float32 and rounded once.
std::tuple<at::Tensor, double> scaled_activation(const at::Tensor& pre, double scaling,
                                                 Activation activation, at::ScalarType dtype) {
  if (pre.scalar_type() == dtype) return {activated(pre, activation), scaling};
  return {activated(pre, activation).mul_(scaling).to(dtype), 1.0};
}

// residual + s * b_u (b_u in every row; residual alone without it), a new contiguous [M, d_out]
// tensor the up-projection then adds into. Small contiguous inputs take a loop of their own
// (in the accumulate type, rounded once, as at::add), larger ones ATen's vectorised kernels:
// at::add's TensorIterator cost 0.8 us on a [4, 64] float32 residual (one CPU thread).
at::Tensor residual_plus_bias(const at::Tensor& residual, const std::optional<at::Tensor>& bias,
                              double scaling) {
  if (!bias.has_value()) return residual.clone(at::MemoryFormat::Contiguous);
  if (!residual.is_contiguous() || !bias->is_contiguous() || residual.numel() > kSmallCpuLoop) {
    return at::add(residual, *bias, scaling);
  }
  const int64_t rows = residual.size(0), cols = residual.size(1);
  at::Tensor out = at::empty({rows, cols}, residual.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, residual.scalar_type(), "residual_plus_bias", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* from = residual.const_data_ptr<scalar_t>();
        const scalar_t* b = bias->const_data_ptr<scalar_t>();
        scalar_t* to = out.mutable_data_ptr<scalar_t>();
        const auto s = static_cast<acc_t>(scaling);
        for (int64_t row = 0; row < rows; ++row) {
          for (int64_t col = 0; col < cols; ++col) {
            const int64_t i = row * cols + col;
            to[i] = static_cast<scalar_t>(static_cast<acc_t>(from[i]) +
                                          s * static_cast<acc_t>(b[col]));
          }
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> adapter_forward_cpu(
    const at::Tensor& h, const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
    const std::optional<at::Tensor>& residual, double scaling, c10::string_view activation) {
  const Activation act = parse_activation(std::string(activation));
  const int64_t d_in = h.size(-1), bottleneck = down_weight.size(0), d_out = up_weight.size(0);
  const at::Tensor h2d = as_2d(h, d_in);
  const at::Tensor down_t = down_weight.t();
  const at::Tensor pre = cast(down_bias.has_value() ? add_product(*down_bias, h2d, down_t)
                                                    : at::mm(h2d, down_t),
                              accumulate_type(h.scalar_type()))
                             .contiguous();
  const auto [hidden, alpha] = scaled_activation(pre, scaling, act, h.scalar_type());
  const at::Tensor residual2d = residual.has_value() ? as_2d(*residual, d_out) : h2d;
  at::Tensor out = residual_plus_bias(residual2d, up_bias, scaling);
  out.addmm_(hidden, up_weight.t(), 1.0, alpha);
  return {like_rows_of(out, h, d_out), like_rows_of(pre, h, bottleneck)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& down_weight,
    const at::Tensor& up_weight, const at::Tensor& pre, double scaling,
    c10::string_view activation, bool sequential, std::array<bool, 5> needs) {
  const Activation act = parse_activation(std::string(activation));
  const auto [need_h, need_down_weight, need_down_bias, need_up_weight, need_up_bias] = needs;
  const int64_t d_in = h.size(-1), bottleneck = down_weight.size(0), d_out = up_weight.size(0);
  const auto dtype = h.scalar_type();
  const at::Tensor grad2d = as_2d(grad_out, d_out);
  const at::Tensor h2d = as_2d(h, d_in);
  const at::Tensor pre2d = as_2d(pre, bottleneck).contiguous();
  at::Tensor grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias;
  const bool need_pre = need_h || need_down_weight || need_down_bias;
  at::Tensor grad_pre;
  if (need_pre) {
    // d(pre) = s * (dOut U) * act'(pre), in h's dtype.
    const at::Tensor grad_hidden =
        pre2d.scalar_type() == dtype
            ? scaled_mm(grad2d, up_weight, scaling)
            : at::mm(grad2d, up_weight).to(pre2d.scalar_type()).mul_(scaling);
    grad_pre = cast(activation_backward(grad_hidden, pre2d, act), dtype);
  }
  if (need_up_weight) {
    const auto [hidden, alpha] = scaled_activation(pre2d, scaling, act, dtype);
    grad_up_weight = scaled_mm(grad2d.t(), hidden, alpha);
  }
  if (need_up_bias) {
    grad_up_bias = scaling == 1.0 ? sum_rows(grad2d)
                                  : cast(at::sum(grad2d, {0}, false, accumulate_type(dtype))
                                             .mul_(scaling),
                                         dtype);
  }
  if (need_down_bias) grad_down_bias = sum_rows(grad_pre);
  if (need_down_weight) grad_down_weight = at::mm(grad_pre.t(), h2d);
  if (need_h) {
    // A sequential adapter's residual is h itself: its gradient joins in the same product.
    grad_h = sequential ? add_product(grad2d, grad_pre, down_weight)
                        : at::mm(grad_pre, down_weight);
    grad_h = like_rows_of(grad_h, h, d_in);
  }
  return {grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdelta_C, CPU, m) {
  m.impl("adapter_forward", &adapter_forward_cpu);
  m.impl("adapter_backward", &adapter_backward_cpu);
}

}  // namespace fastdelta
