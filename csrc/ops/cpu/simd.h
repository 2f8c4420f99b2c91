#pragma once
// x86 helpers shared by the AVX2 kernels (skinny_gemm.cpp, quant_gemv.cpp): runtime CPU checks and a
// horizontal sum. The kernels are compiled with __attribute__((target(...))) and called only when the
// check passes, so the library itself needs no -mavx2.
#include <cpuid.h>
#include <immintrin.h>

#include <cstdlib>
#include <string_view>

namespace lora_ext::cpu {

// ATEN_CPU_CAPABILITY=default holds ATen's kernels to their portable code; these kernels follow it, so one
// variable gives a machine without vector kernels (scripts/isa_matrix.sh runs the numerics tests so).
inline bool portable_kernels_only() {
  const char* v = std::getenv("ATEN_CPU_CAPABILITY");
  return v != nullptr && std::string_view(v) == "default";
}

inline bool cpu_has_avx2_fma() {
  static const bool ok = !portable_kernels_only() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// AVX2 + FMA + F16C. F16C through cpuid: clang's __builtin_cpu_supports does not know "f16c".
inline bool cpu_has_avx2_fma_f16c() {
  static const bool ok = cpu_has_avx2_fma() && [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
  }();
  return ok;
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

}  // namespace lora_ext::cpu
