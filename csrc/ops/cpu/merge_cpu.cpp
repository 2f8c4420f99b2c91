// CPU kernels of merge_ / unmerge_: weight +-= scale * lora_B @ lora_A in place.
//
// float32/float64 weights: one in-place GEMM with beta = 1 (no temporary).
// bfloat16/float16 weights: Delta W is computed in float32 for a bounded chunk
// of rows at a time and added with a single rounding per element; the only
// temporaries are that chunk (<= 256 KiB) and, for a half/bf16 adapter, a
// float32 copy of lora_A ([r, in]).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/cpu/chunking.h"

namespace lora_ext::cpu {

namespace {

constexpr int64_t kMergeChunkBytes = int64_t(256) << 10;

void merge_impl(const char* op, at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  detail::check_merge_args(op, weight, lora_A, lora_B, scale);
  if (weight.numel() == 0) return;
  const auto wt = weight.scalar_type();
  if (wt == at::kFloat || wt == at::kDouble) {
    weight.addmm_(lora_B, lora_A, /*beta=*/1, /*alpha=*/scale);
    return;
  }
  const int64_t out = weight.size(0), in = weight.size(1);
  const at::Tensor A32 = lora_A.to(at::kFloat);
  const int64_t rows = std::min(out, chunk_rows(in, at::kFloat, kMergeChunkBytes));
  at::Tensor buf = at::empty({rows, in}, A32.options());
  for (int64_t s = 0; s < out; s += rows) {
    const int64_t n = std::min(rows, out - s);
    at::Tensor bv = buf.narrow(0, 0, n);
    at::mm_out(bv, lora_B.narrow(0, s, n).to(at::kFloat), A32);
    at::Tensor wv = weight.narrow(0, s, n);
    add_scaled_(wv, bv, scale);
  }
}

void merge_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  merge_impl("merge_", weight, lora_A, lora_B, scale);
}

void unmerge_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  merge_impl("unmerge_", weight, lora_A, lora_B, -scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("merge_", &merge_cpu);
  m.impl("unmerge_", &unmerge_cpu);
}

}  // namespace lora_ext::cpu
