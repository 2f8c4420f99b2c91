#pragma once
// Remembers input tuples whose values a CUDA op has already validated, so that
// the host synchronisation such a check costs is paid once per tuple rather
// than once per call: e.g. the multi-adapter grouping every LoRA layer of a
// model receives for one batch (check_groups) and each layer's cached scales.
//
// A tuple matches when it holds the very same tensors (TensorImpl identity,
// kept as weak references, so a freed tensor whose address is reused never
// matches) at the same version counters (an in-place change invalidates it).
// Inference tensors (torch.inference_mode) have no version counter: they match
// on identity alone, so an in-place change made inside inference mode after
// their first use is not re-validated; the kernels that read them
// bounds-check every index they take from them.
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

namespace lora_ext::cuda {

class ValidatedInputs {
 public:
  explicit ValidatedInputs(size_t capacity) : capacity_(capacity) {}
  bool contains(std::initializer_list<at::Tensor> ts) const;
  void insert(std::initializer_list<at::Tensor> ts);

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    std::vector<Weak> tensors;
    std::vector<int64_t> versions;
  };
  bool matches(const Entry& e, std::initializer_list<at::Tensor> ts) const;
  size_t capacity_;
  mutable std::mutex mu_;
  std::unordered_multimap<const c10::TensorImpl*, Entry> entries_;  // by the first tensor; cleared when full
};

}  // namespace lora_ext::cuda
