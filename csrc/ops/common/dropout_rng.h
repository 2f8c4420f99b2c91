#pragma once
// Counter-based dropout mask shared by every backend.
//
// The keep/drop decision for element e (flat row-major index into the [N, in]
// view of x) is a pure function of (seed, e): bits = splitmix64(seed, e / 2),
// the low 32 bits decide even e and the high 32 bits odd e; the element is kept
// iff its 32 bits >= threshold, threshold = round(p * 2^32). So forward and
// backward regenerate the identical mask from an 8-byte seed, in any chunking
// and on any device, and never need to store it.
// Plain C++ only (no torch types): usable from host code and CUDA kernels.
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LORA_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORA_EXT_HOST_DEVICE inline
#endif

namespace lora_ext::detail {

LORA_EXT_HOST_DEVICE uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Parameters of one dropout mask (a plain struct passed from host to kernels).
struct DropoutParams {
  uint64_t key = 0;        // splitmix64(seed): decorrelates neighbouring seeds
  uint64_t threshold = 0;  // drop iff 32 random bits < threshold
  float scale = 1.0f;      // 1 / (1 - p) for kept elements
  double scale_d = 1.0;
};

inline DropoutParams make_dropout_params(int64_t seed, double p) {
  DropoutParams d;
  d.key = splitmix64(static_cast<uint64_t>(seed));
  d.threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));
  d.scale_d = 1.0 / (1.0 - p);
  d.scale = static_cast<float>(d.scale_d);
  return d;
}

// 64 random bits for the element pair (2k, 2k+1).
LORA_EXT_HOST_DEVICE uint64_t dropout_bits(uint64_t key, uint64_t pair) {
  return splitmix64(key ^ (pair * 0xD1B54A32D192ED03ULL));
}

LORA_EXT_HOST_DEVICE bool dropout_keep(const DropoutParams& d, uint64_t e) {
  const uint64_t bits = dropout_bits(d.key, e >> 1);
  const uint64_t u = (e & 1) ? (bits >> 32) : (bits & 0xFFFFFFFFULL);
  return u >= d.threshold;
}

}  // namespace lora_ext::detail
