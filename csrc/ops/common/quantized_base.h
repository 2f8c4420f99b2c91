#pragma once
// The quantized frozen base of lora_linear_quantized / linear_quantized
// (issue 15), one implementation for every backend. x W^T and g W for a
// quantized W [out, in] never materialise W: its rows are dequantized tile by
// tile into one bounded float32 scratch (Backend::kTileBytes), converted to the
// activation's dtype when that is not float32, and each tile feeds one GEMM:
//   x W^T: the tile's column block of y (each output element is written once,
//          so a half/bf16 output is rounded once, as with a dense weight);
//   g W:   accumulated into the whole input gradient, in float32 when g is
//          half/bf16 (rounded once at the end).
// The LoRA branch is lora_linear's (ops/common/lora_linear_forward.h) with
// QuantizedBase as its Base; Backend adds to what that header needs:
//   static constexpr int64_t kTileBytes
//   static void mask_rows_(dst, row0, drop)                 dst *= mask / (1 - p)
//   static void dequantize_rows(f, qdata, qscale, row0, in, tile)
//   static bool fused_product(f, qdata, qscale, x2d, y, accumulate)
//       y (+)= x2d W^T straight from the quantized bytes when the backend has a
//       kernel for that case (the CPU: float32, at most 4 rows, for decoding);
//       false: the tiles do it.
#include <algorithm>
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/ATen.h>

#include "ops/common/checks.h"
#include "ops/common/lora_linear_forward.h"
#include "ops/common/op_utils.h"
#include "ops/common/quant_checks.h"

namespace lora_ext::detail {

template <typename Backend>
struct QuantizedBase {
  const quant::Format& f;
  const at::Tensor& qdata;
  const std::optional<at::Tensor>& qscale;
  int64_t out, in;

  int64_t out_features() const { return out; }
  int64_t in_features() const { return in; }

  // fn(row0, rows, tile) for consecutive tiles of W's rows, in `dtype`.
  template <typename Fn>
  void for_tiles(at::ScalarType dtype, Fn&& fn) const {
    if (out == 0) return;
    const int64_t rows = std::clamp<int64_t>(Backend::kTileBytes / (std::max<int64_t>(1, in) * 4), 1, out);
    const auto opts = qdata.options().dtype(at::kFloat);
    at::Tensor scratch = at::empty({rows, in}, opts);
    at::Tensor conv = dtype == at::kFloat ? at::Tensor() : at::empty({rows, in}, opts.dtype(dtype));
    for (int64_t r0 = 0; r0 < out; r0 += rows) {
      const int64_t n = std::min(rows, out - r0);
      at::Tensor t = scratch.narrow(0, 0, n);
      Backend::dequantize_rows(f, qdata, qscale, r0, in, t);
      if (conv.defined()) {
        at::Tensor c = conv.narrow(0, 0, n);
        c.copy_(t);
        fn(r0, n, c);
      } else {
        fn(r0, n, t);
      }
    }
  }

  // y = bias + x2d W^T
  void assign(at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& x2d) const {
    if (bias.has_value() && bias->defined()) {
      y.copy_(*bias);  // broadcast over the rows
      accumulate(y, x2d);
      return;
    }
    if (Backend::fused_product(f, qdata, qscale, x2d, y, /*accumulate=*/false)) return;
    for_tiles(x2d.scalar_type(), [&](int64_t r0, int64_t n, const at::Tensor& t) {
      at::Tensor yv = y.narrow(1, r0, n);  // a column block: BLAS writes it with ld = out
      at::mm_out(yv, x2d, t.t());
    });
    if (out == 0) y.zero_();
  }

  // y += x2d W^T
  void accumulate(at::Tensor& y, const at::Tensor& x2d) const {
    if (Backend::fused_product(f, qdata, qscale, x2d, y, /*accumulate=*/true)) return;
    for_tiles(x2d.scalar_type(), [&](int64_t r0, int64_t n, const at::Tensor& t) {
      at::Tensor yv = y.narrow(1, r0, n);
      yv.addmm_(x2d, t.t());
    });
  }

  // gx (+)= g2d W: gx [N, in], g2d [N, out], both in g2d's dtype.
  void accumulate_t(at::Tensor& gx, const at::Tensor& g2d, bool assign) const {
    if (assign && out == 0) gx.zero_();
    for_tiles(g2d.scalar_type(), [&](int64_t r0, int64_t n, const at::Tensor& t) {
      if (assign && r0 == 0) {
        at::mm_out(gx, g2d.narrow(1, 0, n), t);
      } else {
        gx.addmm_(g2d.narrow(1, r0, n), t);
      }
    });
  }
};

inline bool half_like(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// grad_x = grad_y W (+ mask/(1-p) * (grad_h A) with an adapter).
template <typename Backend>
at::Tensor quantized_backward_input_impl(const at::Tensor& grad_y, const QuantizedBase<Backend>& base,
                                         const std::optional<at::Tensor>& lora_A,
                                         const std::optional<at::Tensor>& grad_h, double dropout_p,
                                         const std::optional<at::Tensor>& seed) {
  const typename Backend::Guard guard(grad_y.device());
  const at::Tensor g2d = as_rows(grad_y);
  const int64_t N = g2d.size(0);
  const auto shape = with_last(grad_y.sizes(), base.in);
  if (N == 0) return at::empty(shape, grad_y.options());
  const bool half = half_like(grad_y.scalar_type());
  const at::Tensor g = half ? g2d.to(at::kFloat) : g2d;
  at::Tensor gx;
  if (lora_A.has_value()) {
    gx = at::mm(*grad_h, lora_A->to(g.scalar_type()));  // grad_h is in the accumulation dtype, g's
    if (const auto drop = dropout_from_seed(seed, dropout_p)) Backend::mask_rows_(gx, 0, *drop);
    base.accumulate_t(gx, g, /*assign=*/false);
  } else {
    gx = at::empty({N, base.in}, g.options());
    base.accumulate_t(gx, g, /*assign=*/true);
  }
  if (half) gx = gx.to(grad_y.scalar_type());
  return gx.view(shape);
}

// The ops' entry points, registered per backend (cpu/, cuda/).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> lora_linear_quantized_forward_op(
    const at::Tensor& x, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale, c10::string_view qtype,
    int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "_lora_linear_quantized_forward";
  const auto& f = check_lora_linear_quantized_args(op, x, qdata, qscale, std::string_view(qtype.data(), qtype.size()),
                                                   out_features, in_features, bias, &lora_A, &lora_B, scale, dropout_p);
  check_seed(op, seed, dropout_p);
  const QuantizedBase<Backend> base{f, qdata, qscale, out_features, in_features};
  return lora_linear_forward_impl<Backend>(x, base, bias, lora_A, lora_B, scale, dropout_p, seed);
}

template <typename Backend>
at::Tensor lora_linear_quantized_op(const at::Tensor& x, const at::Tensor& qdata,
                                    const std::optional<at::Tensor>& qscale, c10::string_view qtype,
                                    int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                                    bool training) {
  const auto& f = check_lora_linear_quantized_args("lora_linear_quantized", x, qdata, qscale,
                                                   std::string_view(qtype.data(), qtype.size()), out_features,
                                                   in_features, bias, &lora_A, &lora_B, scale, dropout_p);
  const double p = training ? dropout_p : 0.0;
  const QuantizedBase<Backend> base{f, qdata, qscale, out_features, in_features};
  return std::get<0>(lora_linear_forward_impl<Backend>(x, base, bias, lora_A, lora_B, scale, p, draw_dropout_seed(p)));
}

template <typename Backend>
at::Tensor linear_quantized_op(const at::Tensor& x, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                               c10::string_view qtype, int64_t out_features, int64_t in_features,
                               const std::optional<at::Tensor>& bias) {
  const auto& f = check_lora_linear_quantized_args("linear_quantized", x, qdata, qscale,
                                                   std::string_view(qtype.data(), qtype.size()), out_features,
                                                   in_features, bias, nullptr, nullptr, 1.0, 0.0);
  const typename Backend::Guard guard(x.device());
  const at::Tensor x2d = as_rows(x);
  at::Tensor y = at::empty({x2d.size(0), out_features}, x.options());
  if (x2d.size(0) > 0) QuantizedBase<Backend>{f, qdata, qscale, out_features, in_features}.assign(y, bias, x2d);
  return y.view(with_last(x.sizes(), out_features));
}

template <typename Backend>
at::Tensor lora_linear_quantized_backward_input_op(const at::Tensor& grad_y, const at::Tensor& qdata,
                                                   const std::optional<at::Tensor>& qscale, c10::string_view qtype,
                                                   int64_t out_features, int64_t in_features,
                                                   const std::optional<at::Tensor>& lora_A,
                                                   const std::optional<at::Tensor>& grad_h, double dropout_p,
                                                   const std::optional<at::Tensor>& seed) {
  const char* op = "_lora_linear_quantized_backward_input";
  const auto& f =
      check_quantized_backward_input_args(op, grad_y, qdata, qscale, std::string_view(qtype.data(), qtype.size()),
                                          out_features, in_features, lora_A, grad_h, dropout_p);
  check_seed(op, seed, dropout_p);
  const QuantizedBase<Backend> base{f, qdata, qscale, out_features, in_features};
  return quantized_backward_input_impl<Backend>(grad_y, base, lora_A, grad_h, dropout_p, seed);
}

}  // namespace lora_ext::detail
