#pragma once
// The quantized base's product for a few rows of x (decode: batch 1 to a few
// tokens), straight from the quantized bytes: y[n, o] (+)= sum_i x[n, i] W[o, i]
// with each block's codes converted and multiplied in registers (AVX2), no
// dequantized tile. Decoding is memory-bound, so reading 0.6 instead of 4 bytes
// per weight is the gain.
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "ops/common/quant_formats.h"

namespace lora_ext::cpu {

// Rows of x handled by the fused kernel (more rows: dequantized tiles and a GEMM).
constexpr int64_t kQuantGemvMaxRows = 4;

// float32 x2d [N, in] (rows contiguous) and y [N, out] (rows contiguous, any
// row stride): y = x W^T, or y += x W^T with `accumulate`. Returns false (and
// does nothing) when it does not apply: N > kQuantGemvMaxRows, other dtypes or
// layouts, or a CPU without AVX2/FMA. A non-finite block scale is an error
// naming the row, as in dequantize_rows.
bool quant_gemv(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                const at::Tensor& x2d, at::Tensor& y, bool accumulate);

// One row of a quantized weight decoded into float32 `out` with AVX2 (scale_row:
// the row's int8 scale or nf4 absmaxes, else unused); *ok = its scales are
// finite. Returns false (nothing done) on a CPU without AVX2/FMA/F16C.
bool dequantize_row_fast(const quant::Format& f, const uint8_t* q, const float* scale_row, int64_t in, float* out,
                         bool* ok);

// The first row with a non-finite scale, noted from parallel workers (the error names the lowest row, whatever
// the threads' order).
class FirstBadRow {
 public:
  void note(int64_t row) {
    int64_t cur = first_.load();
    while (row < cur && !first_.compare_exchange_weak(cur, row)) {
    }
  }
  void check(const quant::Format& f) const {
    const int64_t first = first_.load();
    TORCH_CHECK_VALUE(first == std::numeric_limits<int64_t>::max(), "lora_ext::dequantize_weight: expected finite ",
                      f.name, " scales, got a non-finite scale in row ", first);
  }

 private:
  std::atomic<int64_t> first_{std::numeric_limits<int64_t>::max()};
};

}  // namespace lora_ext::cpu
