// The adapter bottleneck on the CPU: out = residual + s * (act(h D^T + b_d) U^T + b_u).
//
// The two products are ATen matmuls; the activation and scaling of the [M, m] bottleneck are
// one pass (at::parallel_for), and the residual and the scaled up-bias are written into `out`
// before the up-projection adds into it, so `out` is the only [M, d_out] tensor made. The
// backward recomputes the activation from the saved float32 pre-activation in the same pass
// that forms d(pre).
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../activations.h"
#include "../common.h"

namespace fastdelta {
namespace {

// Rows of the [M, m] bottleneck per parallel task.
constexpr int64_t kGrain = 256;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// hidden = s * act(pre) in h's dtype; pre [M, m] contiguous in the accumulate type.
at::Tensor scaled_activation(const at::Tensor& pre, double scaling, Activation activation,
                             at::ScalarType dtype) {
  at::Tensor hidden = at::empty(pre.sizes(), pre.options().dtype(dtype));
  const int64_t width = pre.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastdelta_C.activate", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t* z = pre.const_data_ptr<acc_t>();
    scalar_t* out = hidden.data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(scaling);
    dispatch_activation(activation, [&](auto kind) {
      constexpr Activation act = decltype(kind)::value;
      at::parallel_for(0, pre.size(0), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin * width; j < end * width; ++j) {
          out[j] = static_cast<scalar_t>(s * activate<act>(z[j]));
        }
      });
    });
  });
  return hidden;
}

// out[i, j] = residual[i, j] + s * up_bias[j] (up_bias may be undefined), in h's dtype.
at::Tensor residual_plus_bias(const at::Tensor& residual2d, const at::Tensor& up_bias,
                              double scaling) {
  at::Tensor out = at::empty(residual2d.sizes(), residual2d.options());
  const int64_t width = residual2d.size(1);
  const int64_t stride_row = residual2d.stride(0), stride_col = residual2d.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "fastdelta_C.residual", [&] {
        using acc_t = acc_type_t<scalar_t>;
        const scalar_t* residual = residual2d.const_data_ptr<scalar_t>();
        const scalar_t* bias = up_bias.defined() ? up_bias.const_data_ptr<scalar_t>() : nullptr;
        const int64_t bias_stride = up_bias.defined() ? up_bias.stride(0) : 0;
        scalar_t* result = out.data_ptr<scalar_t>();
        const auto s = static_cast<acc_t>(scaling);
        at::parallel_for(0, out.size(0), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t* row = residual + i * stride_row;
            scalar_t* out_row = result + i * width;
            for (int64_t j = 0; j < width; ++j) {
              const acc_t added =
                  bias == nullptr ? acc_t(0) : s * static_cast<acc_t>(bias[j * bias_stride]);
              out_row[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j * stride_col]) + added);
            }
          }
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> adapter_forward_cpu(
    const at::Tensor& h, const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
    const std::optional<at::Tensor>& residual, double scaling, c10::string_view activation) {
  const Activation act = parse_activation(std::string(activation));
  const int64_t d_in = h.size(-1), bottleneck = down_weight.size(0), d_out = up_weight.size(0);
  const at::Tensor h2d = h.reshape({-1, d_in});
  const at::Tensor down_t = down_weight.t();
  const at::Tensor pre = (down_bias.has_value() ? at::addmm(*down_bias, h2d, down_t)
                                                : at::mm(h2d, down_t))
                             .to(accumulate_type(h.scalar_type()))
                             .contiguous();
  const at::Tensor hidden = scaled_activation(pre, scaling, act, h.scalar_type());
  const at::Tensor residual2d = residual.has_value() ? residual->reshape({-1, d_out}) : h2d;
  at::Tensor out = residual_plus_bias(residual2d, up_bias.value_or(at::Tensor()), scaling);
  out.addmm_(hidden, up_weight.t());
  return {out.view(with_last(h.sizes(), d_out)), pre.view(with_last(h.sizes(), bottleneck))};
}

// d(pre) = s * (dOut U) * act'(pre) in h's dtype, and (when `hidden` is defined) hidden =
// s * act(pre), from the same read of pre.
void bottleneck_grads(const at::Tensor& grad_hidden, const at::Tensor& pre, double scaling,
                      Activation activation, const at::Tensor& grad_pre,
                      const at::Tensor& hidden) {
  const int64_t width = pre.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_pre.scalar_type(), "fastdelta_C.activate_grad", [&] {
        using acc_t = acc_type_t<scalar_t>;
        const acc_t* z = pre.const_data_ptr<acc_t>();
        const scalar_t* upstream = grad_hidden.const_data_ptr<scalar_t>();
        scalar_t* grad = grad_pre.data_ptr<scalar_t>();
        scalar_t* scaled = hidden.defined() ? hidden.data_ptr<scalar_t>() : nullptr;
        const auto s = static_cast<acc_t>(scaling);
        dispatch_activation(activation, [&](auto kind) {
          constexpr Activation act = decltype(kind)::value;
          at::parallel_for(0, pre.size(0), kGrain, [&](int64_t begin, int64_t end) {
            for (int64_t j = begin * width; j < end * width; ++j) {
              const acc_t g = static_cast<acc_t>(upstream[j]);
              grad[j] = static_cast<scalar_t>(g * (s * activate_grad<act>(z[j])));
              if (scaled != nullptr) scaled[j] = static_cast<scalar_t>(s * activate<act>(z[j]));
            }
          });
        });
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& down_weight,
    const at::Tensor& up_weight, const at::Tensor& pre, double scaling,
    c10::string_view activation, bool sequential, std::array<bool, 5> needs) {
  const Activation act = parse_activation(std::string(activation));
  const auto [need_h, need_down_weight, need_down_bias, need_up_weight, need_up_bias] = needs;
  const int64_t d_in = h.size(-1), bottleneck = down_weight.size(0), d_out = up_weight.size(0);
  const auto dtype = h.scalar_type();
  const at::Tensor grad2d = grad_out.reshape({-1, d_out});
  const at::Tensor h2d = h.reshape({-1, d_in});
  const at::Tensor pre2d = pre.reshape({-1, bottleneck}).contiguous();
  at::Tensor grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias;
  const bool need_pre = need_h || need_down_weight || need_down_bias;
  at::Tensor hidden = need_up_weight ? at::empty(pre2d.sizes(), h.options()) : at::Tensor();
  at::Tensor grad_pre;
  if (need_pre) {
    grad_pre = at::empty(pre2d.sizes(), h.options());
    bottleneck_grads(at::mm(grad2d, up_weight), pre2d, scaling, act, grad_pre, hidden);
  } else if (need_up_weight) {
    hidden = scaled_activation(pre2d, scaling, act, dtype);
  }
  if (need_up_weight) grad_up_weight = at::mm(grad2d.t(), hidden);
  if (need_up_bias) {
    grad_up_bias = at::sum(grad2d, {0}, false, accumulate_type(dtype)).mul_(scaling).to(dtype);
  }
  if (need_down_bias) grad_down_bias = sum_rows(grad_pre);
  if (need_down_weight) grad_down_weight = at::mm(grad_pre.t(), h2d);
  if (need_h) {
    // A sequential adapter's residual is h itself: its gradient joins in the same product.
    grad_h = sequential ? at::addmm(grad2d, grad_pre, down_weight) : at::mm(grad_pre, down_weight);
    grad_h = grad_h.view(h.sizes());
  }
  return {grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdelta_C, CPU, m) {
  m.impl("adapter_forward", &adapter_forward_cpu);
  m.impl("adapter_backward", &adapter_backward_cpu);
}

}  // namespace fastdelta
