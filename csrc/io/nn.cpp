#include <lora_ext/nn.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <lora_ext/ops.h>

namespace lora_ext::nn {

LoraLinearImpl::LoraLinearImpl(at::Tensor w, std::optional<at::Tensor> b) {
  TORCH_CHECK(w.dim() == 2, "lora_ext::nn::LoraLinear: expected weight of shape [out, in], got ", w.sizes());
  weight = register_parameter("weight", w, /*requires_grad=*/false);
  if (b.has_value() && b->defined()) bias = register_parameter("bias", *b, /*requires_grad=*/false);
}

void LoraLinearImpl::add_adapter(const std::string& name, at::Tensor A, at::Tensor B, double scale, double p) {
  TORCH_CHECK(!name.empty() && name.find('.') == std::string::npos,
              "lora_ext::nn::LoraLinear: expected an adapter "
              "name without '.', got \"",
              name, "\"");
  TORCH_CHECK(!adapters_.count(name), "lora_ext::nn::LoraLinear: adapter \"", name, "\" already exists");
  // validate with the op's own checks (shapes, dtypes, scale, dropout) on an empty batch
  ops::lora_linear(at::empty({0, weight.size(1)}, weight.options()), weight,
                   bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, A, B, scale, p, false);
  Entry e{register_parameter("lora_A_" + name, A), register_parameter("lora_B_" + name, B), scale, p};
  adapters_.emplace(name, e);
  if (!active_) active_ = name;
}

void LoraLinearImpl::set_adapter(const std::optional<std::string>& name) {
  TORCH_CHECK(!name || adapters_.count(*name), "lora_ext::nn::LoraLinear: unknown adapter \"", name.value_or(""), "\"");
  active_ = name;
}

void LoraLinearImpl::delete_adapter(const std::string& name) {
  TORCH_CHECK(adapters_.count(name), "lora_ext::nn::LoraLinear: unknown adapter \"", name, "\"");
  adapters_.erase(name);
  if (active_ == name) active_ = std::nullopt;
  // torch::nn::Module has no unregister: replace the parameters by empty, non-trainable ones
  named_parameters(false)["lora_A_" + name].set_data(at::empty({0}));
  named_parameters(false)["lora_B_" + name].set_data(at::empty({0}));
  named_parameters(false)["lora_A_" + name].set_requires_grad(false);
  named_parameters(false)["lora_B_" + name].set_requires_grad(false);
}

std::vector<std::string> LoraLinearImpl::adapters() const {
  std::vector<std::string> out;
  for (const auto& [k, _] : adapters_) out.push_back(k);
  return out;
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& x) {
  const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  if (!active_) return at::linear(x, weight, b);
  const Entry& e = adapters_.at(*active_);
  return ops::lora_linear(x, weight, b, e.A, e.B, e.scale, e.dropout_p, is_training());
}

}  // namespace lora_ext::nn
