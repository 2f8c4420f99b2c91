#pragma once
// What the backend-independent kernels (ops/common/lora_linear_forward.h,
// ops/common/lora_linear_backward.h, ops/common/quantized_base.h) need from
// CUDA. (The multi-adapter ops' backend is in lora_linear_multi_cuda.cu.)
#include <optional>
#include <tuple>

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

// (scale * g2d^T h [out, r], scale * g2d B [N, r]) in B's dtype, B [out, r]:
// one pass over g2d (any float dtype, converted in row chunks), scale as the
// GEMMs' alpha.
std::tuple<at::Tensor, at::Tensor> grad_B_h(const at::Tensor& g2d, const at::Tensor& h, const at::Tensor& B,
                                            double scale);

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
  static std::tuple<at::Tensor, at::Tensor> grad_B_h(const at::Tensor& g2d, const at::Tensor& h,
                                                     const at::Tensor& B_acc, double scale) {
    return cuda::grad_B_h(g2d, h, B_acc, scale);
  }
  static void convert_rows(at::Tensor& dst, const at::Tensor& src, int64_t row0,
                           const std::optional<detail::DropoutParams>& drop) {
    cuda::dropout_rows(dst, src, row0, drop);  // convert (+ mask) in one pass
  }
  // one GEMM, then the whole product masked in place
  static at::Tensor masked_mm(const at::Tensor& a, const at::Tensor& w,
                              const std::optional<detail::DropoutParams>& drop) {
    at::Tensor out = at::mm(a, w);
    if (drop) cuda::dropout_rows(out, out, 0, drop);
    return out;
  }
  // masked and rounded once into dst by one elementwise kernel
  static void add_masked_(at::Tensor& dst, const at::Tensor& src, int64_t row0,
                          const std::optional<detail::DropoutParams>& drop) {
    cuda::add_scaled_(dst, src, 1.0, row0, drop);
  }
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
