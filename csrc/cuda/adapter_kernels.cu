// The adapter bottleneck's CUDA kernels (launch functions declared in launch.h): the
// up-projection reads act(pre) through its operand loader and writes residual + s * (. + b_u)
// from its epilogue, so the activation, the scaling, the up-bias and the residual are one
// kernel; the backward's first product forms d(pre) = s * (dOut U) * act'(pre) in its epilogue.
#include <algorithm>

#include "../activations.h"
#include "launch.h"
#include "tile_matmul.cuh"

namespace fastdelta::cuda {
namespace {

// act(pre[row, col]), pre contiguous in the accumulate type.
template <typename acc_t, Activation kAct>
struct Activated {
  const acc_t* pre;
  int64_t width;
  __device__ void prepare() {}
  __device__ acc_t operator()(int64_t row, int64_t col) const {
    return activate<kAct>(pre[row * width + col]);
  }
};

// out[row, col] = residual[row, col] + scaling * (value + up_bias[col]).
template <typename scalar_t, typename acc_t>
struct AdapterOutput {
  scalar_t* out;
  int64_t stride_row;
  Strided<scalar_t, acc_t> residual;
  const scalar_t* bias;  // null: no up-bias
  int64_t bias_stride;
  acc_t scaling;
  __device__ void prepare() {}
  __device__ void operator()(int64_t row, int64_t col, acc_t value) const {
    if (bias != nullptr) value += static_cast<acc_t>(bias[col * bias_stride]);
    out[row * stride_row + col] = static_cast<scalar_t>(residual(row, col) + scaling * value);
  }
};

// d(pre)[row, col] = scaling * value * act'(pre[row, col]), value = (dOut U)[row, col].
template <typename scalar_t, typename acc_t, Activation kAct>
struct PreActivationGrad {
  scalar_t* grad_pre;
  const acc_t* pre;
  int64_t width;
  acc_t scaling;
  __device__ void prepare() {}
  __device__ void operator()(int64_t row, int64_t col, acc_t value) const {
    const int64_t index = row * width + col;
    grad_pre[index] = static_cast<scalar_t>(scaling * value * activate_grad<kAct>(pre[index]));
  }
};

template <typename scalar_t, typename acc_t, Activation kAct>
__global__ void scaled_activation_kernel(scalar_t* hidden, const acc_t* pre, int64_t count,
                                         acc_t scaling) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < count; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    hidden[index] = static_cast<scalar_t>(scaling * activate<kAct>(pre[index]));
  }
}

// Calls body(std::integral_constant<Activation, act>{}) for the data type of `dtype` and the
// runtime `activation`, body templated on both.
template <typename Body>
cudaError_t dispatch(DType dtype, Activation activation, const Body& body) {
  return dispatch_dtype(dtype, [&](auto tag) {
    cudaError_t error = cudaErrorInvalidValue;
    dispatch_activation(activation, [&](auto kind) { error = body(tag, kind); });
    return error;
  });
}

}  // namespace

cudaError_t adapter_output(DType dtype, Activation activation, int64_t M, int64_t D, int64_t m,
                           const void* pre, Operand up_weight, Operand residual,
                           const void* up_bias, int64_t bias_stride, double scaling, void* out,
                           cudaStream_t stream) {
  return dispatch(dtype, activation, [&](auto tag, auto kind) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const Activated<acc_t, decltype(kind)::value> hidden{static_cast<const acc_t*>(pre), m};
    const AdapterOutput<scalar_t, acc_t> epilogue{static_cast<scalar_t*>(out),
                                                  D,
                                                  strided<scalar_t, acc_t>(residual),
                                                  static_cast<const scalar_t*>(up_bias),
                                                  bias_stride,
                                                  static_cast<acc_t>(scaling)};
    return tile_matmul<acc_t>(M, D, m, hidden, strided<scalar_t, acc_t>(up_weight), epilogue,
                              stream);
  });
}

cudaError_t adapter_pre_grad(DType dtype, Activation activation, int64_t M, int64_t m,
                             int64_t D, Operand grad_out, Operand up_weight, const void* pre,
                             double scaling, void* grad_pre, cudaStream_t stream) {
  return dispatch(dtype, activation, [&](auto tag, auto kind) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const PreActivationGrad<scalar_t, acc_t, decltype(kind)::value> epilogue{
        static_cast<scalar_t*>(grad_pre), static_cast<const acc_t*>(pre), m,
        static_cast<acc_t>(scaling)};
    return tile_matmul<acc_t>(M, m, D, strided<scalar_t, acc_t>(grad_out),
                              strided<scalar_t, acc_t>(up_weight, /*transposed=*/true), epilogue,
                              stream);
  });
}

cudaError_t adapter_scaled_activation(DType dtype, Activation activation, int64_t count,
                                      const void* pre, double scaling, void* hidden,
                                      cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return dispatch(dtype, activation, [&](auto tag, auto kind) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    constexpr int kBlock = 256;
    const int64_t blocks = std::min<int64_t>((count + kBlock - 1) / kBlock, 65536);
    scaled_activation_kernel<scalar_t, acc_t, decltype(kind)::value>
        <<<blocks, kBlock, 0, stream>>>(static_cast<scalar_t*>(hidden),
                                        static_cast<const acc_t*>(pre), count,
                                        static_cast<acc_t>(scaling));
    return cudaGetLastError();
  });
}

}  // namespace fastdelta::cuda
