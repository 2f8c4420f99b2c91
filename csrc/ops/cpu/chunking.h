#pragma once
// Helpers for CPU kernels that convert / mask bounded row chunks instead of
// materialising output-sized or x-sized temporaries.
#include <algorithm>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "ops/common/dropout_rng.h"

namespace lora_ext::cpu {

// Upper bound on the bytes of one temporary chunk buffer.
constexpr int64_t kChunkBytes = int64_t(1) << 20;

inline int64_t chunk_rows(int64_t cols, at::ScalarType t, int64_t budget = kChunkBytes) {
  const int64_t row_bytes = std::max<int64_t>(1, cols) * static_cast<int64_t>(c10::elementSize(t));
  return std::max<int64_t>(1, budget / row_bytes);
}

// out = a @ w^T with w [m, k] contiguous, out [N, m] contiguous: the skinny
// AVX2 kernel when it applies, otherwise one BLAS call.
void rowdot_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& w);

// a2d [N, k] (any float dtype) @ w [m, k]^T -> [N, m] in w's dtype. When a2d has
// another dtype or dropout is given, rows of a2d are converted (and masked) in
// bounded chunks; otherwise one product.
at::Tensor mm_rows(const at::Tensor& a2d, const at::Tensor& w, const std::optional<detail::DropoutParams>& drop);

// (scale * g2d^T h [out, r], scale * g2d B [N, r]) in B's dtype, B [out, r]:
// one pass over g2d (any float dtype, converted in row chunks), the GEMMs
// unscaled and both results scaled once at the end.
std::tuple<at::Tensor, at::Tensor> grad_B_h(const at::Tensor& g2d, const at::Tensor& h, const at::Tensor& B,
                                            double scale);

// dropout(a w) [N, cols] in w's dtype (a [N, k] in w's dtype, w [k, cols]):
// with dropout, row chunks masked in place while they are in cache.
at::Tensor masked_mm(const at::Tensor& a, const at::Tensor& w, const std::optional<detail::DropoutParams>& drop);

}  // namespace lora_ext::cpu

namespace lora_ext::cpu {

// dst[i, j] = dst[i, j] + alpha * src[i, j], computed in src's dtype (float32
// or float64) and rounded once into dst. dst: 2-D, any float dtype, any
// strides (e.g. a transposed weight view); src: contiguous, same shape.
// Allocates nothing (unlike a mixed-dtype add_, which makes a temporary).
void add_scaled_(at::Tensor& dst, const at::Tensor& src, double alpha);

}  // namespace lora_ext::cpu
