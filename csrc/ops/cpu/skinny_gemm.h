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

// Whether the CPU has AVX2 and FMA (the kernels below require it).
bool has_avx2_fma();

// Serial kernels on raw row pointers, for callers that gather rows (multi-adapter
// batches) and parallelise themselves. float32; W [R, K] and Wt [R, out] contiguous.
// out[m * ldo + k] = dot(rows[m][0..K), W[k]) for m < nrows, k < R.
void rowdot_ptrs(const float* const* rows, int64_t nrows, const float* W, int64_t K, int64_t R, float* out,
                 int64_t ldo);
// yrows[m][o] += sum_k hs[m * R + k] * Wt[k * out + o] (accumulated into the rows).
void expand_ptrs(const float* hs, int64_t nrows, const float* Wt, int64_t R, int64_t out, float* const* yrows);

}  // namespace lora_ext::cpu
