#pragma once
// The backward pieces of lora_linear (_lora_linear_backward_lora and
// _lora_linear_backward_input, which its autograd formula and the quantized
// one call), one implementation for every backend:
//   grad_B = scale * grad_y^T h     grad_h = scale * grad_y B      [N, r]
//   grad_A = grad_h^T dropout(x)    grad_x = grad_y W + mask/(1-p) * (grad_h A)
// Precision is the forward's (ops/common/lora_linear_forward.h): the LoRA
// gradients and grad_h accumulate in the adapter's dtype, or in float32 for a
// bfloat16/float16 adapter; operands in another dtype (a half/bf16 grad_y or x)
// are converted in bounded row chunks (Backend::chunk_rows), never whole. The
// dropout mask is regenerated from the seed, so nothing mask-sized is kept.
//
// Backend supplies, in addition to what the forward needs:
//   static std::tuple<Tensor, Tensor> grad_B_h(g2d, h, B_acc, scale)
//       (grad_B [out, r], grad_h [N, r]) in B_acc's dtype from one pass over
//       grad_y (any float dtype): how the two skinny GEMMs run and where scale
//       enters them is the device's choice
//   static void convert_rows(dst, src, row0, drop)
//       dst = dropout(src) (rows row0.. of the mask), or a plain conversion
//   static Tensor masked_mm(a, w, drop)       mask/(1-p) * (a w) in w's dtype
//   static void add_masked_(dst, src, row0, drop)
//       dst += dropout(src), computed in src's dtype and rounded once into
//       dst; src is scratch and may be overwritten
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "ops/common/checks.h"
#include "ops/common/op_utils.h"

namespace lora_ext::detail {

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_lora_op(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& h, double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  using at::Tensor;
  const char* op = "_lora_linear_backward_lora";
  check_seed(op, seed, dropout_p);
  const typename Backend::Guard guard(grad_y.device());
  const int64_t in = lora_A.size(1), r = lora_A.size(0);
  const auto acc = lora_acc_dtype(lora_A.scalar_type());
  const int64_t N = check_backward_lora_args(op, grad_y, x, lora_A, lora_B, h);
  const Tensor g2d = as_rows(grad_y);
  const Tensor x2d = as_rows(x);
  if (N == 0) {
    return {at::zeros_like(lora_A), at::zeros_like(lora_B), at::empty({0, r}, lora_A.options().dtype(acc))};
  }
  const auto drop = dropout_from_seed(seed, dropout_p);
  const Tensor B_acc = lora_B.to(acc);

  Tensor gB, gh;
  std::tie(gB, gh) = Backend::grad_B_h(g2d, h, B_acc, scale);

  // grad_A = grad_h^T dropout(x), with x converted / masked in row chunks.
  Tensor gA;
  if (!drop && x2d.scalar_type() == acc) {
    gA = at::mm(gh.t(), x2d);
  } else {
    gA = at::zeros({r, in}, B_acc.options());
    for_row_chunks(N, Backend::chunk_rows(in, acc), in, B_acc.options(), [&](int64_t s, int64_t n, Tensor& bv) {
      Backend::convert_rows(bv, x2d.narrow(0, s, n), s, drop);  // convert (+ mask) in one pass
      gA.addmm_(gh.narrow(0, s, n).t(), bv);
    });
  }
  return {gA.to(lora_A.scalar_type()), gB.contiguous().to(lora_B.scalar_type()), gh};
}

template <typename Backend>
at::Tensor lora_linear_backward_input_op(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& lora_A,
                                         const at::Tensor& grad_h, double dropout_p,
                                         const std::optional<at::Tensor>& seed) {
  using at::Tensor;
  const char* op = "_lora_linear_backward_input";
  check_seed(op, seed, dropout_p);
  const typename Backend::Guard guard(grad_y.device());
  const int64_t in = weight.size(1);
  const int64_t N = check_backward_input_args(op, grad_y, weight, lora_A, grad_h);
  const auto acc = lora_acc_dtype(lora_A.scalar_type());
  const Tensor g2d = as_rows(grad_y);
  const auto shape = with_last(grad_y.sizes(), in);
  if (N == 0) return at::empty(shape, grad_y.options());
  const auto drop = dropout_from_seed(seed, dropout_p);
  const Tensor A_acc = lora_A.to(acc);

  Tensor gx;
  if (grad_y.scalar_type() == acc) {
    // mask/(1-p) * (grad_h A) first, then the big GEMM accumulates into it
    // (beta = 1): no extra pass over grad_x.
    gx = Backend::masked_mm(grad_h, A_acc, drop);
    gx.addmm_(g2d, weight);
  } else {
    // half/bf16 grad_x: float32 chunks of grad_h A, masked and rounded once
    // into the base product.
    gx = at::mm(g2d, weight);
    for_row_chunks(N, Backend::chunk_rows(in, acc), in, A_acc.options(), [&](int64_t s, int64_t n, Tensor& bv) {
      at::mm_out(bv, grad_h.narrow(0, s, n), A_acc);
      Tensor gv = gx.narrow(0, s, n);
      Backend::add_masked_(gv, bv, s, drop);
    });
  }
  return gx.view(shape);
}

}  // namespace lora_ext::detail
