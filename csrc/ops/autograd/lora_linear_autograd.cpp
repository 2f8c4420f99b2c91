// Autograd formula of lora_linear, in C++ so that libtorch programs can train.
//
// Forward saves x (alive anyway), the [N, r] intermediate h, and an 8-byte
// dropout seed; weight/lora_A/lora_B are parameters that are alive anyway.
// No output-sized tensor, no dropout mask and no dropped copy of x is saved:
// backward regenerates the mask from the seed. The frozen weight's gradient
// (and bias's) is computed only when they require grad.

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/op_handles.h"
#include "ops/common/op_utils.h"

namespace lora_ext::autograd {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                        const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p, bool training) {
    const double p = training ? dropout_p : 0.0;
    const optional<Tensor> seed = detail::draw_dropout_seed(p);
    auto [y, h] = handles::lora_linear_forward().call(x, weight, bias, lora_A, lora_B, scale, p, seed);
    ctx->save_for_backward({x, weight, lora_A, lora_B, h, seed.value_or(Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["grad_x"] = x.requires_grad();
    ctx->saved_data["grad_w"] = weight.requires_grad();
    ctx->saved_data["grad_b"] = detail::requires_grad(bias);
    ctx->saved_data["grad_ab"] = lora_A.requires_grad() || lora_B.requires_grad();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const Tensor& lora_A = saved[2];
    const Tensor& lora_B = saved[3];
    const Tensor& h = saved[4];
    const optional<Tensor> seed = saved[5].defined() ? optional<Tensor>(saved[5]) : std::nullopt;
    const double scale = ctx->saved_data["scale"].toDouble();
    const double p = ctx->saved_data["p"].toDouble();
    Tensor g = grad_outputs[0];
    Tensor grad_x, grad_w, grad_b, grad_A, grad_B;
    if (!g.defined()) {
      return {grad_x, grad_w, grad_b, grad_A, grad_B, Tensor(), Tensor(), Tensor()};
    }
    const bool need_x = ctx->saved_data["grad_x"].toBool();
    if (need_x || ctx->saved_data["grad_ab"].toBool()) {
      // grad_h = scale * g B comes out of the LoRA backward and feeds grad_x,
      // so grad_y is read once for both.
      Tensor grad_h;
      std::tie(grad_A, grad_B, grad_h) =
          handles::lora_linear_backward_lora().call(g, x, lora_A, lora_B, h, scale, p, seed);
      if (need_x) grad_x = handles::lora_linear_backward_input().call(g, weight, lora_A, grad_h, p, seed);
    }
    const bool need_w = ctx->saved_data["grad_w"].toBool(), need_b = ctx->saved_data["grad_b"].toBool();
    if (need_w || need_b) {
      const Tensor g2d = detail::as_rows(g);
      if (need_w) grad_w = at::mm(g2d.t(), detail::as_rows(x));
      if (need_b) grad_b = g2d.sum(0);
    }
    return {grad_x, grad_w, grad_b, grad_A, grad_B, Tensor(), Tensor(), Tensor()};
  }
};

Tensor lora_linear_autograd(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias, const Tensor& lora_A,
                            const Tensor& lora_B, double scale, double dropout_p, bool training) {
  const bool any_grad =
      at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || detail::requires_grad(bias) ||
                                     lora_A.requires_grad() || lora_B.requires_grad());
  if (!any_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return handles::lora_linear().call(x, weight, bias, lora_A, lora_B, scale, dropout_p, training);
  }
  detail::check_lora_linear_args("lora_linear", x, weight, bias, lora_A, lora_B, scale, dropout_p);
  return LoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, training);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
}

}  // namespace lora_ext::autograd
