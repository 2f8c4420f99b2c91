#pragma once
#include <ATen/core/Tensor.h>

#include "ops/common/dropout_rng.h"

namespace lora_ext::cpu {

// dst = dropout(src) for rows row0 .. row0 + src.size(0) of an [N, cols]
// matrix: dst[i, j] = keep(e) ? src[i, j] / (1 - p) : 0 with e = (row0 + i) *
// cols + j and keep from lora_ext::detail::dropout_keep. src: 2-D, any float
// dtype, any strides; dst: contiguous float32/float64 of the same shape (may be
// src itself). Converts and masks in one pass; SIMD (AVX2) when the CPU has it.
void dropout_rows(at::Tensor& dst, const at::Tensor& src, int64_t row0, const detail::DropoutParams& d);

}  // namespace lora_ext::cpu
