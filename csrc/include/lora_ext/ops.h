#pragma once
// Typed C++ entry points for the lora_ext operators. Every call goes through
// the PyTorch dispatcher, i.e. exactly the kernels Python's torch.ops.lora_ext.*
// reach (CPU/CUDA/Meta kernels and the C++ autograd formulas).
//
// Notation (PEFT's): x [..., in], weight [out, in], bias [out] or none,
// lora_A [r, in], lora_B [out, r], scale = alpha / r (rsLoRA: alpha / sqrt(r)).
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

#include <lora_ext/export.h>

namespace lora_ext::ops {

// y = x W^T + bias + scale * (dropout(x) A^T) B^T.
// Dropout (probability dropout_p) is applied only when training is true; the
// mask is regenerated from a saved seed in backward, never stored.
LORA_EXT_API at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                    const at::Tensor& lora_B, double scale, double dropout_p = 0.0,
                                    bool training = false);

// Row grouping for multi-adapter batches: adapter_ids [N] (int32/int64, -1 =
// base only) -> order [N] (row indices, adapter 0's rows first, base rows last,
// stable) and offsets [n_adapters + 2] (adapter a's rows: order[offsets[a] :
// offsets[a + 1]]). Compute once per batch, pass to every layer.
LORA_EXT_API std::tuple<at::Tensor, at::Tensor> lora_group_rows(const at::Tensor& adapter_ids, int64_t n_adapters);

// Row i: y_i = x_i W^T + bias + scales[a] * (dropout(x_i) A[a]^T) B[a]^T with
// a = adapter_ids[i] (-1: base only). lora_A [n, r_max, in], lora_B [n, out,
// r_max] (zero-padded for smaller ranks), scales float32 [n]. group_order /
// group_offsets: lora_group_rows(adapter_ids, n), computed here when absent.
LORA_EXT_API at::Tensor lora_linear_multi(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                          const at::Tensor& lora_B, const at::Tensor& scales,
                                          const at::Tensor& adapter_ids, double dropout_p = 0.0, bool training = false,
                                          const std::optional<at::Tensor>& group_order = std::nullopt,
                                          const std::optional<at::Tensor>& group_offsets = std::nullopt);

// weight += scale * lora_B @ lora_A, in place, without a weight-sized temporary.
LORA_EXT_API void merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

// weight -= scale * lora_B @ lora_A, in place.
LORA_EXT_API void unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

// Exact merge of a float32/bfloat16/float16 weight: call merge_exact_codes
// (reads the current weight, returns the side information) and then
// merge_exact_; unmerge_exact_ with that side information restores the
// weight bit for bit.
struct ExactMergeCodes {
  at::Tensor codes;      // uint8 [ceil(numel / 4)], 2 bits per weight element
  at::Tensor exc_index;  // int64 [n], flat indices the codes cannot express
  at::Tensor exc_value;  // weight dtype [n], their original values
};

LORA_EXT_API ExactMergeCodes merge_exact_codes(const at::Tensor& weight, const at::Tensor& lora_A,
                                               const at::Tensor& lora_B, double scale);
LORA_EXT_API void merge_exact_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);
LORA_EXT_API void unmerge_exact_(at::Tensor& weight, const ExactMergeCodes& codes, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, double scale);

// A quantized frozen base weight [out_features, in_features] (issue 15). qtype
// and layouts (csrc/ops/common/quant_formats.h; Python: lora_ext.quant):
//   "int8": qdata int8 [out, in], qscale float32 [out]
//   "q8_0" / "q4_0" / "q4_1": qdata uint8 [out, in / 32 * {34, 18, 20}], GGUF's blocks; no qscale
//   "nf4": qdata uint8 [out, in / 2], qscale float32 [out, in / 64] (absmax per 64)
struct QuantizedWeight {
  at::Tensor qdata;
  std::optional<at::Tensor> qscale;
  std::string qtype;
  int64_t out_features = 0;
  int64_t in_features = 0;
};

// The float32 weight.
LORA_EXT_API at::Tensor dequantize_weight(const QuantizedWeight& w);
// lora_linear over the quantized base, dequantized tile by tile into bounded
// scratch (never whole); gradients for x, bias, lora_A and lora_B.
LORA_EXT_API at::Tensor lora_linear_quantized(const at::Tensor& x, const QuantizedWeight& w,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, double scale, double dropout_p = 0.0,
                                              bool training = false);
// lora_linear_multi over the quantized base (per-row adapters, as lora_linear_multi); gradients for x,
// bias, lora_A and lora_B.
LORA_EXT_API at::Tensor lora_linear_multi_quantized(const at::Tensor& x, const QuantizedWeight& w,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, const at::Tensor& scales,
                                                    const at::Tensor& adapter_ids, double dropout_p = 0.0,
                                                    bool training = false,
                                                    const std::optional<at::Tensor>& group_order = std::nullopt,
                                                    const std::optional<at::Tensor>& group_offsets = std::nullopt);
// x W^T + bias for the quantized base alone.
LORA_EXT_API at::Tensor linear_quantized(const at::Tensor& x, const QuantizedWeight& w,
                                         const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace lora_ext::ops
