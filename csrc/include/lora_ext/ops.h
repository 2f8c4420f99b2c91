#pragma once
// Typed C++ entry points for the lora_ext operators. Every call goes through
// the PyTorch dispatcher, i.e. exactly the kernels Python's torch.ops.lora_ext.*
// reach (CPU/CUDA/Meta kernels and the C++ autograd formulas).
//
// Notation (PEFT's): x [..., in], weight [out, in], bias [out] or none,
// lora_A [r, in], lora_B [out, r], scale = alpha / r (rsLoRA: alpha / sqrt(r)).
#include <optional>

#include <ATen/core/Tensor.h>

#include <lora_ext/export.h>

namespace lora_ext::ops {

// y = x W^T + bias + scale * (dropout(x) A^T) B^T.
// Dropout (probability dropout_p) is applied only when training is true; the
// mask is regenerated from a saved seed in backward, never stored.
LORA_EXT_API at::Tensor lora_linear(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A,
    const at::Tensor& lora_B,
    double scale,
    double dropout_p = 0.0,
    bool training = false);

// weight += scale * lora_B @ lora_A, in place, without a weight-sized temporary.
LORA_EXT_API void merge_(
    at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

// weight -= scale * lora_B @ lora_A, in place.
LORA_EXT_API void unmerge_(
    at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

// Exact merge of a float32/bfloat16/float16 weight: call merge_exact_codes
// (reads the current weight, returns the side information) and then
// merge_exact_; unmerge_exact_ with that side information restores the
// weight bit for bit.
struct ExactMergeCodes {
  at::Tensor codes;      // uint8 [ceil(numel / 4)], 2 bits per weight element
  at::Tensor exc_index;  // int64 [n], flat indices the codes cannot express
  at::Tensor exc_value;  // weight dtype [n], their original values
};

LORA_EXT_API ExactMergeCodes merge_exact_codes(
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);
LORA_EXT_API void merge_exact_(
    at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);
LORA_EXT_API void unmerge_exact_(
    at::Tensor& weight, const ExactMergeCodes& codes, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale);

}  // namespace lora_ext::ops
