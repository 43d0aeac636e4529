// What the CPU and CUDA implementations of the fastdelta_C ops share: shapes, dtypes and the
// base layer's gradients (plain ATen matmuls on either device).
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "activations.h"

namespace fastdelta {

// The instruction set that the CPU LoRA's vectorised loops (csrc/cpu/lora.cpp) were compiled for
// and run on this CPU: "arch=x86-64-v4" or "avx512f" (AVX-512), "avx2" or "baseline".
std::string cpu_vector_isa();

// The activation named by fastdelta.ops.activations.canonical_activation.
inline Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_new") return Activation::GeluTanh;
  TORCH_CHECK(name == "silu", "fastdelta_C: unknown activation '", name,
              "'; expected relu, gelu, gelu_new or silu");
  return Activation::Silu;
}

// Which gradients a backward computes: (input, weight, bias, the two delta weights).
using Needs = std::array<bool, 5>;

// The dtype the low-rank products and saved intermediates use: float32, or float64 for float64.
inline at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// `shape` with its last dimension replaced by `last`.
inline std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> result(shape.begin(), shape.end());
  result.back() = last;
  return result;
}

// The ops below are each a dispatcher call, a microsecond or more of host time on a small input
// (measured on the CPU), so the kernels skip the ones that would change nothing.

// t as [rows, last]: itself when it is 2-D, else a reshape (a view when its layout allows).
inline at::Tensor as_2d(const at::Tensor& t, int64_t last) {
  return t.dim() == 2 ? t : t.reshape({-1, last});
}

// A 2-D result t2d in the leading shape of `like` with `last` features.
inline at::Tensor like_rows_of(const at::Tensor& t2d, const at::Tensor& like, int64_t last) {
  return like.dim() == 2 ? t2d : t2d.view(with_last(like.sizes(), last));
}

// t in `dtype`: itself when it is already.
inline at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// alpha * a b for 2-D a, b: the GEMM's own alpha, not a product and a second pass.
inline at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, alpha);  // beta = 0: out is not read
}

// The base weight as nn.Linear holds it, [N, K]: a transposed view of a Conv1D [K, N] weight.
inline at::Tensor base_weight(const at::Tensor& weight, bool fan_in_fan_out) {
  return fan_in_fan_out ? weight.t() : weight;
}

// Up to this many elements, a CPU kernel's elementwise part may take a plain loop of its own
// (sum_rows, add_product, the adapter's residual_plus_bias) in place of an ATen kernel, whose
// set-up costs more than the arithmetic at that size: at::sum's column reduction (its
// TensorIterator, and a second tensor and a cast below float32) took 1.9 us on a [4, 64]
// float32 gradient, one CPU thread, and a small adapter's backward makes two. The loops are
// serial, in the accumulate type, and so are ATen's kernels at this size.
constexpr int64_t kSmallCpuLoop = 1 << 14;

// sums[j] = sum over the rows of in[i][j], for a contiguous [rows >= 1, cols] `in`.
template <typename scalar_t, typename acc_t>
void add_rows(const scalar_t* in, int64_t rows, int64_t cols, acc_t* sums) {
  std::copy(in, in + cols, sums);
  for (int64_t row = 1; row < rows; ++row) {
    const scalar_t* values = in + row * cols;
    for (int64_t col = 0; col < cols; ++col) sums[col] += static_cast<acc_t>(values[col]);
  }
}

// Column sums of a 2-D tensor, accumulated in at least float32, in its dtype (add_rows up to
// kSmallCpuLoop elements).
inline at::Tensor sum_rows(const at::Tensor& t) {
  if (!t.is_cpu() || !t.is_contiguous() || t.numel() > kSmallCpuLoop || t.size(0) == 0) {
    return cast(at::sum(t, {0}, false, accumulate_type(t.scalar_type())), t.scalar_type());
  }
  const int64_t rows = t.size(0), cols = t.size(1);
  at::Tensor out = at::empty({cols}, t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "sum_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = t.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      add_rows(in, rows, cols, result);  // in `out` itself
    } else {
      std::vector<acc_t> sums(cols);
      add_rows(in, rows, cols, sums.data());
      std::copy(sums.begin(), sums.end(), result);
    }
  });
  return out;
}

// base + alpha * a b, for 2-D a [M, K], b [K, N] and base [N] (a bias, every row) or [M, N],
// all of one dtype, as at::addmm. A small contiguous CPU base is written into the new tensor by
// memcpy, and the product added in place: at::addmm copies base through a TensorIterator, half
// a microsecond of a [4, 64] addmm's 2.4 (one CPU thread).
inline at::Tensor add_product(const at::Tensor& base, const at::Tensor& a, const at::Tensor& b,
                              double alpha = 1.0) {
  const int64_t M = a.size(0), N = b.size(1);
  const bool per_row = base.dim() == 1;
  if (!base.is_cpu() || !base.is_contiguous() || M * N > kSmallCpuLoop ||
      base.size(0) != (per_row ? N : M) || base.size(-1) != N) {
    return at::addmm(base, a, b, 1.0, alpha);
  }
  at::Tensor out = at::empty({M, N}, base.options());
  const auto* from = static_cast<const char*>(base.const_data_ptr());
  auto* to = static_cast<char*>(out.mutable_data_ptr());
  const size_t row_bytes = static_cast<size_t>(N) * base.element_size();
  if (per_row) {
    for (int64_t row = 0; row < M; ++row) std::memcpy(to + row * row_bytes, from, row_bytes);
  } else {
    std::memcpy(to, from, row_bytes * M);
  }
  return out.addmm_(a, b, 1.0, alpha);
}

// The gradients of the base weight and bias (undefined when not needed), from 2-D dY and x.
inline std::tuple<at::Tensor, at::Tensor> base_grads(
    const at::Tensor& grad2d, const at::Tensor& x2d, bool fan_in_fan_out, bool need_weight,
    bool need_bias) {
  at::Tensor grad_weight, grad_bias;
  if (need_weight) {
    grad_weight = fan_in_fan_out ? at::mm(x2d.t(), grad2d) : at::mm(grad2d.t(), x2d);
  }
  if (need_bias) {
    grad_bias = sum_rows(grad2d);
  }
  return {grad_weight, grad_bias};
}

// Checks what the kernels assume of the LoRA arguments; fastdelta.ops checks them for users
// first, so these only guard direct calls of torch.ops.fastdelta_C.
inline void check_lora_arguments(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              op, ": x must have a feature dimension and weight, lora_A, lora_B must be 2-D");
  TORCH_CHECK(lora_A.size(1) == x.size(-1) && lora_B.size(1) == lora_A.size(0), op,
              ": lora_A must be [r, K] and lora_B [N, r] for x [..., K]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() &&
                  lora_A.scalar_type() == x.scalar_type() &&
                  lora_B.scalar_type() == x.scalar_type(),
              op, ": x, weight, lora_A and lora_B must have one dtype");
  TORCH_CHECK(weight.device() == x.device() && lora_A.device() == x.device() &&
                  lora_B.device() == x.device(),
              op, ": x, weight, lora_A and lora_B must be on one device");
  TORCH_CHECK(!seed.has_value() ||
                  (seed->scalar_type() == at::kLong && seed->numel() == 1 &&
                   seed->device() == x.device()),
              op, ": seed must be an int64 scalar tensor on x's device");
}

}  // namespace fastdelta
