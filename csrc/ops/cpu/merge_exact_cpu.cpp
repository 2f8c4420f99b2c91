// Exact (bit-for-bit reversible) merge on CPU.
//
// Delta W is recomputed deterministically in float32 by every call:
//   d[i, j] = scale * sum_k B[i, k] * A[k, j], summed in k order, one element at
// a time (independent of threads and chunking; this file is compiled with
// -ffp-contract=off so the SIMD and scalar paths round identically).
// merge:   M = round(W0 + d).
// codes:   c0 = round(M - d) is within one ulp of W0 for nearly every element; a
//          2-bit code per element says which of c0, next(c0), prev(c0) W0 is, and
//          code 3 sends the rare rest (and NaN/Inf) to a sparse list of
//          (flat index, original bits).
// unmerge: W0 = candidate(code) or the sparse list's value.
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ops/common/checks.h"

namespace lora_ext::cpu {

namespace {

using at::Tensor;

// Bits and an order-preserving integer key for each weight dtype.
template <typename T> struct Bits;
template <> struct Bits<c10::BFloat16> { using U = uint16_t; };
template <> struct Bits<c10::Half> { using U = uint16_t; };
template <> struct Bits<float> { using U = uint32_t; };

template <typename T>
typename Bits<T>::U to_bits(T v) {
  typename Bits<T>::U u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

template <typename T>
T from_bits(typename Bits<T>::U u) {
  T v;
  std::memcpy(&v, &u, sizeof(u));
  return v;
}

// next / previous representable value (in value order; -0 and +0 are neighbours).
template <typename T>
T step(T v, int dir) {
  using U = typename Bits<T>::U;
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  U u = to_bits(v);
  const bool neg = u & sign;
  if (dir > 0) {
    if (u == sign) return from_bits<T>(0);  // -0 -> +0
    u = neg ? U(u - 1) : U(u + 1);
  } else {
    if (u == 0) return from_bits<T>(sign);  // +0 -> -0
    u = neg ? U(u + 1) : U(u - 1);
  }
  return from_bits<T>(u);
}

struct Dims {
  int64_t out, in, r, s0, s1;
};

// d_row[j] = scale * sum_k b_row[k] * A32[k, j] for one row, k in order. The
// AVX2 clone rounds exactly like the default one (separate multiply and add).
__attribute__((target_clones("avx2", "default"))) void delta_row(float* d_row, const float* b_row, const float* A32, const Dims& dm, float scale) {
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

Prepared prepare(const char* op, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  detail::check_merge_args(op, weight, lora_A, lora_B, scale);
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf, "lora_ext::", op,
              ": expected a float32, bfloat16 or float16 weight for an exact merge, got ", wt);
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

// Calls f(T{}) for the weight dtypes the exact merge supports.
template <typename F>
void dispatch_exact(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "lora_ext exact merge: unsupported dtype ", t);
  }
}

template <typename T>
T merged_value(T w, float d) {
  return static_cast<T>(static_cast<float>(w) + d);
}

template <typename T>
T base_candidate(T m, float d) {
  return static_cast<T>(static_cast<float>(m) - d);
}

void merge_exact_cpu(Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  const auto p = prepare("merge_exact_", weight, lora_A, lora_B, scale);
  if (weight.numel() == 0) return;
  dispatch_exact(weight.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* w = weight.data_ptr<scalar_t>();
    for_rows(p, scale, [&](int64_t i, const float* d) {
      scalar_t* row = w + i * p.dm.s0;
      for (int64_t j = 0; j < p.dm.in; ++j) row[j * p.dm.s1] = merged_value(row[j * p.dm.s1], d[j]);
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> merge_exact_codes_cpu(
    const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  const auto p = prepare("merge_exact_codes", weight, lora_A, lora_B, scale);
  const int64_t n = weight.numel();
  Tensor codes = at::zeros({(n + 3) / 4}, weight.options().dtype(at::kByte));
  std::vector<int64_t> exc_idx;
  Tensor exc_val;
  dispatch_exact(weight.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      const scalar_t* w = weight.const_data_ptr<scalar_t>();
      uint8_t* c = codes.data_ptr<uint8_t>();
      std::vector<scalar_t> exc_v;
      std::mutex mu;
      // Rows are processed in parallel; a byte of codes may straddle two rows, so
      // each row writes its codes with an atomic OR on the byte.
      for_rows(p, scale, [&](int64_t i, const float* d) {
        std::vector<int64_t> li;
        std::vector<scalar_t> lv;
        const scalar_t* row = w + i * p.dm.s0;
        for (int64_t j = 0; j < p.dm.in; ++j) {
          const scalar_t w0 = row[j * p.dm.s1];
          const scalar_t m = merged_value(w0, d[j]);
          const scalar_t c0 = base_candidate(m, d[j]);
          const auto b0 = to_bits(w0);
          uint8_t code;
          if (to_bits(c0) == b0) code = 0;
          else if (to_bits(step(c0, +1)) == b0) code = 1;
          else if (to_bits(step(c0, -1)) == b0) code = 2;
          else code = 3;
          const int64_t e = i * p.dm.in + j;
          if (code) __atomic_fetch_or(c + e / 4, static_cast<uint8_t>(code << (2 * (e % 4))), __ATOMIC_RELAXED);
          if (code == 3) {
            li.push_back(e);
            lv.push_back(w0);
          }
        }
        if (!li.empty()) {
          std::lock_guard<std::mutex> g(mu);
          exc_idx.insert(exc_idx.end(), li.begin(), li.end());
          exc_v.insert(exc_v.end(), lv.begin(), lv.end());
        }
      });
      exc_val = at::empty({static_cast<int64_t>(exc_v.size())}, weight.options());
      std::memcpy(exc_val.data_ptr<scalar_t>(), exc_v.data(), exc_v.size() * sizeof(scalar_t));
    }
  });
  Tensor idx = at::empty({static_cast<int64_t>(exc_idx.size())}, weight.options().dtype(at::kLong));
  if (!exc_idx.empty()) std::memcpy(idx.data_ptr<int64_t>(), exc_idx.data(), exc_idx.size() * sizeof(int64_t));
  // sorted by index (threads append in any order)
  if (idx.numel() > 1) {
    auto [sorted, perm] = idx.sort();
    return {codes, sorted, exc_val.index_select(0, perm)};
  }
  return {codes, idx, exc_val};
}

void unmerge_exact_cpu(Tensor& weight, const Tensor& codes, const Tensor& exc_index, const Tensor& exc_value,
                       const Tensor& lora_A, const Tensor& lora_B, double scale) {
  const char* op = "unmerge_exact_";
  const auto p = prepare(op, weight, lora_A, lora_B, scale);
  const int64_t n = weight.numel();
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.numel() == (n + 3) / 4 &&
                  codes.is_contiguous(),
              "lora_ext::", op, ": expected codes as a contiguous uint8 tensor of ", (n + 3) / 4,
              " bytes (2 bits per weight element), got ", codes.scalar_type(), " of shape ", codes.sizes());
  TORCH_CHECK(exc_index.scalar_type() == at::kLong && exc_index.dim() == 1 && exc_value.dim() == 1 &&
                  exc_value.numel() == exc_index.numel() && exc_value.scalar_type() == weight.scalar_type(),
              "lora_ext::", op, ": expected exc_index (int64 [n]) and exc_value (", weight.scalar_type(),
              " [n]) of the same length, got ", exc_index.scalar_type(), " ", exc_index.sizes(), " and ",
              exc_value.scalar_type(), " ", exc_value.sizes());
  if (n == 0) return;
  const Tensor idx = exc_index.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < idx.numel(); ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < n, "lora_ext::", op, ": exc_index holds ", ip[k], ", outside [0, ", n, ")");
  }
  dispatch_exact(weight.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      scalar_t* w = weight.data_ptr<scalar_t>();
      const uint8_t* c = codes.const_data_ptr<uint8_t>();
      for_rows(p, scale, [&](int64_t i, const float* d) {
        scalar_t* row = w + i * p.dm.s0;
        for (int64_t j = 0; j < p.dm.in; ++j) {
          const int64_t e = i * p.dm.in + j;
          const int code = (c[e / 4] >> (2 * (e % 4))) & 3;
          const scalar_t c0 = base_candidate(row[j * p.dm.s1], d[j]);
          if (code == 0) row[j * p.dm.s1] = c0;
          else if (code == 1) row[j * p.dm.s1] = step(c0, +1);
          else if (code == 2) row[j * p.dm.s1] = step(c0, -1);
        }
      });
      const Tensor vals = exc_value.contiguous();
      const scalar_t* vp = vals.const_data_ptr<scalar_t>();
      for (int64_t k = 0; k < idx.numel(); ++k) {
        const int64_t e = ip[k];
        w[(e / p.dm.in) * p.dm.s0 + (e % p.dm.in) * p.dm.s1] = vp[k];
      }
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
