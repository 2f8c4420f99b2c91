#pragma once
// Plain parameter structs passed by value from the host launchers to the CUDA
// kernels (no torch types). Element pointers are untyped: each kernel is a
// template over its element types and casts them. Strides are in elements.
#include <cstdint>

#include "ops/common/dropout_rng.h"

namespace lora_ext::cuda {

// merge_ / unmerge_: W[i, j] += scale * sum_k B[i, k] * A[k, j] for a W of
// shape [rows, cols] with any strides (the launcher may have transposed the
// problem so that W's column stride is the small one).
struct MergeParams {
  void* w = nullptr;
  int64_t w_s0 = 0, w_s1 = 0;
  const void* a = nullptr;  // [r, cols]
  int64_t a_s0 = 0, a_s1 = 0;
  const void* b = nullptr;  // [rows, r]
  int64_t b_s0 = 0, b_s1 = 0;
  int64_t rows = 0, cols = 0, r = 0;
  double scale = 0.0;
};

// merge_exact_ / merge_exact_codes / unmerge_exact_: the element rule of
// ops/common/exact_merge.h on W [rows, cols] (any strides; element bits
// through an untyped pointer), with d[i, j] = scale * sum_k B32[i, k] A32[k, j]
// summed in k order from float32 copies A32 [r, cols] and B32 [rows, r]
// (contiguous). Flat element e = i * cols + j owns bits 2 (e % 4) of byte
// e / 4 of codes.
struct ExactMergeParams {
  void* w = nullptr;
  int64_t w_s0 = 0, w_s1 = 0;
  const float* a = nullptr;
  const float* b = nullptr;
  int64_t rows = 0, cols = 0, r = 0;
  float scale = 0.0f;
  uint8_t* codes = nullptr;  // written by merge_exact_codes, read by unmerge_exact_
  // merge_exact_codes: the sparse list, filled up to `capacity` entries in any
  // order; *count counts every entry (so the host can retry with more room).
  // unmerge_exact_: `capacity` entries to scatter back into W.
  int64_t* exc_index = nullptr;
  void* exc_value = nullptr;
  unsigned long long* count = nullptr;
  int64_t capacity = 0;
};

// h[n, j] = sum_k dropout(x)[n, k] * At[k, j]: x [N, in] with any strides and
// any float dtype, At = A^T contiguous [in, r] and h contiguous [N, r] in the
// accumulation dtype. The mask element of x[n, k] is n * in + k.
struct ShrinkParams {
  const void* x = nullptr;
  int64_t x_s0 = 0, x_s1 = 0;
  const void* at = nullptr;
  void* h = nullptr;
  int64_t N = 0, in = 0, r = 0;
  bool dropout = false;
  detail::DropoutParams drop;
};

// dst[i, j] = src[i, j] * (keep(e) ? 1 / (1 - p) : 0), e = e_row0 + i * cols + j:
// src [rows, cols] with any strides and any float dtype, dst contiguous in the
// accumulation dtype (may alias src when src is that buffer). Without dropout a
// plain conversion.
struct DropoutRowsParams {
  const void* src = nullptr;
  int64_t s_s0 = 0, s_s1 = 0;
  void* dst = nullptr;
  int64_t rows = 0, cols = 0;
  uint64_t e_row0 = 0;
  bool dropout = false;
  detail::DropoutParams drop;
};

// dst[i, j] = round(dst[i, j] + alpha * m * src[i, j]) computed in src's dtype
// (float32/float64), m the dropout factor of element e_row0 + i * cols + j
// (1 without dropout): dst [rows, cols] any strides, any float dtype; src
// contiguous.
struct AddScaledParams {
  void* dst = nullptr;
  int64_t d_s0 = 0, d_s1 = 0;
  const void* src = nullptr;
  int64_t rows = 0, cols = 0;
  double alpha = 1.0;
  uint64_t e_row0 = 0;
  bool dropout = false;
  detail::DropoutParams drop;
};

// ---- multi-adapter kernels (lora_linear_multi_cuda.cu) ----
// Rows grouped by adapter (lora_group_rows): position q of the grouped order
// is row order[q] with adapter pos_adapter[q] (n: a base-only row). Kernels
// skip a row index outside [0, rows) and clamp offsets to [0, rows], so that
// even a grouping that was not re-validated (see validated_inputs.h) cannot
// make them touch memory outside their tensors.
struct GroupingParams {
  const int64_t* order = nullptr;        // [rows]
  const int32_t* pos_adapter = nullptr;  // [rows], values in [0, n]
  const int64_t* offsets = nullptr;      // [n + 2]
  int64_t n = 0;
  int64_t rows = 0;
};

// out[row, k] = scales[a] * sum_j mask(x)[row, j] * w[a, k, j]: x [N, K] (element
// type T, any strides), w [n, R, K] (acc_t, any strides), scales [n] acc_t or
// null (= 1), out [N, R] acc_t contiguous. Mask element of x[row, j]: row * K + j.
struct MultiShrinkParams {
  const void* x = nullptr;
  int64_t x_s0 = 0, x_s1 = 0;
  const void* w = nullptr;
  int64_t w_s0 = 0, w_s1 = 0, w_s2 = 0;
  const void* scales = nullptr;
  void* out = nullptr;
  int64_t K = 0, R = 0;
  bool dropout = false;
  detail::DropoutParams drop;
};

// y[row, d] = round(y[row, d] + mask(scales[a] * sum_k h[row, k] * w[a, d, k])):
// h [N, R] acc_t contiguous, w [n, D, R] acc_t (any strides), y [N, D] T (any
// strides). Mask element of y[row, d]: row * D + d.
struct MultiExpandParams {
  const void* h = nullptr;
  const void* w = nullptr;
  int64_t w_s0 = 0, w_s1 = 0, w_s2 = 0;
  const void* scales = nullptr;
  void* y = nullptr;
  int64_t y_s0 = 0, y_s1 = 0;
  int64_t D = 0, R = 0;
  bool dropout = false;
  detail::DropoutParams drop;
};

// out[a, d, k] = scales[a] * sum over the rows of a of mask(g)[row, d] * h[row, k]:
// g [N, D] T (any strides), h [N, R] acc_t contiguous, out [n, D, R] acc_t
// contiguous. Mask element of g[row, d]: row * D + d.
struct MultiOuterParams {
  const void* g = nullptr;
  int64_t g_s0 = 0, g_s1 = 0;
  const void* h = nullptr;
  const void* scales = nullptr;
  void* out = nullptr;
  int64_t D = 0, R = 0;
  bool dropout = false;
  detail::DropoutParams drop;
};

}  // namespace lora_ext::cuda
