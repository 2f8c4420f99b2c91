// Meta kernels of merge_ / unmerge_ and the exact merge: validation only (they return nothing).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/checks.h"

namespace lora_ext::meta {

namespace {

void merge_meta(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  detail::check_merge_args("merge_", weight, lora_A, lora_B, scale);
}

void unmerge_meta(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  detail::check_merge_args("unmerge_", weight, lora_A, lora_B, scale);
}

void merge_exact_meta(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  detail::check_merge_exact_args("merge_exact_", weight, lora_A, lora_B, scale);
}

void unmerge_exact_meta(at::Tensor& weight, const at::Tensor& codes, const at::Tensor& exc_index,
                        const at::Tensor& exc_value, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  detail::check_unmerge_exact_args("unmerge_exact_", weight, codes, exc_index, exc_value, lora_A, lora_B, scale);
}

}  // namespace

// merge_exact_codes has a data-dependent output size (the sparse list); its fake
// implementation is registered from Python (lora_ext/ops.py) with an unbacked size.
TORCH_LIBRARY_IMPL(lora_ext, Meta, m) {
  m.impl("merge_", &merge_meta);
  m.impl("unmerge_", &unmerge_meta);
  m.impl("merge_exact_", &merge_exact_meta);
  m.impl("unmerge_exact_", &unmerge_exact_meta);
}

}  // namespace lora_ext::meta
