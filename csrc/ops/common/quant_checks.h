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

namespace lora_ext::detail {

// lora_linear_quantized / linear_quantized: the quantized weight as above, x
// [..., in_features] (float32/float64/bfloat16/float16) on qdata's device, bias
// [out_features] in x's dtype or None, and, when lora_A/lora_B are given, the
// adapter's rules of lora_linear (check_adapter), finite scale and 0 <= dropout_p < 1.
const quant::Format& check_lora_linear_quantized_args(const char* op, const at::Tensor& x, const at::Tensor& qdata,
                                                      const std::optional<at::Tensor>& qscale, std::string_view qtype,
                                                      int64_t out_features, int64_t in_features,
                                                      const std::optional<at::Tensor>& bias, const at::Tensor* lora_A,
                                                      const at::Tensor* lora_B, double scale, double dropout_p);

// _lora_linear_quantized_backward_input: grad_y [..., out_features] on qdata's
// device; lora_A [r, in_features] and grad_h [N, r] given together or not at all.
const quant::Format& check_quantized_backward_input_args(const char* op, const at::Tensor& grad_y,
                                                         const at::Tensor& qdata,
                                                         const std::optional<at::Tensor>& qscale,
                                                         std::string_view qtype, int64_t out_features,
                                                         int64_t in_features, const std::optional<at::Tensor>& lora_A,
                                                         const std::optional<at::Tensor>& grad_h, double dropout_p);

// lora_linear_multi_quantized: the quantized base, x and bias as for lora_linear_quantized, then the stacked
// adapters, scales, ids and grouping of lora_linear_multi (check_multi_adapter_args) for a [out_features,
// in_features] weight.
const quant::Format& check_lora_linear_multi_quantized_args(
    const char* op, const at::Tensor& x, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
    std::string_view qtype, int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids,
    double dropout_p, const std::optional<at::Tensor>& group_order, const std::optional<at::Tensor>& group_offsets);

// _lora_linear_multi_quantized_backward_input: grad_y [..., out_features] (a float dtype) on qdata's device,
// lora_A [n, r_max, in_features], grad_h [N, r_max] in lora_A's accumulation dtype, the grouping's shapes.
// Returns N.
int64_t check_multi_quantized_backward_input_args(const char* op, const at::Tensor& grad_y, const at::Tensor& qdata,
                                                  const std::optional<at::Tensor>& qscale, std::string_view qtype,
                                                  int64_t out_features, int64_t in_features, const at::Tensor& lora_A,
                                                  const at::Tensor& grad_h, const at::Tensor& order,
                                                  const at::Tensor& offsets);

}  // namespace lora_ext::detail
