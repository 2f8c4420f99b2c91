#pragma once
// Argument validation shared by every backend (CPU, CUDA, Meta) so that all of
// them reject the same inputs with the same messages. Messages name the op and
// say what was expected and what was received.
#include <optional>

#include <ATen/core/Tensor.h>

namespace lora_ext::detail {

// Checks x [..., in], weight [out, in], bias [out] | None, lora_A [r, in],
// lora_B [out, r] (r >= 1), same device, supported dtypes, finite scale and
// 0 <= dropout_p < 1.
void check_lora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scale, double dropout_p);

// The adapter against a base of dtype base.dtype() and size [out, in]: lora_A
// [r, in], lora_B [out, r] (r >= 1) on base's device, dtypes, finite scale.
void check_adapter(const char* op, const char* base_name, const at::Tensor& base, const c10::SymInt& in,
                   const c10::SymInt& out, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);
// 0 <= dropout_p < 1.
void check_dropout_p(const char* op, double dropout_p);

// lora_linear_multi: x [..., in], weight [out, in], bias [out] | None, lora_A
// [n, r_max, in], lora_B [n, out, r_max], scales float [n], adapter_ids
// int32/int64 [N] with N = x's rows, and group_order int64 [N] / group_offsets
// int64 [n + 2] given together or not at all. Shapes, dtypes and devices only:
// the values of adapter_ids are checked where they are read.
void check_lora_linear_multi_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                  const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids,
                                  double dropout_p, const std::optional<at::Tensor>& group_order,
                                  const std::optional<at::Tensor>& group_offsets);
// Its part after the base (x, weight, bias): the stacked adapters, scales, ids, grouping and dropout_p
// for a base of logical shape weight_sizes = [out, in] (lora_linear_multi_quantized's too).
void check_multi_adapter_args(const char* op, const at::Tensor& x, const c10::SymInt& in, const c10::SymInt& out,
                              c10::SymIntArrayRef weight_sizes, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const at::Tensor& scales, const at::Tensor& adapter_ids, double dropout_p,
                              const std::optional<at::Tensor>& group_order,
                              const std::optional<at::Tensor>& group_offsets);

// The backward pieces' inputs (any backend): grad_y [..., out] (in x's dtype for
// the lora piece), x [..., in] with as many rows, h / grad_h [N, r] in the
// accumulation dtype. Return N, the number of rows.
int64_t check_backward_lora_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h);
int64_t check_backward_input_args(const char* op, const at::Tensor& grad_y, const at::Tensor& weight,
                                  const at::Tensor& lora_A, const at::Tensor& grad_h);
// The multi-adapter backward pieces' inputs (any backend): grad_y [..., out] with
// x's dtype and rows, h / grad_h [N, r_max] in the accumulation dtype, and the
// grouping's shapes. Return N, the number of rows.
int64_t check_multi_backward_lora_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h,
                                       const at::Tensor& order, const at::Tensor& offsets);
int64_t check_multi_backward_input_args(const char* op, const at::Tensor& grad_y, const at::Tensor& weight,
                                        const at::Tensor& lora_A, const at::Tensor& grad_h, const at::Tensor& order,
                                        const at::Tensor& offsets);

// The values of a grouping, on host tensors (a CUDA kernel copies them over):
// (order, offsets) is the grouping lora_group_rows makes of ids, the same
// messages on every backend. O(N).
void check_grouping_values(const char* op, const at::Tensor& ids, const at::Tensor& order, const at::Tensor& offsets,
                           int64_t n);
// Every element of a host scales tensor is finite, and fits the LoRA branch's dtype (float32 unless the
// adapter is float64).
void check_finite_scales(const char* op, const at::Tensor& scales, at::ScalarType adapter_dtype);
// group_order int64 [rows], group_offsets int64 [n_adapters + 2] (shapes only).
void check_grouping(const char* op, const at::Tensor& order, const at::Tensor& offsets, const c10::SymInt& rows,
                    const c10::SymInt& n_adapters);

// Checks weight [out, in], lora_A [r, in], lora_B [out, r], dtypes, finite scale.
void check_merge_args(const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                      double scale);

// merge_exact_codes / merge_exact_: check_merge_args and a float32, bfloat16 or
// float16 weight.
void check_merge_exact_args(const char* op, const at::Tensor& weight, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scale);
// unmerge_exact_: as above, plus codes uint8 [ceil(numel / 4)] contiguous,
// exc_index int64 [n] and exc_value [n] in the weight's dtype, all on the
// weight's device. (The values of exc_index are checked where they are read.)
void check_unmerge_exact_args(const char* op, const at::Tensor& weight, const at::Tensor& codes,
                              const at::Tensor& exc_index, const at::Tensor& exc_value, const at::Tensor& lora_A,
                              const at::Tensor& lora_B, double scale);
// Checks a dropout seed tensor: defined iff dropout_p > 0, int64, one element.
void check_seed(const char* op, const std::optional<at::Tensor>& seed, double dropout_p);

// The dtype the LoRA branch accumulates in: float32 for half/bfloat16 adapters,
// otherwise the adapter's dtype.
at::ScalarType lora_acc_dtype(at::ScalarType adapter_dtype);

}  // namespace lora_ext::detail
