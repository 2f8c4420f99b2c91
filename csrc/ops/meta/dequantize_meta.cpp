// Meta kernel of dequantize_weight: validation and the float32 [out, in] result.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/quant_checks.h"

namespace lora_ext::meta {

namespace {

at::Tensor dequantize_weight_meta(const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                                  c10::string_view qtype, int64_t out_features, int64_t in_features) {
  detail::check_quantized_weight("dequantize_weight", qdata, qscale, std::string_view(qtype.data(), qtype.size()),
                                 out_features, in_features);
  return at::empty({out_features, in_features}, qdata.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Meta, m) {
  m.impl("dequantize_weight", &dequantize_weight_meta);
}

}  // namespace lora_ext::meta
