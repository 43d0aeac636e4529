// The LoRA linear's CUDA kernels (launch functions declared in launch.h): every product with
// the rank as one of its dimensions, through the tile kernel, with the dropout mask hashed from
// the seed inside the operand loaders and epilogues (never stored), and the scaling, the bias
// and the masked gradient fused into the epilogues.
#include <algorithm>

#include "../dropout.h"
#include "launch.h"
#include "tile_matmul.cuh"

namespace fastdelta::cuda {
namespace {

// y[row, col] = bias[col] + scaling * value, written before cuBLAS reads y back to add x W^T.
template <typename scalar_t, typename acc_t>
struct SeedOutput {
  scalar_t* out;
  int64_t stride_row;
  const scalar_t* bias;  // null: no bias
  int64_t bias_stride;
  acc_t scaling;
  __device__ void prepare() {}
  __device__ void operator()(int64_t row, int64_t col, acc_t value) const {
    const acc_t b = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[col * bias_stride]);
    out[row * stride_row + col] = static_cast<scalar_t>(b + scaling * value);
  }
};

// dX[row, col] = value where the forward kept x[row, col], else 0, written before cuBLAS reads
// dX back to add dY W.
// The 1 / (1 - p) is already in dxa. No seed: nothing is dropped.
template <typename scalar_t, typename acc_t>
struct SeedInputGrad {
  scalar_t* out;
  int64_t stride_row;  // K, the mask's width too
  const int64_t* seed;
  uint32_t threshold;
  uint64_t key;
  __device__ void prepare() {
    if (seed != nullptr) key = dropout_key(*seed);
  }
  __device__ void operator()(int64_t row, int64_t col, acc_t value) const {
    const int64_t index = row * stride_row + col;
    const bool kept = seed == nullptr || dropout_keep(key, index, threshold);
    out[index] = static_cast<scalar_t>(kept ? value : acc_t(0));
  }
};

__global__ void keep_mask_kernel(bool* keep, int64_t count, const int64_t* seed,
                                 uint32_t threshold) {
  const uint64_t key = dropout_key(*seed);
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < count; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keep[index] = dropout_keep(key, index, threshold);
  }
}

// The product over an x operand, with its dropout mask when there is one.
template <typename scalar_t, typename acc_t, bool kTransposed, typename Body>
cudaError_t with_x_operand(Operand x, int64_t K, DropoutArgs dropout, const Body& body) {
  if (dropout.seed == nullptr) return body(strided<scalar_t, acc_t>(x, kTransposed));
  const auto data = strided<scalar_t, acc_t>(x, kTransposed);
  const Dropped<scalar_t, acc_t, kTransposed> dropped{
      data.data, data.stride_row, data.stride_col, K, dropout.seed, dropout.threshold, 0};
  return body(dropped);
}

}  // namespace

int64_t reduction_chunk(int64_t rows, int64_t cols, int64_t length, int device) {
  constexpr int64_t kMinChunk = 256;  // rows per chunk at least
  int multiprocessors = 0;
  if (cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) !=
      cudaSuccess) {
    multiprocessors = 1;
  }
  // About two blocks per multiprocessor.
  const int64_t tiles = ((rows + kTileM - 1) / kTileM) * ((cols + kTileN - 1) / kTileN);
  const int64_t wanted = (2 * multiprocessors + tiles - 1) / tiles;
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, length / kMinChunk));
  const int64_t chunk = (length + splits - 1) / splits;
  return std::max<int64_t>(kTileK, (chunk + kTileK - 1) / kTileK * kTileK);
}

cudaError_t lora_down(DType dtype, int64_t M, int64_t K, int64_t R, Operand x, Operand lora_A,
                      DropoutArgs dropout, double scale, void* xa, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const StoreScaled<acc_t, acc_t> store{static_cast<acc_t*>(xa), R, static_cast<acc_t>(scale)};
    const auto a_rows = strided<scalar_t, acc_t>(lora_A);
    return with_x_operand<scalar_t, acc_t, false>(x, K, dropout, [&](const auto& x_rows) {
      return tile_matmul<acc_t>(M, R, K, x_rows, a_rows, store, stream);
    });
  });
}

cudaError_t lora_seed_output(DType dtype, int64_t M, int64_t N, int64_t R, const void* xa,
                             Operand lora_B, const void* bias, int64_t bias_stride,
                             double scaling, void* y, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const SeedOutput<scalar_t, acc_t> seed{static_cast<scalar_t*>(y), N,
                                           static_cast<const scalar_t*>(bias), bias_stride,
                                           static_cast<acc_t>(scaling)};
    return tile_matmul<acc_t>(M, N, R, contiguous<acc_t, acc_t>(xa, R),
                              strided<scalar_t, acc_t>(lora_B), seed, stream);
  });
}

cudaError_t lora_grad_xa(DType dtype, int64_t M, int64_t N, int64_t R, Operand grad_y,
                         Operand lora_B, double scale, void* grad_xa, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const StoreScaled<acc_t, acc_t> store{static_cast<acc_t*>(grad_xa), R,
                                          static_cast<acc_t>(scale)};
    return tile_matmul<acc_t>(M, R, N, strided<scalar_t, acc_t>(grad_y),
                              strided<scalar_t, acc_t>(lora_B, /*transposed=*/true), store,
                              stream);
  });
}

cudaError_t lora_grad_B(DType dtype, int64_t M, int64_t N, int64_t R, Operand grad_y,
                        const void* xa, int64_t chunk, void* partials, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const StorePartial<acc_t> store{static_cast<acc_t*>(partials), R, N * R};
    return tile_matmul_chunked<acc_t>(N, R, M, chunk,
                                      strided<scalar_t, acc_t>(grad_y, /*transposed=*/true),
                                      contiguous<acc_t, acc_t>(xa, R, /*transposed=*/true), store,
                                      stream);
  });
}

cudaError_t lora_grad_A(DType dtype, int64_t M, int64_t K, int64_t R, const void* grad_xa,
                        Operand x, DropoutArgs dropout, int64_t chunk, void* partials,
                        cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const StorePartial<acc_t> store{static_cast<acc_t*>(partials), K, R * K};
    const auto grad_xa_cols = contiguous<acc_t, acc_t>(grad_xa, R, /*transposed=*/true);
    return with_x_operand<scalar_t, acc_t, true>(x, K, dropout, [&](const auto& x_cols) {
      return tile_matmul_chunked<acc_t>(R, K, M, chunk, grad_xa_cols, x_cols, store, stream);
    });
  });
}

cudaError_t lora_seed_input_grad(DType dtype, int64_t M, int64_t K, int64_t R,
                                 const void* grad_xa, Operand lora_A, DropoutArgs dropout,
                                 void* grad_x, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const SeedInputGrad<scalar_t, acc_t> seed{static_cast<scalar_t*>(grad_x), K, dropout.seed,
                                              dropout.threshold, 0};
    return tile_matmul<acc_t>(M, K, R, contiguous<acc_t, acc_t>(grad_xa, R),
                              strided<scalar_t, acc_t>(lora_A, /*transposed=*/true), seed,
                              stream);
  });
}

cudaError_t dropout_keep_mask(bool* keep, int64_t count, DropoutArgs dropout,
                              cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  const int64_t blocks = std::min<int64_t>((count + kBlock - 1) / kBlock, 65536);
  keep_mask_kernel<<<blocks, kBlock, 0, stream>>>(keep, count, dropout.seed, dropout.threshold);
  return cudaGetLastError();
}

}  // namespace fastdelta::cuda
