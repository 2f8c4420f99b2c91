// Typed dispatcher calls behind the public C++ API (lora_ext/ops.h).
#include <ATen/core/dispatch/Dispatcher.h>

#include <lora_ext/ops.h>

namespace lora_ext::ops {

namespace {
c10::TypedOperatorHandle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>
merge_handle(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
}
}  // namespace

at::Tensor lora_linear(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A,
    const at::Tensor& lora_B,
    double scale,
    double dropout_p,
    bool training) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::lora_linear", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, double, double, bool)>();
  return op.call(x, weight, bias, lora_A, lora_B, scale, dropout_p, training);
}

std::tuple<at::Tensor, at::Tensor> lora_group_rows(const at::Tensor& adapter_ids, int64_t n_adapters) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::lora_group_rows", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return op.call(adapter_ids, n_adapters);
}

at::Tensor lora_linear_multi(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A,
    const at::Tensor& lora_B,
    const at::Tensor& scales,
    const at::Tensor& adapter_ids,
    double dropout_p,
    bool training,
    const std::optional<at::Tensor>& group_order,
    const std::optional<at::Tensor>& group_offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::lora_linear_multi", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(x, weight, bias, lora_A, lora_B, scales, adapter_ids, dropout_p, training, group_order,
                 group_offsets);
}

void merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  static auto op = merge_handle("lora_ext::merge_");
  op.call(weight, lora_A, lora_B, scale);
}

void unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  static auto op = merge_handle("lora_ext::unmerge_");
  op.call(weight, lora_A, lora_B, scale);
}

ExactMergeCodes merge_exact_codes(
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::merge_exact_codes", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  auto [codes, idx, val] = op.call(weight, lora_A, lora_B, scale);
  return {codes, idx, val};
}

void merge_exact_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  static auto op = merge_handle("lora_ext::merge_exact_");
  op.call(weight, lora_A, lora_B, scale);
}

void unmerge_exact_(
    at::Tensor& weight, const ExactMergeCodes& codes, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::unmerge_exact_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, double)>();
  op.call(weight, codes.codes, codes.exc_index, codes.exc_value, lora_A, lora_B, scale);
}

at::Tensor dequantize_weight(const QuantizedWeight& w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::dequantize_weight", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                                         int64_t, int64_t)>();
  return op.call(w.qdata, w.qscale, w.qtype, w.out_features, w.in_features);
}

at::Tensor lora_linear_quantized(
    const at::Tensor& x, const QuantizedWeight& w, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, double dropout_p, bool training) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::lora_linear_quantized", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, int64_t, int64_t, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, double, double, bool)>();
  return op.call(x, w.qdata, w.qscale, w.qtype, w.out_features, w.in_features, bias, lora_A, lora_B, scale,
                 dropout_p, training);
}

at::Tensor linear_quantized(const at::Tensor& x, const QuantizedWeight& w, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::linear_quantized", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, int64_t, int64_t, const std::optional<at::Tensor>&)>();
  return op.call(x, w.qdata, w.qscale, w.qtype, w.out_features, w.in_features, bias);
}

}  // namespace lora_ext::ops
