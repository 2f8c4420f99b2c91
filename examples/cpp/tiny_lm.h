#pragma once
// The C++ twin of make_example.py's TinyLM, built from the TorchScript model's parameters (copied,
// so merging into the TorchScript model does not touch it), with every nn.Linear a
// lora_ext::nn::LoraLinear: adapters attach to it and run unmerged, switched per call.
// The parameter names (blocks.<i>.attn.q_proj.weight, ...) are the contract with the Python model.
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/script.h>
#include <torch/torch.h>

#include <lora_ext/lora_ext.h>

class TinyLM {
 public:
  explicit TinyLM(const torch::jit::Module& scripted);

  // logits [batch, seq, vocab] for ids [batch, seq]
  torch::Tensor forward(const torch::Tensor& ids);

  // Attaches every LoRA pair of `adapter` to the LoraLinear at its module path, with PEFT's
  // scaling. Throws (before changing anything) if a path is not a linear of this model.
  void add_adapter(const std::string& name, const lora_ext::Adapter& adapter);
  // The adapter every layer uses (layers the adapter does not target run the base); nullopt: base.
  void set_adapter(const std::optional<std::string>& name);

 private:
  torch::Tensor param(const std::string& name) const;
  torch::Tensor linear(const std::string& path, const torch::Tensor& x);
  torch::Tensor layer_norm(const std::string& path, const torch::Tensor& x) const;

  std::map<std::string, torch::Tensor> params_;              // everything but the linears
  std::map<std::string, lora_ext::nn::LoraLinear> linears_;  // by module path
  int64_t n_heads_ = 0;
  int64_t n_layers_ = 0;
};
