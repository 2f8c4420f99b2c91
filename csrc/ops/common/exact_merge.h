#pragma once
// The element rule of the exact (bit-for-bit reversible) merge, shared by the
// CPU and CUDA kernels so that both produce the same bits and the side codes
// of one device unmerge on the other.
//
// Given a weight element w0 and the deterministic float32 delta d of that
// element (computed by the kernels in k order, no FMA: see merge_exact_cpu.cpp):
//   merged:  m = round(w0 + d)
//   codes:   c0 = round(m - d); code 0, 1, 2 say that w0 is c0, next(c0) or
//            prev(c0); code 3 sends w0 to the sparse list (also every NaN w0,
//            whose bits a float round trip need not keep).
//   unmerge: w0 = candidate(code) (code 3: the sparse list's value).
// All arithmetic is one float32 add/subtract plus integer bit operations; the
// float32 -> bfloat16/float16 roundings (to nearest even) are written out in
// integer code here, so no compiler, library or hardware conversion decides
// a single bit. Plain C++ (no torch types): usable in host code and kernels.
#include <cstdint>
#include <cstring>

#include "ops/common/host_device.h"

namespace lora_ext::detail::exact {

LORA_EXT_HOST_DEVICE float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

LORA_EXT_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// A storage format: its bit type U, exact widening to float32, rounding (to
// nearest, ties to even) from float32 and a NaN test on the bits.
struct F32 {
  using U = uint32_t;
  LORA_EXT_HOST_DEVICE static float to_float(U u) { return float_from_bits(u); }
  LORA_EXT_HOST_DEVICE static U from_float(float f) { return float_bits(f); }
  LORA_EXT_HOST_DEVICE static bool is_nan(U u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }
};

struct BF16 {
  using U = uint16_t;
  LORA_EXT_HOST_DEVICE static float to_float(U u) { return float_from_bits(static_cast<uint32_t>(u) << 16); }
  LORA_EXT_HOST_DEVICE static U from_float(float f) {
    const uint32_t x = float_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<U>((x >> 16) | 0x0040u);  // NaN stays NaN (quiet)
    return static_cast<U>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);                    // overflow rounds to Inf
  }
  LORA_EXT_HOST_DEVICE static bool is_nan(U u) { return (u & 0x7FFFu) > 0x7F80u; }
};

struct F16 {
  using U = uint16_t;
  LORA_EXT_HOST_DEVICE static float to_float(U h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu;
    uint32_t m = h & 0x3FFu;
    if (e == 0x1Fu) return float_from_bits(sign | 0x7F800000u | (m << 13));  // Inf / NaN
    if (e != 0) return float_from_bits(sign | ((e + 112u) << 23) | (m << 13));
    if (m == 0) return float_from_bits(sign);
    uint32_t shift = 0;  // subnormal: m * 2^-24, normalised
    while (!(m & 0x400u)) {
      m <<= 1;
      ++shift;
    }
    return float_from_bits(sign | ((113u - shift) << 23) | ((m & 0x3FFu) << 13));
  }
  LORA_EXT_HOST_DEVICE static U from_float(float f) {
    const uint32_t x = float_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return static_cast<U>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));  // NaN
    if (ax >= 0x47800000u) return static_cast<U>(sign | 0x7C00u);                         // >= 2^16 (and Inf): Inf
    const uint32_t e = ax >> 23;
    if (e >= 113u) {  // a normal half (a carry out of the mantissa may round up to Inf: correct)
      uint32_t h = ((e - 112u) << 10) | ((ax >> 13) & 0x3FFu);
      const uint32_t rem = ax & 0x1FFFu;
      if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
      return static_cast<U>(sign | h);
    }
    const uint32_t shift = 126u - e;  // a subnormal half: (1.m * 2^23) * 2^(e - 150) in units of 2^-24
    if (shift > 24u) return sign;     // below half of the smallest subnormal: +-0
    const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;  // may carry into the smallest normal: correct
    return static_cast<U>(sign | h);
  }
  LORA_EXT_HOST_DEVICE static bool is_nan(U u) { return (u & 0x7FFFu) > 0x7C00u; }
};

// next / previous representable value (in value order; -0 and +0 are neighbours).
template <typename U>
LORA_EXT_HOST_DEVICE U step(U u, int dir) {
  constexpr U sign = static_cast<U>(U(1) << (sizeof(U) * 8 - 1));
  const bool neg = u & sign;
  if (dir > 0) {
    if (u == sign) return U(0);  // -0 -> +0
    return neg ? U(u - 1) : U(u + 1);
  }
  if (u == 0) return sign;  // +0 -> -0
  return neg ? U(u + 1) : U(u - 1);
}

// round(x + y) in Fmt. IEEE 754 leaves the bits of a NaN result to the hardware (x86 keeps an
// operand's payload, CUDA returns its own canonical NaN), so a NaN sum is written as the positive
// quiet NaN here: every backend then gives the same bits.
template <typename Fmt>
LORA_EXT_HOST_DEVICE typename Fmt::U rounded_sum(float x, float y) {
  const float s = x + y;
  if ((float_bits(s) & 0x7FFFFFFFu) > 0x7F800000u) return Fmt::from_float(float_from_bits(0x7FC00000u));
  return Fmt::from_float(s);
}

// A NaN weight element stays exactly itself (merging adds a number to it; its payload is kept).
template <typename Fmt>
LORA_EXT_HOST_DEVICE typename Fmt::U merged(typename Fmt::U w0, float d) {
  if (Fmt::is_nan(w0)) return w0;
  return rounded_sum<Fmt>(Fmt::to_float(w0), d);
}

template <typename Fmt>
LORA_EXT_HOST_DEVICE typename Fmt::U base_candidate(typename Fmt::U m, float d) {
  return rounded_sum<Fmt>(Fmt::to_float(m), -d);  // x - d and x + (-d) round identically
}

// The 2-bit code of weight element w0 (3: keep it in the sparse list).
template <typename Fmt>
LORA_EXT_HOST_DEVICE uint8_t encode(typename Fmt::U w0, float d) {
  if (Fmt::is_nan(w0)) return 3;
  const auto c0 = base_candidate<Fmt>(merged<Fmt>(w0, d), d);
  if (c0 == w0) return 0;
  if (step(c0, +1) == w0) return 1;
  if (step(c0, -1) == w0) return 2;
  return 3;
}

// The original bits of a merged element m with code 0..2 (code 3: m unchanged,
// the sparse list restores it).
template <typename Fmt>
LORA_EXT_HOST_DEVICE typename Fmt::U decode(typename Fmt::U m, float d, int code) {
  if (code == 3) return m;
  const auto c0 = base_candidate<Fmt>(m, d);
  return code == 0 ? c0 : step(c0, code == 1 ? +1 : -1);
}

}  // namespace lora_ext::detail::exact
