#pragma once
// The forward of lora_linear (and of its autograd piece _lora_linear_forward),
// one implementation for every backend:
//   h = dropout(x) A^T                  [N, r], the only extra buffer
//   y = bias + scale * h B^T + x W^T    built in place in y
// Precision: the LoRA branch accumulates in the adapter's dtype, or in float32
// when the adapter is bfloat16/float16 (h is then float32 too). The base
// product runs in x's dtype. When x is in the accumulation dtype, y starts as
// bias + scale * h B^T and the base GEMM accumulates into it (beta = 1): the
// low-rank term costs no extra pass over the output. A half/bf16 x with a
// float32 branch (PEFT's default adapter dtype) gets the float32 low-rank term
// in bounded row chunks, each rounded once into the base product.
//
// Backend supplies what differs between devices (ops/cpu, ops/cuda):
//   Guard                                   RAII device guard, built from x's device
//   static Tensor mm_rows(a2d, w, drop)     dropout(a2d) w^T in w's dtype
//   static int64_t chunk_rows(cols, dtype)  rows of one temporary chunk
//   static void add_scaled_(dst, src, a)    dst += a * src, rounded once
// and registers lora_linear_op<Backend> / lora_linear_forward_op<Backend>.
// The base weight is a Base (DenseBase here, QuantizedBase in
// ops/common/quantized_base.h) that writes x W^T into y:
//   assign(y, bias, x2d)      y = bias + x2d W^T (bias may be absent)
//   accumulate(y, x2d)        y += x2d W^T
// and, for the multi-adapter ops' input gradient (ops/common/lora_linear_multi.h):
//   in_features()
//   accumulate_t(gx, g2d, assign)   gx (+)= g2d W, gx [N, in] and g2d [N, out] in one dtype
#include <algorithm>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "ops/common/checks.h"
#include "ops/common/dropout_rng.h"
#include "ops/common/op_utils.h"

namespace lora_ext::detail {

// A dense [out, in] weight in x's dtype.
struct DenseBase {
  const at::Tensor& weight;
  int64_t out_features() const { return weight.size(0); }
  int64_t in_features() const { return weight.size(1); }
  void assign(at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& x2d) const {
    if (bias.has_value() && bias->defined()) {
      at::addmm_out(y, *bias, x2d, weight.t());
    } else {
      at::mm_out(y, x2d, weight.t());
    }
  }
  void accumulate(at::Tensor& y, const at::Tensor& x2d) const { y.addmm_(x2d, weight.t()); }
  void accumulate_t(at::Tensor& gx, const at::Tensor& g2d, bool assign) const {
    if (assign) {
      at::mm_out(gx, g2d, weight);
    } else {
      gx.addmm_(g2d, weight);
    }
  }
};

template <typename Backend, typename Base>
std::tuple<at::Tensor, at::Tensor> lora_linear_forward_impl(const at::Tensor& x, const Base& base,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                            double scale, double dropout_p,
                                                            const std::optional<at::Tensor>& seed) {
  using at::Tensor;
  const typename Backend::Guard guard(x.device());
  const int64_t out = base.out_features(), r = lora_A.size(0);
  const auto acc = lora_acc_dtype(lora_A.scalar_type());
  const Tensor x2d = as_rows(x);
  const int64_t N = x2d.size(0);
  const auto out_shape = with_last(x.sizes(), out);
  if (N == 0) {
    return {at::empty(out_shape, x.options()), at::empty({0, r}, lora_A.options().dtype(acc))};
  }
  const auto drop = dropout_from_seed(seed, dropout_p);
  const Tensor A_acc = lora_A.to(acc), B_acc = lora_B.to(acc);  // no copy when already acc
  const bool has_bias = bias.has_value() && bias->defined();

  Tensor h = Backend::mm_rows(x2d, A_acc, drop);

  Tensor y = at::empty({N, out}, x.options());
  if (x.scalar_type() == acc) {
    if (has_bias) {
      at::addmm_out(y, *bias, h, B_acc.t(), /*beta=*/1, /*alpha=*/scale);
    } else {
      at::addmm_out(y, y, h, B_acc.t(), /*beta=*/0, /*alpha=*/scale);
    }
    base.accumulate(y, x2d);
  } else {
    base.assign(y, bias, x2d);
    const int64_t rows = std::min(N, Backend::chunk_rows(out, acc));
    Tensor buf = at::empty({rows, out}, A_acc.options());
    for (int64_t s = 0; s < N; s += rows) {
      const int64_t n = std::min(rows, N - s);
      Tensor bv = buf.narrow(0, 0, n);
      at::mm_out(bv, h.narrow(0, s, n), B_acc.t());
      Tensor yv = y.narrow(0, s, n);
      Backend::add_scaled_(yv, bv, scale);
    }
  }
  return {y.view(out_shape), h};
}

// lora_linear: y only; dropout (training) with a freshly drawn seed.
template <typename Backend>
at::Tensor lora_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                          bool training) {
  check_lora_linear_args("lora_linear", x, weight, bias, lora_A, lora_B, scale, dropout_p);
  const double p = training ? dropout_p : 0.0;
  return std::get<0>(
      lora_linear_forward_impl<Backend>(x, DenseBase{weight}, bias, lora_A, lora_B, scale, p, draw_dropout_seed(p)));
}

// _lora_linear_forward: (y, h) with the caller's seed (the autograd kernel's).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> lora_linear_forward_op(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          double scale, double dropout_p,
                                                          const std::optional<at::Tensor>& seed) {
  check_lora_linear_args("_lora_linear_forward", x, weight, bias, lora_A, lora_B, scale, dropout_p);
  check_seed("_lora_linear_forward", seed, dropout_p);
  return lora_linear_forward_impl<Backend>(x, DenseBase{weight}, bias, lora_A, lora_B, scale, dropout_p, seed);
}

}  // namespace lora_ext::detail
