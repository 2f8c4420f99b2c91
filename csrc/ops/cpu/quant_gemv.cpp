#include "ops/cpu/quant_gemv.h"

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ops/cpu/simd.h"

namespace lora_ext::cpu {

namespace {

using quant::QType;

__attribute__((target("avx2,fma"))) inline __m256 u8x8(__m128i v) {  // the low 8 bytes, unsigned, as floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

__attribute__((target("avx2,fma"))) inline __m256 i8x8(__m128i v) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

__attribute__((target("avx2,fma,f16c"))) inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);  // exact, as quant::half_bits_to_float
}

// 8 consecutive nf4 values from 4 bytes (element 2j in byte j's high nibble, 2j + 1 in its low one).
__attribute__((target("avx2,fma"))) inline __m256 nf4x8(const uint8_t* q, __m256 tbl_lo, __m256 tbl_hi) {
  int32_t four;
  std::memcpy(&four, q, 4);
  const __m128i dup =
      _mm_shuffle_epi8(_mm_cvtsi32_si128(four), _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1));
  const __m256i codes = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_cvtepu8_epi32(dup), _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)), _mm256_set1_epi32(15));
  const __m256 lo = _mm256_permutevar8x32_ps(tbl_lo, codes), hi = _mm256_permutevar8x32_ps(tbl_hi, codes);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));  // code >= 8: the high table
}

inline bool finite(float s) {
  return s - s == 0.0f;
}

// One row of W decoded into float32 (the tiles' fast path).
__attribute__((target("avx2,fma,f16c"))) bool dequantize_row(QType type, const uint8_t* q, const float* scale_row,
                                                             int64_t in, float* o) {
  bool ok = true;
  if (type == QType::Int8) {
    const int8_t* qi = reinterpret_cast<const int8_t*>(q);
    const float s = scale_row[0];
    const __m256 sv = _mm256_set1_ps(s);
    const int64_t in8 = in & ~int64_t(7);
    for (int64_t i = 0; i < in8; i += 8) {
      _mm256_storeu_ps(o + i, _mm256_mul_ps(i8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qi + i))), sv));
    }
    for (int64_t i = in8; i < in; ++i) o[i] = static_cast<float>(qi[i]) * s;
    return finite(s);
  }
  if (type == QType::NF4) {
    alignas(32) float tbl[16];
    for (int c = 0; c < 16; ++c) tbl[c] = quant::nf4_value(c);
    const __m256 tbl_lo = _mm256_load_ps(tbl), tbl_hi = _mm256_load_ps(tbl + 8);
    constexpr int64_t kBlock = quant::kNF4Block, kBytes = quant::format_of(QType::NF4).block_bytes;
    for (int64_t b = 0; b < in / kBlock; ++b) {
      const float s = scale_row[b];
      ok = ok && finite(s);
      const __m256 sv = _mm256_set1_ps(s);
      for (int j = 0; j < kBlock; j += 8) {
        _mm256_storeu_ps(o + b * kBlock + j, _mm256_mul_ps(nf4x8(q + b * kBytes + j / 2, tbl_lo, tbl_hi), sv));
      }
    }
    return ok;
  }
  const int64_t bytes = quant::format_of(type).block_bytes;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < in / quant::kGgufBlock; ++b) {
    const uint8_t* qb = q + b * bytes;
    float* ob = o + b * quant::kGgufBlock;
    const float d = half_at(qb);
    const float off = type == QType::Q4_0 ? -8.0f * d : type == QType::Q4_1 ? half_at(qb + 2) : 0.0f;
    ok = ok && finite(d) && finite(off);
    const __m256 dv = _mm256_set1_ps(d), ov = _mm256_set1_ps(off);
    __m256 w[4];
    if (type == QType::Q8_0) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 2));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 18));
      w[0] = i8x8(a);
      w[1] = i8x8(_mm_srli_si128(a, 8));
      w[2] = i8x8(c);
      w[3] = i8x8(_mm_srli_si128(c, 8));
    } else {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + (type == QType::Q4_0 ? 2 : 4)));
      const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
      w[0] = u8x8(lo);
      w[1] = u8x8(_mm_srli_si128(lo, 8));
      w[2] = u8x8(hi);
      w[3] = u8x8(_mm_srli_si128(hi, 8));
    }
    // the portable decoder's roundings exactly: q * d, (q - 8) * d, q * d + m (no FMA)
    const __m256 eight = _mm256_set1_ps(type == QType::Q4_0 ? 8.0f : 0.0f);
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(w[k], eight), dv);
      _mm256_storeu_ps(ob + 8 * k, type == QType::Q4_1 ? _mm256_add_ps(v, ov) : v);
    }
  }
  return ok;
}

// One output row o against N (<= 4) rows of x: dot[n] = sum_i x[n, i] W[o, i].
// xsum[n * nb + b] is the sum of x[n]'s block b (for the formats with an offset).
template <int N>
__attribute__((target("avx2,fma,f16c"))) bool row_dots(QType type, const uint8_t* q, const float* scale_row,
                                                       const float* const* x, const float* xsum, int64_t in,
                                                       float* dot) {
  __m256 acc[N];
  float extra[N];
  for (int n = 0; n < N; ++n) {
    acc[n] = _mm256_setzero_ps();
    extra[n] = 0.0f;
  }
  bool ok = true;
  if (type == QType::Int8) {
    const int8_t* qi = reinterpret_cast<const int8_t*>(q);
    const int64_t in8 = in & ~int64_t(7);
    for (int64_t i = 0; i < in8; i += 8) {
      const __m256 w = i8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qi + i)));
      for (int n = 0; n < N; ++n) acc[n] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[n] + i), acc[n]);
    }
    const float s = scale_row[0];
    ok = finite(s);
    for (int n = 0; n < N; ++n) {
      float t = hsum(acc[n]);
      for (int64_t i = in8; i < in; ++i) t += static_cast<float>(qi[i]) * x[n][i];
      dot[n] = t * s;
    }
    return ok;
  }
  if (type == QType::NF4) {
    constexpr int64_t kBlock = quant::kNF4Block, kBytes = quant::format_of(QType::NF4).block_bytes;
    const int64_t nb = in / kBlock;
    alignas(32) float tbl[16];
    for (int c = 0; c < 16; ++c) tbl[c] = quant::nf4_value(c);
    const __m256 tbl_lo = _mm256_load_ps(tbl), tbl_hi = _mm256_load_ps(tbl + 8);
    for (int64_t b = 0; b < nb; ++b) {
      const float s = scale_row[b];
      ok = ok && finite(s);
      const uint8_t* qb = q + b * kBytes;
      __m256 bacc[N];
      for (int n = 0; n < N; ++n) bacc[n] = _mm256_setzero_ps();
      for (int j = 0; j < kBlock; j += 8) {
        const __m256 wv = nf4x8(qb + j / 2, tbl_lo, tbl_hi);
        for (int n = 0; n < N; ++n) bacc[n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[n] + b * kBlock + j), bacc[n]);
      }
      const __m256 sv = _mm256_set1_ps(s);
      for (int n = 0; n < N; ++n) acc[n] = _mm256_fmadd_ps(bacc[n], sv, acc[n]);
    }
    for (int n = 0; n < N; ++n) dot[n] = hsum(acc[n]);
    return ok;
  }
  const int64_t nb = in / quant::kGgufBlock;
  const int64_t bytes = quant::format_of(type).block_bytes;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* qb = q + b * bytes;
    const float d = half_at(qb);
    ok = ok && finite(d);
    __m256 w0, w1, w2, w3;  // elements 0-7, 8-15, 16-23, 24-31
    if (type == QType::Q8_0) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 2));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 18));
      w0 = i8x8(a);
      w1 = i8x8(_mm_srli_si128(a, 8));
      w2 = i8x8(c);
      w3 = i8x8(_mm_srli_si128(c, 8));
    } else {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + (type == QType::Q4_0 ? 2 : 4)));
      const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
      w0 = u8x8(lo);
      w1 = u8x8(_mm_srli_si128(lo, 8));
      w2 = u8x8(hi);
      w3 = u8x8(_mm_srli_si128(hi, 8));
    }
    const __m256 dv = _mm256_set1_ps(d);
    const float off = type == QType::Q4_0 ? -8.0f * d : type == QType::Q4_1 ? half_at(qb + 2) : 0.0f;
    if (type == QType::Q4_1) ok = ok && finite(off);
    for (int n = 0; n < N; ++n) {
      const float* xb = x[n] + b * quant::kGgufBlock;
      __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
      t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), t);
      t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), t);
      t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), t);
      acc[n] = _mm256_fmadd_ps(t, dv, acc[n]);
      if (type != QType::Q8_0) extra[n] += off * xsum[n * nb + b];
    }
  }
  for (int n = 0; n < N; ++n) dot[n] = hsum(acc[n]) + extra[n];
  return ok;
}

template <int N>
void gemv_rows(const quant::Format& f, const uint8_t* q, int64_t row_bytes, const float* scales, const float* const* x,
               const float* xsum, int64_t in, int64_t out, float* y, int64_t ldy, bool accumulate) {
  const int64_t scale_cols = f.type == QType::Int8 ? 1 : in / quant::kNF4Block;
  FirstBadRow bad;
  at::parallel_for(0, out, 64, [&](int64_t o0, int64_t o1) {
    float dot[N];
    for (int64_t o = o0; o < o1; ++o) {
      const bool ok =
          row_dots<N>(f.type, q + o * row_bytes, scales ? scales + o * scale_cols : nullptr, x, xsum, in, dot);
      for (int n = 0; n < N; ++n) {
        float& dst = y[n * ldy + o];
        dst = accumulate ? dst + dot[n] : dot[n];
      }
      if (!ok) bad.note(o);
    }
  });
  bad.check(f);
}

}  // namespace

bool quant_gemv(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                const at::Tensor& x2d, at::Tensor& y, bool accumulate) {
  const int64_t N = x2d.size(0), in = x2d.size(1), out = y.size(1);
  if (N < 1 || N > kQuantGemvMaxRows || x2d.scalar_type() != at::kFloat || y.scalar_type() != at::kFloat ||
      x2d.stride(1) != 1 || y.stride(1) != 1 || !cpu_has_avx2_fma_f16c() || out == 0 || in == 0) {
    return false;
  }
  const int64_t nb = f.block == quant::kGgufBlock ? in / quant::kGgufBlock : 0;
  std::vector<float> xsum(static_cast<size_t>(N * nb));
  const float* xr[kQuantGemvMaxRows];
  for (int64_t n = 0; n < N; ++n) {
    xr[n] = x2d.const_data_ptr<float>() + n * x2d.stride(0);
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.0f;
      for (int64_t i = 0; i < quant::kGgufBlock; ++i) s += xr[n][b * quant::kGgufBlock + i];
      xsum[n * nb + b] = s;
    }
  }
  const at::Tensor sc = qscale ? qscale->contiguous() : at::Tensor();
  const float* scales = sc.defined() ? sc.const_data_ptr<float>() : nullptr;
  const auto* q = static_cast<const uint8_t*>(qdata.const_data_ptr());
  float* yp = y.mutable_data_ptr<float>();
  const int64_t rb = qdata.size(1), ldy = y.stride(0);
  switch (N) {
    case 1:
      gemv_rows<1>(f, q, rb, scales, xr, xsum.data(), in, out, yp, ldy, accumulate);
      break;
    case 2:
      gemv_rows<2>(f, q, rb, scales, xr, xsum.data(), in, out, yp, ldy, accumulate);
      break;
    case 3:
      gemv_rows<3>(f, q, rb, scales, xr, xsum.data(), in, out, yp, ldy, accumulate);
      break;
    default:
      gemv_rows<4>(f, q, rb, scales, xr, xsum.data(), in, out, yp, ldy, accumulate);
  }
  return true;
}

bool dequantize_row_fast(const quant::Format& f, const uint8_t* q, const float* scale_row, int64_t in, float* out,
                         bool* ok) {
  if (!cpu_has_avx2_fma_f16c()) return false;
  *ok = dequantize_row(f.type, q, scale_row, in, out);
  return true;
}

}  // namespace lora_ext::cpu
