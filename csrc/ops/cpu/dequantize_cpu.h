#pragma once
// Row-range dequantization for the CPU kernels of the quantized base (issue 15):
// rows [row0, row0 + rows) of a validated quantized weight into float32 `out`
// (leading dimension `ld`), so that callers can dequantize tile by tile into
// bounded scratch.
#include <optional>

#include <ATen/core/Tensor.h>

#include "ops/common/quant_formats.h"

namespace lora_ext::cpu {

void dequantize_rows(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                     int64_t row0, int64_t rows, int64_t in_features, float* out, int64_t ld);

}  // namespace lora_ext::cpu
