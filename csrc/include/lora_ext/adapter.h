#pragma once
// PEFT adapter folders (adapter_config.json + adapter_model.safetensors), read natively.
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include <lora_ext/export.h>

namespace lora_ext {

// The fields of PEFT's adapter_config.json that decide what an adapter computes.
struct LORA_EXT_API AdapterConfig {
  int64_t r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  bool fan_in_fan_out = false;
  // regex -> r / alpha, in the file's order: like PEFT, the first pattern that matches wins
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<std::string> target_modules;          // names (exact or ".suffix" match) ...
  std::optional<std::string> target_modules_regex;  // ... or one regex (re.fullmatch)
  std::vector<std::string> modules_to_save;
  std::string json;  // the whole file, for anything else

  // PEFT's rules: the first pattern p with re.match(r"(.*\.)?(p)$", path) wins.
  int64_t rank_for(const std::string& module_path) const;
  double alpha_for(const std::string& module_path) const;
  // alpha / r, or alpha / sqrt(r) with rsLoRA.
  double scaling_for(const std::string& module_path) const;
};

// Reads adapter_config.json (a path to the file or to its folder). Throws
// c10::Error naming the file on bad JSON or ill-typed fields, and on options
// that would change results and that lora_ext does not implement (use_dora...):
// it refuses the configs lora_ext's Python reader (LoraConfig.from_dict) refuses.
LORA_EXT_API AdapterConfig load_adapter_config(const std::string& path);

struct LORA_EXT_API Adapter {
  AdapterConfig config;
  std::map<std::string, at::Tensor> tensors;  // PEFT's keys: base_model.model.<path>.lora_A.weight, ...
};

// Reads an adapter folder: adapter_config.json and adapter_model.safetensors. When the weights
// carry their own config (lora_ext saves put it in the safetensors metadata) and the folder's
// adapter_config.json differs from it (a save interrupted between its two renames), the weights'
// config is used, with a warning. Throws c10::Error on NaN/Inf values unless `allow_nonfinite`.
LORA_EXT_API Adapter load_adapter(const std::string& dir, bool allow_nonfinite = false);

// One module an adapter targets: PEFT's base_model.model.<path>.lora_A.weight and .lora_B.weight
// (embeddings: .lora_embedding_A / .lora_embedding_B, stored [r, num] and [dim, r]) with PEFT's
// scaling for <path>. For programs that attach adapters to their own layers (lora_ext::nn::LoraLinear).
struct LORA_EXT_API AdapterModule {
  std::string path;   // module path in the base model, e.g. "blocks.0.attn.q_proj"
  at::Tensor lora_A;  // as stored: [r, in] (convolutions: [r, in, kh, kw])
  at::Tensor lora_B;  // [out, r] (convolutions: [out, r, 1, 1])
  double scaling;     // config.scaling_for(path)
  bool embedding;
};

// Pairs every A with its B, in key order. Throws c10::Error listing every key without its partner
// and every key that is not a LoRA weight (modules_to_save copies, biases) unless
// `ignore_other_keys`; nothing else is checked here (shapes are checked where the pair is used).
LORA_EXT_API std::vector<AdapterModule> adapter_modules(const Adapter& adapter, bool ignore_other_keys = false);

}  // namespace lora_ext
