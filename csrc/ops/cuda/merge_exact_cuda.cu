// CUDA kernels of the exact (bit-for-bit reversible) merge: merge_exact_codes,
// merge_exact_, unmerge_exact_.
//
// The same bits as the CPU kernels (merge_exact_cpu.cpp), so codes made on one
// device unmerge on the other: Delta W is recomputed per element in float32
// with explicitly rounded multiplies and adds (__fmul_rn / __fadd_rn, never
// contracted into an FMA) in k order, and the element rule (merged value,
// 2-bit codes, the sparse list) is ops/common/exact_merge.h, shared with the
// CPU. One thread owns four consecutive flat elements, i.e. one byte of codes,
// so codes are written without atomics. The sparse list of merge_exact_codes
// is collected with an atomic counter into a buffer sized for the usual rare
// exceptions (rerun with the exact size if it overflows), then sorted.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/exact_merge_dispatch.h"
#include "ops/cuda/params.h"
#include "ops/cuda/utils.cuh"

namespace lora_ext::cuda {

namespace {

namespace ex = detail::exact;
using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

enum class Mode { kMerge, kCodes, kUnmerge };

__device__ __forceinline__ float exact_delta(const ExactMergeParams& p, int64_t i, int64_t j) {
  const float* b = p.b + i * p.r;
  const float* a = p.a + j;
  float acc = 0.0f;
  for (int64_t k = 0; k < p.r; ++k) acc = __fadd_rn(acc, __fmul_rn(b[k], a[k * p.cols]));
  return __fmul_rn(acc, p.scale);
}

template <typename Fmt, Mode mode>
__global__ void __launch_bounds__(kThreads) exact_merge_kernel(ExactMergeParams p) {
  using U = typename Fmt::U;
  U* w = static_cast<U*>(p.w);
  const int64_t n = p.rows * p.cols;
  const int64_t nbytes = (n + 3) / 4;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < nbytes;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t e = 4 * t;
    int64_t i = e / p.cols, j = e - i * p.cols;
    const uint8_t in_byte = mode == Mode::kUnmerge ? p.codes[t] : 0;
    uint8_t out_byte = 0;
    for (int q = 0; q < 4 && e < n; ++q, ++e) {
      U* wp = w + i * p.w_s0 + j * p.w_s1;
      const float d = exact_delta(p, i, j);
      if constexpr (mode == Mode::kMerge) {
        *wp = ex::merged<Fmt>(*wp, d);
      } else if constexpr (mode == Mode::kUnmerge) {
        *wp = ex::decode<Fmt>(*wp, d, (in_byte >> (2 * q)) & 3);
      } else {
        const U w0 = *wp;
        const uint8_t code = ex::encode<Fmt>(w0, d);
        out_byte |= static_cast<uint8_t>(code << (2 * q));
        if (code == 3) {
          const unsigned long long slot = atomicAdd(p.count, 1ull);
          if (slot < static_cast<unsigned long long>(p.capacity)) {
            p.exc_index[slot] = e;
            static_cast<U*>(p.exc_value)[slot] = w0;
          }
        }
      }
      if (++j == p.cols) {
        j = 0;
        ++i;
      }
    }
    if constexpr (mode == Mode::kCodes) p.codes[t] = out_byte;
  }
}

// unmerge_exact_: W[e] = exc_value[k] for e = exc_index[k] (after the decode kernel).
template <typename Fmt>
__global__ void __launch_bounds__(kThreads) exact_scatter_kernel(ExactMergeParams p) {
  using U = typename Fmt::U;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < p.capacity;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = p.exc_index[k];
    const int64_t i = e / p.cols, j = e - i * p.cols;
    static_cast<U*>(p.w)[i * p.w_s0 + j * p.w_s1] = static_cast<const U*>(p.exc_value)[k];
  }
}

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(items, kThreads), kMaxBlocks)));
}

// The parameters every exact kernel shares; A32/B32 keep the float32 copies alive.
struct Prepared {
  Tensor A32, B32;
  ExactMergeParams p;
};

Prepared prepare(Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  Prepared pr;
  pr.A32 = lora_A.to(at::kFloat).contiguous();
  pr.B32 = lora_B.to(at::kFloat).contiguous();
  auto& p = pr.p;
  p.w = weight.data_ptr();
  p.w_s0 = weight.stride(0);
  p.w_s1 = weight.stride(1);
  p.a = pr.A32.const_data_ptr<float>();
  p.b = pr.B32.const_data_ptr<float>();
  p.rows = weight.size(0);
  p.cols = weight.size(1);
  p.r = lora_A.size(0);
  p.scale = static_cast<float>(scale);  // as the CPU kernel rounds it
  return pr;
}

template <Mode mode>
void launch(const at::ScalarType dtype, const ExactMergeParams& p) {
  const unsigned grid = grid_for((p.rows * p.cols + 3) / 4);
  auto stream = at::cuda::getCurrentCUDAStream();
  ex::dispatch_format(dtype, [&](auto fmt) {
    exact_merge_kernel<decltype(fmt), mode><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void merge_exact_cuda(Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  detail::check_merge_exact_args("merge_exact_", weight, lora_A, lora_B, scale);
  if (weight.numel() == 0) return;
  at::assert_no_internal_overlap(weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto pr = prepare(weight, lora_A, lora_B, scale);
  launch<Mode::kMerge>(weight.scalar_type(), pr.p);
}

std::tuple<Tensor, Tensor, Tensor> merge_exact_codes_cuda(const Tensor& weight, const Tensor& lora_A,
                                                          const Tensor& lora_B, double scale) {
  detail::check_merge_exact_args("merge_exact_codes", weight, lora_A, lora_B, scale);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n = weight.numel();
  Tensor codes = at::empty({(n + 3) / 4}, weight.options().dtype(at::kByte));
  if (n == 0) return {codes, at::empty({0}, weight.options().dtype(at::kLong)), at::empty({0}, weight.options())};
  Tensor w = weight;  // read only: the codes kernel never writes W
  auto pr = prepare(w, lora_A, lora_B, scale);
  auto& p = pr.p;
  p.codes = codes.data_ptr<uint8_t>();
  Tensor count = at::zeros({1}, weight.options().dtype(at::kLong));
  p.count = reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>());
  // Usually far fewer than 1 in 256 elements need the list; rerun once with the
  // exact size when they do not fit.
  int64_t capacity = std::max<int64_t>(256, n / 256);
  Tensor idx, val;
  int64_t found = 0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    idx = at::empty({capacity}, weight.options().dtype(at::kLong));
    val = at::empty({capacity}, weight.options());
    p.exc_index = idx.data_ptr<int64_t>();
    p.exc_value = val.data_ptr();
    p.capacity = capacity;
    launch<Mode::kCodes>(weight.scalar_type(), p);
    found = count.item<int64_t>();  // the list's length decides the output shape: one sync
    if (found <= capacity) break;
    TORCH_INTERNAL_ASSERT(attempt == 0, "lora_ext::merge_exact_codes: the sparse list overflowed twice");
    capacity = found;
    count.zero_();
  }
  idx = idx.narrow(0, 0, found);
  val = val.narrow(0, 0, found);
  if (found > 1) {  // sorted by index (threads append in any order)
    auto [sorted, perm] = idx.sort();
    return {codes, sorted, val.index_select(0, perm)};
  }
  return {codes, idx.clone(), val.clone()};
}

void unmerge_exact_cuda(Tensor& weight, const Tensor& codes, const Tensor& exc_index, const Tensor& exc_value,
                        const Tensor& lora_A, const Tensor& lora_B, double scale) {
  const char* op = "unmerge_exact_";
  detail::check_unmerge_exact_args(op, weight, codes, exc_index, exc_value, lora_A, lora_B, scale);
  const int64_t n = weight.numel();
  if (n == 0) return;
  at::assert_no_internal_overlap(weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor idx = exc_index.contiguous();
  const Tensor vals = exc_value.contiguous();
  if (idx.numel() > 0) {  // validated before anything is written (one sync)
    const Tensor bad = at::logical_or(idx < 0, idx >= n);
    if (bad.any().item<bool>()) {
      const int64_t v = idx.masked_select(bad)[0].item<int64_t>();
      TORCH_CHECK(false, "lora_ext::", op, ": exc_index holds ", v, ", outside [0, ", n, ")");
    }
  }
  auto pr = prepare(weight, lora_A, lora_B, scale);
  auto& p = pr.p;
  p.codes = const_cast<uint8_t*>(codes.const_data_ptr<uint8_t>());  // read only in this mode
  launch<Mode::kUnmerge>(weight.scalar_type(), p);
  if (idx.numel() == 0) return;
  p.exc_index = const_cast<int64_t*>(idx.const_data_ptr<int64_t>());  // read only in the scatter
  p.exc_value = const_cast<void*>(vals.const_data_ptr());
  p.capacity = idx.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  ex::dispatch_format(weight.scalar_type(), [&](auto fmt) {
    exact_scatter_kernel<decltype(fmt)><<<grid_for(p.capacity), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("merge_exact_codes", &merge_exact_codes_cuda);
  m.impl("merge_exact_", &merge_exact_cuda);
  m.impl("unmerge_exact_", &unmerge_exact_cuda);
}

}  // namespace lora_ext::cuda
