// Exact (bit-for-bit reversible) merge on CPU.
//
// Delta W is recomputed deterministically in float32 by every call:
//   d[i, j] = scale * sum_k B[i, k] * A[k, j], summed in k order, one element at
// a time (independent of threads and chunking; this file is compiled with
// -ffp-contract=off so the SIMD and scalar paths round identically, and the
// CUDA kernel computes the same bits with explicitly rounded multiply and add).
// The element rule (merged value, 2-bit codes, sparse list) is
// ops/common/exact_merge.h, shared with the CUDA kernels.
#include <cstring>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/exact_merge_dispatch.h"

namespace lora_ext::cpu {

namespace {

using at::Tensor;
namespace ex = detail::exact;

struct Dims {
  int64_t out, in, r, s0, s1;
};

// d_row[j] = scale * sum_k b_row[k] * A32[k, j] for one row, k in order. The
// AVX2 clone rounds exactly like the default one (separate multiply and add).
__attribute__((target_clones("avx2", "default"))) void delta_row(float* d_row, const float* b_row, const float* A32,
                                                                 const Dims& dm, float scale) {
  for (int64_t j = 0; j < dm.in; ++j) d_row[j] = 0.0f;
  for (int64_t k = 0; k < dm.r; ++k) {
    const float bk = b_row[k];
    const float* a = A32 + k * dm.in;
    for (int64_t j = 0; j < dm.in; ++j) d_row[j] = d_row[j] + bk * a[j];
  }
  for (int64_t j = 0; j < dm.in; ++j) d_row[j] = d_row[j] * scale;
}

struct Prepared {
  Tensor A32, B32;
  Dims dm;
};

Prepared prepare(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B) {
  Prepared p;
  p.A32 = lora_A.to(at::kFloat).contiguous();
  p.B32 = lora_B.to(at::kFloat).contiguous();
  p.dm = {weight.size(0), weight.size(1), lora_A.size(0), weight.stride(0), weight.stride(1)};
  return p;
}

template <typename F>
void for_rows(const Prepared& p, double scale, F&& f) {
  const Dims& dm = p.dm;
  const float* A = p.A32.const_data_ptr<float>();
  const float* B = p.B32.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, dm.out, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dm.in)), [&](int64_t b0, int64_t b1) {
    std::vector<float> d(static_cast<size_t>(dm.in));
    for (int64_t i = b0; i < b1; ++i) {
      delta_row(d.data(), B + i * dm.r, A, dm, s);
      f(i, d.data());
    }
  });
}

template <typename Fmt>
typename Fmt::U* bits_ptr(const Tensor& t) {
  return static_cast<typename Fmt::U*>(t.data_ptr());
}

void merge_exact_cpu(Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  detail::check_merge_exact_args("merge_exact_", weight, lora_A, lora_B, scale);
  if (weight.numel() == 0) return;
  const auto p = prepare(weight, lora_A, lora_B);
  ex::dispatch_format(weight.scalar_type(), [&](auto fmt) {
    using Fmt = decltype(fmt);
    auto* w = bits_ptr<Fmt>(weight);
    for_rows(p, scale, [&](int64_t i, const float* d) {
      auto* row = w + i * p.dm.s0;
      for (int64_t j = 0; j < p.dm.in; ++j) row[j * p.dm.s1] = ex::merged<Fmt>(row[j * p.dm.s1], d[j]);
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> merge_exact_codes_cpu(const Tensor& weight, const Tensor& lora_A,
                                                         const Tensor& lora_B, double scale) {
  detail::check_merge_exact_args("merge_exact_codes", weight, lora_A, lora_B, scale);
  const int64_t n = weight.numel();
  Tensor codes = at::zeros({(n + 3) / 4}, weight.options().dtype(at::kByte));
  Tensor idx = at::empty({0}, weight.options().dtype(at::kLong));
  Tensor val = at::empty({0}, weight.options());
  if (n == 0) return {codes, idx, val};
  const auto p = prepare(weight, lora_A, lora_B);
  ex::dispatch_format(weight.scalar_type(), [&](auto fmt) {
    using Fmt = decltype(fmt);
    using U = typename Fmt::U;
    const U* w = bits_ptr<Fmt>(weight);
    uint8_t* c = codes.data_ptr<uint8_t>();
    std::vector<int64_t> exc_idx;
    std::vector<U> exc_val;
    std::mutex mu;
    // Rows are processed in parallel; a byte of codes may straddle two rows, so
    // each row writes its codes with an atomic OR on the byte.
    for_rows(p, scale, [&](int64_t i, const float* d) {
      std::vector<int64_t> li;
      std::vector<U> lv;
      const U* row = w + i * p.dm.s0;
      for (int64_t j = 0; j < p.dm.in; ++j) {
        const U w0 = row[j * p.dm.s1];
        const uint8_t code = ex::encode<Fmt>(w0, d[j]);
        if (!code) continue;
        const int64_t e = i * p.dm.in + j;
        __atomic_fetch_or(c + e / 4, static_cast<uint8_t>(code << (2 * (e % 4))), __ATOMIC_RELAXED);
        if (code == 3) {
          li.push_back(e);
          lv.push_back(w0);
        }
      }
      if (!li.empty()) {
        std::lock_guard<std::mutex> g(mu);
        exc_idx.insert(exc_idx.end(), li.begin(), li.end());
        exc_val.insert(exc_val.end(), lv.begin(), lv.end());
      }
    });
    const auto m = static_cast<int64_t>(exc_idx.size());
    idx = at::empty({m}, idx.options());
    val = at::empty({m}, val.options());
    if (m > 0) {  // an empty list has null data pointers, and memcpy from/to null is undefined even for 0 bytes
      std::memcpy(idx.data_ptr<int64_t>(), exc_idx.data(), m * sizeof(int64_t));
      std::memcpy(val.data_ptr(), exc_val.data(), m * sizeof(U));
    }
  });
  if (idx.numel() > 1) {  // sorted by index (threads append in any order)
    auto [sorted, perm] = idx.sort();
    return {codes, sorted, val.index_select(0, perm)};
  }
  return {codes, idx, val};
}

void unmerge_exact_cpu(Tensor& weight, const Tensor& codes, const Tensor& exc_index, const Tensor& exc_value,
                       const Tensor& lora_A, const Tensor& lora_B, double scale) {
  const char* op = "unmerge_exact_";
  detail::check_unmerge_exact_args(op, weight, codes, exc_index, exc_value, lora_A, lora_B, scale);
  const int64_t n = weight.numel();
  if (n == 0) return;
  const Tensor idx = exc_index.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < idx.numel(); ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < n, "lora_ext::", op, ": exc_index holds ", ip[k], ", outside [0, ", n, ")");
  }
  const auto p = prepare(weight, lora_A, lora_B);
  ex::dispatch_format(weight.scalar_type(), [&](auto fmt) {
    using Fmt = decltype(fmt);
    using U = typename Fmt::U;
    U* w = bits_ptr<Fmt>(weight);
    const uint8_t* c = codes.const_data_ptr<uint8_t>();
    for_rows(p, scale, [&](int64_t i, const float* d) {
      U* row = w + i * p.dm.s0;
      for (int64_t j = 0; j < p.dm.in; ++j) {
        const int64_t e = i * p.dm.in + j;
        U& v = row[j * p.dm.s1];
        v = ex::decode<Fmt>(v, d[j], (c[e / 4] >> (2 * (e % 4))) & 3);
      }
    });
    const Tensor vals = exc_value.contiguous();
    const U* vp = static_cast<const U*>(vals.const_data_ptr());
    for (int64_t k = 0; k < idx.numel(); ++k) {
      const int64_t e = ip[k];
      w[(e / p.dm.in) * p.dm.s0 + (e % p.dm.in) * p.dm.s1] = vp[k];
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("merge_exact_codes", &merge_exact_codes_cpu);
  m.impl("merge_exact_", &merge_exact_cpu);
  m.impl("unmerge_exact_", &unmerge_exact_cpu);
}

}  // namespace lora_ext::cpu
