// The LoRA linear on CUDA: y = x W^T + b + s * (drop(x) A^T) B^T, forward and backward.
//
// Forward: xa = drop(x) A^T / (1 - p) (a tile kernel; the dropout mask hashed in it from the
// seed, never stored). Then y, the only [M, N] tensor, is written twice: a tile kernel writes
// y = b + s * xa B^T (bias and scaling in its epilogue), and y.addmm_(x, W^T) has cuBLAS read y
// back as its C operand (beta = 1) and write x W^T + y over it. That is 2 writes and 1 read of
// [M, N] where a GEMM whose epilogue forms the low-rank product (the triton backend's) writes y
// once: 2 * M * N * sizeof(dtype) more bytes, and in float16/bfloat16 one more rounding (of
// b + s * xa B^T to y's dtype). cuBLASLt cannot do it in one write: its epilogues add a bias
// vector, apply ReLU or GELU (or their gradients) or reduce a bias gradient; none forms a
// second product. It stays the fallback because x W^T, nearly all the flops (2MNK against
// 2Mr(K + N)), runs on cuBLAS's tensor-core kernels. In bfloat16 the extra 4 bytes per output
// element, against the GEMM's 2K flops, cost about 590/K of its time at an H100's peak rates
// (14% at K = 4096): an estimate, not a measurement.
// Backward, from x, xa and the seed alone: dxa = s * dY B / (1 - p) (float32). dX is written
// twice the same way: a tile kernel writes drop'(dxa A) (the mask hashed again in its epilogue),
// then grad_x.addmm_(dY, W) has cuBLAS read it and write dY W + it over it (2 writes and 1 read
// of [M, K]). dA = dxa^T drop(x) and dB = s * dY^T xa are tile products split over the rows,
// their partial sums added in a fixed order (deterministic). dW and db are cuBLAS / ATen.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "launch.h"
#include "tensor_args.h"

namespace fastdelta::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& seed,
    double scaling, double dropout_p, bool fan_in_fan_out) {
  check_lora_arguments("fastdelta_C::lora_forward", x, weight, lora_A, lora_B, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = x.size(-1), N = lora_B.size(0), R = lora_A.size(0);
  const at::Tensor x2d = x.reshape({-1, K});
  const int64_t M = x2d.size(0);
  const DropoutArgs dropout = dropout_args(seed, dropout_p);
  const double dropout_scale = dropout.seed == nullptr ? 1.0 : 1.0 / (1.0 - dropout_p);
  at::Tensor xa = at::empty({M, R}, x.options().dtype(accumulate_type(x.scalar_type())));
  at::Tensor y = at::empty({M, N}, x.options());
  if (bias.has_value()) {
    check_kernel_input("fastdelta_C::lora_forward", "bias", *bias, x.device(), x.scalar_type(),
                       {N});
  }
  const DType dtype = dtype_of(x);
  C10_CUDA_CHECK(lora_down(dtype, M, K, R, operand(x2d), operand(lora_A), dropout, dropout_scale,
                           xa.data_ptr(), stream));
  const bool has_bias = bias.has_value();
  C10_CUDA_CHECK(lora_seed_output(dtype, M, N, R, xa.const_data_ptr(), operand(lora_B),
                                  has_bias ? bias->const_data_ptr() : nullptr,
                                  has_bias ? bias->stride(0) : 0, scaling, y.data_ptr(), stream));
  y.addmm_(x2d, base_weight(weight, fan_in_fan_out).t());
  return {y.view(with_last(x.sizes(), N)), xa.view(with_last(x.sizes(), R))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
    const std::optional<at::Tensor>& seed, double scaling, double dropout_p, bool fan_in_fan_out,
    std::array<bool, 5> needs) {
  check_lora_arguments("fastdelta_C::lora_backward", x, weight, lora_A, lora_B, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto [need_x, need_weight, need_bias, need_A, need_B] = needs;
  const int64_t K = x.size(-1), N = lora_B.size(0), R = lora_A.size(0);
  const at::Tensor grad2d = grad_y.reshape({-1, N});
  const at::Tensor x2d = x.reshape({-1, K});
  const int64_t M = x2d.size(0);
  const at::Tensor xa2d = xa.reshape({-1, R}).contiguous();
  check_kernel_input("fastdelta_C::lora_backward", "grad_y", grad2d, x.device(), x.scalar_type(),
                     {M, N});
  check_kernel_input("fastdelta_C::lora_backward", "xa", xa2d, x.device(),
                     accumulate_type(x.scalar_type()), {M, R});
  const auto acc_options = x.options().dtype(accumulate_type(x.scalar_type()));
  const DropoutArgs dropout = dropout_args(seed, dropout_p);
  const double dropout_scale = dropout.seed == nullptr ? 1.0 : 1.0 / (1.0 - dropout_p);
  const DType dtype = dtype_of(x);
  const int device = x.get_device();
  at::Tensor grad_x, grad_A, grad_B;
  if (need_B) {
    const int64_t chunk = reduction_chunk(N, R, M, device);
    at::Tensor partials = at::empty({chunk_count(M, chunk), N, R}, acc_options);
    C10_CUDA_CHECK(lora_grad_B(dtype, M, N, R, operand(grad2d), xa2d.const_data_ptr(), chunk,
                               partials.data_ptr(), stream));
    grad_B = partials.sum(0).mul_(scaling).to(lora_B.scalar_type());
  }
  if (need_x || need_A) {
    at::Tensor grad_xa = at::empty({M, R}, acc_options);
    C10_CUDA_CHECK(lora_grad_xa(dtype, M, N, R, operand(grad2d), operand(lora_B),
                                scaling * dropout_scale, grad_xa.data_ptr(), stream));
    if (need_A) {
      const int64_t chunk = reduction_chunk(R, K, M, device);
      at::Tensor partials = at::empty({chunk_count(M, chunk), R, K}, acc_options);
      C10_CUDA_CHECK(lora_grad_A(dtype, M, K, R, grad_xa.const_data_ptr(), operand(x2d), dropout,
                                 chunk, partials.data_ptr(), stream));
      grad_A = partials.sum(0).to(lora_A.scalar_type());
    }
    if (need_x) {
      grad_x = at::empty({M, K}, x.options());
      C10_CUDA_CHECK(lora_seed_input_grad(dtype, M, K, R, grad_xa.const_data_ptr(),
                                          operand(lora_A), dropout, grad_x.data_ptr(), stream));
      grad_x.addmm_(grad2d, base_weight(weight, fan_in_fan_out));
      grad_x = grad_x.view(x.sizes());
    }
  }
  auto [grad_weight, grad_bias] = base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias);
  return {grad_x, grad_weight, grad_bias, grad_A, grad_B};
}

at::Tensor dropout_keep_mask_cuda(const at::Tensor& seed, at::IntArrayRef shape, double p) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastdelta_C::dropout_keep_mask: seed must be an int64 scalar tensor");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool));
  const DropoutArgs dropout{seed.const_data_ptr<int64_t>(), dropout_threshold(p)};
  C10_CUDA_CHECK(dropout_keep_mask(keep.data_ptr<bool>(), keep.numel(), dropout,
                                   c10::cuda::getCurrentCUDAStream()));
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdelta_C, CUDA, m) {
  m.impl("lora_forward", &lora_forward_cuda);
  m.impl("lora_backward", &lora_backward_cuda);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cuda);
}

}  // namespace fastdelta::cuda
