#pragma once
// lora_linear_multi_quantized and its autograd pieces: lora_linear_multi with the quantized frozen base of
// lora_linear_quantized (ops/common/quantized_base.h). The entry points are lora_linear_multi's
// (ops/common/lora_linear_multi.h) with QuantizedBase<Backend> as the base product: the same grouping,
// scales, seed, dropout masks and LoRA kernels (Multi, the backend's multi-adapter part), so the result is
// lora_linear_multi's over dequantize(W) up to the base GEMM's rounding. The LoRA gradients are
// _lora_linear_multi_backward_lora's; grad_x = grad_y W (tile by tile) + the rows' LoRA terms, in float32
// for a half/bf16 grad_y (rounded once, as _lora_linear_quantized_backward_input does).
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/ATen.h>

#include "ops/common/checks.h"
#include "ops/common/lora_linear_multi.h"
#include "ops/common/op_utils.h"
#include "ops/common/quant_checks.h"
#include "ops/common/quantized_base.h"

namespace lora_ext::detail {

inline std::string_view qtype_view(c10::string_view s) {
  return {s.data(), s.size()};
}

template <typename Multi, typename Backend>
at::Tensor lora_linear_multi_quantized_op(
    const at::Tensor& x, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale, c10::string_view qtype,
    int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids, double dropout_p, bool training,
    const std::optional<at::Tensor>& group_order, const std::optional<at::Tensor>& group_offsets) {
  const char* op = "lora_linear_multi_quantized";
  const auto& f = check_lora_linear_multi_quantized_args(op, x, qdata, qscale, qtype_view(qtype), out_features,
                                                         in_features, bias, lora_A, lora_B, scales, adapter_ids,
                                                         dropout_p, group_order, group_offsets);
  const typename Multi::Guard guard(x.device());
  const auto [order, offsets] = multi_grouping<Multi>(op, adapter_ids, group_order, group_offsets, lora_A.size(0));
  const double p = training ? dropout_p : 0.0;
  const QuantizedBase<Backend> base{f, qdata, qscale, out_features, in_features};
  return std::get<0>(
      multi_forward_impl<Multi>(op, x, base, bias, lora_A, lora_B, scales, order, offsets, p, draw_dropout_seed(p)));
}

template <typename Multi, typename Backend>
std::tuple<at::Tensor, at::Tensor> lora_linear_multi_quantized_forward_op(
    const at::Tensor& x, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale, c10::string_view qtype,
    int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids, const at::Tensor& order,
    const at::Tensor& offsets, double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "_lora_linear_multi_quantized_forward";
  const auto& f =
      check_lora_linear_multi_quantized_args(op, x, qdata, qscale, qtype_view(qtype), out_features, in_features, bias,
                                             lora_A, lora_B, scales, adapter_ids, dropout_p, order, offsets);
  check_seed(op, seed, dropout_p);
  const typename Multi::Guard guard(x.device());
  Multi::check_grouping(op, adapter_ids, order, offsets, lora_A.size(0));
  const QuantizedBase<Backend> base{f, qdata, qscale, out_features, in_features};
  return multi_forward_impl<Multi>(op, x, base, bias, lora_A, lora_B, scales, order, offsets, dropout_p, seed);
}

template <typename Multi, typename Backend>
at::Tensor lora_linear_multi_quantized_backward_input_op(
    const at::Tensor& grad_y, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale, c10::string_view qtype,
    int64_t out_features, int64_t in_features, const at::Tensor& lora_A, const at::Tensor& grad_h,
    const at::Tensor& order, const at::Tensor& offsets, double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "_lora_linear_multi_quantized_backward_input";
  check_seed(op, seed, dropout_p);
  const int64_t N = check_multi_quantized_backward_input_args(
      op, grad_y, qdata, qscale, qtype_view(qtype), out_features, in_features, lora_A, grad_h, order, offsets);
  check_dropout_p(op, dropout_p);
  const auto& f = *quant::find_format(qtype_view(qtype));
  const typename Multi::Guard guard(grad_y.device());
  const auto shape = with_last(grad_y.sizes(), in_features);
  if (N == 0) return at::empty(shape, grad_y.options());
  const QuantizedBase<Backend> base{f, qdata, qscale, out_features, in_features};
  const auto g = Multi::groups(order, offsets, N, lora_A.size(0));
  const auto drop = dropout_from_seed(seed, dropout_p);
  const at::Tensor A_acc = lora_A.to(lora_acc_dtype(lora_A.scalar_type()));
  // a half/bf16 grad_y: the tiles' products accumulate in float32 (the branch's dtype), rounded once
  const bool half = half_like(grad_y.scalar_type());
  const at::Tensor g2d = half ? as_rows(grad_y).to(at::kFloat) : as_rows(grad_y);
  at::Tensor gx = Multi::backward_input(op, g2d, base, A_acc, grad_h, g, drop);
  if (half) gx = gx.to(grad_y.scalar_type());
  return gx.view(shape);
}

}  // namespace lora_ext::detail
