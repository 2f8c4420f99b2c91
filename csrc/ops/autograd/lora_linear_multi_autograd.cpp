// Autograd formula of lora_linear_multi, in C++ (libtorch programs can train
// several adapters at once). Saves x, h [N, r_max], the grouping and an 8-byte
// dropout seed, as lora_linear does; each adapter's A and B receive gradients
// from its own rows only. scales and adapter_ids are not differentiable.
// lora_linear_multi_quantized: the same formula over a quantized frozen base (no gradient for it; the
// quantized weight is saved, alive anyway), grad_x from _lora_linear_multi_quantized_backward_input.
#include <string>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/op_handles.h"
#include "ops/common/op_utils.h"
#include "ops/common/quant_checks.h"

namespace lora_ext::autograd {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// The rows grouped by adapter: the caller's (checked by the op's argument checks) or computed.
std::tuple<Tensor, Tensor> grouping(const Tensor& adapter_ids, int64_t n_adapters, const optional<Tensor>& group_order,
                                    const optional<Tensor>& group_offsets) {
  if (group_order.has_value() && group_order->defined()) return {*group_order, *group_offsets};
  at::AutoDispatchBelowADInplaceOrView guard;
  return handles::lora_group_rows().call(adapter_ids, n_adapters);
}

class LoraLinearMultiFunction : public torch::autograd::Function<LoraLinearMultiFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                        const Tensor& lora_A, const Tensor& lora_B, const Tensor& scales, const Tensor& adapter_ids,
                        const Tensor& order, const Tensor& offsets, double dropout_p, bool training) {
    const double p = training ? dropout_p : 0.0;
    const optional<Tensor> seed = detail::draw_dropout_seed(p);
    auto [y, h] = handles::lora_linear_multi_forward().call(x, weight, bias, lora_A, lora_B, scales, adapter_ids, order,
                                                            offsets, p, seed);
    ctx->save_for_backward({x, weight, lora_A, lora_B, scales, order, offsets, h, seed.value_or(Tensor())});
    ctx->saved_data["p"] = p;
    ctx->saved_data["grad_x"] = x.requires_grad();
    ctx->saved_data["grad_w"] = weight.requires_grad();
    ctx->saved_data["grad_b"] = detail::requires_grad(bias);
    ctx->saved_data["grad_ab"] = lora_A.requires_grad() || lora_B.requires_grad();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &scales = saved[4],
                 &order = saved[5], &offsets = saved[6], &h = saved[7];
    const optional<Tensor> seed = saved[8].defined() ? optional<Tensor>(saved[8]) : std::nullopt;
    const double p = ctx->saved_data["p"].toDouble();
    const Tensor& g = grad_outputs[0];
    Tensor grad_x, grad_w, grad_b, grad_A, grad_B;
    if (g.defined()) {
      const bool need_x = ctx->saved_data["grad_x"].toBool();
      if (need_x || ctx->saved_data["grad_ab"].toBool()) {
        Tensor grad_h;
        std::tie(grad_A, grad_B, grad_h) =
            handles::lora_linear_multi_backward_lora().call(g, x, lora_A, lora_B, scales, order, offsets, h, p, seed);
        if (need_x) {
          grad_x = handles::lora_linear_multi_backward_input().call(g, weight, lora_A, grad_h, order, offsets, p, seed);
        }
      }
      const Tensor g2d = detail::as_rows(g);
      if (ctx->saved_data["grad_w"].toBool()) grad_w = at::mm(g2d.t(), detail::as_rows(x));
      if (ctx->saved_data["grad_b"].toBool()) grad_b = g2d.sum(0);
    }
    return {grad_x, grad_w, grad_b, grad_A, grad_B, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor lora_linear_multi_autograd(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                                  const Tensor& lora_A, const Tensor& lora_B, const Tensor& scales,
                                  const Tensor& adapter_ids, double dropout_p, bool training,
                                  const optional<Tensor>& group_order, const optional<Tensor>& group_offsets) {
  const bool any_grad =
      at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || detail::requires_grad(bias) ||
                                     lora_A.requires_grad() || lora_B.requires_grad());
  if (!any_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return handles::lora_linear_multi().call(x, weight, bias, lora_A, lora_B, scales, adapter_ids, dropout_p, training,
                                             group_order, group_offsets);
  }
  detail::check_lora_linear_multi_args("lora_linear_multi", x, weight, bias, lora_A, lora_B, scales, adapter_ids,
                                       dropout_p, group_order, group_offsets);
  const auto [order, offsets] = grouping(adapter_ids, lora_A.size(0), group_order, group_offsets);
  return LoraLinearMultiFunction::apply(x, weight, bias, lora_A, lora_B, scales, adapter_ids, order, offsets, dropout_p,
                                        training);
}

class LoraLinearMultiQuantizedFunction : public torch::autograd::Function<LoraLinearMultiQuantizedFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                        c10::string_view qtype, int64_t out, int64_t in, const optional<Tensor>& bias,
                        const Tensor& lora_A, const Tensor& lora_B, const Tensor& scales, const Tensor& adapter_ids,
                        const Tensor& order, const Tensor& offsets, double dropout_p, bool training) {
    const double p = training ? dropout_p : 0.0;
    const optional<Tensor> seed = detail::draw_dropout_seed(p);
    auto [y, h] = handles::lora_linear_multi_quantized_forward().call(
        x, qdata, qscale, qtype, out, in, bias, lora_A, lora_B, scales, adapter_ids, order, offsets, p, seed);
    ctx->save_for_backward(
        {x, qdata, qscale.value_or(Tensor()), lora_A, lora_B, scales, order, offsets, h, seed.value_or(Tensor())});
    ctx->saved_data["qtype"] = std::string(qtype.data(), qtype.size());
    ctx->saved_data["out"] = out;
    ctx->saved_data["in"] = in;
    ctx->saved_data["p"] = p;
    ctx->saved_data["grad_x"] = x.requires_grad();
    ctx->saved_data["grad_b"] = detail::requires_grad(bias);
    ctx->saved_data["grad_ab"] = lora_A.requires_grad() || lora_B.requires_grad();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &qdata = s[1], &lora_A = s[3], &lora_B = s[4], &scales = s[5], &order = s[6],
                 &offsets = s[7], &h = s[8];
    const optional<Tensor> qscale = s[2].defined() ? optional<Tensor>(s[2]) : std::nullopt;
    const optional<Tensor> seed = s[9].defined() ? optional<Tensor>(s[9]) : std::nullopt;
    const std::string qtype = ctx->saved_data["qtype"].toStringRef();
    const int64_t out = ctx->saved_data["out"].toInt(), in = ctx->saved_data["in"].toInt();
    const double p = ctx->saved_data["p"].toDouble();
    const Tensor& g = grad_outputs[0];
    Tensor grad_x, grad_b, grad_A, grad_B;
    if (g.defined()) {
      const bool need_x = ctx->saved_data["grad_x"].toBool();
      if (need_x || ctx->saved_data["grad_ab"].toBool()) {
        Tensor grad_h;
        std::tie(grad_A, grad_B, grad_h) =
            handles::lora_linear_multi_backward_lora().call(g, x, lora_A, lora_B, scales, order, offsets, h, p, seed);
        if (need_x) {
          grad_x = handles::lora_linear_multi_quantized_backward_input().call(g, qdata, qscale, qtype, out, in, lora_A,
                                                                              grad_h, order, offsets, p, seed);
        }
      }
      if (ctx->saved_data["grad_b"].toBool()) grad_b = detail::as_rows(g).sum(0);
    }
    return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), grad_b,  grad_A,
            grad_B, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor lora_linear_multi_quantized_autograd(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                                            c10::string_view qtype, int64_t out, int64_t in,
                                            const optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B,
                                            const Tensor& scales, const Tensor& adapter_ids, double dropout_p,
                                            bool training, const optional<Tensor>& group_order,
                                            const optional<Tensor>& group_offsets) {
  const bool any_grad = at::GradMode::is_enabled() && (x.requires_grad() || detail::requires_grad(bias) ||
                                                       lora_A.requires_grad() || lora_B.requires_grad());
  if (!any_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return handles::lora_linear_multi_quantized().call(x, qdata, qscale, qtype, out, in, bias, lora_A, lora_B, scales,
                                                       adapter_ids, dropout_p, training, group_order, group_offsets);
  }
  detail::check_lora_linear_multi_quantized_args("lora_linear_multi_quantized", x, qdata, qscale,
                                                 std::string_view(qtype.data(), qtype.size()), out, in, bias, lora_A,
                                                 lora_B, scales, adapter_ids, dropout_p, group_order, group_offsets);
  const auto [order, offsets] = grouping(adapter_ids, lora_A.size(0), group_order, group_offsets);
  return LoraLinearMultiQuantizedFunction::apply(x, qdata, qscale, qtype, out, in, bias, lora_A, lora_B, scales,
                                                 adapter_ids, order, offsets, dropout_p, training);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) {
  m.impl("lora_linear_multi", &lora_linear_multi_autograd);
  m.impl("lora_linear_multi_quantized", &lora_linear_multi_quantized_autograd);
}

}  // namespace lora_ext::autograd
