// From ATen tensors to the plain arguments of the launch functions in launch.h, for the
// *_cuda.cpp op implementations.
#pragma once

#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "../dropout.h"
#include "launch.h"

namespace fastdelta::cuda {

inline DType dtype_of(const at::Tensor& tensor) {
  const auto type = tensor.scalar_type();
  if (type == at::kDouble) return DType::Double;
  if (type == at::kHalf) return DType::Half;
  if (type == at::kBFloat16) return DType::BFloat16;
  TORCH_CHECK(type == at::kFloat, "fastdelta_C: the CUDA kernels take float32, float64, float16 "
              "or bfloat16 tensors, not ", type);
  return DType::Float;
}

// A 2-D tensor as a strided operand.
inline Operand operand(const at::Tensor& matrix) {
  TORCH_CHECK(matrix.dim() == 2, "fastdelta_C: expected a 2-D tensor, got ", matrix.sizes());
  return {matrix.const_data_ptr(), matrix.stride(0), matrix.stride(1)};
}

// Checks a tensor that a kernel reads through its data pointer, with no ATen op to check it
// first: `dtype`, `sizes`, on `device` (any strides). fastdelta.ops checks what users pass; this
// guards direct calls of torch.ops.fastdelta_C, where a mismatch would be read out of bounds or
// as the wrong type instead of rejected.
inline void check_kernel_input(const char* op, const char* name, const at::Tensor& tensor,
                               const at::Device& device, at::ScalarType dtype,
                               at::IntArrayRef sizes) {
  TORCH_CHECK(tensor.device() == device && tensor.scalar_type() == dtype &&
                  tensor.sizes() == sizes,
              op, ": ", name, " must be ", dtype, " ", sizes, " on ", device, ", got ",
              tensor.scalar_type(), " ", tensor.sizes(), " on ", tensor.device());
}

// The dropout of a LoRA launch: on when `seed` is given and p > 0.
inline DropoutArgs dropout_args(const std::optional<at::Tensor>& seed, double p) {
  if (!seed.has_value() || p <= 0) return {nullptr, 0};
  return {seed->const_data_ptr<int64_t>(), dropout_threshold(p)};
}

}  // namespace fastdelta::cuda
