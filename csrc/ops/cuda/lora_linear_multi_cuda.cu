// CUDA kernels of the multi-adapter ops: lora_group_rows, lora_linear_multi and
// the pieces of its autograd formula (same schemas and results as the CPU file).
// The entry points (checks, grouping, seed, empty batches, result dtypes) are
// ops/common/lora_linear_multi.h over CudaMulti at the end of this file.
//
// Rows are visited in grouped order (order[pos], adapter of pos from offsets),
// so consecutive thread blocks work on the same adapter and its A/B stay in
// L2. Three generic kernels, any in/out size, any rank, fp32 accumulation for
// half/bf16 (fp64 for fp64), the [N, r_max] intermediate in the accumulation
// dtype:
//   shrink: out[row, k] = s * sum_j mask(x)[row, j] * W[a, k, j]     (h = x A^T; grad_h = s g B)
//   expand: y[row, d]  += mask(s * sum_k h[row, k] * W[a, d, k])     (y += s h B^T; grad_x += mask(grad_h A))
//   outer:  G[a, d, k]  = s * sum_{rows of a} mask(g)[row, d] * h[row, k]   (grad_B, grad_A)
// The dense base products go through ATen (cuBLAS). Host and device meet in the
// plain parameter structs of params.h (Multi*Params, GroupingParams); every
// launch uses the input's device, the current stream and a launch check; empty
// inputs return early.
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>

#include "ops/common/checks.h"
#include "ops/common/dropout_rng.h"
#include "ops/common/lora_linear_multi.h"
#include "ops/common/lora_linear_multi_quantized.h"
#include "ops/common/op_utils.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/params.h"
#include "ops/cuda/utils.cuh"
#include "ops/cuda/validated_inputs.h"

namespace lora_ext::cuda_multi {

using at::Tensor;
using cuda::ceil_div;
using cuda::from_acc;
using cuda::GroupingParams;
using cuda::load_acc;
using cuda::MultiExpandParams;
using cuda::MultiOuterParams;
using cuda::MultiShrinkParams;
using cuda::ValidatedInputs;
using std::optional;

constexpr int kThreads = 256;
constexpr int kRankChunk = 8;  // ranks per block in shrink / outer

// ---------------------------------------------------------------- kernels
template <typename acc_t>
__device__ acc_t keep_scale(const detail::DropoutParams& d, uint64_t e) {
  return detail::dropout_keep(d, e) ? static_cast<acc_t>(d.scale_d) : acc_t(0);
}

template <typename T, typename acc_t>
__global__ void multi_shrink_kernel(MultiShrinkParams p, GroupingParams g) {
  const T* x = static_cast<const T*>(p.x);
  const acc_t* w = static_cast<const acc_t*>(p.w);
  const acc_t* scales = static_cast<const acc_t*>(p.scales);
  const int64_t pos = blockIdx.x;
  const int64_t a = g.pos_adapter[pos];
  if (a >= g.n) return;  // base row: stays 0
  const int64_t row = g.order[pos];
  if (row < 0 || row >= g.rows) return;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kRankChunk;
  const int kc = static_cast<int>(p.R - k0 < kRankChunk ? p.R - k0 : kRankChunk);
  acc_t acc[kRankChunk];
#pragma unroll
  for (int c = 0; c < kRankChunk; ++c) acc[c] = acc_t(0);
  const T* xr = x + row * p.x_s0;
  const acc_t* wa = w + a * p.w_s0 + k0 * p.w_s1;
  for (int64_t j = threadIdx.x; j < p.K; j += blockDim.x) {
    acc_t v = load_acc<acc_t>(xr + j * p.x_s1);
    if (p.dropout) v *= keep_scale<acc_t>(p.drop, static_cast<uint64_t>(row) * p.K + j);
#pragma unroll
    for (int c = 0; c < kRankChunk; ++c) {
      if (c < kc) acc[c] += v * wa[c * p.w_s1 + j * p.w_s2];
    }
  }
  __shared__ acc_t red[kRankChunk][kThreads];
#pragma unroll
  for (int c = 0; c < kRankChunk; ++c) red[c][threadIdx.x] = acc[c];
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
#pragma unroll
      for (int c = 0; c < kRankChunk; ++c) red[c][threadIdx.x] += red[c][threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x < kc) {
    const acc_t s = scales ? scales[a] : acc_t(1);
    static_cast<acc_t*>(p.out)[row * p.R + k0 + threadIdx.x] = red[threadIdx.x][0] * s;
  }
}

template <typename T, typename acc_t>
__global__ void multi_expand_kernel(MultiExpandParams p, GroupingParams g) {
  const acc_t* h = static_cast<const acc_t*>(p.h);
  const acc_t* w = static_cast<const acc_t*>(p.w);
  const acc_t* scales = static_cast<const acc_t*>(p.scales);
  extern __shared__ unsigned char smem[];
  acc_t* hs = reinterpret_cast<acc_t*>(smem);
  const int64_t pos = blockIdx.x;
  const int64_t a = g.pos_adapter[pos];
  if (a >= g.n) return;  // base row: nothing to add
  const int64_t row = g.order[pos];
  if (row < 0 || row >= g.rows) return;
  for (int64_t k = threadIdx.x; k < p.R; k += blockDim.x) hs[k] = h[row * p.R + k];
  __syncthreads();
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= p.D) return;
  const acc_t* wa = w + a * p.w_s0 + d * p.w_s1;
  acc_t acc = 0;
  for (int64_t k = 0; k < p.R; ++k) acc += hs[k] * wa[k * p.w_s2];
  if (scales) acc *= scales[a];
  if (p.dropout) acc *= keep_scale<acc_t>(p.drop, static_cast<uint64_t>(row) * p.D + d);
  T* out = static_cast<T*>(p.y) + row * p.y_s0 + d * p.y_s1;
  *out = from_acc<T>(load_acc<acc_t>(out) + acc);
}

template <typename T, typename acc_t>
__global__ void multi_outer_kernel(MultiOuterParams p, GroupingParams g) {
  const T* gm = static_cast<const T*>(p.g);
  const acc_t* h = static_cast<const acc_t*>(p.h);
  const acc_t* scales = static_cast<const acc_t*>(p.scales);
  const int64_t a = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kRankChunk;
  const int kc = static_cast<int>(p.R - k0 < kRankChunk ? p.R - k0 : kRankChunk);
  if (d >= p.D) return;
  acc_t acc[kRankChunk];
#pragma unroll
  for (int c = 0; c < kRankChunk; ++c) acc[c] = acc_t(0);
  const int64_t q0 = max(int64_t(0), g.offsets[a]), q1 = min(g.rows, g.offsets[a + 1]);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t row = g.order[q];
    if (row < 0 || row >= g.rows) continue;
    acc_t v = load_acc<acc_t>(gm + row * p.g_s0 + d * p.g_s1);
    if (p.dropout) v *= keep_scale<acc_t>(p.drop, static_cast<uint64_t>(row) * p.D + d);
    const acc_t* hr = h + row * p.R + k0;
#pragma unroll
    for (int c = 0; c < kRankChunk; ++c) {
      if (c < kc) acc[c] += v * hr[c];
    }
  }
  const acc_t s = scales ? scales[a] : acc_t(1);
  acc_t* o = static_cast<acc_t*>(p.out) + (a * p.D + d) * p.R + k0;
  for (int c = 0; c < kc; ++c) o[c] = acc[c] * s;
}

// ---------------------------------------------------------------- host helpers
struct DeviceGroups {
  Tensor order, pos_adapter, offsets;
  GroupingParams view(int64_t n) const {
    return {order.const_data_ptr<int64_t>(), pos_adapter.const_data_ptr<int32_t>(), offsets.const_data_ptr<int64_t>(),
            n, order.size(0)};
  }
};

DeviceGroups device_groups(const Tensor& order, const Tensor& offsets, int64_t N, int64_t n) {
  DeviceGroups g;
  g.order = order.contiguous();
  g.offsets = offsets.contiguous();
  // adapter of each grouped position: offsets[a] <= pos < offsets[a + 1]. A binary
  // search (no sync), clamped to [0, n] so that any offsets give in-range adapters.
  const Tensor pos = at::arange(N, g.offsets.options());
  g.pos_adapter = at::searchsorted(g.offsets, pos, /*out_int32=*/true, /*right=*/true).sub_(1).clamp_(0, n);
  return g;
}

// The launchers take T, the CUDA element type of x / y / g, and acc_t, the
// accumulation type (float, or double for float64), from dispatch_elem.
template <typename T, typename acc_t>
void shrink(Tensor& out, const Tensor& x2d, const Tensor& w, int64_t ws0, int64_t ws1, int64_t ws2,
            const optional<Tensor>& scales, const std::optional<detail::DropoutParams>& drop, const DeviceGroups& g,
            int64_t n) {
  const int64_t N = x2d.size(0), R = out.size(1);
  if (N == 0 || R == 0) return;
  MultiShrinkParams p;
  p.x = x2d.const_data_ptr();
  p.x_s0 = x2d.stride(0);
  p.x_s1 = x2d.stride(1);
  p.w = w.const_data_ptr();
  p.w_s0 = ws0;
  p.w_s1 = ws1;
  p.w_s2 = ws2;
  p.scales = scales ? scales->const_data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.K = x2d.size(1);
  p.R = R;
  p.dropout = drop.has_value();
  p.drop = drop.value_or(detail::DropoutParams{});
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(ceil_div(R, kRankChunk)));
  multi_shrink_kernel<T, acc_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p, g.view(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename acc_t>
void expand(Tensor& y2d, const Tensor& h, const Tensor& w, int64_t ws0, int64_t ws1, int64_t ws2,
            const optional<Tensor>& scales, const std::optional<detail::DropoutParams>& drop, const DeviceGroups& g,
            int64_t n) {
  const int64_t N = y2d.size(0), D = y2d.size(1), R = h.size(1);
  if (N == 0 || D == 0) return;
  MultiExpandParams p;
  p.h = h.const_data_ptr();
  p.w = w.const_data_ptr();
  p.w_s0 = ws0;
  p.w_s1 = ws1;
  p.w_s2 = ws2;
  p.scales = scales ? scales->const_data_ptr() : nullptr;
  p.y = y2d.data_ptr();
  p.y_s0 = y2d.stride(0);
  p.y_s1 = y2d.stride(1);
  p.D = D;
  p.R = R;
  p.dropout = drop.has_value();
  p.drop = drop.value_or(detail::DropoutParams{});
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(ceil_div(D, kThreads)));
  multi_expand_kernel<T, acc_t><<<grid, kThreads, R * sizeof(acc_t), at::cuda::getCurrentCUDAStream()>>>(p, g.view(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename acc_t>
Tensor outer(const Tensor& g2d, const Tensor& h, const optional<Tensor>& scales,
             const std::optional<detail::DropoutParams>& drop, const DeviceGroups& g, int64_t n) {
  const int64_t D = g2d.size(1), R = h.size(1);
  Tensor out = at::zeros({n, D, R}, h.options());
  if (n == 0 || D == 0 || g2d.size(0) == 0) return out;
  MultiOuterParams p;
  p.g = g2d.const_data_ptr();
  p.g_s0 = g2d.stride(0);
  p.g_s1 = g2d.stride(1);
  p.h = h.const_data_ptr();
  p.scales = scales ? scales->const_data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.D = D;
  p.R = R;
  p.dropout = drop.has_value();
  p.drop = drop.value_or(detail::DropoutParams{});
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(ceil_div(D, kThreads)),
                  static_cast<unsigned>(ceil_div(R, kRankChunk)));
  multi_outer_kernel<T, acc_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p, g.view(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Calls f(type_identity<T>{}, type_identity<acc_t>{}) for x's dtype: T the CUDA
// element type (utils.cuh), acc_t float (double for float64).
template <typename F>
void dispatch_elem(at::ScalarType t, const char* what, F&& f) {
  cuda::dispatch_float(t, what, [&](auto ty) {
    using T = typename decltype(ty)::type;
    using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
    f(ty, std::type_identity<acc_t>{});
  });
}

// ---------------------------------------------------------------- ops
// The CUDA part of ops/common/lora_linear_multi.h.
struct CudaMulti {
  using Guard = c10::cuda::CUDAGuard;
  using Groups = DeviceGroups;

  // A stable sort of the slots (the base rows' slot n last) and a bincount, on the device.
  static std::tuple<Tensor, Tensor> group_rows(const Tensor& ids, int64_t n) {
    const char* op = "lora_group_rows";
    const Tensor ids64 = ids.to(at::kLong);
    if (ids.numel() > 0) {
      const auto [mn, mx] = at::aminmax(ids64);
      const Tensor range = at::stack({mn, mx}).cpu();  // one sync
      const auto lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
      TORCH_CHECK_INDEX(lo >= -1 && hi < n, "lora_ext::", op, ": expected adapter ids in [-1, ", n,
                        ") (-1 = base only; n_adapters = ", n, "), got values in [", lo, ", ", hi, "]");
    }
    const Tensor slot = at::where(ids64 < 0, at::full_like(ids64, n), ids64);
    const Tensor order = std::get<1>(at::sort(slot, /*stable=*/true, 0, false));
    const Tensor counts = at::bincount(slot, {}, n + 1);
    const Tensor offsets = at::cat({at::zeros({1}, counts.options()), at::cumsum(counts, 0)});
    return {order, offsets};
  }

  // The value checks read device data on the host (a sync), which a CUDA graph capture forbids: they
  // run eagerly and are skipped while capturing. Each distinct (ids, order, offsets) and scales tensor
  // is checked once, not per call (every layer of a model gets the same grouping for one batch).
  static bool capturing() { return at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None; }

  // The CPU's check (same messages) on one host copy of the three small int64 vectors (one sync).
  static void check_grouping(const char* op, const Tensor& ids, const Tensor& order, const Tensor& offsets, int64_t n) {
    static ValidatedInputs checked(1024);
    if (capturing() || checked.contains({ids, order, offsets})) return;
    const int64_t N = ids.size(0);
    const Tensor host = at::cat({ids.to(at::kLong), order.to(at::kLong), offsets.to(at::kLong)}).cpu();
    detail::check_grouping_values(op, host.narrow(0, 0, N), host.narrow(0, N, order.size(0)),
                                  host.narrow(0, N + order.size(0), offsets.size(0)), n);
    checked.insert({ids, order, offsets});
  }

  static void check_scales(const char* op, const Tensor& scales, at::ScalarType adapter_dtype) {
    static ValidatedInputs checked(1 << 14);
    if (capturing() || checked.contains({scales})) return;
    detail::check_finite_scales(op, scales.cpu(), adapter_dtype);
    checked.insert({scales});
  }

  static Groups groups(const Tensor& order, const Tensor& offsets, int64_t N, int64_t n) {
    return device_groups(order, offsets, N, n);
  }

  // The base GEMM through ATen, then h = mask(x) A[a]^T (shrink) and y += s h B[a]^T (expand).
  // The base product is base's (DenseBase: cuBLAS; QuantizedBase: dequantized tiles and cuBLAS).
  template <typename Base>
  static Tensor forward(const char* op, const Tensor& x2d, const Base& base, const optional<Tensor>& bias,
                        const Tensor& lora_A, const Tensor& lora_B, const Tensor& scales, const Groups& g,
                        const optional<detail::DropoutParams>& drop, Tensor& h) {
    const int64_t n = lora_A.size(0);
    const auto acc = h.scalar_type();
    Tensor y = at::empty({x2d.size(0), base.out_features()}, x2d.options());
    base.assign(y, bias, x2d);
    const Tensor A = lora_A.to(acc), B = lora_B.to(acc);
    const optional<Tensor> s = scales.to(acc).contiguous();
    dispatch_elem(x2d.scalar_type(), op, [&](auto ty, auto acc_ty) {
      using T = typename decltype(ty)::type;
      using acc_t = typename decltype(acc_ty)::type;
      shrink<T, acc_t>(h, x2d, A, A.stride(0), A.stride(1), A.stride(2), std::nullopt, drop, g, n);
      expand<T, acc_t>(y, h, B, B.stride(0), B.stride(1), B.stride(2), s, std::nullopt, g, n);
    });
    return y;
  }

  static std::tuple<Tensor, Tensor, Tensor> backward_lora(const char* op, const Tensor& g2d, const Tensor& x2d,
                                                          const Tensor& lora_A, const Tensor& B, const Tensor& scales,
                                                          const Groups& g, const Tensor& h,
                                                          const optional<detail::DropoutParams>& drop) {
    const int64_t n = lora_A.size(0), r = lora_A.size(1), N = g2d.size(0);
    const optional<Tensor> s = scales.to(B.scalar_type()).contiguous();
    const Tensor hc = h.contiguous();
    Tensor gh = at::zeros({N, r}, h.options());
    Tensor gA, gB;
    dispatch_elem(x2d.scalar_type(), op, [&](auto ty, auto acc_ty) {
      using T = typename decltype(ty)::type;
      using acc_t = typename decltype(acc_ty)::type;
      // grad_h[row, k] = s_a sum_o g[row, o] B[a, o, k]: B read as [n, r, out]
      shrink<T, acc_t>(gh, g2d, B, B.stride(0), B.stride(2), B.stride(1), s, std::nullopt, g, n);
      gB = outer<T, acc_t>(g2d, hc, s, std::nullopt, g, n);                     // [n, out, r]
      gA = outer<T, acc_t>(x2d, gh, std::nullopt, drop, g, n).transpose(1, 2);  // [n, in, r] -> [n, r, in]
    });
    return {gA.contiguous(), gB, gh};
  }

  template <typename Base>
  static Tensor backward_input(const char* op, const Tensor& g2d, const Base& base, const Tensor& A,
                               const Tensor& grad_h, const Groups& g, const optional<detail::DropoutParams>& drop) {
    const int64_t n = A.size(0);
    Tensor gx = at::empty({g2d.size(0), base.in_features()}, g2d.options());
    base.accumulate_t(gx, g2d, /*assign=*/true);
    const Tensor ghc = grad_h.contiguous();
    dispatch_elem(g2d.scalar_type(), op, [&](auto ty, auto acc_ty) {
      using T = typename decltype(ty)::type;
      using acc_t = typename decltype(acc_ty)::type;
      // grad_x[row, j] += mask(sum_k grad_h[row, k] A[a, k, j]): A read as [n, in, r]
      expand<T, acc_t>(gx, ghc, A, A.stride(0), A.stride(2), A.stride(1), std::nullopt, drop, g, n);
    });
    return gx;
  }
};

}  // namespace lora_ext::cuda_multi

namespace lora_ext {
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_group_rows", &detail::lora_group_rows_op<cuda_multi::CudaMulti>);
  m.impl("lora_linear_multi", &detail::lora_linear_multi_op<cuda_multi::CudaMulti>);
  m.impl("_lora_linear_multi_forward", &detail::lora_linear_multi_forward_op<cuda_multi::CudaMulti>);
  m.impl("_lora_linear_multi_backward_lora", &detail::lora_linear_multi_backward_lora_op<cuda_multi::CudaMulti>);
  m.impl("_lora_linear_multi_backward_input", &detail::lora_linear_multi_backward_input_op<cuda_multi::CudaMulti>);
  m.impl("lora_linear_multi_quantized",
         &detail::lora_linear_multi_quantized_op<cuda_multi::CudaMulti, cuda::CudaBackend>);
  m.impl("_lora_linear_multi_quantized_forward",
         &detail::lora_linear_multi_quantized_forward_op<cuda_multi::CudaMulti, cuda::CudaBackend>);
  m.impl("_lora_linear_multi_quantized_backward_input",
         &detail::lora_linear_multi_quantized_backward_input_op<cuda_multi::CudaMulti, cuda::CudaBackend>);
}
}  // namespace lora_ext
