// The adapter activations and their derivatives, for the CPU and CUDA kernels alike; the same
// formulas as fastdelta/ops/activations.py (gelu_new is the tanh approximation).
#pragma once

#include <cmath>
#include <type_traits>

#include "host_device.h"

namespace fastdelta {

enum class Activation { Relu, Gelu, GeluTanh, Silu };

template <Activation act, typename T>
FASTDELTA_HOST_DEVICE T activate(T z) {
  using std::erf, std::exp, std::tanh;
  if constexpr (act == Activation::Relu) {
    return z > T(0) ? z : T(0);
  } else if constexpr (act == Activation::Gelu) {
    return T(0.5) * z * (T(1) + erf(z * T(0.70710678118654752440)));
  } else if constexpr (act == Activation::GeluTanh) {
    return T(0.5) * z * (T(1) + tanh(T(0.79788456080286535588) * (z + T(0.044715) * z * z * z)));
  } else {
    return z / (T(1) + exp(-z));
  }
}

template <Activation act, typename T>
FASTDELTA_HOST_DEVICE T activate_grad(T z) {
  using std::erf, std::exp, std::tanh;
  if constexpr (act == Activation::Relu) {
    return z > T(0) ? T(1) : T(0);
  } else if constexpr (act == Activation::Gelu) {
    return T(0.5) * (T(1) + erf(z * T(0.70710678118654752440))) +
           z * exp(T(-0.5) * z * z) * T(0.39894228040143267794);
  } else if constexpr (act == Activation::GeluTanh) {
    const T c = T(0.79788456080286535588), k = T(0.044715);
    const T t = tanh(c * (z + k * z * z * z));
    return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * c * (T(1) + T(3) * k * z * z);
  } else {
    const T s = T(1) / (T(1) + exp(-z));
    return s * (T(1) + z * (T(1) - s));
  }
}

// Calls body(std::integral_constant<Activation, act>{}) for the runtime activation `act`.
template <typename Body>
void dispatch_activation(Activation act, Body&& body) {
  switch (act) {
    case Activation::Relu:
      return body(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Gelu:
      return body(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::GeluTanh:
      return body(std::integral_constant<Activation, Activation::GeluTanh>{});
    case Activation::Silu:
      return body(std::integral_constant<Activation, Activation::Silu>{});
  }
}

}  // namespace fastdelta
