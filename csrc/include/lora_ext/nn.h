#pragma once
// lora_ext::nn::LoraLinear: a torch::nn::Module holding a frozen base weight and
// any number of named adapters, for programs that build their network in C++.
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <lora_ext/export.h>

namespace lora_ext::nn {

class LORA_EXT_API LoraLinearImpl : public torch::nn::Module {
 public:
  // weight [out, in] (frozen), optional bias [out].
  explicit LoraLinearImpl(at::Tensor weight, std::optional<at::Tensor> bias = std::nullopt);

  // Adds adapter `name` (lora_A [r, in], lora_B [out, r], scale = alpha / r or alpha / sqrt(r)),
  // registered as trainable parameters lora_A_<name> / lora_B_<name>. The first one becomes active.
  void add_adapter(const std::string& name, at::Tensor lora_A, at::Tensor lora_B, double scale, double dropout_p = 0.0);
  // The adapter forward uses; std::nullopt: the plain base linear.
  void set_adapter(const std::optional<std::string>& name);
  void delete_adapter(const std::string& name);
  std::vector<std::string> adapters() const;
  const std::optional<std::string>& active_adapter() const { return active_; }

  // y = x W^T + b + scale * (dropout(x) A^T) B^T through lora_ext::ops::lora_linear.
  at::Tensor forward(const at::Tensor& x);

  at::Tensor weight;
  at::Tensor bias;

 private:
  struct Entry {
    at::Tensor A, B;
    double scale, dropout_p;
  };
  std::map<std::string, Entry> adapters_;
  std::optional<std::string> active_;
};

TORCH_MODULE(LoraLinear);

}  // namespace lora_ext::nn
