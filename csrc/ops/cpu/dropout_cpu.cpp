#include "ops/cpu/dropout_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace lora_ext::cpu {

namespace {

// One row segment whose element indices share their upper 32 bits. Written as
// a plain loop over 32-bit lanes (the multiply is unconditional, a select picks
// its factor) so the compiler vectorises it; target_clones
// builds an AVX2 copy chosen at load time on CPUs that have it.
#define LORA_EXT_DROPOUT_SEGMENT(NAME, SRC_T, DST_T)                                                                 \
  __attribute__((target_clones("avx2", "default"))) void NAME(DST_T* dst, const SRC_T* src, int64_t sstride,         \
                                                              int64_t n, uint32_t lo0, uint32_t hi, uint32_t key_lo, \
                                                              uint32_t key_hi, uint32_t threshold, DST_T scale) {    \
    if (sstride == 1) {                                                                                              \
      for (int64_t j = 0; j < n; ++j) {                                                                              \
        const uint32_t u = detail::dropout_u32(key_lo, key_hi, lo0 + static_cast<uint32_t>(j), hi);                  \
        const DST_T v = static_cast<DST_T>(src[j]);                                                                  \
        dst[j] = v * (u >= threshold ? scale : DST_T(0));                                                            \
      }                                                                                                              \
    } else {                                                                                                         \
      for (int64_t j = 0; j < n; ++j) {                                                                              \
        const uint32_t u = detail::dropout_u32(key_lo, key_hi, lo0 + static_cast<uint32_t>(j), hi);                  \
        const DST_T v = static_cast<DST_T>(src[j * sstride]);                                                        \
        dst[j] = v * (u >= threshold ? scale : DST_T(0));                                                            \
      }                                                                                                              \
    }                                                                                                                \
  }

LORA_EXT_DROPOUT_SEGMENT(segment_f32, float, float)
LORA_EXT_DROPOUT_SEGMENT(segment_f64, double, double)
LORA_EXT_DROPOUT_SEGMENT(segment_bf16, c10::BFloat16, float)
LORA_EXT_DROPOUT_SEGMENT(segment_f16, c10::Half, float)
#undef LORA_EXT_DROPOUT_SEGMENT

inline void segment(float* d, const float* s, int64_t ss, int64_t n, uint32_t lo, uint32_t hi,
                    const detail::DropoutParams& p) {
  segment_f32(d, s, ss, n, lo, hi, p.key_lo, p.key_hi, p.threshold, p.scale);
}
inline void segment(double* d, const double* s, int64_t ss, int64_t n, uint32_t lo, uint32_t hi,
                    const detail::DropoutParams& p) {
  segment_f64(d, s, ss, n, lo, hi, p.key_lo, p.key_hi, p.threshold, p.scale_d);
}
inline void segment(float* d, const c10::BFloat16* s, int64_t ss, int64_t n, uint32_t lo, uint32_t hi,
                    const detail::DropoutParams& p) {
  segment_bf16(d, s, ss, n, lo, hi, p.key_lo, p.key_hi, p.threshold, p.scale);
}
inline void segment(float* d, const c10::Half* s, int64_t ss, int64_t n, uint32_t lo, uint32_t hi,
                    const detail::DropoutParams& p) {
  segment_f16(d, s, ss, n, lo, hi, p.key_lo, p.key_hi, p.threshold, p.scale);
}

template <typename src_t, typename dst_t>
void dropout_rows_impl(dst_t* dst, const src_t* src, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                       uint64_t e_row0, const detail::DropoutParams& d) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst_t* drow = dst + i * cols;
      const src_t* srow = src + i * s0;
      const uint64_t e0 = e_row0 + static_cast<uint64_t>(i) * static_cast<uint64_t>(cols);
      int64_t j = 0;
      while (j < cols) {  // split where the upper 32 bits of the index change
        const uint64_t e = e0 + static_cast<uint64_t>(j);
        const uint32_t lo = static_cast<uint32_t>(e), hi = static_cast<uint32_t>(e >> 32);
        const int64_t n = std::min<int64_t>(cols - j, static_cast<int64_t>((uint64_t(1) << 32) - lo));
        segment(drow + j, srow + j * s1, s1, n, lo, hi, d);
        j += n;
      }
    }
  });
}

}  // namespace

void dropout_rows(at::Tensor& dst, const at::Tensor& src, int64_t row0, const detail::DropoutParams& d) {
  TORCH_INTERNAL_ASSERT(dst.is_contiguous() && dst.dim() == 2 && src.dim() == 2 && dst.sizes() == src.sizes());
  const int64_t rows = dst.size(0), cols = dst.size(1);
  if (rows == 0 || cols == 0) return;
  const uint64_t e_row0 = static_cast<uint64_t>(row0) * static_cast<uint64_t>(cols);
  const auto dt = dst.scalar_type(), st = src.scalar_type();
  if (dt == at::kDouble) {
    TORCH_INTERNAL_ASSERT(st == at::kDouble);
    dropout_rows_impl(dst.data_ptr<double>(), src.const_data_ptr<double>(), rows, cols, src.stride(0), src.stride(1),
                      e_row0, d);
    return;
  }
  TORCH_INTERNAL_ASSERT(dt == at::kFloat);
  float* out = dst.data_ptr<float>();
  switch (st) {
    case at::kFloat:
      dropout_rows_impl(out, src.const_data_ptr<float>(), rows, cols, src.stride(0), src.stride(1), e_row0, d);
      break;
    case at::kBFloat16:
      dropout_rows_impl(out, src.const_data_ptr<c10::BFloat16>(), rows, cols, src.stride(0), src.stride(1), e_row0, d);
      break;
    case at::kHalf:
      dropout_rows_impl(out, src.const_data_ptr<c10::Half>(), rows, cols, src.stride(0), src.stride(1), e_row0, d);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "lora_ext dropout_rows: unsupported source dtype ", st);
  }
}

}  // namespace lora_ext::cpu
