#pragma once
// Typed dispatcher handles of the lora_ext operators: the one way C++ code in
// this library calls an op through the dispatcher (the public API in
// ops/ops.cpp, the autograd kernels in ops/autograd/). Each accessor looks its
// op up on first use and keeps the handle; its signature is the op's schema
// (ops/registration.cpp) in C++ types.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

namespace lora_ext::handles {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using std::tuple;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// ---------------------------------------------------------------- lora_linear and its autograd pieces
inline const auto& lora_linear() {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, double, double, bool)>(
          "lora_ext::lora_linear");
  return op;
}

inline const auto& lora_linear_forward() {
  static const auto op =
      find<tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, double,
                                 double, const OptTensor&)>("lora_ext::_lora_linear_forward");
  return op;
}

inline const auto& lora_linear_backward_lora() {
  static const auto op =
      find<tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         double, double, const OptTensor&)>("lora_ext::_lora_linear_backward_lora");
  return op;
}

inline const auto& lora_linear_backward_input() {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, const OptTensor&)>(
          "lora_ext::_lora_linear_backward_input");
  return op;
}

// ---------------------------------------------------------------- merges
// merge_, unmerge_ and merge_exact_ share one signature.
using MergeHandle = c10::TypedOperatorHandle<void(Tensor&, const Tensor&, const Tensor&, double)>;

inline const MergeHandle& merge_() {
  static const auto op = find<void(Tensor&, const Tensor&, const Tensor&, double)>("lora_ext::merge_");
  return op;
}

inline const MergeHandle& unmerge_() {
  static const auto op = find<void(Tensor&, const Tensor&, const Tensor&, double)>("lora_ext::unmerge_");
  return op;
}

inline const MergeHandle& merge_exact_() {
  static const auto op = find<void(Tensor&, const Tensor&, const Tensor&, double)>("lora_ext::merge_exact_");
  return op;
}

inline const auto& merge_exact_codes() {
  static const auto op = find<tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>(
      "lora_ext::merge_exact_codes");
  return op;
}

inline const auto& unmerge_exact_() {
  static const auto op =
      find<void(Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>(
          "lora_ext::unmerge_exact_");
  return op;
}

// ---------------------------------------------------------------- quantized bases
inline const auto& dequantize_weight() {
  static const auto op =
      find<Tensor(const Tensor&, const OptTensor&, c10::string_view, int64_t, int64_t)>("lora_ext::dequantize_weight");
  return op;
}

inline const auto& lora_linear_quantized() {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t, int64_t, const OptTensor&,
                  const Tensor&, const Tensor&, double, double, bool)>("lora_ext::lora_linear_quantized");
  return op;
}

inline const auto& linear_quantized() {
  static const auto op = find<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t, int64_t,
                                     const OptTensor&)>("lora_ext::linear_quantized");
  return op;
}

inline const auto& lora_linear_quantized_forward() {
  static const auto op =
      find<tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t, int64_t,
                                 const OptTensor&, const Tensor&, const Tensor&, double, double, const OptTensor&)>(
          "lora_ext::_lora_linear_quantized_forward");
  return op;
}

inline const auto& lora_linear_quantized_backward_input() {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t, int64_t, const OptTensor&,
                  const OptTensor&, double, const OptTensor&)>("lora_ext::_lora_linear_quantized_backward_input");
  return op;
}

// ---------------------------------------------------------------- multi-adapter batches
inline const auto& lora_group_rows() {
  static const auto op = find<tuple<Tensor, Tensor>(const Tensor&, int64_t)>("lora_ext::lora_group_rows");
  return op;
}

inline const auto& lora_linear_multi() {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                  const Tensor&, double, bool, const OptTensor&, const OptTensor&)>("lora_ext::lora_linear_multi");
  return op;
}

inline const auto& lora_linear_multi_forward() {
  static const auto op =
      find<tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, const OptTensor&)>(
          "lora_ext::_lora_linear_multi_forward");
  return op;
}

inline const auto& lora_linear_multi_backward_lora() {
  static const auto op =
      find<tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&, double, const OptTensor&)>(
          "lora_ext::_lora_linear_multi_backward_lora");
  return op;
}

inline const auto& lora_linear_multi_backward_input() {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                  const OptTensor&)>("lora_ext::_lora_linear_multi_backward_input");
  return op;
}

// ---------------------------------------------------------------- multi-adapter batches on a quantized base
inline const auto& lora_linear_multi_quantized() {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t, int64_t, const OptTensor&,
                  const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool, const OptTensor&,
                  const OptTensor&)>("lora_ext::lora_linear_multi_quantized");
  return op;
}

inline const auto& lora_linear_multi_quantized_forward() {
  static const auto op =
      find<tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t, int64_t,
                                 const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&, double, const OptTensor&)>(
          "lora_ext::_lora_linear_multi_quantized_forward");
  return op;
}

inline const auto& lora_linear_multi_quantized_backward_input() {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t, int64_t, const Tensor&,
                  const Tensor&, const Tensor&, const Tensor&, double, const OptTensor&)>(
          "lora_ext::_lora_linear_multi_quantized_backward_input");
  return op;
}

}  // namespace lora_ext::handles
