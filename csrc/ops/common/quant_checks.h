#pragma once
// Validation of a quantized weight (qdata, qscale, qtype, out_features,
// in_features), shared by every backend. Shapes, dtypes, devices and block
// divisibility only; the values (block scales) are checked where they are read.
#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "ops/common/quant_formats.h"

namespace lora_ext::detail {

const quant::Format& check_quantized_weight(const char* op, const at::Tensor& qdata,
                                            const std::optional<at::Tensor>& qscale, std::string_view qtype,
                                            int64_t out_features, int64_t in_features);

}  // namespace lora_ext::detail
