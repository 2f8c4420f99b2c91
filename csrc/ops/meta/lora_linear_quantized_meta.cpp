// Meta (shape-only) kernels of lora_linear_quantized, linear_quantized and
// their autograd pieces; validation is the code the real kernels run.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/op_utils.h"
#include "ops/common/quant_checks.h"

namespace lora_ext::meta {

using at::Tensor;
using std::optional;

namespace {

std::string_view sv(c10::string_view s) {
  return {s.data(), s.size()};
}

Tensor lora_linear_quantized_meta(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                                  c10::string_view qtype, int64_t out, int64_t in, const optional<Tensor>& bias,
                                  const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p,
                                  bool training) {
  detail::check_lora_linear_quantized_args("lora_linear_quantized", x, qdata, qscale, sv(qtype), out, in, bias, &lora_A,
                                           &lora_B, scale, dropout_p);
  return at::empty_symint(detail::with_last(x.sym_sizes(), out), x.options());
}

Tensor linear_quantized_meta(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                             c10::string_view qtype, int64_t out, int64_t in, const optional<Tensor>& bias) {
  detail::check_lora_linear_quantized_args("linear_quantized", x, qdata, qscale, sv(qtype), out, in, bias, nullptr,
                                           nullptr, 1.0, 0.0);
  return at::empty_symint(detail::with_last(x.sym_sizes(), out), x.options());
}

std::tuple<Tensor, Tensor> lora_linear_quantized_forward_meta(const Tensor& x, const Tensor& qdata,
                                                              const optional<Tensor>& qscale, c10::string_view qtype,
                                                              int64_t out, int64_t in, const optional<Tensor>& bias,
                                                              const Tensor& lora_A, const Tensor& lora_B, double scale,
                                                              double dropout_p, const optional<Tensor>& seed) {
  const char* op = "_lora_linear_quantized_forward";
  detail::check_lora_linear_quantized_args(op, x, qdata, qscale, sv(qtype), out, in, bias, &lora_A, &lora_B, scale,
                                           dropout_p);
  detail::check_seed(op, seed, dropout_p);
  const auto acc = detail::lora_acc_dtype(lora_A.scalar_type());
  return {at::empty_symint(detail::with_last(x.sym_sizes(), out), x.options()),
          at::empty_symint({detail::leading_numel(x.sym_sizes()), lora_A.sym_size(0)}, lora_A.options().dtype(acc))};
}

Tensor lora_linear_quantized_backward_input_meta(const Tensor& grad_y, const Tensor& qdata,
                                                 const optional<Tensor>& qscale, c10::string_view qtype, int64_t out,
                                                 int64_t in, const optional<Tensor>& lora_A,
                                                 const optional<Tensor>& grad_h, double dropout_p,
                                                 const optional<Tensor>& seed) {
  const char* op = "_lora_linear_quantized_backward_input";
  detail::check_quantized_backward_input_args(op, grad_y, qdata, qscale, sv(qtype), out, in, lora_A, grad_h, dropout_p);
  detail::check_seed(op, seed, dropout_p);
  return at::empty_symint(detail::with_last(grad_y.sym_sizes(), in), grad_y.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Meta, m) {
  m.impl("lora_linear_quantized", &lora_linear_quantized_meta);
  m.impl("linear_quantized", &linear_quantized_meta);
  m.impl("_lora_linear_quantized_forward", &lora_linear_quantized_forward_meta);
  m.impl("_lora_linear_quantized_backward_input", &lora_linear_quantized_backward_input_meta);
}

}  // namespace lora_ext::meta
