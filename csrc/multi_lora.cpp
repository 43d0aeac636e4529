// The mixed-batch LoRA of the cpp backend, fastdelta_C::multi_lora_forward and
// ::multi_lora_backward: row i of x runs adapter ids[i] of the stacked lora_A [n, r, K] and
// lora_B [n, N, r] (see fastdelta/ops/multi_lora.py). The functional op has grouped the rows
// once: `order` lists them by adapter (rows without one last) and `starts` [n + 1] where each
// adapter's rows begin in it. The base product runs once over the whole batch; each adapter's
// low-rank products run on its contiguous slice of the gathered rows, written in place, and
// the low-rank term goes back to its rows with one index_add_. The backward gathers dY the same
// way: dB_j = s_j dY_j^T xa_j, dxa_j = s_j dY_j B_j, dA_j = dxa_j^T drop(x_j) and
// dx_j = drop'(dxa_j A_j), scattered back onto dY W.
//
// ATen ops only, so one implementation serves CPU and CUDA tensors (registered for
// CompositeExplicitAutograd; the Python op fastdelta::multi_lora_linear carries the
// derivative). The per-adapter loop reads the n + 1 segment bounds on the host once per pass:
// free on the CPU; on a GPU, where this is the fallback of the triton backend (which reads
// nothing on the host), it waits for the queued kernels. The dropout mask is the extension's
// LoRA mask for x's shape (fastdelta_C::dropout_keep_mask), so a row is dropped exactly as
// lora_linear on the cpp backend drops it.
#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "dispatch.h"

namespace fastdelta {
namespace {

struct Span {
  int64_t adapter, first, last;  // the adapter's rows are positions first .. last - 1 of order
};

// What the ops assume of their arguments. fastdelta.ops.multi_lora_linear checks them for users
// first, with errors that name the fix; these guard direct calls of torch.ops.fastdelta_C.
void check_arguments(const char* op, const at::Tensor& x, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, const at::Tensor& scalings,
                     const at::Tensor& order, const at::Tensor& starts,
                     const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a feature dimension");
  const int64_t rows = x.size(-1) > 0 ? x.numel() / x.size(-1) : 0;
  TORCH_CHECK(lora_A.dim() == 3 && lora_B.dim() == 3 && lora_A.size(0) == lora_B.size(0) &&
                  lora_A.size(2) == x.size(-1) && lora_B.size(2) == lora_A.size(1),
              op, ": lora_A must be [n, r, K] and lora_B [n, N, r], K x's features");
  TORCH_CHECK(scalings.dim() == 1 && scalings.size(0) == lora_A.size(0), op,
              ": scalings must be [n], one per adapter");
  TORCH_CHECK(order.dim() == 1 && order.size(0) == rows && !order.is_floating_point(), op,
              ": order must be an integer [M], a permutation of x's rows");
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == lora_A.size(0) + 1 &&
                  !starts.is_floating_point(),
              op, ": starts must be an integer [n + 1]");
  TORCH_CHECK(!seed.has_value() || (seed->scalar_type() == at::kLong && seed->numel() == 1 &&
                                    seed->device() == x.device()),
              op, ": seed must be an int64 scalar tensor on x's device");
}

// The adapters that have rows, and how many rows have an adapter: one host read of `starts`,
// whose bounds must rise from 0 to at most `rows`.
std::pair<std::vector<Span>, int64_t> segments(const at::Tensor& starts, int64_t rows) {
  const at::Tensor bounds = starts.to(at::kCPU, at::kLong).contiguous();
  const int64_t* b = bounds.const_data_ptr<int64_t>();
  const int64_t count = bounds.numel();
  TORCH_CHECK(count > 0 && b[0] == 0 && b[count - 1] <= rows,
              "fastdelta_C multi_lora: starts must rise from 0 to at most x's rows");
  std::vector<Span> spans;
  for (int64_t j = 0; j + 1 < count; ++j) {
    TORCH_CHECK(b[j + 1] >= b[j], "fastdelta_C multi_lora: starts must not decrease");
    if (b[j + 1] > b[j]) spans.push_back({j, b[j], b[j + 1]});
  }
  return {spans, b[count - 1]};
}

// The extension's LoRA keep-mask for an [m, k] input.
at::Tensor keep_mask(const at::Tensor& seed, int64_t m, int64_t k, double p) {
  return op<at::Tensor(const at::Tensor&, at::IntArrayRef, double)>(
             "fastdelta_C::dropout_keep_mask")
      .call(seed, {m, k}, p);
}

at::Tensor rows_of(const at::Tensor& t, const Span& span) {
  return t.narrow(0, span.first, span.last - span.first);
}

std::tuple<at::Tensor, at::Tensor> multi_lora_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scalings,
    const at::Tensor& order, const at::Tensor& starts, const std::optional<at::Tensor>& seed,
    double dropout_p, bool fan_in_fan_out) {
  check_arguments("fastdelta_C::multi_lora_forward", x, lora_A, lora_B, scalings, order, starts,
                  seed);
  const int64_t k = x.size(-1), rank = lora_A.size(1), n = lora_B.size(1);
  const at::Tensor x2d = x.reshape({-1, k});
  const int64_t m = x2d.size(0);
  at::Tensor y = at::linear(x2d, base_weight(weight, fan_in_fan_out), bias);
  at::Tensor xa = at::zeros({m, rank}, x.options().dtype(accumulate_type(x.scalar_type())));
  const auto [spans, used] =
      m > 0 ? segments(starts, m) : std::pair<std::vector<Span>, int64_t>{};
  if (used > 0) {
    const at::Tensor rows = order.narrow(0, 0, used);
    const at::Tensor source =
        seed.has_value() ? at::where(keep_mask(*seed, m, k, dropout_p), x2d, 0) : x2d;
    const at::Tensor gathered = source.index_select(0, rows);
    at::Tensor xa_sorted = at::empty({used, rank}, gathered.options());
    at::Tensor delta = at::empty({used, n}, y.options());
    for (const Span& span : spans) {
      at::Tensor out = rows_of(xa_sorted, span);
      at::mm_out(out, rows_of(gathered, span), lora_A.select(0, span.adapter).t());
    }
    // The 1 / (1 - p) of inverted dropout scales the [M, r] product, as lora_linear's.
    if (seed.has_value()) xa_sorted.mul_(1.0 / (1.0 - dropout_p));
    for (const Span& span : spans) {
      at::Tensor out = rows_of(delta, span);
      at::mm_out(out, rows_of(xa_sorted, span) * scalings.select(0, span.adapter),
                 lora_B.select(0, span.adapter).t());
    }
    y.index_add_(0, rows, delta);
    xa.index_copy_(0, rows, cast(xa_sorted, xa.scalar_type()));
  }
  return {y.view(with_last(x.sizes(), n)), xa.view(with_last(x.sizes(), rank))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scalings,
    const at::Tensor& order, const at::Tensor& starts, const at::Tensor& xa,
    const std::optional<at::Tensor>& seed, double dropout_p, bool fan_in_fan_out,
    std::array<bool, 5> needs) {
  check_arguments("fastdelta_C::multi_lora_backward", x, lora_A, lora_B, scalings, order,
                  starts, seed);
  const auto [need_x, need_weight, need_bias, need_A, need_B] = needs;
  const int64_t k = x.size(-1);
  const at::Tensor x2d = x.reshape({-1, k});
  const at::Tensor grad2d = grad_y.reshape({-1, grad_y.size(-1)});
  const int64_t m = x2d.size(0);
  at::Tensor grad_x = need_x ? at::mm(grad2d, base_weight(weight, fan_in_fan_out)) : at::Tensor();
  at::Tensor grad_A = need_A ? at::zeros_like(lora_A) : at::Tensor();
  at::Tensor grad_B = need_B ? at::zeros_like(lora_B) : at::Tensor();
  const bool low_rank_grads = need_x || need_A || need_B;
  const auto [spans, used] =
      m > 0 && low_rank_grads ? segments(starts, m) : std::pair<std::vector<Span>, int64_t>{};
  if (used > 0) {
    const at::Tensor rows = order.narrow(0, 0, used);
    const at::Tensor gathered = grad2d.index_select(0, rows);
    at::Tensor keep;  // drawn once for dA and dX both
    if (seed.has_value() && (need_A || need_x)) {
      keep = keep_mask(*seed, m, k, dropout_p).index_select(0, rows);
    }
    const double dropout_scale = seed.has_value() ? 1.0 / (1.0 - dropout_p) : 1.0;
    at::Tensor xa_sorted, x_sorted, low_rank;
    if (need_B) {
      xa_sorted = cast(xa.reshape({m, -1}).index_select(0, rows), gathered.scalar_type());
    }
    if (need_A) {
      x_sorted = x2d.index_select(0, rows);
      if (keep.defined()) x_sorted = at::where(keep, x_sorted, 0);
    }
    if (need_x) low_rank = at::empty({used, k}, gathered.options());
    for (const Span& span : spans) {
      const at::Tensor grad_j = rows_of(gathered, span);
      const at::Tensor scaling = scalings.select(0, span.adapter);
      if (need_B) {
        at::Tensor out = grad_B.select(0, span.adapter);
        at::mm_out(out, grad_j.t(), rows_of(xa_sorted, span) * scaling);
      }
      if (!(need_A || need_x)) continue;
      // With dropout, grad_xa carries the 1 / (1 - p) scale and `keep` the mask.
      const at::Tensor grad_xa =
          at::mm(grad_j, lora_B.select(0, span.adapter)) * (scaling * dropout_scale);
      if (need_A) {
        at::Tensor out = grad_A.select(0, span.adapter);
        at::mm_out(out, grad_xa.t(), rows_of(x_sorted, span));
      }
      if (need_x) {
        at::Tensor out = rows_of(low_rank, span);
        at::mm_out(out, grad_xa, lora_A.select(0, span.adapter));
      }
    }
    if (need_x) {
      if (keep.defined()) low_rank = at::where(keep, low_rank, 0);
      grad_x.index_add_(0, rows, low_rank);
    }
  }
  if (need_x) grad_x = grad_x.view(x.sizes());
  auto [grad_weight, grad_bias] = base_grads(grad2d, x2d, fan_in_fan_out, need_weight, need_bias);
  return {grad_x, grad_weight, grad_bias, grad_A, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdelta_C, CompositeExplicitAutograd, m) {
  m.impl("multi_lora_forward", &multi_lora_forward);
  m.impl("multi_lora_backward", &multi_lora_backward);
}

}  // namespace fastdelta
