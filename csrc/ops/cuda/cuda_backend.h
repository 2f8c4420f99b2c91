#pragma once
// What the backend-independent kernels (ops/common/lora_linear_forward.h,
// ops/common/quantized_base.h) need from CUDA.
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/common/dropout_rng.h"
#include "ops/common/quant_formats.h"
#include "ops/cuda/dropout_cuda.h"

namespace lora_ext::cuda {

// Upper bound on the bytes of one temporary row-chunk buffer (conversions of
// half/bf16 operands to float32, masked chunks of x, float32 low-rank terms).
constexpr int64_t kChunkBytes = int64_t(32) << 20;

int64_t chunk_rows(int64_t cols, at::ScalarType t);

// a2d [N, k] (any float dtype) @ w [m, k]^T -> [N, m] in w's dtype, dropout(a2d) with drop.
at::Tensor mm_rows(const at::Tensor& a2d, const at::Tensor& w, const std::optional<detail::DropoutParams>& drop);

// Rows [row0, row0 + tile.size(0)) of a validated quantized weight into the
// contiguous float32 tile (dequantize_cuda.cu); a non-finite block scale is an
// error naming the row, as on the CPU.
void dequantize_rows(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                     int64_t row0, int64_t in_features, at::Tensor& tile);

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr int64_t kTileBytes = kChunkBytes;
  static at::Tensor mm_rows(const at::Tensor& a2d, const at::Tensor& w,
                            const std::optional<detail::DropoutParams>& drop) {
    return cuda::mm_rows(a2d, w, drop);
  }
  static int64_t chunk_rows(int64_t cols, at::ScalarType t) { return cuda::chunk_rows(cols, t); }
  static void add_scaled_(at::Tensor& dst, const at::Tensor& src, double alpha) { cuda::add_scaled_(dst, src, alpha); }
  static void mask_rows_(at::Tensor& dst, int64_t row0, const detail::DropoutParams& d) {
    cuda::dropout_rows(dst, dst, row0, d);
  }
  static void dequantize_rows(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                              int64_t row0, int64_t in_features, at::Tensor& tile) {
    cuda::dequantize_rows(f, qdata, qscale, row0, in_features, tile);
  }
  // no fused kernel yet: dequantized tiles and cuBLAS
  static bool fused_product(const quant::Format&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, at::Tensor&, bool) {
    return false;
  }
};

}  // namespace lora_ext::cuda
