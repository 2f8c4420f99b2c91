// CPU kernel of dequantize_weight: a quantized [out, in] weight to float32,
// rows in parallel. Block scales that are not finite (a corrupt or hostile
// file) are an error naming the first such row, never NaN weights.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/quant_checks.h"
#include "ops/cpu/dequantize_cpu.h"
#include "ops/cpu/quant_gemv.h"

namespace lora_ext::cpu {

using quant::QType;

void dequantize_rows(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                     int64_t row0, int64_t rows, int64_t in_features, float* out, int64_t ld) {
  const int64_t row_bytes = qdata.size(1);
  const uint8_t* base = static_cast<const uint8_t*>(qdata.const_data_ptr()) + row0 * row_bytes;
  const at::Tensor sc = qscale ? qscale->contiguous() : at::Tensor();  // kept alive while read
  const float* scales = sc.defined() ? sc.const_data_ptr<float>() : nullptr;
  FirstBadRow bad;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* q = base + r * row_bytes;
      float* o = out + r * ld;
      bool ok = true;
      const float* scale_row =
          scales == nullptr ? nullptr : scales + (row0 + r) * (f.type == QType::Int8 ? 1 : in_features / f.block);
      if (dequantize_row_fast(f, q, scale_row, in_features, o, &ok)) {
        // AVX2 (ops/cpu/quant_gemv.cpp): the same values as the portable decoder below
      } else
        switch (f.type) {
          case QType::Int8: {
            const float s = scales[row0 + r];
            ok = s - s == 0.0f;
            const int8_t* qi = reinterpret_cast<const int8_t*>(q);
            for (int64_t i = 0; i < in_features; ++i) o[i] = static_cast<float>(qi[i]) * s;
            break;
          }
          case QType::NF4: {
            const float* absmax = scales + (row0 + r) * (in_features / quant::kNF4Block);
            for (int64_t i = 0; i < in_features; i += 2) {
              const float s = absmax[i / quant::kNF4Block];
              const uint8_t byte = q[i / 2];
              o[i] = quant::nf4_value(byte >> 4) * s;
              o[i + 1] = quant::nf4_value(byte & 0x0F) * s;
            }
            for (int64_t b = 0; b < in_features / quant::kNF4Block; ++b) ok = ok && absmax[b] - absmax[b] == 0.0f;
            break;
          }
          default:
            for (int64_t b = 0; b < in_features / quant::kGgufBlock; ++b) {
              ok = quant::decode_gguf_block(f.type, q + b * f.block_bytes, o + b * quant::kGgufBlock) && ok;
            }
        }
      if (!ok) bad.note(row0 + r);
    }
  });
  bad.check(f);
}

namespace {

at::Tensor dequantize_weight_cpu(const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                                 c10::string_view qtype, int64_t out_features, int64_t in_features) {
  const auto& f = detail::check_quantized_weight(
      "dequantize_weight", qdata, qscale, std::string_view(qtype.data(), qtype.size()), out_features, in_features);
  at::Tensor w = at::empty({out_features, in_features}, qdata.options().dtype(at::kFloat));
  if (w.numel() == 0) return w;
  dequantize_rows(f, qdata, qscale, 0, out_features, in_features, w.mutable_data_ptr<float>(), in_features);
  return w;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("dequantize_weight", &dequantize_weight_cpu);
}

}  // namespace lora_ext::cpu
