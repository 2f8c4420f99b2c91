// Meta kernels of merge_ / unmerge_: validation only (they return nothing).
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

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Meta, m) {
  m.impl("merge_", &merge_meta);
  m.impl("unmerge_", &unmerge_meta);
}

}  // namespace lora_ext::meta
