// Typed dispatcher calls behind the public C++ API (lora_ext/ops.h), through
// the op handles of ops/common/op_handles.h.
#include <lora_ext/ops.h>

#include "ops/common/op_handles.h"

namespace lora_ext::ops {

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                       bool training) {
  return handles::lora_linear().call(x, weight, bias, lora_A, lora_B, scale, dropout_p, training);
}

std::tuple<at::Tensor, at::Tensor> lora_group_rows(const at::Tensor& adapter_ids, int64_t n_adapters) {
  return handles::lora_group_rows().call(adapter_ids, n_adapters);
}

at::Tensor lora_linear_multi(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales,
                             const at::Tensor& adapter_ids, double dropout_p, bool training,
                             const std::optional<at::Tensor>& group_order,
                             const std::optional<at::Tensor>& group_offsets) {
  return handles::lora_linear_multi().call(x, weight, bias, lora_A, lora_B, scales, adapter_ids, dropout_p, training,
                                           group_order, group_offsets);
}

void merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  handles::merge_().call(weight, lora_A, lora_B, scale);
}

void unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  handles::unmerge_().call(weight, lora_A, lora_B, scale);
}

ExactMergeCodes merge_exact_codes(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                  double scale) {
  auto [codes, idx, val] = handles::merge_exact_codes().call(weight, lora_A, lora_B, scale);
  return {codes, idx, val};
}

void merge_exact_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  handles::merge_exact_().call(weight, lora_A, lora_B, scale);
}

void unmerge_exact_(at::Tensor& weight, const ExactMergeCodes& codes, const at::Tensor& lora_A,
                    const at::Tensor& lora_B, double scale) {
  handles::unmerge_exact_().call(weight, codes.codes, codes.exc_index, codes.exc_value, lora_A, lora_B, scale);
}

at::Tensor dequantize_weight(const QuantizedWeight& w) {
  return handles::dequantize_weight().call(w.qdata, w.qscale, w.qtype, w.out_features, w.in_features);
}

at::Tensor lora_linear_quantized(const at::Tensor& x, const QuantizedWeight& w, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                                 bool training) {
  return handles::lora_linear_quantized().call(x, w.qdata, w.qscale, w.qtype, w.out_features, w.in_features, bias,
                                               lora_A, lora_B, scale, dropout_p, training);
}

at::Tensor lora_linear_multi_quantized(const at::Tensor& x, const QuantizedWeight& w,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                       const at::Tensor& lora_B, const at::Tensor& scales,
                                       const at::Tensor& adapter_ids, double dropout_p, bool training,
                                       const std::optional<at::Tensor>& group_order,
                                       const std::optional<at::Tensor>& group_offsets) {
  return handles::lora_linear_multi_quantized().call(x, w.qdata, w.qscale, w.qtype, w.out_features, w.in_features, bias,
                                                     lora_A, lora_B, scales, adapter_ids, dropout_p, training,
                                                     group_order, group_offsets);
}

at::Tensor linear_quantized(const at::Tensor& x, const QuantizedWeight& w, const std::optional<at::Tensor>& bias) {
  return handles::linear_quantized().call(x, w.qdata, w.qscale, w.qtype, w.out_features, w.in_features, bias);
}

}  // namespace lora_ext::ops
