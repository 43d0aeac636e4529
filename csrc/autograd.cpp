// The cpp backend's ops with their derivatives, for eager mode: fastdelta_C::lora_linear,
// fastdelta_C::adapter_bottleneck and fastdelta_C::linear_adapter check their arguments, run the
// forward op, and record one autograd node whose backward runs the backward op. A call from
// Python is then one dispatcher call with no Python in the forward or the backward: on one CPU
// thread, a [4, 64] input, a 64x64 weight and r = 8, the LoRA linear's forward took 19 us
// through a Python autograd.Function around the forward op and 11 us here; forward and backward
// (the gradients of x, A and B) 89 us and 71 us.
//
// The nodes are Node subclasses with their saved tensors and arguments as members, as
// PyTorch's generated nodes are, not torch::autograd::Function's CppNode with its context and
// its saved_data dictionary: a call that saves four tensors took 30.0 us forward and backward
// through a Function, 23.9 us through such a node (one CPU thread). SavedVariable checks each
// saved tensor's version when the backward unpacks it and applies saved_tensors_hooks, the
// backward computes the gradients this backward asks for (task_should_compute_output), and
// release_variables frees the saved tensors after a backward without retain_graph.
//
// fastdelta_C::linear_adapter is a linear layer with the adapter after it as one node: an
// adapter on an nn.Linear or Conv1D, called by its host's forward as LoRA is, costs that
// forward one dispatcher call instead of the linear's, the adapter module's and the op's.
//
// The kernels are registered for the Autograd key, so they run for every device whose forward
// and backward ops have kernels (CPU, and CUDA where it is built), and as
// CompositeExplicitAutograd for tensors made under torch.inference_mode, which have no Autograd
// key (and never need a node). torch.compile, FakeTensor and tensor subclasses use the Python
// custom ops of fastdelta.ops instead, which call the same forward and backward ops.
//
// The checks are the whole of what fastdelta.ops checks in Python, as cheap integer
// comparisons: a call that fails one raises here, and fastdelta.ops then re-runs its own check
// to raise the error that names the argument and the fix.
#include <algorithm>
#include <array>
#include <mutex>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "common.h"
#include "dispatch.h"

namespace fastdelta {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using LoraForward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, double, double, bool);
using LoraBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double, bool,
    std::array<bool, 5>);
using AdapterForward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    c10::string_view);
using AdapterBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, c10::string_view, bool, std::array<bool, 5>);

// The gradients a node's backward computes: of the inputs whose edge is valid and on the path
// of this backward (torch.autograd.grad of some inputs only skips the others).
template <size_t N>
std::array<bool, N> needed_grads(const Node& node) {
  std::array<bool, N> needs{};
  for (size_t i = 0; i < N; ++i) needs[i] = node.task_should_compute_output(i);
  return needs;
}

// The fused backwards compute first derivatives only: their ops run below autograd (each ATen
// op then skips its Autograd and ADInplaceOrView kernels, about 2 us of a small adapter's
// backward on one CPU thread), so their gradients have no graph of their own. The saved
// tensors are unpacked before that: under non-reentrant checkpointing the unpacking recomputes
// the forward, which must run above autograd to save what it saved the first time. Under
// create_graph (grad mode on inside the backward) each gradient is still the fused one but
// carries a node that raises, naming the fix, if a second backward reaches it, as
// fastdelta.ops.eager.once_differentiable does for the Python backends; a second
// differentiation would otherwise be silently wrong.
std::string double_backward_message(const char* op) {
  return std::string("fastdelta.ops.") + op +
         ": its fused backward has no derivative of its own, so a gradient taken through it "
         "with create_graph=True cannot be differentiated again (a double backward: gradient "
         "penalties, MAML, Hessian-vector products). Take higher derivatives with torch.func "
         "(torch.func.grad of torch.func.grad, jacrev, hessian), under which fastdelta's ops "
         "run their eager reference";
}

// `grads`, the gradients `node` computed from `grad_output`, as its backward returns them: as
// they are where no graph is built, else each an alias whose grad_fn raises. That node's edges
// are `node`'s own (its inputs) and grad_output's, so a second backward towards any of them
// reaches it rather than leaving the gradients out of the graph.
variable_list first_derivatives(const Node& node, const at::Tensor& grad_output,
                                variable_list grads, bool builds_graph, const char* op) {
  if (!builds_graph) return grads;
  torch::autograd::edge_list edges = node.next_edges();
  edges.push_back(torch::autograd::impl::gradient_edge(grad_output));
  const auto error =
      c10::make_intrusive<torch::autograd::Error>(double_backward_message(op), std::move(edges));
  for (at::Tensor& grad : grads) {
    if (!grad.defined()) continue;
    grad = grad.detach();  // an alias: grad_output itself may be one of them
    torch::autograd::create_gradient_edge(grad, error);
  }
  return grads;
}

// Makes `node` the grad_fn of `output`, with an edge to each differentiable input in order (an
// absent optional input has an invalid edge). Called only where compute_requires_grad holds.
template <typename... Inputs>
void record(const c10::intrusive_ptr<Node>& node, const at::Tensor& output,
            const Inputs&... inputs) {
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  torch::autograd::set_history(output, node);
}

void check_same(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x) {
  TORCH_CHECK(tensor.device() == x.device(), op, ": ", name, " is on another device than x");
  TORCH_CHECK(tensor.scalar_type() == x.scalar_type(), op, ": ", name, " has another dtype than x");
}

void check_lora_call(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, const std::optional<at::Tensor>& seed,
                     double dropout_p, bool fan_in_fan_out) {
  constexpr const char* op = "fastdelta_C::lora_linear";
  check_lora_arguments(op, x, weight, lora_A, lora_B, seed);
  const int64_t N = fan_in_fan_out ? weight.size(1) : weight.size(0);
  const int64_t K = fan_in_fan_out ? weight.size(0) : weight.size(1);
  TORCH_CHECK(x.size(-1) == K && lora_B.size(0) == N, op,
              ": the weight's shape does not fit x, lora_A and lora_B");
  if (bias.has_value()) {
    check_same(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N]");
  }
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1)");
}

void check_adapter_call(const at::Tensor& h, const at::Tensor& down_weight,
                        const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
                        const std::optional<at::Tensor>& up_bias,
                        const std::optional<at::Tensor>& residual,
                        const char* op = "fastdelta_C::adapter_bottleneck") {
  TORCH_CHECK(h.dim() >= 1 && down_weight.dim() == 2 && up_weight.dim() == 2, op,
              ": h must have a feature dimension and the weights must be 2-D");
  check_same(op, "down_weight", down_weight, h);
  check_same(op, "up_weight", up_weight, h);
  const int64_t bottleneck = down_weight.size(0), d_out = up_weight.size(0);
  TORCH_CHECK(h.size(-1) == down_weight.size(1) && up_weight.size(1) == bottleneck, op,
              ": the weights' shapes do not fit h");
  if (down_bias.has_value()) {
    check_same(op, "down_bias", *down_bias, h);
    TORCH_CHECK(down_bias->dim() == 1 && down_bias->size(0) == bottleneck, op,
                ": down_bias must be [m]");
  }
  if (up_bias.has_value()) {
    check_same(op, "up_bias", *up_bias, h);
    TORCH_CHECK(up_bias->dim() == 1 && up_bias->size(0) == d_out, op,
                ": up_bias must be [out]");
  }
  if (residual.has_value()) {
    check_same(op, "residual", *residual, h);
    TORCH_CHECK(residual->dim() == h.dim() && residual->size(-1) == d_out &&
                    residual->sizes().slice(0, h.dim() - 1) == h.sizes().slice(0, h.dim() - 1),
                op, ": residual must be h's shape with out features");
  } else {
    TORCH_CHECK(h.size(-1) == d_out, op, ": a sequential adapter needs out == in features");
  }
}

// A dropout seed drawn as fastdelta.ops draws one, torch.randint(2**62, ()) from the default
// generator of x's device. On the CPU it is randint's own draw (random64() mod 2^62 under the
// generator's lock, ATen's uniform_int_from_to_distribution) written into a tensor made without
// a dispatched op: randint's dispatch was a tenth of a small forward's time.
at::Tensor draw_seed(const at::Tensor& x) {
  constexpr uint64_t kRange = uint64_t{1} << 62;
  if (!x.is_cpu()) return at::randint(int64_t{kRange}, {}, x.options().dtype(at::kLong));
  at::Generator generator = at::detail::getDefaultCPUGenerator();
  uint64_t value = 0;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    value = generator.get<at::CPUGeneratorImpl>()->random64();
  }
  at::Tensor seed = at::detail::empty_cpu({}, at::kLong);
  *seed.data_ptr<int64_t>() = static_cast<int64_t>(value % kRange);
  return seed;
}

// The backward node of one lora_linear call (see the top of the file).
struct LoraLinearBackward : public Node {
  SavedVariable x, weight, lora_A, lora_B, xa, seed;
  double scaling = 0, dropout_p = 0;
  bool fan_in_fan_out = false;

  std::string name() const override { return "LoraLinearBackward"; }

  // Gradients of (x, weight, bias, lora_A, lora_B).
  variable_list apply(variable_list&& grads) override {
    RECORD_FUNCTION("fastdelta::lora_linear_backward", c10::ArrayRef<const c10::IValue>{});
    std::lock_guard<std::mutex> lock(mutex_);
    const auto needs = needed_grads<5>(*this);
    if (!grads[0].defined() || std::none_of(needs.begin(), needs.end(), [](bool b) { return b; })) {
      return variable_list(5);
    }
    const at::Tensor mask_seed = seed.unpack();
    const std::array<at::Tensor, 5> saved = {x.unpack(), weight.unpack(), lora_A.unpack(),
                                             lora_B.unpack(), xa.unpack()};
    const bool builds_graph = at::GradMode::is_enabled();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see first_derivatives
    auto [grad_x, grad_weight, grad_bias, grad_A, grad_B] =
        op<LoraBackward>("fastdelta_C::lora_backward")
            .call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                  mask_seed.defined() ? std::optional<at::Tensor>(mask_seed) : std::nullopt,
                  scaling, dropout_p, fan_in_fan_out, needs);
    return first_derivatives(*this, grads[0], {grad_x, grad_weight, grad_bias, grad_A, grad_B},
                             builds_graph, "lora_linear");
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&x, &weight, &lora_A, &lora_B, &xa, &seed}) saved->reset_data();
  }
};

// The backward node of one adapter_bottleneck call.
struct AdapterBottleneckBackward : public Node {
  SavedVariable h, down_weight, up_weight, pre;
  double scaling = 0;
  std::string activation;
  bool sequential = true;

  std::string name() const override { return "AdapterBottleneckBackward"; }

  // Gradients of (h, down_weight, down_bias, up_weight, up_bias, residual).
  variable_list apply(variable_list&& grads) override {
    RECORD_FUNCTION("fastdelta::adapter_bottleneck_backward",
                    c10::ArrayRef<const c10::IValue>{});
    std::lock_guard<std::mutex> lock(mutex_);
    const auto needs = needed_grads<6>(*this);
    if (!grads[0].defined()) return variable_list(6);
    const bool builds_graph = at::GradMode::is_enabled();
    at::Tensor grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias;
    if (needs[0] || needs[1] || needs[2] || needs[3] || needs[4]) {
      const std::array<at::Tensor, 4> saved = {h.unpack(), down_weight.unpack(),
                                               up_weight.unpack(), pre.unpack()};
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see first_derivatives
      std::tie(grad_h, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias) =
          op<AdapterBackward>("fastdelta_C::adapter_backward")
              .call(grads[0], saved[0], saved[1], saved[2], saved[3], scaling, activation,
                    sequential, {needs[0], needs[1], needs[2], needs[3], needs[4]});
    }
    // A parallel adapter's residual receives grad_out unchanged.
    const at::Tensor grad_residual = needs[5] ? grads[0] : at::Tensor();
    return first_derivatives(*this, grads[0],
                             {grad_h, grad_down_weight, grad_down_bias, grad_up_weight,
                              grad_up_bias, grad_residual},
                             builds_graph, "adapter_bottleneck");
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&h, &down_weight, &up_weight, &pre}) saved->reset_data();
  }
};

// h = x W^T + b for 2-D x, W [N, K] (stored [K, N] with fan_in_fan_out, as GPT-2's Conv1D):
// the product nn.Linear and Conv1D compute.
at::Tensor base_linear(const at::Tensor& x2d, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, bool fan_in_fan_out) {
  const at::Tensor weight_t = fan_in_fan_out ? weight : weight.t();
  return bias.has_value() ? add_product(*bias, x2d, weight_t) : at::mm(x2d, weight_t);
}

void check_linear_adapter_call(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, bool fan_in_fan_out) {
  constexpr const char* op = "fastdelta_C::linear_adapter";
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2, op,
              ": x must have a feature dimension and weight must be 2-D");
  check_same(op, "weight", weight, x);
  const int64_t K = fan_in_fan_out ? weight.size(0) : weight.size(1);
  const int64_t N = fan_in_fan_out ? weight.size(1) : weight.size(0);
  TORCH_CHECK(x.size(-1) == K, op, ": the weight's shape does not fit x");
  if (bias.has_value()) {
    check_same(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N]");
  }
}

// (out, h, pre) of a linear layer followed by its adapter, 2-D: h = x W^T + b, and out = h +
// s * (act(pre) U^T + b_u) with pre = h D^T + b_d (sequential) or x D^T + b_d (parallel).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_adapter_2d(
    const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias, double scaling,
    c10::string_view activation, bool parallel, bool fan_in_fan_out) {
  const at::Tensor h = base_linear(x2d, weight, bias, fan_in_fan_out);
  const at::Tensor& input = parallel ? x2d : h;
  const std::optional<at::Tensor> residual =
      parallel ? std::optional<at::Tensor>(h) : std::nullopt;
  check_adapter_call(input, down_weight, down_bias, up_weight, up_bias, residual,
                     "fastdelta_C::linear_adapter");
  auto [out, pre] = op<AdapterForward>("fastdelta_C::adapter_forward")
                        .call(input, down_weight, down_bias, up_weight, up_bias, residual,
                              scaling, activation);
  return {out, h, pre};
}

// The backward node of one linear_adapter call: a linear layer (nn.Linear, or Conv1D with
// fan_in_fan_out) and the adapter after it, the layer's own product the adapter's input
// (sequential) or its residual (parallel, the adapter reading x). It keeps what the two would
// keep apart: the adapter's input and pre-activation, the weights, and x only where a gradient
// needs it.
struct LinearAdapterBackward : public Node {
  SavedVariable x, weight, h, down_weight, up_weight, pre;
  double scaling = 0;
  std::string activation;
  bool parallel = false, fan_in_fan_out = false;

  std::string name() const override { return "LinearAdapterBackward"; }

  // Gradients of (x, weight, bias, down_weight, down_bias, up_weight, up_bias).
  variable_list apply(variable_list&& grads) override {
    RECORD_FUNCTION("fastdelta::linear_adapter_backward", c10::ArrayRef<const c10::IValue>{});
    std::lock_guard<std::mutex> lock(mutex_);
    const auto needs = needed_grads<7>(*this);
    const auto [need_x, need_weight, need_bias] = std::tuple(needs[0], needs[1], needs[2]);
    if (!grads[0].defined()) return variable_list(7);
    const at::Tensor weight_saved = weight.unpack(), x_saved = x.unpack();
    const at::Tensor adapter_input = parallel ? at::Tensor() : h.unpack();
    const std::array<at::Tensor, 3> adapter_saved = {down_weight.unpack(), up_weight.unpack(),
                                                     pre.unpack()};
    const bool builds_graph = at::GradMode::is_enabled();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see first_derivatives
    const at::Tensor grad2d = as_2d(grads[0], grads[0].size(-1));
    const at::Tensor w = base_weight(weight_saved, fan_in_fan_out);  // [N, K]
    const int64_t K = w.size(1);
    const at::Tensor x2d = x_saved.defined() ? as_2d(x_saved, K) : at::Tensor();
    // The adapter's input gradient: dh (sequential, the residual path included), or its part
    // of dx (parallel).
    const bool need_input = parallel ? need_x : need_x || need_weight || need_bias;
    auto [grad_input, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias] =
        op<AdapterBackward>("fastdelta_C::adapter_backward")
            .call(grad2d, parallel ? x2d : adapter_input, adapter_saved[0], adapter_saved[1],
                  adapter_saved[2], scaling, activation, !parallel,
                  {need_input, needs[3], needs[4], needs[5], needs[6]});
    // The gradient reaching the linear layer's output.
    const at::Tensor grad_h = parallel ? grad2d : grad_input;
    at::Tensor grad_x;
    if (need_x) {
      grad_x = parallel ? add_product(grad_input, grad_h, w) : at::mm(grad_h, w);
      grad_x = like_rows_of(grad_x, grads[0], K);
    }
    auto [grad_weight, grad_bias] =
        base_grads(grad_h, x2d, fan_in_fan_out, need_weight, need_bias);
    return first_derivatives(*this, grads[0],
                             {grad_x, grad_weight, grad_bias, grad_down_weight, grad_down_bias,
                              grad_up_weight, grad_up_bias},
                             builds_graph, "linear_adapter");
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&x, &weight, &h, &down_weight, &up_weight, &pre}) {
      saved->reset_data();
    }
  }
};

// The ops' kernels, for the Autograd key and, unchanged, for tensors without autograd (made under
// torch.inference_mode), which skip the Autograd kernels: the checks, the forward op below
// autograd, and a backward node where a gradient may be asked for.

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                       const at::Tensor& lora_B, const std::optional<at::Tensor>& seed,
                       double scaling, double dropout_p, bool fan_in_fan_out) {
  // Named as the Python op is, so a profile reads the same on either path.
  RECORD_FUNCTION("fastdelta::lora_linear", c10::ArrayRef<const c10::IValue>{});
  check_lora_call(x, weight, bias, lora_A, lora_B, seed, dropout_p, fan_in_fan_out);
  std::optional<at::Tensor> mask_seed;
  if (dropout_p > 0) {
    // Drawn as fastdelta.ops draws it, from torch's generator for x's device.
    mask_seed = seed.has_value() ? *seed : draw_seed(x);
  }
  at::Tensor y, xa;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(y, xa) = op<LoraForward>("fastdelta_C::lora_forward")
                          .call(x, weight, bias, lora_A, lora_B, mask_seed, scaling, dropout_p,
                                fan_in_fan_out);
  }
  if (torch::autograd::compute_requires_grad(x, weight, bias, lora_A, lora_B)) {
    const auto node = c10::make_intrusive<LoraLinearBackward>();
    node->x = SavedVariable(x, false);
    node->weight = SavedVariable(weight, false);
    node->lora_A = SavedVariable(lora_A, false);
    node->lora_B = SavedVariable(lora_B, false);
    node->xa = SavedVariable(xa, false);
    node->seed = SavedVariable(mask_seed.value_or(at::Tensor()), false);
    node->scaling = scaling;
    node->dropout_p = dropout_p;
    node->fan_in_fan_out = fan_in_fan_out;
    record(node, y, x, weight, bias, lora_A, lora_B);
  }
  return y;
}

at::Tensor adapter_bottleneck(const at::Tensor& h, const at::Tensor& down_weight,
                              const std::optional<at::Tensor>& down_bias,
                              const at::Tensor& up_weight,
                              const std::optional<at::Tensor>& up_bias,
                              const std::optional<at::Tensor>& residual, double scaling,
                              c10::string_view activation) {
  RECORD_FUNCTION("fastdelta::adapter_bottleneck", c10::ArrayRef<const c10::IValue>{});
  check_adapter_call(h, down_weight, down_bias, up_weight, up_bias, residual);
  parse_activation(std::string(activation));
  at::Tensor out, pre;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, pre) = op<AdapterForward>("fastdelta_C::adapter_forward")
                             .call(h, down_weight, down_bias, up_weight, up_bias, residual,
                                   scaling, activation);
  }
  if (torch::autograd::compute_requires_grad(h, down_weight, down_bias, up_weight, up_bias,
                                             residual)) {
    const auto node = c10::make_intrusive<AdapterBottleneckBackward>();
    node->h = SavedVariable(h, false);
    node->down_weight = SavedVariable(down_weight, false);
    node->up_weight = SavedVariable(up_weight, false);
    node->pre = SavedVariable(pre, false);
    node->scaling = scaling;
    node->activation = std::string(activation);
    node->sequential = !residual.has_value();
    record(node, out, h, down_weight, down_bias, up_weight, up_bias, residual);
  }
  return out;
}

at::Tensor linear_adapter(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& down_weight,
                          const std::optional<at::Tensor>& down_bias,
                          const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                          double scaling, c10::string_view activation, bool parallel,
                          bool fan_in_fan_out) {
  RECORD_FUNCTION("fastdelta::linear_adapter", c10::ArrayRef<const c10::IValue>{});
  check_linear_adapter_call(x, weight, bias, fan_in_fan_out);
  parse_activation(std::string(activation));
  at::Tensor out, h, pre;
  {
    // Below autograd, the output's reshape included: a view autograd tracked would be a view
    // of a tensor without history, and an in-place op on it would not reach this node.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, h, pre) =
        linear_adapter_2d(as_2d(x, x.size(-1)), weight, bias, down_weight, down_bias, up_weight,
                          up_bias, scaling, activation, parallel, fan_in_fan_out);
    out = like_rows_of(out, x, out.size(1));
  }
  if (torch::autograd::compute_requires_grad(x, weight, bias, down_weight, down_bias, up_weight,
                                             up_bias)) {
    const auto node = c10::make_intrusive<LinearAdapterBackward>();
    // x is the adapter's input (parallel), or read by the weight's gradient alone.
    node->x = SavedVariable(parallel || weight.requires_grad() ? x : at::Tensor(), false);
    node->weight = SavedVariable(weight, false);
    node->h = SavedVariable(parallel ? at::Tensor() : h, false);
    node->down_weight = SavedVariable(down_weight, false);
    node->up_weight = SavedVariable(up_weight, false);
    node->pre = SavedVariable(pre, false);
    node->scaling = scaling;
    node->activation = std::string(activation);
    node->parallel = parallel;
    node->fan_in_fan_out = fan_in_fan_out;
    record(node, out, x, weight, bias, down_weight, down_bias, up_weight, up_bias);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdelta_C, Autograd, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("adapter_bottleneck", &adapter_bottleneck);
  m.impl("linear_adapter", &linear_adapter);
}

TORCH_LIBRARY_IMPL(fastdelta_C, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("adapter_bottleneck", &adapter_bottleneck);
  m.impl("linear_adapter", &linear_adapter);
}

}  // namespace fastdelta
