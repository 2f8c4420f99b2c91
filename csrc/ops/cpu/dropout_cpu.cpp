#include "ops/cpu/dropout_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace lora_ext::cpu {

namespace {

template <typename T>
void scale_range(T* data, uint64_t e0, int64_t begin, int64_t end, const detail::DropoutParams& d) {
  const T s = static_cast<T>(d.scale_d);
  int64_t i = begin;
  // Leading odd element, then whole pairs sharing one 64-bit draw.
  if (i < end && ((e0 + i) & 1)) {
    data[i] = detail::dropout_keep(d, e0 + i) ? data[i] * s : T(0);
    ++i;
  }
  for (; i + 1 < end; i += 2) {
    const uint64_t bits = detail::dropout_bits(d.key, (e0 + i) >> 1);
    const uint64_t lo = bits & 0xFFFFFFFFULL, hi = bits >> 32;
    data[i] = lo >= d.threshold ? data[i] * s : T(0);
    data[i + 1] = hi >= d.threshold ? data[i + 1] * s : T(0);
  }
  if (i < end) {
    data[i] = detail::dropout_keep(d, e0 + i) ? data[i] * s : T(0);
  }
}

}  // namespace

void apply_dropout_rows_(at::Tensor& buf, int64_t row0, const detail::DropoutParams& d) {
  TORCH_INTERNAL_ASSERT(buf.is_contiguous() && buf.dim() == 2);
  const int64_t n = buf.numel();
  if (n == 0) return;
  const uint64_t e0 = static_cast<uint64_t>(row0) * static_cast<uint64_t>(buf.size(1));
  AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "lora_ext_apply_dropout", [&] {
    scalar_t* data = buf.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) { scale_range(data, e0, begin, end, d); });
  });
}

}  // namespace lora_ext::cpu
