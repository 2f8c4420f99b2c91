#pragma once
// The multi-adapter ops (lora_group_rows, lora_linear_multi and the pieces of
// its autograd formula), one entry point per op for every backend: argument
// checks, the grouping of the rows (lora_group_rows', or the one passed in,
// checked against adapter_ids), the scales check, the dropout seed, empty
// batches, the LoRA branch's dtype (float32 for half/bf16 adapters, as in
// lora_linear) and the results' shapes and dtypes. Check order, and so which
// error a call with several faults gets, is the same on every backend.
//
// Backend (next to its kernels: ops/cpu/lora_linear_multi_cpu.cpp,
// ops/cuda/lora_linear_multi_cuda.cu) supplies the device's algorithm:
//   Guard                                       RAII device guard
//   static tuple<Tensor, Tensor> group_rows(ids, n)
//       (order, offsets) of ids of checked shape and dtype; checks the values
//   static void check_grouping(op, ids, order, offsets, n)
//       (order, offsets) is the grouping of ids (check_grouping_values)
//   static void check_scales(op, scales, adapter_dtype)      finite scales
//   Groups, static Groups groups(order, offsets, N, n)      the grouping as its kernels read it
//   template <Base> static Tensor forward(op, x2d, base, bias, lora_A, lora_B, scales, g, drop, h)
//       y [N, out] in x's dtype; h [N, r_max] (zeros, in the acc dtype) filled on adapter rows
//   static tuple<Tensor, Tensor, Tensor> backward_lora(op, g2d, x2d, lora_A, B_acc, scales, g, h, drop)
//       grad_A [n, r_max, in] and grad_B [n, out, r_max] contiguous in the acc dtype, grad_h [N, r_max]
//   template <Base> static Tensor backward_input(op, g2d, base, A_acc, grad_h, g, drop)
//       grad_x [N, in] in g2d's dtype
// N >= 1 in the last three. The base product is a Base (ops/common/lora_linear_forward.h): DenseBase{weight}
// for lora_linear_multi, QuantizedBase for lora_linear_multi_quantized (ops/common/lora_linear_multi_quantized.h),
// so the LoRA terms' kernels are the same for both.
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "ops/common/checks.h"
#include "ops/common/lora_linear_forward.h"
#include "ops/common/op_utils.h"

namespace lora_ext::detail {

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> lora_group_rows_op(const at::Tensor& ids, int64_t n) {
  const char* op = "lora_group_rows";
  TORCH_CHECK(ids.dim() == 1, "lora_ext::", op, ": expected adapter_ids of shape [N], got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "lora_ext::", op,
              ": expected adapter_ids of dtype int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(n >= 0, "lora_ext::", op, ": expected n_adapters >= 0, got ", n);
  const typename Backend::Guard guard(ids.device());
  return Backend::group_rows(ids, n);
}

// The grouping of the rows: (order, offsets) when given, checked against the
// ids, otherwise lora_group_rows'.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> multi_grouping(const char* op, const at::Tensor& ids,
                                                  const std::optional<at::Tensor>& order,
                                                  const std::optional<at::Tensor>& offsets, int64_t n) {
  if (!(order.has_value() && order->defined())) return lora_group_rows_op<Backend>(ids, n);
  Backend::check_grouping(op, ids, *order, *offsets, n);
  return {*order, *offsets};
}

// (y, h) for a checked grouping.
template <typename Backend, typename Base>
std::tuple<at::Tensor, at::Tensor> multi_forward_impl(const char* op, const at::Tensor& x, const Base& base,
                                                      const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B, const at::Tensor& scales,
                                                      const at::Tensor& order, const at::Tensor& offsets,
                                                      double dropout_p, const std::optional<at::Tensor>& seed) {
  const int64_t out = base.out_features(), n = lora_A.size(0), r = lora_A.size(1);
  const auto acc = lora_acc_dtype(lora_A.scalar_type());
  const at::Tensor x2d = as_rows(x);
  const int64_t N = x2d.size(0);
  const auto out_shape = with_last(x.sizes(), out);
  Backend::check_scales(op, scales, lora_A.scalar_type());
  at::Tensor h = at::zeros({N, r}, lora_A.options().dtype(acc));
  if (N == 0) return {at::empty(out_shape, x.options()), h};
  const auto g = Backend::groups(order, offsets, N, n);
  const auto drop = dropout_from_seed(seed, dropout_p);
  const std::optional<at::Tensor> b = bias.has_value() && bias->defined() ? bias : std::nullopt;
  const at::Tensor y = Backend::forward(op, x2d, base, b, lora_A, lora_B, scales, g, drop, h);
  return {y.view(out_shape), h};
}

template <typename Backend>
at::Tensor lora_linear_multi_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales,
                                const at::Tensor& adapter_ids, double dropout_p, bool training,
                                const std::optional<at::Tensor>& group_order,
                                const std::optional<at::Tensor>& group_offsets) {
  const char* op = "lora_linear_multi";
  check_lora_linear_multi_args(op, x, weight, bias, lora_A, lora_B, scales, adapter_ids, dropout_p, group_order,
                               group_offsets);
  const typename Backend::Guard guard(x.device());
  const auto [order, offsets] = multi_grouping<Backend>(op, adapter_ids, group_order, group_offsets, lora_A.size(0));
  const double p = training ? dropout_p : 0.0;
  return std::get<0>(multi_forward_impl<Backend>(op, x, DenseBase{weight}, bias, lora_A, lora_B, scales, order, offsets,
                                                 p, draw_dropout_seed(p)));
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> lora_linear_multi_forward_op(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids, const at::Tensor& order,
    const at::Tensor& offsets, double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "_lora_linear_multi_forward";
  check_lora_linear_multi_args(op, x, weight, bias, lora_A, lora_B, scales, adapter_ids, dropout_p, order, offsets);
  check_seed(op, seed, dropout_p);
  const typename Backend::Guard guard(x.device());
  Backend::check_grouping(op, adapter_ids, order, offsets, lora_A.size(0));
  return multi_forward_impl<Backend>(op, x, DenseBase{weight}, bias, lora_A, lora_B, scales, order, offsets, dropout_p,
                                     seed);
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_multi_backward_lora_op(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& scales, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& h, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const char* op = "_lora_linear_multi_backward_lora";
  check_seed(op, seed, dropout_p);
  const typename Backend::Guard guard(x.device());
  const int64_t n = lora_A.size(0), r = lora_A.size(1), in = lora_A.size(2), out = lora_B.size(1);
  const auto acc = lora_acc_dtype(lora_A.scalar_type());
  const int64_t N = check_multi_backward_lora_args(op, grad_y, x, lora_A, lora_B, h, order, offsets);
  if (N == 0) {
    return {at::zeros({n, r, in}, lora_A.options()), at::zeros({n, out, r}, lora_B.options()),
            at::zeros({0, r}, lora_A.options().dtype(acc))};
  }
  const at::Tensor g2d = as_rows(grad_y);
  const at::Tensor x2d = as_rows(x);
  const auto g = Backend::groups(order, offsets, N, n);
  const at::Tensor B_acc = lora_B.to(acc);
  const auto drop = dropout_from_seed(seed, dropout_p);
  auto [gA, gB, gh] = Backend::backward_lora(op, g2d, x2d, lora_A, B_acc, scales, g, h, drop);
  return {gA.to(lora_A.scalar_type()), gB.to(lora_B.scalar_type()), gh};
}

template <typename Backend>
at::Tensor lora_linear_multi_backward_input_op(const at::Tensor& grad_y, const at::Tensor& weight,
                                               const at::Tensor& lora_A, const at::Tensor& grad_h,
                                               const at::Tensor& order, const at::Tensor& offsets, double dropout_p,
                                               const std::optional<at::Tensor>& seed) {
  const char* op = "_lora_linear_multi_backward_input";
  check_seed(op, seed, dropout_p);
  const typename Backend::Guard guard(grad_y.device());
  const int64_t in = weight.size(1), n = lora_A.size(0);
  const int64_t N = check_multi_backward_input_args(op, grad_y, weight, lora_A, grad_h, order, offsets);
  const auto acc = lora_acc_dtype(lora_A.scalar_type());
  const at::Tensor g2d = as_rows(grad_y);
  const auto shape = with_last(grad_y.sizes(), in);
  if (N == 0) return at::empty(shape, grad_y.options());
  const auto g = Backend::groups(order, offsets, N, n);
  const auto drop = dropout_from_seed(seed, dropout_p);
  const at::Tensor A_acc = lora_A.to(acc);
  return Backend::backward_input(op, g2d, DenseBase{weight}, A_acc, grad_h, g, drop).view(shape);
}

}  // namespace lora_ext::detail
