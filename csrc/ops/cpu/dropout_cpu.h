#pragma once
#include <ATen/core/Tensor.h>

#include "ops/common/dropout_rng.h"

namespace lora_ext::cpu {

// buf: contiguous [rows, cols] float/double chunk holding rows row0.. of the
// [N, cols] matrix. Multiplies each element by mask/(1-p) in place, using the
// mask of lora_ext::detail::dropout_keep for the element's flat index.
void apply_dropout_rows_(at::Tensor& buf, int64_t row0, const detail::DropoutParams& d);

}  // namespace lora_ext::cpu
