// Meta (shape-only) kernels of lora_linear and its autograd pieces, so that
// FakeTensor tracing (torch.compile, torch.export) sees exact output shapes,
// dtypes and strides. Validation is the same code the real kernels run.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/op_utils.h"

namespace lora_ext::meta {

using at::Tensor;
using std::optional;

namespace {

Tensor lora_linear_meta(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias, const Tensor& lora_A,
                        const Tensor& lora_B, double scale, double dropout_p, bool training) {
  detail::check_lora_linear_args("lora_linear", x, weight, bias, lora_A, lora_B, scale, dropout_p);
  return at::empty_symint(detail::with_last(x.sym_sizes(), weight.sym_size(0)), x.options());
}

std::tuple<Tensor, Tensor> lora_linear_forward_meta(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                                                    const Tensor& lora_A, const Tensor& lora_B, double scale,
                                                    double dropout_p, const optional<Tensor>& seed) {
  detail::check_lora_linear_args("_lora_linear_forward", x, weight, bias, lora_A, lora_B, scale, dropout_p);
  detail::check_seed("_lora_linear_forward", seed, dropout_p);
  const auto acc = detail::lora_acc_dtype(lora_A.scalar_type());
  Tensor y = at::empty_symint(detail::with_last(x.sym_sizes(), weight.sym_size(0)), x.options());
  Tensor h = at::empty_symint({detail::leading_numel(x.sym_sizes()), lora_A.sym_size(0)}, lora_A.options().dtype(acc));
  return {y, h};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward_lora_meta(const Tensor& grad_y, const Tensor& x,
                                                                  const Tensor& lora_A, const Tensor& lora_B,
                                                                  const Tensor& h, double scale, double dropout_p,
                                                                  const optional<Tensor>& seed) {
  detail::check_seed("_lora_linear_backward_lora", seed, dropout_p);
  const auto acc = detail::lora_acc_dtype(lora_A.scalar_type());
  return {
      at::empty_symint(lora_A.sym_sizes(), lora_A.options()), at::empty_symint(lora_B.sym_sizes(), lora_B.options()),
      at::empty_symint({detail::leading_numel(grad_y.sym_sizes()), lora_A.sym_size(0)}, lora_A.options().dtype(acc))};
}

Tensor lora_linear_backward_input_meta(const Tensor& grad_y, const Tensor& weight, const Tensor& lora_A,
                                       const Tensor& grad_h, double dropout_p, const optional<Tensor>& seed) {
  detail::check_seed("_lora_linear_backward_input", seed, dropout_p);
  return at::empty_symint(detail::with_last(grad_y.sym_sizes(), weight.sym_size(1)), grad_y.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Meta, m) {
  m.impl("lora_linear", &lora_linear_meta);
  m.impl("_lora_linear_forward", &lora_linear_forward_meta);
  m.impl("_lora_linear_backward_input", &lora_linear_backward_input_meta);
  m.impl("_lora_linear_backward_lora", &lora_linear_backward_lora_meta);
}

}  // namespace lora_ext::meta
