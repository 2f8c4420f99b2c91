#pragma once
// Host side of the exact merge, shared by the CPU and CUDA launchers: the
// ops/common/exact_merge.h format of a weight dtype.
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "ops/common/exact_merge.h"

namespace lora_ext::detail::exact {

// Calls f(Fmt{}) with the format of the weight dtype (float32, bfloat16, float16;
// the op's argument checks reject the others before this is reached).
template <typename F>
void dispatch_format(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float:
      f(F32{});
      break;
    case c10::ScalarType::BFloat16:
      f(BF16{});
      break;
    case c10::ScalarType::Half:
      f(F16{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "lora_ext exact merge: unsupported dtype ", t);
  }
}

}  // namespace lora_ext::detail::exact
