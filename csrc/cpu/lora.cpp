// The LoRA linear on the CPU: y = x W^T + b + s * (drop(x) A^T) B^T, forward and backward.
//
// The products are ATen matmuls (MKL / oneDNN); what ATen cannot fuse is done per block of
// kRowBlock rows inside at::parallel_for: the dropout mask is hashed from the seed for those
// rows only and applied to a [kRowBlock, K] float32 copy of them, so no [M, K] temporary and no
// mask is ever made, and the backward hashes each block's mask once for dA and dX both.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "../common.h"
#include "../dropout.h"

namespace fastdelta {
namespace {

// Rows per block: a [64, K] float32 block stays in L2 for K up to a few thousand.
constexpr int64_t kRowBlock = 64;

struct CpuDropout {
  bool active = false;
  uint64_t key = 0;
  uint32_t threshold = 0;
  double scale = 1.0;  // 1 / (1 - p), the inverted-dropout scale
};

CpuDropout cpu_dropout(const std::optional<at::Tensor>& seed, double p) {
  CpuDropout dropout;
  if (seed.has_value() && p > 0) {
    dropout.active = true;
    dropout.key = dropout_key(seed->item<int64_t>());
    dropout.threshold = dropout_threshold(p);
    dropout.scale = 1.0 / (1.0 - p);
  }
  return dropout;
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// block[i, k] = x2d[first + i, k] in the accumulate type, 0 where keep[i * K + k] is 0 (keep
// may be null: no dropout).
template <typename scalar_t>
void copy_rows(const at::Tensor& x2d, int64_t first, int64_t rows, const uint8_t* keep,
               acc_type_t<scalar_t>* block) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t K = x2d.size(1), stride_row = x2d.stride(0), stride_col = x2d.stride(1);
  const scalar_t* x = x2d.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = x + (first + i) * stride_row;
    acc_t* out = block + i * K;
    const uint8_t* kept = keep == nullptr ? nullptr : keep + i * K;
    if (stride_col == 1 && kept != nullptr) {
      for (int64_t k = 0; k < K; ++k) out[k] = kept[k] ? static_cast<acc_t>(row[k]) : acc_t(0);
    } else if (stride_col == 1) {
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<acc_t>(row[k]);
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const acc_t value = static_cast<acc_t>(row[k * stride_col]);
        out[k] = kept == nullptr || kept[k] ? value : acc_t(0);
      }
    }
  }
}

// One block of rows of x, as for_each_row_block hands it to its body.
struct RowBlock {
  int64_t first;        // the first row
  int64_t rows;         // how many rows
  at::Tensor x;         // [rows, K] accumulate type, dropped elements zeroed (if asked for)
  const uint8_t* keep;  // [rows * K] keep bits, or null without dropout
  at::Tensor scratch;   // [rows, K] accumulate type, the body's to use
};

// Calls body(block) for consecutive blocks of at most kRowBlock rows of x2d, in parallel. The
// per-thread buffers are [kRowBlock, K]; `copy_x` says whether body needs block.x.
template <typename Body>
void for_each_row_block(const at::Tensor& x2d, const CpuDropout& dropout, bool copy_x,
                        bool need_scratch, const Body& body) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const auto options = x2d.options().dtype(accumulate_type(x2d.scalar_type()));
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  // The bodies call ATen ops: the worker threads take this thread's grad mode and dispatch
  // state (an op's kernel runs below autograd, so parameters that require grad are plain
  // inputs there; a fresh worker thread would send them to autograd).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const at::Tensor x_buffer = copy_x ? at::empty({kRowBlock, K}, options) : at::Tensor();
    const at::Tensor scratch = need_scratch ? at::empty({kRowBlock, K}, options) : at::Tensor();
    std::vector<uint8_t> keep(dropout.active ? kRowBlock * K : 0);
    for (int64_t b = begin; b < end; ++b) {
      RowBlock block{b * kRowBlock, std::min(kRowBlock, M - b * kRowBlock), {}, nullptr, {}};
      if (dropout.active) {
        fill_keep_mask(dropout.key, dropout.threshold, block.first * K, block.rows * K,
                       keep.data());
        block.keep = keep.data();
      }
      if (copy_x) {
        block.x = x_buffer.narrow(0, 0, block.rows);
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, x2d.scalar_type(), "fastdelta_C.copy_rows", [&] {
              copy_rows<scalar_t>(x2d, block.first, block.rows, block.keep,
                                  block.x.data_ptr<acc_type_t<scalar_t>>());
            });
      }
      if (need_scratch) block.scratch = scratch.narrow(0, 0, block.rows);
      body(block);
    }
  });
}

// xa = drop(x) A^T / (1 - p): [M, r] in the accumulate type.
at::Tensor low_rank_input(const at::Tensor& x2d, const at::Tensor& lora_A,
                          const CpuDropout& dropout) {
  const auto acc = accumulate_type(x2d.scalar_type());
  if (!dropout.active && x2d.scalar_type() == acc) return at::mm(x2d, lora_A.t());
  // The 1 / (1 - p) goes into the [r, K] copy of A, not into the [M, K] input.
  const at::Tensor a_t = (lora_A.to(acc) * dropout.scale).t();
  at::Tensor xa = at::empty({x2d.size(0), lora_A.size(0)}, x2d.options().dtype(acc));
  for_each_row_block(x2d, dropout, /*copy_x=*/true, /*need_scratch=*/false,
                     [&](const RowBlock& block) {
                       at::Tensor out = xa.narrow(0, block.first, block.rows);
                       at::mm_out(out, block.x, a_t);
                     });
  return xa;
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& seed,
    double scaling, double dropout_p, bool fan_in_fan_out) {
  check_lora_arguments("fastdelta_C::lora_forward", x, weight, lora_A, lora_B, seed);
  const int64_t K = x.size(-1), N = lora_B.size(0), R = lora_A.size(0);
  const at::Tensor x2d = x.reshape({-1, K});
  const at::Tensor xa = low_rank_input(x2d, lora_A, cpu_dropout(seed, dropout_p));
  const at::Tensor w_t = base_weight(weight, fan_in_fan_out).t();
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x2d, w_t) : at::mm(x2d, w_t);
  // The low-rank product goes straight into y: no [M, N] temporary.
  y.addmm_(xa.to(x.scalar_type()), lora_B.t(), 1.0, scaling);
  return {y.view(with_last(x.sizes(), N)), xa.view(with_last(x.sizes(), R))};
}

// grad_x[first + i, k] += keep ? lora[i, k] : 0, for one block of rows.
void add_kept(const at::Tensor& grad_x, const RowBlock& block, const at::Tensor& lora) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_x.scalar_type(), "fastdelta_C.add_kept", [&] {
        using acc_t = acc_type_t<scalar_t>;
        const int64_t count = block.rows * grad_x.size(1);
        scalar_t* out = grad_x.data_ptr<scalar_t>() + block.first * grad_x.size(1);
        const acc_t* values = lora.const_data_ptr<acc_t>();
        for (int64_t j = 0; j < count; ++j) {
          const acc_t kept = block.keep[j] ? values[j] : acc_t(0);
          out[j] = static_cast<scalar_t>(static_cast<acc_t>(out[j]) + kept);
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
    const std::optional<at::Tensor>& seed, double scaling, double dropout_p, bool fan_in_fan_out,
    std::array<bool, 5> needs) {
  check_lora_arguments("fastdelta_C::lora_backward", x, weight, lora_A, lora_B, seed);
  const auto [need_x, need_weight, need_bias, need_A, need_B] = needs;
  const int64_t K = x.size(-1), N = lora_B.size(0), R = lora_A.size(0);
  const at::Tensor grad2d = grad_y.reshape({-1, N});
  const at::Tensor x2d = x.reshape({-1, K});
  const auto dtype = x.scalar_type();
  const auto acc = accumulate_type(dtype);
  const CpuDropout dropout = cpu_dropout(seed, dropout_p);
  at::Tensor grad_x, grad_A, grad_B;
  if (need_B) {
    grad_B = at::mm(grad2d.t(), xa.reshape({-1, R}).to(dtype)).mul_(scaling);
  }
  if (need_x) {
    grad_x = at::mm(grad2d, base_weight(weight, fan_in_fan_out));
  }
  if (need_x || need_A) {
    // dxa = s * dY B, with the 1 / (1 - p) of dropout: [M, r] in the accumulate type.
    const at::Tensor grad_xa = at::mm(grad2d, lora_B).to(acc).mul_(scaling * dropout.scale);
    if (need_x && !dropout.active) grad_x.addmm_(grad_xa.to(dtype), lora_A);
    const bool blocked_A = need_A && (dropout.active || dtype != acc);
    if (need_A && !blocked_A) grad_A = at::mm(grad_xa.t(), x2d);
    if (blocked_A || (need_x && dropout.active)) {
      // dA = dxa^T drop(x) summed over row blocks (one float32 partial per thread), and
      // dX += drop'(dxa A), each block's mask hashed once for both.
      const at::Tensor a_acc = lora_A.to(acc);
      std::vector<at::Tensor> partial_A(at::get_num_threads());
      const bool add_x = need_x && dropout.active;
      for_each_row_block(x2d, dropout, blocked_A, add_x, [&](const RowBlock& block) {
        const at::Tensor rows_xa = grad_xa.narrow(0, block.first, block.rows);
        if (blocked_A) {
          at::Tensor& sum = partial_A[at::get_thread_num()];
          if (!sum.defined()) sum = at::zeros({R, K}, a_acc.options());
          sum.addmm_(rows_xa.t(), block.x);
        }
        if (add_x) {
          at::Tensor lora = block.scratch;
          at::mm_out(lora, rows_xa, a_acc);
          add_kept(grad_x, block, lora);
        }
      });
      if (blocked_A) {
        grad_A = at::zeros({R, K}, a_acc.options());
        for (const at::Tensor& sum : partial_A) {
          if (sum.defined()) grad_A.add_(sum);
        }
      }
    }
    if (need_A) grad_A = grad_A.to(lora_A.scalar_type());
  }
  if (need_x) grad_x = grad_x.view(x.sizes());
  auto [grad_weight, grad_bias] = base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias);
  return {grad_x, grad_weight, grad_bias, grad_A, grad_B};
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& seed, at::IntArrayRef shape, double p) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastdelta_C::dropout_keep_mask: seed must be an int64 scalar tensor");
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool));
  const uint64_t key = dropout_key(seed.item<int64_t>());
  const uint32_t threshold = dropout_threshold(p);
  auto* data = reinterpret_cast<uint8_t*>(keep.data_ptr<bool>());
  at::parallel_for(0, keep.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    fill_keep_mask(key, threshold, begin, end - begin, data + begin);
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdelta_C, CPU, m) {
  m.impl("lora_forward", &lora_forward_cpu);
  m.impl("lora_backward", &lora_backward_cpu);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
}

}  // namespace fastdelta
