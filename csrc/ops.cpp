// The fastdelta_C operator library: the schemas of the cpp backend's ops. The CPU kernels are
// registered in cpu/, the CUDA kernels in cuda/ (built only where CUDA is), and lora_linear,
// adapter_bottleneck and linear_adapter, the forward ops with their derivatives, in
// autograd.cpp. The Python ops fastdelta::lora_linear and fastdelta::adapter_bottleneck call
// the forward and backward ops when the cpp backend is chosen; nothing is registered against
// their schemas.
#include <torch/library.h>

TORCH_LIBRARY(fastdelta_C, m) {
  // (y, xa): y = x W^T + b + scaling * xa B^T, xa = dropout(x) A^T in float32 (float64 for
  // float64 x). Dropout is on when seed (an int64 scalar on x's device) is given.
  m.def(
      "lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor? seed, float scaling, float dropout_p, bool fan_in_fan_out) -> (Tensor, Tensor)");
  // Gradients of (x, weight, bias, lora_A, lora_B); undefined (None) where needs is false.
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor xa, Tensor? seed, float scaling, float dropout_p, bool fan_in_fan_out, "
      "bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // y of lora_forward, differentiable (one autograd node whose backward is lora_backward). With
  // dropout_p > 0 and no seed, the seed is drawn from torch's generator for x's device.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor? seed, float scaling, float dropout_p, bool fan_in_fan_out) -> Tensor");
  // The keep-mask (bool, `shape`) that the lora ops draw from seed for an input of `shape`.
  m.def("dropout_keep_mask(Tensor seed, int[] shape, float p) -> Tensor");
  // (out, pre): out = residual + scaling * (act(pre) U^T + b_u), pre = h D^T + b_d in float32
  // (float64 for float64 h); residual None means h.
  m.def(
      "adapter_forward(Tensor h, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
      "Tensor? up_bias, Tensor? residual, float scaling, str activation) -> (Tensor, Tensor)");
  // Gradients of (h, down_weight, down_bias, up_weight, up_bias); a sequential adapter's dh
  // includes the residual path.
  m.def(
      "adapter_backward(Tensor grad_out, Tensor h, Tensor down_weight, Tensor up_weight, "
      "Tensor pre, float scaling, str activation, bool sequential, bool[5] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // out of adapter_forward, differentiable (one autograd node whose backward is
  // adapter_backward; a parallel adapter's residual receives the output's gradient).
  m.def(
      "adapter_bottleneck(Tensor h, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
      "Tensor? up_bias, Tensor? residual, float scaling, str activation) -> Tensor");
  // A linear layer and its adapter as one op: h = x W^T + b (W stored [K, N] with
  // fan_in_fan_out), out = h + scaling * (act(a D^T + b_d) U^T + b_u), a = h (sequential) or x
  // (parallel). Differentiable, one autograd node.
  m.def(
      "linear_adapter(Tensor x, Tensor weight, Tensor? bias, Tensor down_weight, "
      "Tensor? down_bias, Tensor up_weight, Tensor? up_bias, float scaling, str activation, "
      "bool parallel, bool fan_in_fan_out) -> Tensor");
  // The mixed-batch LoRA (multi_lora.cpp): (y, xa) for row i running adapter ids[i] of the
  // stacked lora_A [n, r, K], lora_B [n, N, r], the rows grouped by `order` and `starts`.
  m.def(
      "multi_lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor scalings, Tensor order, Tensor starts, Tensor? seed, float dropout_p, "
      "bool fan_in_fan_out) -> (Tensor, Tensor)");
  // Its gradients of (x, weight, bias, lora_A, lora_B); undefined where needs is false.
  m.def(
      "multi_lora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, "
      "Tensor lora_B, Tensor scalings, Tensor order, Tensor starts, Tensor xa, Tensor? seed, "
      "float dropout_p, bool fan_in_fan_out, bool[5] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
