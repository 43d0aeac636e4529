// The adapter bottleneck on CUDA: out = residual + s * (act(h D^T + b_d) U^T + b_u).
//
// Forward: pre = h D^T + b_d by cuBLAS (kept in float32 for the backward), then one tile kernel
// computes the up-projection with the activation, the scaling, the up-bias and the residual
// fused (adapter_kernels.cu): `out` is the only [M, d_out] tensor written.
// Backward (saves h and pre; the activation is recomputed): one tile kernel forms d(pre) =
// s * (dOut U) * act'(pre); dU, dD and dh are cuBLAS products. A sequential adapter's dh is
// at::addmm(dOut, d(pre), D): ATen copies dOut into dh, then cuBLAS reads dh back and writes
// d(pre) D + dh over it (beta = 1), as the LoRA op does with y (lora_cuda.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "launch.h"
#include "tensor_args.h"

namespace fastdelta::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> adapter_forward_cuda(
    const at::Tensor& h, const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
    const std::optional<at::Tensor>& residual, double scaling, c10::string_view activation) {
  const Activation act = parse_activation(std::string(activation));
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t d_in = h.size(-1), bottleneck = down_weight.size(0), d_out = up_weight.size(0);
  const at::Tensor h2d = h.reshape({-1, d_in});
  const int64_t M = h2d.size(0);
  const at::Tensor down_t = down_weight.t();
  const at::Tensor pre = (down_bias.has_value() ? at::addmm(*down_bias, h2d, down_t)
                                                : at::mm(h2d, down_t))
                             .to(accumulate_type(h.scalar_type()))
                             .contiguous();
  const at::Tensor residual2d = residual.has_value() ? residual->reshape({-1, d_out}) : h2d;
  const char* op = "fastdelta_C::adapter_forward";
  check_kernel_input(op, "up_weight", up_weight, h.device(), h.scalar_type(), {d_out, bottleneck});
  if (up_bias.has_value()) {
    check_kernel_input(op, "up_bias", *up_bias, h.device(), h.scalar_type(), {d_out});
  }
  check_kernel_input(op, "the residual (h when none is given)", residual2d, h.device(),
                     h.scalar_type(), {M, d_out});
  at::Tensor out = at::empty({M, d_out}, h.options());
  const bool has_bias = up_bias.has_value();
  C10_CUDA_CHECK(adapter_output(dtype_of(h), act, M, d_out, bottleneck, pre.const_data_ptr(),
                                operand(up_weight), operand(residual2d),
                                has_bias ? up_bias->const_data_ptr() : nullptr,
                                has_bias ? up_bias->stride(0) : 0, scaling, out.data_ptr(),
                                c10::cuda::getCurrentCUDAStream()));
  return {out.view(with_last(h.sizes(), d_out)), pre.view(with_last(h.sizes(), bottleneck))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& down_weight,
    const at::Tensor& up_weight, const at::Tensor& pre, double scaling,
    c10::string_view activation, bool sequential, std::array<bool, 5> needs) {
  const Activation act = parse_activation(std::string(activation));
  const c10::cuda::CUDAGuard guard(h.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto [need_h, need_down_weight, need_down_bias, need_up_weight, need_up_bias] = needs;
  const int64_t d_in = h.size(-1), bottleneck = down_weight.size(0), d_out = up_weight.size(0);
  const auto dtype = h.scalar_type();
  const at::Tensor grad2d = grad_out.reshape({-1, d_out});
  const at::Tensor h2d = h.reshape({-1, d_in});
  const at::Tensor pre2d = pre.reshape({-1, bottleneck}).contiguous();
  const int64_t M = h2d.size(0);
  const char* op = "fastdelta_C::adapter_backward";
  check_kernel_input(op, "grad_out", grad2d, h.device(), dtype, {M, d_out});
  check_kernel_input(op, "up_weight", up_weight, h.device(), dtype, {d_out, bottleneck});
  check_kernel_input(op, "pre", pre2d, h.device(), accumulate_type(dtype), {M, bottleneck});
  at::Tensor grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias;
  if (need_up_weight) {
    const at::Tensor hidden = at::empty({M, bottleneck}, h.options());
    C10_CUDA_CHECK(adapter_scaled_activation(dtype_of(h), act, M * bottleneck,
                                             pre2d.const_data_ptr(), scaling, hidden.data_ptr(),
                                             stream));
    grad_up_weight = at::mm(grad2d.t(), hidden);
  }
  if (need_up_bias) {
    grad_up_bias = at::sum(grad2d, {0}, false, accumulate_type(dtype)).mul_(scaling).to(dtype);
  }
  if (need_h || need_down_weight || need_down_bias) {
    const at::Tensor grad_pre = at::empty({M, bottleneck}, h.options());
    C10_CUDA_CHECK(adapter_pre_grad(dtype_of(h), act, M, bottleneck, d_out, operand(grad2d),
                                    operand(up_weight), pre2d.const_data_ptr(), scaling,
                                    grad_pre.data_ptr(), stream));
    if (need_down_bias) grad_down_bias = sum_rows(grad_pre);
    if (need_down_weight) grad_down_weight = at::mm(grad_pre.t(), h2d);
    if (need_h) {
      // A sequential adapter's residual is h itself: its gradient joins in the same product.
      grad_h =
          sequential ? at::addmm(grad2d, grad_pre, down_weight) : at::mm(grad_pre, down_weight);
      grad_h = grad_h.view(h.sizes());
    }
  }
  return {grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdelta_C, CUDA, m) {
  m.impl("adapter_forward", &adapter_forward_cuda);
  m.impl("adapter_backward", &adapter_backward_cuda);
}

}  // namespace fastdelta::cuda
