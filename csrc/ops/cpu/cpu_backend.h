#pragma once
// What the backend-independent kernels (ops/common/lora_linear_forward.h,
// ops/common/lora_linear_backward.h, ops/common/quantized_base.h) need from
// the CPU. (The multi-adapter ops' backend is in lora_linear_multi_cpu.cpp.)
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "ops/common/dropout_rng.h"
#include "ops/common/quant_formats.h"
#include "ops/cpu/chunking.h"
#include "ops/cpu/dequantize_cpu.h"
#include "ops/cpu/dropout_cpu.h"
#include "ops/cpu/quant_gemv.h"

namespace lora_ext::cpu {

struct CpuBackend {
  // no device guard on the CPU
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  // Bytes of one dequantized float32 weight tile (the quantized base's scratch).
  static constexpr int64_t kTileBytes = int64_t(4) << 20;
  static at::Tensor mm_rows(const at::Tensor& a2d, const at::Tensor& w,
                            const std::optional<detail::DropoutParams>& drop) {
    return cpu::mm_rows(a2d, w, drop);
  }
  static int64_t chunk_rows(int64_t cols, at::ScalarType t) { return cpu::chunk_rows(cols, t); }
  static void add_scaled_(at::Tensor& dst, const at::Tensor& src, double alpha) { cpu::add_scaled_(dst, src, alpha); }
  static std::tuple<at::Tensor, at::Tensor> grad_B_h(const at::Tensor& g2d, const at::Tensor& h,
                                                     const at::Tensor& B_acc, double scale) {
    return cpu::grad_B_h(g2d, h, B_acc, scale);
  }
  static void convert_rows(at::Tensor& dst, const at::Tensor& src, int64_t row0,
                           const std::optional<detail::DropoutParams>& drop) {
    if (drop) {
      cpu::dropout_rows(dst, src, row0, *drop);  // convert + mask in one pass
    } else {
      dst.copy_(src);
    }
  }
  static at::Tensor masked_mm(const at::Tensor& a, const at::Tensor& w,
                              const std::optional<detail::DropoutParams>& drop) {
    return cpu::masked_mm(a, w, drop);
  }
  static void add_masked_(at::Tensor& dst, at::Tensor& src, int64_t row0,
                          const std::optional<detail::DropoutParams>& drop) {
    if (drop) cpu::dropout_rows(src, src, row0, *drop);  // in place
    cpu::add_scaled_(dst, src, 1.0);
  }
  // dst *= mask / (1 - p) for rows [row0, row0 + dst.size(0)) of the seed's mask.
  static void mask_rows_(at::Tensor& dst, int64_t row0, const detail::DropoutParams& d) {
    cpu::dropout_rows(dst, dst, row0, d);
  }
  // Rows [row0, row0 + tile.size(0)) of a validated quantized weight into the
  // contiguous float32 tile.
  static void dequantize_rows(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                              int64_t row0, int64_t in_features, at::Tensor& tile) {
    cpu::dequantize_rows(f, qdata, qscale, row0, tile.size(0), in_features, tile.mutable_data_ptr<float>(),
                         in_features);
  }
  static bool fused_product(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                            const at::Tensor& x2d, at::Tensor& y, bool accumulate) {
    return cpu::quant_gemv(f, qdata, qscale, x2d, y, accumulate);
  }
};

}  // namespace lora_ext::cpu
