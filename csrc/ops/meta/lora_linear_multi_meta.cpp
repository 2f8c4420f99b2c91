// Meta (shape-only) kernels of the multi-adapter ops. Validation of shapes,
// dtypes and devices is the code the real kernels run; values (adapter ids,
// the grouping) are checked by the real kernels only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/op_utils.h"
#include "ops/common/quant_checks.h"

namespace lora_ext::meta {

using at::Tensor;
using std::optional;

namespace {

std::tuple<Tensor, Tensor> group_rows_meta(const Tensor& ids, int64_t n) {
  TORCH_CHECK(ids.dim() == 1, "lora_ext::lora_group_rows: expected adapter_ids of shape [N], got ", ids.sym_sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "lora_ext::lora_group_rows: expected adapter_ids of dtype int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(n >= 0, "lora_ext::lora_group_rows: expected n_adapters >= 0, got ", n);
  const auto opt = ids.options().dtype(at::kLong);
  return {at::empty_symint(ids.sym_sizes(), opt), at::empty({n + 2}, opt)};
}

Tensor lora_linear_multi_meta(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias, const Tensor& lora_A,
                              const Tensor& lora_B, const Tensor& scales, const Tensor& adapter_ids, double dropout_p,
                              bool training, const optional<Tensor>& group_order,
                              const optional<Tensor>& group_offsets) {
  detail::check_lora_linear_multi_args("lora_linear_multi", x, weight, bias, lora_A, lora_B, scales, adapter_ids,
                                       dropout_p, group_order, group_offsets);
  return at::empty_symint(detail::with_last(x.sym_sizes(), weight.sym_size(0)), x.options());
}

std::tuple<Tensor, Tensor> lora_linear_multi_forward_meta(const Tensor& x, const Tensor& weight,
                                                          const optional<Tensor>& bias, const Tensor& lora_A,
                                                          const Tensor& lora_B, const Tensor& scales,
                                                          const Tensor& adapter_ids, const Tensor& order,
                                                          const Tensor& offsets, double dropout_p,
                                                          const optional<Tensor>& seed) {
  const char* op = "_lora_linear_multi_forward";
  detail::check_lora_linear_multi_args(op, x, weight, bias, lora_A, lora_B, scales, adapter_ids, dropout_p, order,
                                       offsets);
  detail::check_seed(op, seed, dropout_p);
  const auto acc = detail::lora_acc_dtype(lora_A.scalar_type());
  return {at::empty_symint(detail::with_last(x.sym_sizes(), weight.sym_size(0)), x.options()),
          at::empty_symint({adapter_ids.sym_size(0), lora_A.sym_size(1)}, lora_A.options().dtype(acc))};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_multi_backward_lora_meta(
    const Tensor& grad_y, const Tensor& x, const Tensor& lora_A, const Tensor& lora_B, const Tensor& scales,
    const Tensor& order, const Tensor& offsets, const Tensor& h, double dropout_p, const optional<Tensor>& seed) {
  detail::check_seed("_lora_linear_multi_backward_lora", seed, dropout_p);
  const auto acc = detail::lora_acc_dtype(lora_A.scalar_type());
  return {at::empty_symint(lora_A.sym_sizes(), lora_A.options()),
          at::empty_symint(lora_B.sym_sizes(), lora_B.options()),
          at::empty_symint({order.sym_size(0), lora_A.sym_size(1)}, lora_A.options().dtype(acc))};
}

Tensor lora_linear_multi_backward_input_meta(const Tensor& grad_y, const Tensor& weight, const Tensor& lora_A,
                                             const Tensor& grad_h, const Tensor& order, const Tensor& offsets,
                                             double dropout_p, const optional<Tensor>& seed) {
  detail::check_seed("_lora_linear_multi_backward_input", seed, dropout_p);
  return at::empty_symint(detail::with_last(grad_y.sym_sizes(), weight.sym_size(1)), grad_y.options());
}

std::string_view sv(c10::string_view s) {
  return {s.data(), s.size()};
}

Tensor lora_linear_multi_quantized_meta(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                                        c10::string_view qtype, int64_t out, int64_t in, const optional<Tensor>& bias,
                                        const Tensor& lora_A, const Tensor& lora_B, const Tensor& scales,
                                        const Tensor& adapter_ids, double dropout_p, bool training,
                                        const optional<Tensor>& group_order, const optional<Tensor>& group_offsets) {
  detail::check_lora_linear_multi_quantized_args("lora_linear_multi_quantized", x, qdata, qscale, sv(qtype), out, in,
                                                 bias, lora_A, lora_B, scales, adapter_ids, dropout_p, group_order,
                                                 group_offsets);
  return at::empty_symint(detail::with_last(x.sym_sizes(), out), x.options());
}

std::tuple<Tensor, Tensor> lora_linear_multi_quantized_forward_meta(
    const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale, c10::string_view qtype, int64_t out,
    int64_t in, const optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B, const Tensor& scales,
    const Tensor& adapter_ids, const Tensor& order, const Tensor& offsets, double dropout_p,
    const optional<Tensor>& seed) {
  const char* op = "_lora_linear_multi_quantized_forward";
  detail::check_lora_linear_multi_quantized_args(op, x, qdata, qscale, sv(qtype), out, in, bias, lora_A, lora_B, scales,
                                                 adapter_ids, dropout_p, order, offsets);
  detail::check_seed(op, seed, dropout_p);
  const auto acc = detail::lora_acc_dtype(lora_A.scalar_type());
  return {at::empty_symint(detail::with_last(x.sym_sizes(), out), x.options()),
          at::empty_symint({adapter_ids.sym_size(0), lora_A.sym_size(1)}, lora_A.options().dtype(acc))};
}

Tensor lora_linear_multi_quantized_backward_input_meta(const Tensor& grad_y, const Tensor& qdata,
                                                       const optional<Tensor>& qscale, c10::string_view qtype,
                                                       int64_t out, int64_t in, const Tensor& lora_A,
                                                       const Tensor& grad_h, const Tensor& order, const Tensor& offsets,
                                                       double dropout_p, const optional<Tensor>& seed) {
  const char* op = "_lora_linear_multi_quantized_backward_input";
  detail::check_seed(op, seed, dropout_p);
  detail::check_quantized_weight(op, qdata, qscale, sv(qtype), out, in);
  return at::empty_symint(detail::with_last(grad_y.sym_sizes(), in), grad_y.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Meta, m) {
  m.impl("lora_group_rows", &group_rows_meta);
  m.impl("lora_linear_multi", &lora_linear_multi_meta);
  m.impl("_lora_linear_multi_forward", &lora_linear_multi_forward_meta);
  m.impl("_lora_linear_multi_backward_lora", &lora_linear_multi_backward_lora_meta);
  m.impl("_lora_linear_multi_backward_input", &lora_linear_multi_backward_input_meta);
  m.impl("lora_linear_multi_quantized", &lora_linear_multi_quantized_meta);
  m.impl("_lora_linear_multi_quantized_forward", &lora_linear_multi_quantized_forward_meta);
  m.impl("_lora_linear_multi_quantized_backward_input", &lora_linear_multi_quantized_backward_input_meta);
}

}  // namespace lora_ext::meta
