// The LoRA linear on the CPU: y = x W^T + b + s * (drop(x) A^T) B^T, forward and backward.
//
// The products are ATen matmuls (MKL / oneDNN); what ATen cannot fuse is done per block of
// kRowBlock rows inside at::parallel_for: the dropout mask is hashed from the seed for those
// rows only and applied to a [kRowBlock, K] float32 copy of them, so no [M, K] temporary and no
// mask is ever made, and the backward hashes each block's mask once for dA and dX both.
//
// The hashing and the masked copies are plain loops over arrays, which the compiler vectorises:
// on x86-64 Linux they are compiled for AVX-512, AVX2 and the baseline (target_clones) and the
// loader picks the widest the CPU runs. Measured on a 2-core AVX-512 machine, one thread, for a
// [2048, 1024] keep-mask: 2.3 ms hashed one element at a time, 0.7 ms vectorised; the LoRA
// forward and backward at that size with dropout 0.1 went from 1.14x to about 1.0x of their
// time without dropout.
//
// The AVX-512 clone is "arch=x86-64-v4", which the loader picks by the CPU's features (AVX-512
// F, BW, CD, DQ, VL). An "arch=skylake-avx512" clone is picked by the CPU's model, so only on
// Intel parts: on an AMD EPYC (Zen 4) the AVX2 clone ran. There, for 1024 x 256 elements in
// 128-row blocks, the x86-64-v4 clone hashes in 19 us against AVX2's 58 us (its 64-bit
// multiplies are one instruction, vpmullq), and hashes and copies in 51 us against 93 us.
//
// The outputs with an [M, N] or [M, K] shape are written once: the low-rank term (and the bias)
// first, then the big product is accumulated onto it by the GEMM itself (beta = 1), which costs
// nothing in a compute-bound GEMM, where adding the low-rank term afterwards reads and writes
// the whole output again.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "../common.h"
#include "../dropout.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define FASTDELTA_AVX512_TARGET "arch=x86-64-v4"
#elif defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDELTA_AVX512_TARGET "avx512f"  // arch=x86-64-v4 needs GCC 12
#endif

#ifdef FASTDELTA_AVX512_TARGET
#define FASTDELTA_VECTOR_CLONES \
  __attribute__((target_clones("default", "avx2", FASTDELTA_AVX512_TARGET)))
#else
#define FASTDELTA_VECTOR_CLONES
#endif

namespace fastdelta {

// The clone of FASTDELTA_VECTOR_CLONES that this CPU runs: the same three targets as versions of
// one function, each returning its name, which the loader picks by the same rules.
#ifdef FASTDELTA_AVX512_TARGET
__attribute__((target("default"))) const char* vector_clone() { return "baseline"; }
__attribute__((target("avx2"))) const char* vector_clone() { return "avx2"; }
__attribute__((target(FASTDELTA_AVX512_TARGET))) const char* vector_clone() {
  return FASTDELTA_AVX512_TARGET;
}
#else
const char* vector_clone() { return "baseline"; }
#endif

std::string cpu_vector_isa() { return vector_clone(); }

namespace {

// Rows per block: a [128, K] float32 block (512 KiB at K = 1024) stays in L2 for K up to a
// couple of thousand, and halves the small GEMM calls of 64-row blocks.
constexpr int64_t kRowBlock = 128;

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
    // Read in place (the seed is a CPU scalar here): item() would be a dispatched op.
    dropout.key = dropout_key(*seed->const_data_ptr<int64_t>());
    dropout.threshold = dropout_threshold(p);
    dropout.scale = 1.0 / (1.0 - p);
  }
  return dropout;
}

// words[i] = the hash word of word index first_word + i (csrc/dropout.h), for i < count.
FASTDELTA_VECTOR_CLONES
void hash_words(uint64_t key, int64_t first_word, int64_t count, uint64_t* words) {
  for (int64_t i = 0; i < count; ++i) words[i] = dropout_word(key, first_word + i);
}

// The 16 random bits of element indices first .. first + count - 1, one uint16 lane each (lane
// j for index first + j), hashed into `buffer`.
const uint16_t* dropout_lanes(const CpuDropout& dropout, int64_t first, int64_t count,
                              std::vector<uint64_t>& buffer) {
  const int64_t first_word = first >> 2;
  const int64_t words = ((first + count + 3) >> 2) - first_word;
  buffer.resize(words);
  hash_words(dropout.key, first_word, words, buffer.data());
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  // Lane n of a word (its bits 16n .. 16n + 15, dropout_bits') is its n-th uint16 in memory.
  return reinterpret_cast<const uint16_t*>(buffer.data()) + (first - 4 * first_word);
#else
  static_assert(sizeof(uint64_t) == 4 * sizeof(uint16_t));
  for (uint64_t& word : buffer) {
    uint16_t lanes[4];
    for (int n = 0; n < 4; ++n) lanes[n] = static_cast<uint16_t>(word >> (16 * n));
    std::memcpy(&word, lanes, sizeof(word));
  }
  return reinterpret_cast<const uint16_t*>(buffer.data()) + (first - 4 * first_word);
#endif
}

// out[j] = lanes[j] >= threshold ? x[j] : 0, float32.
FASTDELTA_VECTOR_CLONES
void drop_copy(const float* x, const uint16_t* lanes, uint32_t threshold, int64_t count,
               float* out) {
  for (int64_t j = 0; j < count; ++j) {
    out[j] = static_cast<uint32_t>(lanes[j]) >= threshold ? x[j] : 0.0f;
  }
}

// values[j] = 0 where lanes[j] < threshold, float32, in place.
FASTDELTA_VECTOR_CLONES
void drop_in_place(float* values, const uint16_t* lanes, uint32_t threshold, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    values[j] = static_cast<uint32_t>(lanes[j]) >= threshold ? values[j] : 0.0f;
  }
}

// keep[j] = lanes[j] >= threshold, as bools.
FASTDELTA_VECTOR_CLONES
void keep_bits(const uint16_t* lanes, uint32_t threshold, int64_t count, uint8_t* keep) {
  for (int64_t j = 0; j < count; ++j) keep[j] = static_cast<uint32_t>(lanes[j]) >= threshold;
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// block[i, k] = x2d[first + i, k] in the accumulate type, 0 where lane i * K + k of the block's
// dropout bits is below the threshold (lanes may be null: no dropout).
template <typename scalar_t>
void copy_rows(const at::Tensor& x2d, int64_t first, int64_t rows, const uint16_t* lanes,
               uint32_t threshold, acc_type_t<scalar_t>* block) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t K = x2d.size(1), stride_row = x2d.stride(0), stride_col = x2d.stride(1);
  const scalar_t* x = x2d.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = x + (first + i) * stride_row;
    acc_t* out = block + i * K;
    const uint16_t* bits = lanes == nullptr ? nullptr : lanes + i * K;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stride_col == 1 && bits != nullptr) {
        drop_copy(row, bits, threshold, K, out);
        continue;
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const acc_t value = static_cast<acc_t>(row[k * stride_col]);
      out[k] = bits == nullptr || bits[k] >= threshold ? value : acc_t(0);
    }
  }
}

// Rows first .. first + rows - 1 of t: t itself when that is all of them (a decode-sized input
// is one block), which spares a dispatched narrow per tensor and block.
at::Tensor rows_of(const at::Tensor& t, int64_t first, int64_t rows) {
  return first == 0 && rows == t.size(0) ? t : t.narrow(0, first, rows);
}

// One block of rows of x, as for_each_row_block hands it to its body.
struct RowBlock {
  int64_t first;           // the first row
  int64_t rows;            // how many rows
  at::Tensor x;            // [rows, K] accumulate type, dropped elements zeroed (if asked for)
  const uint16_t* lanes;   // [rows * K] dropout bits, or null without dropout
};

// Calls body(block) for block b of at most kRowBlock rows of x2d, for b in [begin, end), with
// `x_buffer` ([kRowBlock, K] accumulate type, or undefined) holding block.x.
template <typename Body>
void run_row_blocks(const at::Tensor& x2d, const CpuDropout& dropout, at::Tensor x_buffer,
                    int64_t begin, int64_t end, const Body& body) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  std::vector<uint64_t> words;
  for (int64_t b = begin; b < end; ++b) {
    RowBlock block{b * kRowBlock, std::min(kRowBlock, M - b * kRowBlock), {}, nullptr};
    if (dropout.active) {
      block.lanes = dropout_lanes(dropout, block.first * K, block.rows * K, words);
    }
    if (x_buffer.defined()) {
      block.x = rows_of(x_buffer, 0, block.rows);
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, x2d.scalar_type(), "fastdelta_C.copy_rows", [&] {
            copy_rows<scalar_t>(x2d, block.first, block.rows, block.lanes, dropout.threshold,
                                block.x.data_ptr<acc_type_t<scalar_t>>());
          });
    }
    body(block);
  }
}

// Calls body(block) for consecutive blocks of at most kRowBlock rows of x2d, in parallel. The
// per-thread buffer is [kRowBlock, K] ([M, K] for a single block); `copy_x` says whether body
// needs block.x.
template <typename Body>
void for_each_row_block(const at::Tensor& x2d, const CpuDropout& dropout, bool copy_x,
                        const Body& body) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const auto options = x2d.options().dtype(accumulate_type(x2d.scalar_type()));
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t buffer_rows = std::min(kRowBlock, M);
  const auto buffer = [&] {
    return copy_x ? at::empty({buffer_rows, K}, options) : at::Tensor();
  };
  if (blocks <= 1) {  // decode-sized inputs: no thread pool, no thread state to hand over
    run_row_blocks(x2d, dropout, buffer(), 0, blocks, body);
    return;
  }
  // The bodies call ATen ops: the worker threads take this thread's grad mode and dispatch
  // state (an op's kernel runs below autograd, so parameters that require grad are plain
  // inputs there; a fresh worker thread would send them to autograd).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    run_row_blocks(x2d, dropout, buffer(), begin, end, body);
  });
}

// xa = drop(x) A^T / (1 - p): [M, r] in the accumulate type.
at::Tensor low_rank_input(const at::Tensor& x2d, const at::Tensor& lora_A,
                          const CpuDropout& dropout) {
  const auto acc = accumulate_type(x2d.scalar_type());
  if (!dropout.active && x2d.scalar_type() == acc) return at::mm(x2d, lora_A.t());
  // The 1 / (1 - p) is the GEMM's alpha, not a pass over the [M, K] input.
  const at::Tensor a_t = cast(lora_A, acc).t();
  at::Tensor xa = at::empty({x2d.size(0), lora_A.size(0)}, x2d.options().dtype(acc));
  for_each_row_block(x2d, dropout, /*copy_x=*/true, [&](const RowBlock& block) {
    at::Tensor out = rows_of(xa, block.first, block.rows);
    at::addmm_out(out, out, block.x, a_t, /*beta=*/0, dropout.scale);  // out is not read
  });
  return xa;
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& seed,
    double scaling, double dropout_p, bool fan_in_fan_out) {
  check_lora_arguments("fastdelta_C::lora_forward", x, weight, lora_A, lora_B, seed);
  const int64_t K = x.size(-1), N = lora_B.size(0), R = lora_A.size(0);
  const at::Tensor x2d = as_2d(x, K);
  const at::Tensor xa = low_rank_input(x2d, lora_A, cpu_dropout(seed, dropout_p));
  // y = b + s * xa B^T first, then the GEMM adds x W^T onto it (see the top of the file). In
  // float32 and float64 (xa's own dtype) the scaling is the GEMM's alpha; a 16-bit x takes xa
  // scaled in float32 and rounded once.
  const bool low_precision = x.scalar_type() != xa.scalar_type();
  const at::Tensor low = low_precision ? (xa * scaling).to(x.scalar_type()) : xa;
  const double alpha = low_precision ? 1.0 : scaling;
  at::Tensor y = bias.has_value() ? at::addmm(*bias, low, lora_B.t(), 1.0, alpha)
                                  : scaled_mm(low, lora_B.t(), alpha);
  y.addmm_(x2d, base_weight(weight, fan_in_fan_out).t());
  return {like_rows_of(y, x, N), like_rows_of(xa, x, R)};
}

// rows[j] = drop'(values[j]) in grad_x's dtype, for the `count` elements of one block: the
// low-rank part of dX, which the base product is then added onto.
void store_kept(at::Tensor& rows, const at::Tensor& values, const RowBlock& block,
                uint32_t threshold) {
  const int64_t count = block.rows * rows.size(1);
  if (rows.scalar_type() == at::kFloat) {  // values are rows themselves
    drop_in_place(rows.data_ptr<float>(), block.lanes, threshold, count);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows.scalar_type(), "fastdelta_C.store_kept", [&] {
        using acc_t = acc_type_t<scalar_t>;
        const acc_t* source = values.const_data_ptr<acc_t>();
        scalar_t* target = rows.data_ptr<scalar_t>();
        for (int64_t j = 0; j < count; ++j) {
          target[j] = static_cast<scalar_t>(block.lanes[j] >= threshold ? source[j] : acc_t(0));
        }
      });
}

// The row-blocked part of the backward, one pass that hashes each block's mask once: dA =
// dxa^T drop(x) summed over the blocks (one partial sum per thread, in the accumulate type)
// when `grad_A` is asked for, and dX = drop'(dxa A) when `grad_x` ([M, K], x's dtype) is.
void blocked_backward(const at::Tensor& x2d, const at::Tensor& grad_xa, const at::Tensor& a_acc,
                      const CpuDropout& dropout, at::Tensor* grad_x, at::Tensor* grad_A) {
  std::vector<at::Tensor> partial_A(at::get_num_threads());
  const bool float_x = grad_x != nullptr && grad_x->scalar_type() == at::kFloat;
  for_each_row_block(x2d, dropout, grad_A != nullptr, [&](const RowBlock& block) {
    const at::Tensor rows_xa = rows_of(grad_xa, block.first, block.rows);
    if (grad_A != nullptr) {
      at::Tensor& sum = partial_A[at::get_thread_num()];
      if (sum.defined()) {
        sum.addmm_(rows_xa.t(), block.x);
      } else {
        sum = at::mm(rows_xa.t(), block.x);
      }
    }
    if (grad_x != nullptr) {
      at::Tensor rows = rows_of(*grad_x, block.first, block.rows);
      const at::Tensor values = float_x ? rows : at::empty({block.rows, a_acc.size(1)},
                                                           a_acc.options());
      at::Tensor out = values;
      at::mm_out(out, rows_xa, a_acc);
      store_kept(rows, values, block, dropout.threshold);
    }
  });
  if (grad_A == nullptr) return;
  for (const at::Tensor& sum : partial_A) {
    if (!sum.defined()) continue;
    if (grad_A->defined()) {
      grad_A->add_(sum);
    } else {
      *grad_A = sum;
    }
  }
  if (!grad_A->defined()) *grad_A = at::zeros({a_acc.size(0), x2d.size(1)}, a_acc.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
    const std::optional<at::Tensor>& seed, double scaling, double dropout_p, bool fan_in_fan_out,
    std::array<bool, 5> needs) {
  check_lora_arguments("fastdelta_C::lora_backward", x, weight, lora_A, lora_B, seed);
  const auto [need_x, need_weight, need_bias, need_A, need_B] = needs;
  const int64_t K = x.size(-1), N = lora_B.size(0), R = lora_A.size(0);
  const at::Tensor grad2d = as_2d(grad_y, N);
  const at::Tensor x2d = as_2d(x, K);
  const auto dtype = x.scalar_type();
  const auto acc = accumulate_type(dtype);
  const CpuDropout dropout = cpu_dropout(seed, dropout_p);
  at::Tensor grad_x, grad_A, grad_B;
  if (need_B) {
    grad_B = scaled_mm(grad2d.t(), cast(as_2d(xa, R), dtype), scaling);
  }
  if (need_x || need_A) {
    // dxa = s * dY B, with the 1 / (1 - p) of dropout: [M, r] in the accumulate type.
    const double grad_xa_scale = scaling * dropout.scale;
    const at::Tensor grad_xa = dtype == acc
                                   ? scaled_mm(grad2d, lora_B, grad_xa_scale)
                                   : at::mm(grad2d, lora_B).to(acc).mul_(grad_xa_scale);
    const bool blocked_A = need_A && (dropout.active || dtype != acc);
    if (need_A && !blocked_A) grad_A = at::mm(grad_xa.t(), x2d);
    // dX = drop'(dxa A), then dY W added onto it by the GEMM (see the top of the file).
    if (need_x && !dropout.active) grad_x = at::mm(cast(grad_xa, dtype), lora_A);
    if (need_x && dropout.active) grad_x = at::empty({x2d.size(0), K}, x.options());
    const bool blocked_x = need_x && dropout.active;
    if (blocked_A || blocked_x) {
      blocked_backward(x2d, grad_xa, cast(lora_A, acc), dropout, blocked_x ? &grad_x : nullptr,
                       blocked_A ? &grad_A : nullptr);
    }
    if (need_x) {
      grad_x.addmm_(grad2d, base_weight(weight, fan_in_fan_out));
      grad_x = like_rows_of(grad_x, x, K);
    }
    if (need_A) grad_A = cast(grad_A, lora_A.scalar_type());
  }
  auto [grad_weight, grad_bias] = base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias);
  return {grad_x, grad_weight, grad_bias, grad_A, grad_B};
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& seed, at::IntArrayRef shape, double p) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastdelta_C::dropout_keep_mask: seed must be an int64 scalar tensor");
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool));
  CpuDropout dropout;
  dropout.key = dropout_key(seed.item<int64_t>());
  dropout.threshold = dropout_threshold(p);
  auto* data = reinterpret_cast<uint8_t*>(keep.data_ptr<bool>());
  at::parallel_for(0, keep.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> words;
    const uint16_t* lanes = dropout_lanes(dropout, begin, end - begin, words);
    keep_bits(lanes, dropout.threshold, end - begin, data + begin);
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
