#pragma once
// Quantized frozen base weights [out, in] (issue 15): the formats, their byte
// layouts and how one block decodes. Shared by the CPU and Meta kernels (and,
// later, CUDA): plain host/device functions on raw bytes.
//
//   qtype   qdata                            qscale                element (o, i)
//   "int8"  int8  [out, in]                  float32 [out]         q * scale[o]
//   "q8_0"  uint8 [out, in / 32 * 34] GGUF   None                  q * d        (fp16 d, int8 q[32])
//   "q4_0"  uint8 [out, in / 32 * 18] GGUF   None                  (q - 8) * d  (fp16 d, 16 bytes of nibbles)
//   "q4_1"  uint8 [out, in / 32 * 20] GGUF   None                  q * d + m    (fp16 d, fp16 m, 16 bytes)
//   "nf4"   uint8 [out, in / 2]              float32 [out, in/64]  NF4[q] * absmax (QLoRA; 2 codes per byte)
//
// GGUF's 4-bit blocks keep element j in the low nibble of byte j and element
// j + 16 in its high nibble; NF4 (bitsandbytes' layout) keeps element 2j in the
// high nibble of byte j and element 2j + 1 in the low one.
#include <cstdint>
#include <cstring>
#include <string_view>

#include "ops/common/host_device.h"

namespace lora_ext::quant {

enum class QType : int { Int8 = 0, Q8_0, Q4_0, Q4_1, NF4 };

// The one source of these numbers: the kernels read them from here, and lora_ext/quant.py from here
// too, through lora_ext._C.quant_formats() and lora_ext._C.nf4_values() (csrc/python/module.cpp).
inline constexpr int64_t kGgufBlock = 32;  // elements per GGUF block (q8_0, q4_0, q4_1)
inline constexpr int64_t kNF4Block = 64;   // elements per nf4 block: one absmax each

struct Format {
  QType type;
  const char* name;
  int64_t block;        // elements per block along `in` (int8: 1)
  int64_t block_bytes;  // bytes per block in qdata
  bool has_qscale;      // a separate qscale tensor
};

inline constexpr Format kFormats[] = {
    {QType::Int8, "int8", 1, 1, true},
    {QType::Q8_0, "q8_0", kGgufBlock, 2 + kGgufBlock, false},      // fp16 d, int8 q[32]
    {QType::Q4_0, "q4_0", kGgufBlock, 2 + kGgufBlock / 2, false},  // fp16 d, 16 bytes of nibbles
    {QType::Q4_1, "q4_1", kGgufBlock, 4 + kGgufBlock / 2, false},  // fp16 d, fp16 m, 16 bytes
    {QType::NF4, "nf4", kNF4Block, kNF4Block / 2, true},           // 64 codes = 32 bytes; absmax in qscale
};

// kFormats in QType order: the format of a type.
constexpr const Format& format_of(QType t) {
  return kFormats[static_cast<int>(t)];
}
static_assert(format_of(QType::Int8).type == QType::Int8 && format_of(QType::Q8_0).type == QType::Q8_0 &&
                  format_of(QType::Q4_0).type == QType::Q4_0 && format_of(QType::Q4_1).type == QType::Q4_1 &&
                  format_of(QType::NF4).type == QType::NF4,
              "kFormats must list the formats in QType order");
// nullptr when `name` is not a format.
inline const Format* find_format(std::string_view name) {
  for (const auto& f : kFormats) {
    if (name == f.name) return &f;
  }
  return nullptr;
}

// The NF4 code book (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
inline constexpr int kNF4Codes = 16;
LORA_EXT_HOST_DEVICE float nf4_value(int code) {
  constexpr float kNF4[kNF4Codes] = {-1.0f,
                                     -0.6961928009986877f,
                                     -0.5250730514526367f,
                                     -0.39491748809814453f,
                                     -0.28444138169288635f,
                                     -0.18477343022823334f,
                                     -0.09105003625154495f,
                                     0.0f,
                                     0.07958029955625534f,
                                     0.16093020141124725f,
                                     0.24611230194568634f,
                                     0.33791524171829224f,
                                     0.44070982933044434f,
                                     0.5626170039176941f,
                                     0.7229568362236023f,
                                     1.0f};
  return kNF4[code & 15];
}

// IEEE half (as stored in GGUF blocks) to float, exactly.
LORA_EXT_HOST_DEVICE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

LORA_EXT_HOST_DEVICE uint16_t load_u16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (static_cast<uint16_t>(p[1]) << 8));  // GGUF is little-endian
}

// Decodes one GGUF block (32 elements) into out[0..32). Returns false when its
// scale (or minimum) is not finite.
LORA_EXT_HOST_DEVICE bool decode_gguf_block(QType t, const uint8_t* b, float* out) {
  const float d = half_bits_to_float(load_u16(b));
  if (t == QType::Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(q[j]) * d;
    return d - d == 0.0f;
  }
  if (t == QType::Q4_0) {
    const uint8_t* q = b + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>((q[j] & 0x0F) - 8) * d;
      out[j + 16] = static_cast<float>((q[j] >> 4) - 8) * d;
    }
    return d - d == 0.0f;
  }
  // Q4_1: the product q * d is exact in float (4-bit times an 11-bit mantissa), so
  // the one rounding is the addition, with or without FMA contraction.
  const float m = half_bits_to_float(load_u16(b + 2));
  const uint8_t* q = b + 4;
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<float>(q[j] & 0x0F) * d + m;
    out[j + 16] = static_cast<float>(q[j] >> 4) * d + m;
  }
  return d - d == 0.0f && m - m == 0.0f;
}

}  // namespace lora_ext::quant
