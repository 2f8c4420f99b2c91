#pragma once
// The validated plan behind merge_adapter / unmerge_adapter (apply.cpp) and AotiModel (aoti.cpp):
// every module of a PEFT adapter matched to the parameter <path>.weight, shapes, ranks, dtypes and
// values checked for all modules before the caller changes anything.
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <lora_ext/adapter.h>

namespace lora_ext::detail {

struct Update {
  std::string path;   // module path, e.g. "model.layers.0.self_attn.q_proj"
  at::Tensor target;  // [out, in] view of the parameter
  at::Tensor A, B;    // [r, in], [out, r] on the target's device (float32 for a half/bfloat16 target)
  double scale;       // weight * PEFT's scaling for the path
};

// Throws c10::Error listing every problem ("lora_ext::<op>: the adapter does not fit ...") when any
// module does not fit, or when the adapter holds no LoRA weights; `exact` adds the exact merge's dtype
// check (float32/bfloat16/float16). `module_types` (module path -> class name, "Linear", "Embedding",
// where known) lets it refuse embedding keys on a linear layer and linear keys on an embedding, as
// lora_ext's Python reader does, even where the shapes would fit.
std::vector<Update> plan_updates(const std::map<std::string, at::Tensor>& params, const Adapter& adapter, double weight,
                                 const char* op, bool exact = false,
                                 const std::map<std::string, std::string>& module_types = {});

}  // namespace lora_ext::detail
