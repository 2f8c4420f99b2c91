#pragma once
// Applying a PEFT adapter to a model loaded in C++, by parameter names.
//
// PEFT's key base_model.model.<path>.lora_A.weight (or .lora_embedding_A)
// targets the parameter <path>.weight. Every key is matched exactly; an adapter
// key that matches no parameter, or a shape mismatch, throws c10::Error before
// anything is changed. Merging happens in place through the merge kernels
// (weight += weight_factor * scaling * B @ A, with PEFT's per-module scaling).
#include <torch/csrc/jit/api/module.h>
#include <torch/nn/module.h>

#include <lora_ext/adapter.h>
#include <lora_ext/export.h>

namespace lora_ext {

LORA_EXT_API void merge_adapter(torch::jit::Module& module, const Adapter& adapter, double weight = 1.0);
LORA_EXT_API void unmerge_adapter(torch::jit::Module& module, const Adapter& adapter, double weight = 1.0);
LORA_EXT_API void merge_adapter(torch::nn::Module& module, const Adapter& adapter, double weight = 1.0);
LORA_EXT_API void unmerge_adapter(torch::nn::Module& module, const Adapter& adapter, double weight = 1.0);

}  // namespace lora_ext
