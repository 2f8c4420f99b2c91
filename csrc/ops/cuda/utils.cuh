#pragma once
// Helpers shared by the .cu files: element conversions for the kernels
// (CUDA's own half/bfloat16 types, explicit intrinsics, so they do not depend
// on torch's __CUDA_NO_HALF_CONVERSIONS__ flags) and the host-side mapping of
// an ATen dtype onto those types.
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace lora_ext::cuda {

// ---- device: load any float element as float (double stays double) ----
__device__ __forceinline__ float to_acc_base(float v) {
  return v;
}
__device__ __forceinline__ double to_acc_base(double v) {
  return v;
}
__device__ __forceinline__ float to_acc_base(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_acc_base(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_acc(const T* p) {
  return static_cast<acc_t>(to_acc_base(*p));
}

// ---- device: round an accumulator once into the element type ----
template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// ---- host: call f(std::type_identity<T>{}) with T the CUDA element type ----
template <typename F>
void dispatch_float(c10::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case c10::ScalarType::Float:
      f(std::type_identity<float>{});
      break;
    case c10::ScalarType::Double:
      f(std::type_identity<double>{});
      break;
    case c10::ScalarType::Half:
      f(std::type_identity<__half>{});
      break;
    case c10::ScalarType::BFloat16:
      f(std::type_identity<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, "lora_ext CUDA ", what, ": unsupported dtype ", t);
  }
}

// The accumulation dtypes: float32 or float64.
template <typename F>
void dispatch_acc(c10::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case c10::ScalarType::Float:
      f(std::type_identity<float>{});
      break;
    case c10::ScalarType::Double:
      f(std::type_identity<double>{});
      break;
    default:
      TORCH_CHECK(false, "lora_ext CUDA ", what, ": unsupported accumulation dtype ", t);
  }
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace lora_ext::cuda
