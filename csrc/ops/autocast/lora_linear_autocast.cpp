// Autocast kernels of the LoRA layer ops, one code for AutocastCPU and AutocastCUDA.
//
// PyTorch's rule for `linear` (CastPolicy::lower_precision_fp): under torch.autocast the activations, the
// base weight and the bias run in the autocast dtype (bfloat16 or float16; float64 and non-float tensors
// are left alone). The adapters keep their own dtype: the ops take a float32 adapter next to a half/bf16 base
// and accumulate the LoRA branch in float32, which is PEFT's default setup (fp32 adapters on a bf16 model)
// and more exact than casting the adapters down. The quantized ops cast x and the bias; the quantized bytes
// and scales are the stored format, never cast. Autocast runs before Autograd in the dispatcher, so the casts
// are recorded by autograd (gradients come back in each tensor's own dtype) and are traced by torch.compile
// and torch.export like aten::linear's. The ops' internal pieces (_lora_linear_forward, ...) keep
// autocast's fallthrough: they are called from the autograd kernels with consistent dtypes.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>
#include <string>
#include <string_view>

#include <lora_ext/ops.h>

namespace lora_ext::autocast {

using at::Tensor;
using std::optional;

namespace {

template <c10::DeviceType device>
Tensor lower(const Tensor& t) {
  return at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(device), t, device);
}

template <c10::DeviceType device>
optional<Tensor> lower(const optional<Tensor>& t) {
  return at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(device), t, device);
}

// Redispatches (through the public C++ API, lora_ext/ops.h) below this device's Autocast key; nested lora_ext
// calls see no autocast either, as in aten.
template <c10::DeviceType device>
c10::impl::ExcludeDispatchKeyGuard below_autocast() {
  return c10::impl::ExcludeDispatchKeyGuard(at::autocast::get_autocast_dispatch_key_from_device_type(device));
}

template <c10::DeviceType device>
Tensor lora_linear(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias, const Tensor& lora_A,
                   const Tensor& lora_B, double scale, double dropout_p, bool training) {
  auto guard = below_autocast<device>();
  return ops::lora_linear(lower<device>(x), lower<device>(weight), lower<device>(bias), lora_A, lora_B, scale,
                          dropout_p, training);
}

template <c10::DeviceType device>
Tensor lora_linear_multi(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias, const Tensor& lora_A,
                         const Tensor& lora_B, const Tensor& scales, const Tensor& adapter_ids, double dropout_p,
                         bool training, const optional<Tensor>& group_order, const optional<Tensor>& group_offsets) {
  auto guard = below_autocast<device>();
  return ops::lora_linear_multi(lower<device>(x), lower<device>(weight), lower<device>(bias), lora_A, lora_B, scales,
                                adapter_ids, dropout_p, training, group_order, group_offsets);
}

template <c10::DeviceType device>
Tensor lora_linear_quantized(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                             std::string_view qtype, int64_t out_features, int64_t in_features,
                             const optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B, double scale,
                             double dropout_p, bool training) {
  auto guard = below_autocast<device>();
  const ops::QuantizedWeight w{qdata, qscale, std::string(qtype), out_features, in_features};
  return ops::lora_linear_quantized(lower<device>(x), w, lower<device>(bias), lora_A, lora_B, scale, dropout_p,
                                    training);
}

template <c10::DeviceType device>
Tensor lora_linear_multi_quantized(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale,
                                   std::string_view qtype, int64_t out_features, int64_t in_features,
                                   const optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B,
                                   const Tensor& scales, const Tensor& adapter_ids, double dropout_p, bool training,
                                   const optional<Tensor>& group_order, const optional<Tensor>& group_offsets) {
  auto guard = below_autocast<device>();
  const ops::QuantizedWeight w{qdata, qscale, std::string(qtype), out_features, in_features};
  return ops::lora_linear_multi_quantized(lower<device>(x), w, lower<device>(bias), lora_A, lora_B, scales, adapter_ids,
                                          dropout_p, training, group_order, group_offsets);
}

template <c10::DeviceType device>
Tensor linear_quantized(const Tensor& x, const Tensor& qdata, const optional<Tensor>& qscale, std::string_view qtype,
                        int64_t out_features, int64_t in_features, const optional<Tensor>& bias) {
  auto guard = below_autocast<device>();
  const ops::QuantizedWeight w{qdata, qscale, std::string(qtype), out_features, in_features};
  return ops::linear_quantized(lower<device>(x), w, lower<device>(bias));
}

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  m.impl("lora_linear", TORCH_FN(lora_linear<device>));
  m.impl("lora_linear_multi", TORCH_FN(lora_linear_multi<device>));
  m.impl("lora_linear_quantized", TORCH_FN(lora_linear_quantized<device>));
  m.impl("linear_quantized", TORCH_FN(linear_quantized<device>));
  m.impl("lora_linear_multi_quantized", TORCH_FN(lora_linear_multi_quantized<device>));
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, AutocastCPU, m) {
  register_autocast<c10::DeviceType::CPU>(m);
}

TORCH_LIBRARY_IMPL(lora_ext, AutocastCUDA, m) {
  register_autocast<c10::DeviceType::CUDA>(m);
}

}  // namespace lora_ext::autocast
