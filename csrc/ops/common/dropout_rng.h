#pragma once
// Counter-based dropout mask shared by every backend.
//
// The keep/drop decision for element e (flat row-major index into the [N, in]
// view of x) is a pure function of (seed, e): 32 random bits
// u = dropout_u32(key, e) from two rounds of the murmur3 finaliser over the
// element index mixed with a 64-bit key derived from the seed; the element is
// kept iff u >= threshold, threshold = round(p * 2^32). Forward and backward
// therefore regenerate the identical mask from an 8-byte seed, in any chunking
// and on any device, and never store it. Only 32-bit integer multiplies, so
// CPU SIMD and GPU threads compute it cheaply.
// Plain C++ only (no torch types): usable from host code and CUDA kernels.
#include <cmath>
#include <cstdint>

#include "ops/common/host_device.h"

namespace lora_ext::detail {

LORA_EXT_HOST_DEVICE uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

LORA_EXT_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6BU;
  h ^= h >> 13;
  h *= 0xC2B2AE35U;
  h ^= h >> 16;
  return h;
}

// Parameters of one dropout mask (a plain struct passed from host to kernels).
struct DropoutParams {
  uint32_t key_lo = 0, key_hi = 0;  // from splitmix64(seed)
  uint32_t threshold = 0;           // drop iff u < threshold
  float scale = 1.0f;               // 1 / (1 - p) for kept elements
  double scale_d = 1.0;
};

inline DropoutParams make_dropout_params(int64_t seed, double p) {
  DropoutParams d;
  const uint64_t key = splitmix64(static_cast<uint64_t>(seed));
  d.key_lo = static_cast<uint32_t>(key);
  d.key_hi = static_cast<uint32_t>(key >> 32);
  const double t = std::round(p * 4294967296.0);
  d.threshold = t >= 4294967295.0 ? 0xFFFFFFFFU : static_cast<uint32_t>(t);
  d.scale_d = 1.0 / (1.0 - p);
  d.scale = static_cast<float>(d.scale_d);
  return d;
}

// 32 random bits for element e = hi * 2^32 + lo. A bijection of lo for fixed
// (hi, key): distinct elements of one 2^32 block never share their bits.
LORA_EXT_HOST_DEVICE uint32_t dropout_u32(uint32_t key_lo, uint32_t key_hi, uint32_t lo, uint32_t hi) {
  uint32_t h = (lo ^ key_lo) * 0x9E3779B1U;
  h ^= hi * 0x85EBCA77U + key_hi;
  h = fmix32(h);
  return fmix32(h + key_lo);
}

LORA_EXT_HOST_DEVICE bool dropout_keep(const DropoutParams& d, uint64_t e) {
  return dropout_u32(d.key_lo, d.key_hi, static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32)) >= d.threshold;
}

}  // namespace lora_ext::detail
