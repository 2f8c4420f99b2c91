// Autograd of lora_linear_quantized and linear_quantized, in C++ so that
// libtorch programs can train on a quantized base. The base (qdata, qscale)
// is frozen and gets no gradient; x, bias, lora_A and lora_B do. Saved: x, the
// quantized weight (alive anyway), h [N, r] and an 8-byte dropout seed, as for
// lora_linear; the LoRA gradients are lora_linear's own backward piece.
#include <string>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/common/op_handles.h"
#include "ops/common/op_utils.h"
#include "ops/common/quant_checks.h"

namespace lora_ext::autograd {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : std::nullopt;
}

// The quantized weight's saved fields: qdata, qscale (undefined for GGUF blocks).
void save_base(AutogradContext* ctx, c10::string_view qtype, int64_t out, int64_t in) {
  ctx->saved_data["qtype"] = std::string(qtype.data(), qtype.size());
  ctx->saved_data["out"] = out;
  ctx->saved_data["in"] = in;
}

Tensor bias_grad(const Tensor& g, bool need) {
  return need ? detail::as_rows(g).sum(0) : Tensor();
}

class LoraLinearQuantizedFunction : public torch::autograd::Function<LoraLinearQuantizedFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                        c10::string_view qtype, int64_t out, int64_t in, const optional<Tensor>& bias,
                        const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p, bool training) {
    const double p = training ? dropout_p : 0.0;
    const optional<Tensor> seed = detail::draw_dropout_seed(p);
    auto [y, h] = handles::lora_linear_quantized_forward().call(x, qdata, qscale, qtype, out, in, bias, lora_A, lora_B,
                                                                scale, p, seed);
    ctx->save_for_backward({x, qdata, qscale.value_or(Tensor()), lora_A, lora_B, h, seed.value_or(Tensor())});
    save_base(ctx, qtype, out, in);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["grad_x"] = x.requires_grad();
    ctx->saved_data["grad_b"] = detail::requires_grad(bias);
    ctx->saved_data["grad_ab"] = lora_A.requires_grad() || lora_B.requires_grad();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &qdata = s[1], &lora_A = s[3], &lora_B = s[4], &h = s[5];
    const optional<Tensor> qscale = opt(s[2]), seed = opt(s[6]);
    const std::string qtype = ctx->saved_data["qtype"].toStringRef();
    const int64_t out = ctx->saved_data["out"].toInt(), in = ctx->saved_data["in"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble(), p = ctx->saved_data["p"].toDouble();
    const Tensor& g = grad_outputs[0];
    Tensor grad_x, grad_b, grad_A, grad_B;
    if (g.defined()) {
      const bool need_x = ctx->saved_data["grad_x"].toBool();
      if (need_x || ctx->saved_data["grad_ab"].toBool()) {
        Tensor grad_h;
        std::tie(grad_A, grad_B, grad_h) =
            handles::lora_linear_backward_lora().call(g, x, lora_A, lora_B, h, scale, p, seed);
        if (need_x) {
          grad_x = handles::lora_linear_quantized_backward_input().call(g, qdata, qscale, qtype, out, in, lora_A,
                                                                        grad_h, p, seed);
        }
      }
      grad_b = bias_grad(g, ctx->saved_data["grad_b"].toBool());
    }
    return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            grad_b, grad_A,   grad_B,   Tensor(), Tensor(), Tensor()};
  }
};

class LinearQuantizedFunction : public torch::autograd::Function<LinearQuantizedFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                        c10::string_view qtype, int64_t out, int64_t in, const optional<Tensor>& bias) {
    ctx->save_for_backward({qdata, qscale.value_or(Tensor())});
    save_base(ctx, qtype, out, in);
    ctx->saved_data["grad_x"] = x.requires_grad();
    ctx->saved_data["grad_b"] = detail::requires_grad(bias);
    at::AutoDispatchBelowADInplaceOrView guard;
    return handles::linear_quantized().call(x, qdata, qscale, qtype, out, in, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    const std::string qtype = ctx->saved_data["qtype"].toStringRef();
    const int64_t out = ctx->saved_data["out"].toInt(), in = ctx->saved_data["in"].toInt();
    const Tensor& g = grad_outputs[0];
    Tensor grad_x, grad_b;
    if (g.defined()) {
      if (ctx->saved_data["grad_x"].toBool()) {
        grad_x = handles::lora_linear_quantized_backward_input().call(g, s[0], opt(s[1]), qtype, out, in, std::nullopt,
                                                                      std::nullopt, 0.0, std::nullopt);
      }
      grad_b = bias_grad(g, ctx->saved_data["grad_b"].toBool());
    }
    return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), grad_b};
  }
};

bool any_grad(std::initializer_list<bool> flags) {
  if (!at::GradMode::is_enabled()) return false;
  for (bool f : flags) {
    if (f) return true;
  }
  return false;
}

Tensor lora_linear_quantized_autograd(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                                      c10::string_view qtype, int64_t out, int64_t in, const optional<Tensor>& bias,
                                      const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p,
                                      bool training) {
  if (!any_grad({x.requires_grad(), detail::requires_grad(bias), lora_A.requires_grad(), lora_B.requires_grad()})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return handles::lora_linear_quantized().call(x, qdata, qscale, qtype, out, in, bias, lora_A, lora_B, scale,
                                                 dropout_p, training);
  }
  detail::check_lora_linear_quantized_args("lora_linear_quantized", x, qdata, qscale,
                                           std::string_view(qtype.data(), qtype.size()), out, in, bias, &lora_A,
                                           &lora_B, scale, dropout_p);
  return LoraLinearQuantizedFunction::apply(x, qdata, qscale, qtype, out, in, bias, lora_A, lora_B, scale, dropout_p,
                                            training);
}

Tensor linear_quantized_autograd(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                                 c10::string_view qtype, int64_t out, int64_t in, const optional<Tensor>& bias) {
  if (!any_grad({x.requires_grad(), detail::requires_grad(bias)})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return handles::linear_quantized().call(x, qdata, qscale, qtype, out, in, bias);
  }
  return LinearQuantizedFunction::apply(x, qdata, qscale, qtype, out, in, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) {
  m.impl("lora_linear_quantized", &lora_linear_quantized_autograd);
  m.impl("linear_quantized", &linear_quantized_autograd);
}

}  // namespace lora_ext::autograd
