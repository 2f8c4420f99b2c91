#pragma once
// Hand-written AVX2/FMA kernels for the skinny float32 products of LoRA, where
// one side has only r (<= a few hundred) columns and BLAS kernels tuned for
// square GEMMs run at a fraction of peak. Each returns false (and does nothing)
// when it does not apply (no AVX2/FMA, not float32, unsupported layout), so
// callers fall back to ATen.
#include <ATen/core/Tensor.h>

namespace lora_ext::cpu {

// out[N, R] = X[N, K] @ W[R, K]^T, float32. X with unit column stride (any row
// stride), W contiguous, out contiguous [N, R] (written, not accumulated).
bool skinny_rowdot(at::Tensor& out, const at::Tensor& X, const at::Tensor& W);

}  // namespace lora_ext::cpu
