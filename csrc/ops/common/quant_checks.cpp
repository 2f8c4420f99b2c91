#include "ops/common/quant_checks.h"

#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lora_ext::detail {

const quant::Format& check_quantized_weight(const char* op, const at::Tensor& qdata,
                                            const std::optional<at::Tensor>& qscale, std::string_view qtype,
                                            int64_t out_features, int64_t in_features) {
  const quant::Format* f = quant::find_format(qtype);
  TORCH_CHECK_VALUE(f != nullptr, "lora_ext::", op,
                    ": expected qtype 'int8', 'q8_0', 'q4_0', 'q4_1' or 'nf4', got '", std::string(qtype), "'");
  TORCH_CHECK_VALUE(out_features >= 0 && in_features >= 0, "lora_ext::", op,
                    ": expected out_features >= 0 and in_features >= 0, got ", out_features, " and ", in_features);
  TORCH_CHECK_VALUE(in_features % f->block == 0, "lora_ext::", op, ": ", f->name, " quantizes blocks of ", f->block,
                    " along in_features: expected in_features divisible by ", f->block, ", got ", in_features);
  const int64_t row_bytes = in_features / f->block * f->block_bytes;
  const auto want = f->type == quant::QType::Int8 ? at::kChar : at::kByte;
  TORCH_CHECK(qdata.scalar_type() == want, "lora_ext::", op, ": expected ", f->name, " qdata of dtype ",
              want == at::kChar ? "int8" : "uint8", ", got ", qdata.scalar_type());
  TORCH_CHECK(qdata.dim() == 2 && qdata.sym_size(0) == out_features && qdata.sym_size(1) == row_bytes,
              "lora_ext::", op, ": expected ", f->name, " qdata of shape [", out_features, ", ", row_bytes,
              "] for a [", out_features, ", ", in_features, "] weight, got ", qdata.sym_sizes());
  TORCH_CHECK(qdata.is_contiguous(), "lora_ext::", op, ": expected a contiguous qdata (the format's byte layout)");
  if (!f->has_qscale) {
    TORCH_CHECK_VALUE(!qscale.has_value(), "lora_ext::", op, ": ", f->name,
                      " keeps its scales inside its blocks: expected qscale None, got a tensor of shape ",
                      qscale->sym_sizes());
    return *f;
  }
  TORCH_CHECK_VALUE(qscale.has_value(), "lora_ext::", op, ": expected a float32 qscale for ", f->name, ", got None");
  const at::Tensor& s = *qscale;
  const bool int8 = f->type == quant::QType::Int8;
  const int64_t cols = int8 ? 1 : in_features / f->block;
  TORCH_CHECK(s.scalar_type() == at::kFloat, "lora_ext::", op, ": expected ", f->name,
              " qscale of dtype float32, got ", s.scalar_type());
  TORCH_CHECK(int8 ? (s.dim() == 1 && s.sym_size(0) == out_features)
                   : (s.dim() == 2 && s.sym_size(0) == out_features && s.sym_size(1) == cols),
              "lora_ext::", op, ": expected ", f->name, " qscale of shape ",
              int8 ? "[" + std::to_string(out_features) + "] (one scale per output row)"
                   : "[" + std::to_string(out_features) + ", " + std::to_string(cols) + "] (one absmax per 64)",
              ", got ", s.sym_sizes());
  TORCH_CHECK(s.device() == qdata.device(), "lora_ext::", op, ": expected qscale on ", qdata.device(), ", got ",
              s.device());
  return *f;
}

}  // namespace lora_ext::detail
