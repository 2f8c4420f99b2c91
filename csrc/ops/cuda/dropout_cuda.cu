// CUDA kernels that apply the counter-based dropout mask on the fly:
//  - shrink_kernel: h = dropout(x) @ A^T ([N, r]) reading x once, masking and
//    converting each element as it is loaded; the dropped x is never stored.
//  - dropout_rows_kernel: masked / converted copy of a row chunk (or in place).
//  - add_scaled_kernel: dst += alpha * dropout(src), rounded once into dst.
#include <algorithm>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "ops/cuda/dropout_cuda.h"
#include "ops/cuda/params.h"
#include "ops/cuda/utils.cuh"

namespace lora_ext::cuda {

namespace {

using detail::DropoutParams;

// The dropout factor of element e: 0 if dropped, else 1 / (1 - p) in acc_t
// (float32's factor is the float rounding of 1 / (1 - p), as on the CPU).
template <typename acc_t>
__device__ __forceinline__ acc_t keep_factor(const DropoutParams& d, uint64_t e) {
  const bool keep = detail::dropout_keep(d, e);
  if constexpr (std::is_same_v<acc_t, double>) {
    return keep ? d.scale_d : 0.0;
  } else {
    return keep ? d.scale : 0.0f;
  }
}

// ---------------------------------------------------------------------------
// shrink: one block of kThreads threads per kRows rows of x and per tile of jt
// (a power of two <= kThreads) columns of h. Thread t owns column t % jt and
// the k-slice t / jt (mod kThreads / jt) of every chunk of kThreads inputs;
// the slices are summed in shared memory at the end in a fixed order, so the
// result is deterministic.
// ---------------------------------------------------------------------------
constexpr int kThreads = 256;
constexpr int kRows = 8;

template <typename x_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) shrink_kernel(ShrinkParams p, int jt) {
  __shared__ acc_t xs[kRows * kThreads];  // a chunk of kRows x kThreads masked inputs, then the partial sums
  const x_t* __restrict__ x = static_cast<const x_t*>(p.x);
  const acc_t* __restrict__ at = static_cast<const acc_t*>(p.at);
  acc_t* __restrict__ h = static_cast<acc_t*>(p.h);
  const int t = threadIdx.x;
  const int jl = t & (jt - 1);
  const int ks = t / jt;
  const int ksplit = kThreads / jt;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * jt + jl;
  acc_t acc[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = acc_t(0);

  for (int64_t k0 = 0; k0 < p.in; k0 += kThreads) {
    const int kn = static_cast<int>(std::min<int64_t>(kThreads, p.in - k0));
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t row = row0 + i;
      acc_t v = acc_t(0);
      if (row < p.N && t < kn) {
        const int64_t k = k0 + t;
        v = load_acc<acc_t>(x + row * p.x_s0 + k * p.x_s1);
        if (p.dropout) v = v * keep_factor<acc_t>(p.drop, static_cast<uint64_t>(row) * p.in + k);
      }
      xs[i * kThreads + t] = v;
    }
    __syncthreads();
    if (j < p.r) {
      for (int k = ks; k < kn; k += ksplit) {
        const acc_t a = at[(k0 + k) * p.r + j];
#pragma unroll
        for (int i = 0; i < kRows; ++i) acc[i] += xs[i * kThreads + k] * a;
      }
    }
    __syncthreads();
  }
  // partial sums: xs[(ks * kRows + i) * jt + jl], kThreads * kRows entries in all
#pragma unroll
  for (int i = 0; i < kRows; ++i) xs[(ks * kRows + i) * jt + jl] = acc[i];
  __syncthreads();
  for (int o = t; o < kRows * jt; o += kThreads) {
    const int i = o / jt, jj = o % jt;
    acc_t s = acc_t(0);
    for (int q = 0; q < ksplit; ++q) s += xs[(q * kRows + i) * jt + jj];
    const int64_t row = row0 + i;
    const int64_t col = static_cast<int64_t>(blockIdx.y) * jt + jj;
    if (row < p.N && col < p.r) h[row * p.r + col] = s;
  }
}

// ---------------------------------------------------------------------------
// elementwise kernels over [rows, cols]: threads along cols, blocks stride rows
// ---------------------------------------------------------------------------
constexpr int kEwThreads = 256;

dim3 ew_grid(int64_t rows, int64_t cols) {
  const int64_t gx = std::min<int64_t>(ceil_div(cols, kEwThreads), 1024);
  const int64_t gy = std::min<int64_t>(rows, 65535);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

template <typename src_t, typename acc_t>
__global__ void dropout_rows_kernel(DropoutRowsParams p) {
  const src_t* src = static_cast<const src_t*>(p.src);  // may alias dst
  acc_t* dst = static_cast<acc_t*>(p.dst);
  for (int64_t i = blockIdx.y; i < p.rows; i += gridDim.y) {
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.cols;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      acc_t v = load_acc<acc_t>(src + i * p.s_s0 + j * p.s_s1);
      if (p.dropout) v = v * keep_factor<acc_t>(p.drop, p.e_row0 + static_cast<uint64_t>(i * p.cols + j));
      dst[i * p.cols + j] = v;
    }
  }
}

template <typename dst_t, typename acc_t>
__global__ void add_scaled_kernel(AddScaledParams p) {
  dst_t* dst = static_cast<dst_t*>(p.dst);
  const acc_t* __restrict__ src = static_cast<const acc_t*>(p.src);
  const acc_t alpha = static_cast<acc_t>(p.alpha);
  for (int64_t i = blockIdx.y; i < p.rows; i += gridDim.y) {
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.cols;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      acc_t v = src[i * p.cols + j];
      if (p.dropout) v = v * keep_factor<acc_t>(p.drop, p.e_row0 + static_cast<uint64_t>(i * p.cols + j));
      dst_t* d = dst + i * p.d_s0 + j * p.d_s1;
      *d = from_acc<dst_t>(load_acc<acc_t>(d) + alpha * v);
    }
  }
}

// Whether an (element type, accumulation type) pair is one the ops produce:
// float64 data accumulates in float64, everything else in float32.
template <typename T, typename acc_t>
constexpr bool valid_pair() {
  return std::is_same_v<T, double> == std::is_same_v<acc_t, double>;
}

}  // namespace

at::Tensor dropout_shrink(const at::Tensor& x2d, const at::Tensor& A_acc,
                          const std::optional<detail::DropoutParams>& drop) {
  TORCH_INTERNAL_ASSERT(x2d.dim() == 2 && A_acc.dim() == 2 && x2d.size(1) == A_acc.size(1));
  const int64_t N = x2d.size(0), in = x2d.size(1), r = A_acc.size(0);
  at::Tensor h = at::empty({N, r}, A_acc.options());
  if (N == 0 || r == 0) return h;
  TORCH_CHECK(ceil_div(N, kRows) <= 0x7FFFFFFF, "lora_ext CUDA dropout_shrink: too many rows (", N, ")");
  const at::Tensor At = A_acc.t().contiguous();  // [in, r], small
  ShrinkParams p;
  p.x = x2d.const_data_ptr();
  p.x_s0 = x2d.stride(0);
  p.x_s1 = x2d.stride(1);
  p.at = At.const_data_ptr();
  p.h = h.mutable_data_ptr();
  p.N = N;
  p.in = in;
  p.r = r;
  p.dropout = drop.has_value();
  if (drop) p.drop = *drop;
  int jt = 1;
  while (jt < r && jt < kThreads) jt *= 2;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kRows)), static_cast<unsigned>(ceil_div(r, jt)));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(x2d.scalar_type(), "dropout_shrink", [&](auto xt) {
    using x_t = typename decltype(xt)::type;
    dispatch_acc(A_acc.scalar_type(), "dropout_shrink", [&](auto accty) {
      using acc_t = typename decltype(accty)::type;
      if constexpr (valid_pair<x_t, acc_t>()) {
        shrink_kernel<x_t, acc_t><<<grid, kThreads, 0, stream>>>(p, jt);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        TORCH_INTERNAL_ASSERT(false, "lora_ext CUDA dropout_shrink: unexpected dtypes ", x2d.scalar_type(), ", ",
                              A_acc.scalar_type());
      }
    });
  });
  return h;
}

void dropout_rows(at::Tensor& dst, const at::Tensor& src, int64_t row0,
                  const std::optional<detail::DropoutParams>& drop) {
  TORCH_INTERNAL_ASSERT(dst.is_contiguous() && dst.dim() == 2 && src.dim() == 2 && dst.sizes() == src.sizes());
  const int64_t rows = dst.size(0), cols = dst.size(1);
  if (rows == 0 || cols == 0) return;
  DropoutRowsParams p;
  p.src = src.const_data_ptr();
  p.s_s0 = src.stride(0);
  p.s_s1 = src.stride(1);
  p.dst = dst.mutable_data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.e_row0 = static_cast<uint64_t>(row0) * static_cast<uint64_t>(cols);
  p.dropout = drop.has_value();
  if (drop) p.drop = *drop;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(src.scalar_type(), "dropout_rows", [&](auto st) {
    using src_t = typename decltype(st)::type;
    dispatch_acc(dst.scalar_type(), "dropout_rows", [&](auto dt) {
      using acc_t = typename decltype(dt)::type;
      if constexpr (valid_pair<src_t, acc_t>()) {
        dropout_rows_kernel<src_t, acc_t><<<ew_grid(rows, cols), kEwThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        TORCH_INTERNAL_ASSERT(false, "lora_ext CUDA dropout_rows: unexpected dtypes ", src.scalar_type(), ", ",
                              dst.scalar_type());
      }
    });
  });
}

void add_scaled_(at::Tensor& dst, const at::Tensor& src, double alpha, int64_t row0,
                 const std::optional<detail::DropoutParams>& drop) {
  TORCH_INTERNAL_ASSERT(dst.dim() == 2 && src.dim() == 2 && src.is_contiguous() && dst.sizes() == src.sizes());
  const int64_t rows = dst.size(0), cols = dst.size(1);
  if (rows == 0 || cols == 0) return;
  AddScaledParams p;
  p.dst = dst.mutable_data_ptr();
  p.d_s0 = dst.stride(0);
  p.d_s1 = dst.stride(1);
  p.src = src.const_data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.alpha = alpha;
  p.e_row0 = static_cast<uint64_t>(row0) * static_cast<uint64_t>(cols);
  p.dropout = drop.has_value();
  if (drop) p.drop = *drop;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(dst.scalar_type(), "add_scaled_", [&](auto dty) {
    using dst_t = typename decltype(dty)::type;
    dispatch_acc(src.scalar_type(), "add_scaled_", [&](auto sty) {
      using acc_t = typename decltype(sty)::type;
      if constexpr (valid_pair<dst_t, acc_t>()) {
        add_scaled_kernel<dst_t, acc_t><<<ew_grid(rows, cols), kEwThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        TORCH_INTERNAL_ASSERT(false, "lora_ext CUDA add_scaled_: unexpected dtypes ", dst.scalar_type(), ", ",
                              src.scalar_type());
      }
    });
  });
}

}  // namespace lora_ext::cuda
