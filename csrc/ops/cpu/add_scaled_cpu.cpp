#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops/cpu/chunking.h"

namespace lora_ext::cpu {

void add_scaled_(at::Tensor& dst, const at::Tensor& src, double alpha) {
  TORCH_INTERNAL_ASSERT(dst.dim() == 2 && src.dim() == 2 && src.is_contiguous() && dst.sizes() == src.sizes());
  TORCH_INTERNAL_ASSERT(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble);
  const int64_t rows = dst.size(0), cols = dst.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t s0 = dst.stride(0), s1 = dst.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "lora_ext_add_scaled", [&] {
    using dst_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_ext_add_scaled_src", [&] {
      using acc_t = scalar_t;
      const acc_t a = static_cast<acc_t>(alpha);
      const acc_t* sp = src.data_ptr<acc_t>();
      dst_t* dp = dst.data_ptr<dst_t>();
      const int64_t grain = std::max<int64_t>(1, 32768 / cols);
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          dst_t* d = dp + i * s0;
          const acc_t* s = sp + i * cols;
          if (s1 == 1) {
            for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<dst_t>(static_cast<acc_t>(d[j]) + a * s[j]);
          } else {
            for (int64_t j = 0; j < cols; ++j) {
              d[j * s1] = static_cast<dst_t>(static_cast<acc_t>(d[j * s1]) + a * s[j]);
            }
          }
        }
      });
    });
  });
}

}  // namespace lora_ext::cpu
