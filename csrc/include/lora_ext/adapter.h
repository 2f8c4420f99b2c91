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
  std::vector<std::string> target_modules;       // names (exact or ".suffix" match) ...
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
// that would change results and that lora_ext does not implement (use_dora...).
LORA_EXT_API AdapterConfig load_adapter_config(const std::string& path);

struct LORA_EXT_API Adapter {
  AdapterConfig config;
  std::map<std::string, at::Tensor> tensors;  // PEFT's keys: base_model.model.<path>.lora_A.weight, ...
};

// Reads an adapter folder: adapter_config.json and adapter_model.safetensors.
LORA_EXT_API Adapter load_adapter(const std::string& dir);

}  // namespace lora_ext
