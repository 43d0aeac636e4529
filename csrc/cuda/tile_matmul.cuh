// One tiled matmul for every product of the cpp backend that has a small dimension (the
// LoRA rank or the adapter bottleneck), with what surrounds the product fused into it: the
// operands are read through loader functors (which apply the dropout mask or the activation
// on the fly) and each result goes through an epilogue functor (scaling, bias, residual, mask).
// The big products (x W^T, dY W, dW) are cuBLAS's, through ATen, in the *_cuda.cpp files.
//
//   C[i, j] = sum_k a(i, k) * b(j, k),   i < M, j < N, k < K, accumulated in acc_t.
//
// A block computes a kTileM x kTileN tile of C from kTileK-deep slices of both operands held in
// shared memory; each of its 256 threads owns 4 x 4 outputs. gridDim.z splits the k range into
// chunks (for products whose output is too small to fill the GPU); an epilogue then writes a
// partial sum per chunk (see StorePartial), summed afterwards in a fixed order, so results are
// deterministic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "../dropout.h"
#include "launch.h"

namespace fastdelta::cuda {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;
constexpr int kThreadRows = kTileM / 16;  // outputs per thread along i (rows ty + 16 * r)
constexpr int kThreadCols = kTileN / 16;  // outputs per thread along j (cols tx + 16 * c)

// The tile (blockIdx.x, blockIdx.y) of C over k-chunk blockIdx.z: the body of the two kernels
// below, which differ only in their launch bounds.
template <typename acc_t, typename ALoad, typename BLoad, typename Epilogue>
__device__ __forceinline__ void tile_matmul_block(int64_t M, int64_t N, int64_t K,
                                                  int64_t k_chunk, ALoad& a, BLoad& b,
                                                  Epilogue& epilogue) {
  // +1 column: the transposed stores into the tiles do not all hit one bank.
  __shared__ acc_t a_tile[kTileK][kTileM + 1];
  __shared__ acc_t b_tile[kTileK][kTileN + 1];
  a.prepare();
  b.prepare();
  epilogue.prepare();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = k_begin + k_chunk < K ? k_begin + k_chunk : K;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[kThreadRows][kThreadCols];
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
#pragma unroll
    for (int c = 0; c < kThreadCols; ++c) acc[r][c] = acc_t(0);
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    // Consecutive threads take consecutive k: coalesced for operands with k contiguous.
    for (int e = threadIdx.x; e < kTileM * kTileK; e += kThreads) {
      const int kk = e % kTileK, i = e / kTileK;
      const int64_t row = row0 + i, k = k0 + kk;
      a_tile[kk][i] = row < M && k < k_end ? a(row, k) : acc_t(0);
    }
    for (int e = threadIdx.x; e < kTileN * kTileK; e += kThreads) {
      const int kk = e % kTileK, j = e / kTileK;
      const int64_t col = col0 + j, k = k0 + kk;
      b_tile[kk][j] = col < N && k < k_end ? b(col, k) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t a_values[kThreadRows], b_values[kThreadCols];
#pragma unroll
      for (int r = 0; r < kThreadRows; ++r) a_values[r] = a_tile[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < kThreadCols; ++c) b_values[c] = b_tile[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < kThreadRows; ++r) {
#pragma unroll
        for (int c = 0; c < kThreadCols; ++c) acc[r][c] += a_values[r] * b_values[c];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
#pragma unroll
    for (int c = 0; c < kThreadCols; ++c) {
      const int64_t row = row0 + ty + 16 * r, col = col0 + tx + 16 * c;
      if (row < M && col < N) epilogue(row, col, acc[r][c]);
    }
  }
}

// float32 accumulation (float, half and bfloat16 data). ptxas chooses the registers: 48-64 per
// thread, no spills (tests/test_cpp_extension.py's ptxas audit). Asking for a minimum of blocks
// per SM, even 1, makes it take 66-90 instead, for fewer resident blocks.
template <typename acc_t, typename ALoad, typename BLoad, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    tile_matmul_kernel(int64_t M, int64_t N, int64_t K, int64_t k_chunk, ALoad a, BLoad b,
                       Epilogue epilogue) {
  tile_matmul_block<acc_t>(M, N, K, k_chunk, a, b, epilogue);
}

// float64 accumulation: the 16 accumulators and 8 operands of a thread take 48 registers alone.
// Left to choose, ptxas kept gelu_new's float64 up-projection at 80 registers on sm_80 (three
// blocks per SM) and spilled 16 bytes to local memory; at least two blocks per SM allows up to
// 128 registers, and the float64 kernels take 95-115 with no spills.
template <typename acc_t, typename ALoad, typename BLoad, typename Epilogue>
__global__ void __launch_bounds__(kThreads, 2)
    tile_matmul_kernel_fp64(int64_t M, int64_t N, int64_t K, int64_t k_chunk, ALoad a, BLoad b,
                            Epilogue epilogue) {
  tile_matmul_block<acc_t>(M, N, K, k_chunk, a, b, epilogue);
}

// Launch C = a . b^T on `stream` as chunk_count(K, k_chunk) k-chunks of k_chunk (the epilogue
// must then write per-chunk partial sums, see StorePartial); returns the launch's error. An
// empty reduction (K = 0) still runs the epilogue, with zeros.
template <typename acc_t, typename ALoad, typename BLoad, typename Epilogue>
cudaError_t tile_matmul_chunked(int64_t M, int64_t N, int64_t K, int64_t k_chunk,
                                const ALoad& a, const BLoad& b, const Epilogue& epilogue,
                                cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  // gridDim.y and gridDim.z are at most 65535: N up to 4,194,240 columns (the cpp backend's N
  // are feature counts), and reduction_chunk makes a few chunks per multiprocessor. Beyond, the
  // launch fails and the op raises; it never computes a partial result.
  const dim3 grid(static_cast<unsigned>((M + kTileM - 1) / kTileM),
                  static_cast<unsigned>((N + kTileN - 1) / kTileN),
                  static_cast<unsigned>(chunk_count(K, k_chunk)));
  if constexpr (std::is_same_v<acc_t, double>) {
    tile_matmul_kernel_fp64<acc_t><<<grid, kThreads, 0, stream>>>(M, N, K, k_chunk, a, b, epilogue);
  } else {
    tile_matmul_kernel<acc_t><<<grid, kThreads, 0, stream>>>(M, N, K, k_chunk, a, b, epilogue);
  }
  return cudaGetLastError();
}

// Launch C = a . b^T on `stream` in one pass over k.
template <typename acc_t, typename ALoad, typename BLoad, typename Epilogue>
cudaError_t tile_matmul(int64_t M, int64_t N, int64_t K, const ALoad& a, const BLoad& b,
                        const Epilogue& epilogue, cudaStream_t stream) {
  return tile_matmul_chunked<acc_t>(M, N, K, std::max<int64_t>(K, 1), a, b, epilogue, stream);
}

// Calls body(scalar_t{}) with the C++ type of `dtype` and returns its result.
template <typename Body>
cudaError_t dispatch_dtype(DType dtype, const Body& body) {
  switch (dtype) {
    case DType::Float:
      return body(float{});
    case DType::Double:
      return body(double{});
    case DType::Half:
      return body(c10::Half{});
    case DType::BFloat16:
      return body(c10::BFloat16{});
  }
  return cudaErrorInvalidValue;
}

// The type a kernel accumulates in: double for double data, else float.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ---------------------------------------------------------------------------------------------
// Operand loaders: value (row, col) of an operand, in acc_t.

// data[row * stride_row + col * stride_col]: any layout, a transposed or stride-0 one too.
template <typename scalar_t, typename acc_t>
struct Strided {
  const scalar_t* data;
  int64_t stride_row, stride_col;
  __device__ void prepare() {}
  __device__ acc_t operator()(int64_t row, int64_t col) const {
    return static_cast<acc_t>(data[row * stride_row + col * stride_col]);
  }
};

// An Operand read as `scalar_t`; transposed: its (col, row) element at (row, col).
template <typename scalar_t, typename acc_t>
Strided<scalar_t, acc_t> strided(const Operand& operand, bool transposed = false) {
  const auto* data = static_cast<const scalar_t*>(operand.data);
  if (transposed) return {data, operand.stride_col, operand.stride_row};
  return {data, operand.stride_row, operand.stride_col};
}

// A contiguous rows x width buffer as an operand (transposed: as its width x rows transpose).
template <typename scalar_t, typename acc_t>
Strided<scalar_t, acc_t> contiguous(const void* data, int64_t width, bool transposed = false) {
  const auto* typed = static_cast<const scalar_t*>(data);
  if (transposed) return {typed, 1, width};
  return {typed, width, 1};
}

// An element of the LoRA input x [M, K] after dropout (without the 1 / (1 - p)), its mask
// hashed from the seed at index m * K + k. kTransposed: the operand is x^T, (row, col) = (k, m).
template <typename scalar_t, typename acc_t, bool kTransposed>
struct Dropped {
  const scalar_t* data;
  int64_t stride_row, stride_col;  // of the operand, so swapped for x^T
  int64_t width;                   // K
  const int64_t* seed;
  uint32_t threshold;
  uint64_t key;
  __device__ void prepare() { key = dropout_key(*seed); }
  __device__ acc_t operator()(int64_t row, int64_t col) const {
    const int64_t m = kTransposed ? col : row, k = kTransposed ? row : col;
    if (!dropout_keep(key, m * width + k, threshold)) return acc_t(0);
    return static_cast<acc_t>(data[row * stride_row + col * stride_col]);
  }
};

// ---------------------------------------------------------------------------------------------
// Epilogues shared by the LoRA and adapter kernels.

// out[row, col] = scale * value.
template <typename out_t, typename acc_t>
struct StoreScaled {
  out_t* out;
  int64_t stride_row;
  acc_t scale;
  __device__ void prepare() {}
  __device__ void operator()(int64_t row, int64_t col, acc_t value) const {
    out[row * stride_row + col] = static_cast<out_t>(scale * value);
  }
};

// The partial sum of k-chunk blockIdx.z: out[blockIdx.z][row][col] = value; the caller sums
// the chunks.
template <typename acc_t>
struct StorePartial {
  acc_t* out;
  int64_t stride_row, stride_chunk;
  __device__ void prepare() {}
  __device__ void operator()(int64_t row, int64_t col, acc_t value) const {
    out[blockIdx.z * stride_chunk + row * stride_row + col] = value;
  }
};

}  // namespace fastdelta::cuda
