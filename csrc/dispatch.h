// Calling the fastdelta_C ops from C++ through the dispatcher.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace fastdelta {

// The fastdelta_C op `name` with `Signature`, looked up once. The handle is kept per Signature,
// so each Signature must be one op's (the callers' `using` declarations say which).
template <typename Signature>
const c10::TypedOperatorHandle<Signature>& op(const char* name) {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return handle;
}

}  // namespace fastdelta
