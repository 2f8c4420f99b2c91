#include "ops/common/checks.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

namespace lora_ext::detail {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

bool is_half_like(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dims, const char* layout) {
  TORCH_CHECK(t.dim() == dims, "lora_ext::", op, ": expected ", name, " to have ", dims, " dims ", layout, ", got ",
              t.dim(), " dims with shape ", t.sym_sizes());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "lora_ext::", op, ": expected ", name, " on device ", ref.device(),
              " (the device of the first tensor argument), got ", t.device());
}

// Shared rules for the adapter (lora_A, lora_B) against a base dtype/size.
// The largest scale the LoRA branch can hold: it computes in float32 unless the adapter is float64,
// so a finite double beyond FLT_MAX would become inf there (or fail ATen's Scalar conversion).
double max_scale(at::ScalarType adapter_dtype) {
  return lora_acc_dtype(adapter_dtype) == at::kDouble ? std::numeric_limits<double>::max()
                                                      : static_cast<double>(std::numeric_limits<float>::max());
}

const char* scale_dtype_note(at::ScalarType adapter_dtype) {
  return lora_acc_dtype(adapter_dtype) == at::kDouble ? "" : " representable in float32 (the LoRA branch's dtype)";
}

}  // namespace

void check_adapter(const char* op, const char* base_name, const at::Tensor& base, const c10::SymInt& in,
                   const c10::SymInt& out, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  check_dims(op, "lora_A", lora_A, 2, "[r, in]");
  check_dims(op, "lora_B", lora_B, 2, "[out, r]");
  check_same_device(op, "lora_A", lora_A, base);
  check_same_device(op, "lora_B", lora_B, base);
  const auto& r = lora_A.sym_size(0);
  TORCH_CHECK_VALUE(r.sym_ge(1).expect_true(__FILE__, __LINE__), "lora_ext::", op,
                    ": expected rank r >= 1 (lora_A of shape [r, in]), got lora_A of shape ", lora_A.sym_sizes());
  TORCH_SYM_CHECK(lora_A.sym_size(1).sym_eq(in), "lora_ext::", op, ": expected lora_A of shape [r, in] with in = ", in,
                  ", got ", lora_A.sym_sizes());
  TORCH_SYM_CHECK(lora_B.sym_size(0).sym_eq(out), "lora_ext::", op,
                  ": expected lora_B of shape [out, r] with out = ", out, ", got ", lora_B.sym_sizes());
  TORCH_SYM_CHECK(lora_B.sym_size(1).sym_eq(r), "lora_ext::", op, ": expected lora_B of shape [out, r] with r = ", r,
                  " (lora_A's first dim), got ", lora_B.sym_sizes());
  const auto bt = base.scalar_type();
  const auto at_ = lora_A.scalar_type();
  TORCH_CHECK(is_supported_float(bt), "lora_ext::", op, ": expected ", base_name,
              " of dtype float32, float64, bfloat16 or float16, got ", bt);
  TORCH_CHECK(lora_B.scalar_type() == at_, "lora_ext::", op, ": expected lora_A and lora_B of the same dtype, got ",
              at_, " and ", lora_B.scalar_type());
  // A half/bf16 base takes a float32 adapter (PEFT's default) or a half/bf16 one;
  // the LoRA branch then accumulates in float32.
  TORCH_CHECK(at_ == bt || (is_half_like(bt) && (at_ == at::kFloat || is_half_like(at_))), "lora_ext::", op,
              ": expected lora_A/lora_B of dtype ", bt, " (the ", base_name, "'s dtype)",
              (is_half_like(bt) ? ", float32, bfloat16 or float16" : ""), ", got ", at_);
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::abs(scale) <= max_scale(at_), "lora_ext::", op,
                    ": expected a finite scale", scale_dtype_note(at_), ", got ", scale);
}

at::ScalarType lora_acc_dtype(at::ScalarType adapter_dtype) {
  return is_half_like(adapter_dtype) ? at::kFloat : adapter_dtype;
}

namespace {

// x [..., in], weight [out, in], bias [out] | None: dtypes and devices.
void check_base_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "lora_ext::", op,
              ": expected x of shape [..., in] with at least 1 dim, got a 0-dim tensor");
  check_dims(op, "weight", weight, 2, "[out, in]");
  check_same_device(op, "weight", weight, x);
  TORCH_CHECK(is_supported_float(x.scalar_type()), "lora_ext::", op,
              ": expected x of dtype float32, float64, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "lora_ext::", op, ": expected weight of dtype ", x.scalar_type(),
              " (x's dtype), got ", weight.scalar_type());
  const auto& in = weight.sym_size(1);
  const auto& out = weight.sym_size(0);
  TORCH_SYM_CHECK(x.sym_size(-1).sym_eq(in), "lora_ext::", op, ": expected x of shape [..., in] with in = ", in,
                  " (weight of shape ", weight.sym_sizes(), "), got x of shape ", x.sym_sizes());
  if (bias.has_value() && bias->defined()) {
    check_dims(op, "bias", *bias, 1, "[out]");
    check_same_device(op, "bias", *bias, x);
    TORCH_SYM_CHECK(bias->sym_size(0).sym_eq(out), "lora_ext::", op, ": expected bias of shape [", out, "], got ",
                    bias->sym_sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "lora_ext::", op, ": expected bias of dtype ", x.scalar_type(),
                " (x's dtype), got ", bias->scalar_type());
  }
}

}  // namespace

void check_dropout_p(const char* op, double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "lora_ext::", op, ": expected 0 <= dropout_p < 1, got ",
                    dropout_p);
}

void check_lora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scale, double dropout_p) {
  TORCH_CHECK(x.defined() && weight.defined() && lora_A.defined() && lora_B.defined(), "lora_ext::", op,
              ": expected defined tensors for x, weight, lora_A and lora_B");
  check_base_args(op, x, weight, bias);
  check_adapter(op, "x/weight", x, weight.sym_size(1), weight.sym_size(0), lora_A, lora_B, scale);
  check_dropout_p(op, dropout_p);
}

void check_lora_linear_multi_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                  const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids,
                                  double dropout_p, const std::optional<at::Tensor>& group_order,
                                  const std::optional<at::Tensor>& group_offsets) {
  TORCH_CHECK(x.defined() && weight.defined() && lora_A.defined() && lora_B.defined() && scales.defined() &&
                  adapter_ids.defined(),
              "lora_ext::", op, ": expected defined tensors for x, weight, lora_A, lora_B, scales and adapter_ids");
  check_base_args(op, x, weight, bias);
  check_multi_adapter_args(op, x, weight.sym_size(1), weight.sym_size(0), weight.sym_sizes(), lora_A, lora_B, scales,
                           adapter_ids, dropout_p, group_order, group_offsets);
}

void check_multi_adapter_args(const char* op, const at::Tensor& x, const c10::SymInt& in, const c10::SymInt& out,
                              c10::SymIntArrayRef weight_sizes, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const at::Tensor& scales, const at::Tensor& adapter_ids, double dropout_p,
                              const std::optional<at::Tensor>& group_order,
                              const std::optional<at::Tensor>& group_offsets) {
  check_dims(op, "lora_A", lora_A, 3, "[n_adapters, r_max, in]");
  check_dims(op, "lora_B", lora_B, 3, "[n_adapters, out, r_max]");
  check_same_device(op, "lora_A", lora_A, x);
  check_same_device(op, "lora_B", lora_B, x);
  const auto& n = lora_A.sym_size(0);
  const auto& r = lora_A.sym_size(1);
  TORCH_CHECK_VALUE(r.sym_ge(1).expect_true(__FILE__, __LINE__), "lora_ext::", op,
                    ": expected r_max >= 1 (lora_A of shape [n_adapters, r_max, in]), got lora_A of shape ",
                    lora_A.sym_sizes());
  TORCH_SYM_CHECK(lora_A.sym_size(2).sym_eq(in), "lora_ext::", op,
                  ": expected lora_A of shape [n_adapters, r_max, in] with in = ", in, ", got ", lora_A.sym_sizes());
  TORCH_SYM_CHECK(
      lora_B.sym_size(0).sym_eq(n).sym_and(lora_B.sym_size(1).sym_eq(out)).sym_and(lora_B.sym_size(2).sym_eq(r)),
      "lora_ext::", op, ": expected lora_B of shape [n_adapters, out, r_max] = [", n, ", ", out, ", ", r,
      "] (from lora_A ", lora_A.sym_sizes(), " and weight ", weight_sizes, "), got ", lora_B.sym_sizes());
  const auto bt = x.scalar_type(), at_ = lora_A.scalar_type();
  TORCH_CHECK(lora_B.scalar_type() == at_, "lora_ext::", op, ": expected lora_A and lora_B of the same dtype, got ",
              at_, " and ", lora_B.scalar_type());
  TORCH_CHECK(at_ == bt || (is_half_like(bt) && (at_ == at::kFloat || is_half_like(at_))), "lora_ext::", op,
              ": expected lora_A/lora_B of dtype ", bt, " (x's dtype)",
              (is_half_like(bt) ? ", float32, bfloat16 or float16" : ""), ", got ", at_);
  check_dims(op, "scales", scales, 1, "[n_adapters]");
  check_same_device(op, "scales", scales, x);
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kDouble, "lora_ext::", op,
              ": expected scales of dtype float32 (or float64), got ", scales.scalar_type());
  TORCH_SYM_CHECK(scales.sym_size(0).sym_eq(n), "lora_ext::", op, ": expected scales of shape [n_adapters] = [", n,
                  "], got ", scales.sym_sizes());
  check_dims(op, "adapter_ids", adapter_ids, 1, "[N]");
  check_same_device(op, "adapter_ids", adapter_ids, x);
  TORCH_CHECK(adapter_ids.scalar_type() == at::kInt || adapter_ids.scalar_type() == at::kLong, "lora_ext::", op,
              ": expected adapter_ids of dtype int32 or int64, got ", adapter_ids.scalar_type());
  c10::SymInt rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows = rows * x.sym_size(i);
  TORCH_SYM_CHECK(adapter_ids.sym_size(0).sym_eq(rows), "lora_ext::", op,
                  ": expected adapter_ids of shape [N] with N = ", rows, " (the rows of x of shape ", x.sym_sizes(),
                  "), got ", adapter_ids.sym_sizes());
  const bool has_order = group_order.has_value() && group_order->defined();
  const bool has_offsets = group_offsets.has_value() && group_offsets->defined();
  TORCH_CHECK(has_order == has_offsets, "lora_ext::", op,
              ": expected group_order and group_offsets together (both from lora_group_rows) or neither, got ",
              (has_order ? "group_order only" : "group_offsets only"));
  if (has_order) {
    check_grouping(op, *group_order, *group_offsets, rows, n);
    check_same_device(op, "group_order", *group_order, x);
    check_same_device(op, "group_offsets", *group_offsets, x);
  }
  check_dropout_p(op, dropout_p);
}

void check_grouping(const char* op, const at::Tensor& order, const at::Tensor& offsets, const c10::SymInt& rows,
                    const c10::SymInt& n_adapters) {
  check_dims(op, "group_order", order, 1, "[N]");
  check_dims(op, "group_offsets", offsets, 1, "[n_adapters + 2]");
  TORCH_CHECK(order.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong, "lora_ext::", op,
              ": expected group_order and group_offsets of dtype int64 (from lora_group_rows), got ",
              order.scalar_type(), " and ", offsets.scalar_type());
  TORCH_SYM_CHECK(order.sym_size(0).sym_eq(rows), "lora_ext::", op,
                  ": expected group_order of shape [N] with N = ", rows, ", got ", order.sym_sizes());
  TORCH_SYM_CHECK(offsets.sym_size(0).sym_eq(n_adapters + 2), "lora_ext::", op,
                  ": expected group_offsets of shape [n_adapters + 2] = [", n_adapters + 2, "], got ",
                  offsets.sym_sizes());
}

void check_merge_args(const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                      double scale) {
  TORCH_CHECK(weight.defined() && lora_A.defined() && lora_B.defined(), "lora_ext::", op,
              ": expected defined tensors for weight, lora_A and lora_B");
  check_dims(op, "weight", weight, 2, "[out, in]");
  check_adapter(op, "weight", weight, weight.sym_size(1), weight.sym_size(0), lora_A, lora_B, scale);
}

void check_merge_exact_args(const char* op, const at::Tensor& weight, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scale) {
  check_merge_args(op, weight, lora_A, lora_B, scale);
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf, "lora_ext::", op,
              ": expected a float32, bfloat16 or float16 weight for an exact merge, got ", wt);
  // an expanded (broadcast) weight: several elements share memory, so their updates would pile up
  at::assert_no_internal_overlap(weight);
}

void check_unmerge_exact_args(const char* op, const at::Tensor& weight, const at::Tensor& codes,
                              const at::Tensor& exc_index, const at::Tensor& exc_value, const at::Tensor& lora_A,
                              const at::Tensor& lora_B, double scale) {
  check_merge_exact_args(op, weight, lora_A, lora_B, scale);
  TORCH_CHECK(codes.defined() && exc_index.defined() && exc_value.defined(), "lora_ext::", op,
              ": expected defined tensors for codes, exc_index and exc_value");
  const auto nbytes = (weight.sym_numel() + 3) / 4;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 &&
                  codes.sym_numel().sym_eq(nbytes).expect_true(__FILE__, __LINE__) && codes.is_contiguous(),
              "lora_ext::", op, ": expected codes as a contiguous uint8 tensor of ", nbytes,
              " bytes (2 bits per weight element), got ", codes.scalar_type(), " of shape ", codes.sym_sizes());
  TORCH_CHECK(exc_index.scalar_type() == at::kLong && exc_index.dim() == 1 && exc_value.dim() == 1 &&
                  exc_value.sym_numel().sym_eq(exc_index.sym_numel()).expect_true(__FILE__, __LINE__) &&
                  exc_value.scalar_type() == weight.scalar_type(),
              "lora_ext::", op, ": expected exc_index (int64 [n]) and exc_value (", weight.scalar_type(),
              " [n]) of the same length, got ", exc_index.scalar_type(), " ", exc_index.sym_sizes(), " and ",
              exc_value.scalar_type(), " ", exc_value.sym_sizes());
  check_same_device(op, "codes", codes, weight);
  check_same_device(op, "exc_index", exc_index, weight);
  check_same_device(op, "exc_value", exc_value, weight);
}

void check_grouping_values(const char* op, const at::Tensor& ids, const at::Tensor& order, const at::Tensor& offsets,
                           int64_t n) {
  TORCH_INTERNAL_ASSERT(ids.is_cpu() && order.is_cpu() && offsets.is_cpu(), "check_grouping_values: host tensors");
  const int64_t N = ids.size(0);
  const at::Tensor ord_t = order.to(at::kLong).contiguous(), off_t = offsets.to(at::kLong).contiguous();
  const at::Tensor ids_t = ids.to(at::kLong).contiguous();
  const int64_t* off = off_t.const_data_ptr<int64_t>();
  const int64_t* ord = ord_t.const_data_ptr<int64_t>();
  const int64_t* p = ids_t.const_data_ptr<int64_t>();
  const char* hint = " (pass the outputs of lora_group_rows(adapter_ids, n_adapters))";
  TORCH_CHECK_VALUE(off[0] == 0 && off[n + 1] == N, "lora_ext::", op,
                    ": expected group_offsets[0] == 0 "
                    "and group_offsets[-1] == N = ",
                    N, ", got ", off[0], " and ", off[n + 1], hint);
  for (int64_t a = 0; a <= n; ++a) {
    TORCH_CHECK_VALUE(off[a] <= off[a + 1], "lora_ext::", op,
                      ": expected non-decreasing group_offsets, got group_offsets[", a, "] = ", off[a],
                      " > group_offsets[", a + 1, "] = ", off[a + 1], hint);
  }
  std::vector<char> seen(N, 0);
  for (int64_t a = 0; a <= n; ++a) {
    const int64_t want = a < n ? a : -1;
    for (int64_t k = off[a]; k < off[a + 1]; ++k) {
      const int64_t row = ord[k];
      TORCH_CHECK_VALUE(row >= 0 && row < N && !seen[row], "lora_ext::", op,
                        ": expected group_order to be a permutation of 0..N-1, got group_order[", k, "] = ", row, hint);
      seen[row] = 1;
      TORCH_CHECK_VALUE(p[row] == want, "lora_ext::", op, ": group_order[", k, "] = ", row, " is in the group of ",
                        (a < n ? "adapter " + std::to_string(a) : std::string("the base rows")), " but adapter_ids[",
                        row, "] = ", p[row], hint);
    }
  }
}

void check_finite_scales(const char* op, const at::Tensor& scales, at::ScalarType adapter_dtype) {
  TORCH_INTERNAL_ASSERT(scales.is_cpu(), "check_finite_scales: a host tensor");
  const at::Tensor s = scales.to(at::kDouble).contiguous();
  const double* v = s.const_data_ptr<double>();
  const double limit = max_scale(adapter_dtype);
  for (int64_t a = 0; a < s.numel(); ++a) {
    TORCH_CHECK_VALUE(std::isfinite(v[a]) && std::abs(v[a]) <= limit, "lora_ext::", op, ": expected finite scales",
                      scale_dtype_note(adapter_dtype), ", got scales[", a, "] = ", v[a]);
  }
}

void check_seed(const char* op, const std::optional<at::Tensor>& seed, double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "lora_ext::", op, ": expected 0 <= dropout_p < 1, got ",
                    dropout_p);
  const bool has_seed = seed.has_value() && seed->defined();
  TORCH_CHECK(has_seed == (dropout_p > 0.0), "lora_ext::", op,
              ": expected a seed tensor exactly when dropout_p > 0, got ", (has_seed ? "a seed" : "no seed"),
              " with dropout_p = ", dropout_p);
  if (has_seed) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, "lora_ext::", op,
                ": expected seed to be a one-element int64 tensor, got ", seed->scalar_type(), " of shape ",
                seed->sym_sizes(), " on ", seed->device());
  }
}

namespace {

int64_t leading_rows(const at::Tensor& t) {  // product of all dims but the last
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) n *= t.size(i);
  return n;
}

// grad_y [..., out] in x's dtype, x [..., in] with as many rows, h [N, r] in acc.
int64_t check_backward_lora_shapes(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h,
                                   int64_t in, int64_t out, int64_t r, at::ScalarType acc) {
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == out && grad_y.scalar_type() == x.scalar_type(), "lora_ext::", op,
              ": expected grad_y of shape [..., ", out, "] and dtype ", x.scalar_type(), ", got ", grad_y.sizes(), " ",
              grad_y.scalar_type());
  const int64_t N = leading_rows(grad_y);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in && leading_rows(x) == N, "lora_ext::", op, ": expected x with ", N,
              " rows of ", in, " (as grad_y), got ", x.sizes());
  TORCH_CHECK(h.dim() == 2 && h.size(0) == N && h.size(1) == r && h.scalar_type() == acc, "lora_ext::", op,
              ": expected h of shape [", N, ", ", r, "] and dtype ", acc, ", got ", h.sizes(), " ", h.scalar_type());
  return N;
}

// grad_y [..., out], grad_h [N, r] in acc.
int64_t check_backward_input_shapes(const char* op, const at::Tensor& grad_y, const at::Tensor& grad_h, int64_t out,
                                    int64_t r, at::ScalarType acc) {
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == out, "lora_ext::", op, ": expected grad_y of shape [..., ", out,
              "], got ", grad_y.sizes());
  const int64_t N = leading_rows(grad_y);
  TORCH_CHECK(grad_h.dim() == 2 && grad_h.size(0) == N && grad_h.size(1) == r && grad_h.scalar_type() == acc,
              "lora_ext::", op, ": expected grad_h of shape [", N, ", ", r, "] and dtype ", acc, ", got ",
              grad_h.sizes(), " ", grad_h.scalar_type());
  return N;
}

}  // namespace

int64_t check_backward_lora_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h) {
  return check_backward_lora_shapes(op, grad_y, x, h, lora_A.size(1), lora_B.size(0), lora_A.size(0),
                                    lora_acc_dtype(lora_A.scalar_type()));
}

int64_t check_backward_input_args(const char* op, const at::Tensor& grad_y, const at::Tensor& weight,
                                  const at::Tensor& lora_A, const at::Tensor& grad_h) {
  return check_backward_input_shapes(op, grad_y, grad_h, weight.size(0), lora_A.size(0),
                                     lora_acc_dtype(lora_A.scalar_type()));
}

int64_t check_multi_backward_lora_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h,
                                       const at::Tensor& order, const at::Tensor& offsets) {
  const int64_t N = check_backward_lora_shapes(op, grad_y, x, h, lora_A.size(2), lora_B.size(1), lora_A.size(1),
                                               lora_acc_dtype(lora_A.scalar_type()));
  check_grouping(op, order, offsets, N, lora_A.size(0));
  return N;
}

int64_t check_multi_backward_input_args(const char* op, const at::Tensor& grad_y, const at::Tensor& weight,
                                        const at::Tensor& lora_A, const at::Tensor& grad_h, const at::Tensor& order,
                                        const at::Tensor& offsets) {
  const int64_t N = check_backward_input_shapes(op, grad_y, grad_h, weight.size(0), lora_A.size(1),
                                                lora_acc_dtype(lora_A.scalar_type()));
  check_grouping(op, order, offsets, N, lora_A.size(0));
  return N;
}

}  // namespace lora_ext::detail
