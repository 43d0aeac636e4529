// The CUDA kernels of the cpp backend as plain launch functions. nvcc compiles them in the
// *_kernels.cu files without ATen's headers (which alone cost nvcc most of a minute per file);
// the op implementations in *_cuda.cpp, compiled by the host compiler, check shapes, allocate,
// call these and run the cuBLAS products through ATen.
//
// Matrices are strided: element (row, col) of an Operand is data[row * stride_row +
// col * stride_col], so transposed and stride-0 (expanded) tensors need no copy. Buffers written
// here are contiguous. "acc" buffers (xa, dxa, pre, partial sums) are float32, or float64 for
// float64 data. Every function returns the launch's error (cudaSuccess when none).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../activations.h"

namespace fastdelta::cuda {

enum class DType { Float, Double, Half, BFloat16 };

struct Operand {
  const void* data;
  int64_t stride_row;
  int64_t stride_col;
};

// The dropout of a launch: the seed (an int64 on the device, read by the kernel) and the 16-bit
// keep threshold; seed null means no dropout.
struct DropoutArgs {
  const int64_t* seed;
  uint32_t threshold;
};

// The length of the row chunks that a reduction over `length` rows is split into so that an
// output of rows x cols still fills the GPU; the chunks' partial sums are then added in a fixed
// order (deterministic, unlike atomics).
int64_t reduction_chunk(int64_t rows, int64_t cols, int64_t length, int device);

// How many chunks of `chunk` rows cover `length` rows (at least one).
inline int64_t chunk_count(int64_t length, int64_t chunk) {
  const int64_t count = (length + chunk - 1) / chunk;
  return count > 1 ? count : 1;
}

// xa[M, R] (acc) = scale * drop(x)[M, K] A[R, K]^T.
cudaError_t lora_down(DType dtype, int64_t M, int64_t K, int64_t R, Operand x, Operand lora_A,
                      DropoutArgs dropout, double scale, void* xa, cudaStream_t stream);

// y[M, N] = bias + scaling * xa[M, R] B[N, R]^T (bias may be null). The op then has cuBLAS read
// y back and write x W^T + y over it: y is written twice (see lora_cuda.cpp).
cudaError_t lora_seed_output(DType dtype, int64_t M, int64_t N, int64_t R, const void* xa,
                             Operand lora_B, const void* bias, int64_t bias_stride,
                             double scaling, void* y, cudaStream_t stream);

// dxa[M, R] (acc) = scale * dY[M, N] B[N, R].
cudaError_t lora_grad_xa(DType dtype, int64_t M, int64_t N, int64_t R, Operand grad_y,
                         Operand lora_B, double scale, void* grad_xa, cudaStream_t stream);

// partials[c, N, R] (acc) = sum over the rows m of chunk c (`chunk` rows each, see
// chunk_count) of dY[m, N]^T xa[m, R].
cudaError_t lora_grad_B(DType dtype, int64_t M, int64_t N, int64_t R, Operand grad_y,
                        const void* xa, int64_t chunk, void* partials, cudaStream_t stream);

// partials[c, R, K] (acc) = sum over the rows m of chunk c of dxa[m, R]^T drop(x)[m, K].
cudaError_t lora_grad_A(DType dtype, int64_t M, int64_t K, int64_t R, const void* grad_xa,
                        Operand x, DropoutArgs dropout, int64_t chunk, void* partials,
                        cudaStream_t stream);

// dX[M, K] = drop'(dxa[M, R] A[R, K]). The op then has cuBLAS read dX back and write dY W + dX
// over it.
cudaError_t lora_seed_input_grad(DType dtype, int64_t M, int64_t K, int64_t R,
                                 const void* grad_xa, Operand lora_A, DropoutArgs dropout,
                                 void* grad_x, cudaStream_t stream);

// keep[i] for i < count: the mask the LoRA kernels draw for flat element i.
cudaError_t dropout_keep_mask(bool* keep, int64_t count, DropoutArgs dropout,
                              cudaStream_t stream);

// out[M, D] = residual + scaling * (act(pre[M, m]) U[D, m]^T + up_bias); up_bias may be null.
cudaError_t adapter_output(DType dtype, Activation activation, int64_t M, int64_t D, int64_t m,
                           const void* pre, Operand up_weight, Operand residual,
                           const void* up_bias, int64_t bias_stride, double scaling, void* out,
                           cudaStream_t stream);

// d(pre)[M, m] = scaling * (dOut[M, D] U[D, m]) * act'(pre), in the data's dtype.
cudaError_t adapter_pre_grad(DType dtype, Activation activation, int64_t M, int64_t m,
                             int64_t D, Operand grad_out, Operand up_weight, const void* pre,
                             double scaling, void* grad_pre, cudaStream_t stream);

// hidden[i] = scaling * act(pre[i]) for i < count, in the data's dtype.
cudaError_t adapter_scaled_activation(DType dtype, Activation activation, int64_t count,
                                      const void* pre, double scaling, void* hidden,
                                      cudaStream_t stream);

}  // namespace fastdelta::cuda
