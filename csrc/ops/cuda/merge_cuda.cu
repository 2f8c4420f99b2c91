// CUDA kernels of merge_ / unmerge_: W +-= scale * lora_B @ lora_A in place.
//
// One tiled kernel for every dtype: each block owns a kTileM x kTileN tile of W,
// stages the rows of B and columns of A it needs (kTileK ranks at a time) in
// shared memory in the accumulation dtype (float32; float64 for a float64
// weight), computes its tile of Delta W and updates W with one rounding per
// element. No temporary at all: A and B are read in their own dtype
// (float32 on a bfloat16/float16 weight, PEFT's default, or the weight's
// dtype) and layout. W may be any 2-D strided view (e.g. the transposed
// [out, in] view of a GPT-2 Conv1D [in, out] weight): the launcher transposes
// the whole problem when W's row stride is the smaller one, so the threads of
// a warp always walk W's unit-stride dimension.
#include <cmath>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/cuda/params.h"
#include "ops/cuda/utils.cuh"

namespace lora_ext::cuda {

namespace {

constexpr int kTileM = 32;  // rows of W per block
constexpr int kTileN = 64;  // columns of W per block
constexpr int kTileK = 32;  // ranks staged per step
constexpr int kBlockX = 32, kBlockY = 8;
constexpr int kRowsPerThread = kTileM / kBlockY;  // 4
constexpr int kColsPerThread = kTileN / kBlockX;  // 2
constexpr int64_t kMaxGridY = 65535;

template <typename w_t, typename ab_t, typename acc_t>
__global__ void __launch_bounds__(kBlockX* kBlockY) merge_kernel(MergeParams p) {
  __shared__ acc_t Bs[kTileM][kTileK + 1];
  __shared__ acc_t As[kTileK][kTileN];
  w_t* w = static_cast<w_t*>(p.w);
  const ab_t* __restrict__ a = static_cast<const ab_t*>(p.a);
  const ab_t* __restrict__ b = static_cast<const ab_t*>(p.b);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kBlockX + tx;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t row_tiles = ceil_div(p.rows, kTileM);
  const acc_t scale = static_cast<acc_t>(p.scale);

  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t row0 = tile * kTileM;
    acc_t acc[kRowsPerThread][kColsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) acc[i][c] = acc_t(0);
    }
    for (int64_t k0 = 0; k0 < p.r; k0 += kTileK) {
      for (int e = tid; e < kTileM * kTileK; e += kBlockX * kBlockY) {
        const int i = e / kTileK, kk = e % kTileK;
        const int64_t row = row0 + i, k = k0 + kk;
        Bs[i][kk] = (row < p.rows && k < p.r) ? load_acc<acc_t>(b + row * p.b_s0 + k * p.b_s1) : acc_t(0);
      }
      for (int e = tid; e < kTileK * kTileN; e += kBlockX * kBlockY) {
        const int kk = e / kTileN, c = e % kTileN;
        const int64_t col = col0 + c, k = k0 + kk;
        As[kk][c] = (col < p.cols && k < p.r) ? load_acc<acc_t>(a + k * p.a_s0 + col * p.a_s1) : acc_t(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kTileK; ++kk) {
        acc_t av[kColsPerThread];
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) av[c] = As[kk][tx + c * kBlockX];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const acc_t bv = Bs[ty + i * kBlockY][kk];
#pragma unroll
          for (int c = 0; c < kColsPerThread; ++c) acc[i][c] += bv * av[c];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + ty + i * kBlockY;
      if (row >= p.rows) continue;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int64_t col = col0 + tx + c * kBlockX;
        if (col >= p.cols) continue;
        w_t* wp = w + row * p.w_s0 + col * p.w_s1;
        *wp = from_acc<w_t>(load_acc<acc_t>(wp) + scale * acc[i][c]);
      }
    }
  }
}

// Adapter dtypes a weight dtype takes (see detail::check_merge_args).
template <typename w_t, typename ab_t>
constexpr bool valid_merge_pair() {
  constexpr bool w_half = std::is_same_v<w_t, __half> || std::is_same_v<w_t, __nv_bfloat16>;
  constexpr bool ab_half = std::is_same_v<ab_t, __half> || std::is_same_v<ab_t, __nv_bfloat16>;
  if constexpr (w_half) {
    return ab_half || std::is_same_v<ab_t, float>;
  } else {
    return std::is_same_v<w_t, ab_t>;
  }
}

void merge_impl(const char* op, at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  detail::check_merge_args(op, weight, lora_A, lora_B, scale);
  if (weight.numel() == 0) return;
  at::assert_no_internal_overlap(weight);  // every element is read and written by one thread
  const c10::cuda::CUDAGuard guard(weight.device());
  MergeParams p;
  p.w = weight.mutable_data_ptr();
  p.r = lora_A.size(0);
  p.scale = scale;
  if (weight.stride(0) >= weight.stride(1)) {
    p.rows = weight.size(0);
    p.cols = weight.size(1);
    p.w_s0 = weight.stride(0);
    p.w_s1 = weight.stride(1);
    p.a = lora_A.const_data_ptr();
    p.a_s0 = lora_A.stride(0);
    p.a_s1 = lora_A.stride(1);
    p.b = lora_B.const_data_ptr();
    p.b_s0 = lora_B.stride(0);
    p.b_s1 = lora_B.stride(1);
  } else {
    // W^T += scale * A^T B^T: W^T's column stride is the small one.
    p.rows = weight.size(1);
    p.cols = weight.size(0);
    p.w_s0 = weight.stride(1);
    p.w_s1 = weight.stride(0);
    p.a = lora_B.const_data_ptr();  // B^T [r, out]
    p.a_s0 = lora_B.stride(1);
    p.a_s1 = lora_B.stride(0);
    p.b = lora_A.const_data_ptr();  // A^T [in, r]
    p.b_s0 = lora_A.stride(1);
    p.b_s1 = lora_A.stride(0);
  }
  const int64_t gx = ceil_div(p.cols, kTileN);
  TORCH_CHECK(gx <= 0x7FFFFFFF, "lora_ext::", op, ": weight too large for the CUDA kernel (", weight.sizes(), ")");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::min(ceil_div(p.rows, kTileM), kMaxGridY)));
  const dim3 block(kBlockX, kBlockY);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(weight.scalar_type(), op, [&](auto wty) {
    using w_t = typename decltype(wty)::type;
    dispatch_float(lora_A.scalar_type(), op, [&](auto aty) {
      using ab_t = typename decltype(aty)::type;
      if constexpr (valid_merge_pair<w_t, ab_t>()) {
        using acc_t = std::conditional_t<std::is_same_v<w_t, double>, double, float>;
        merge_kernel<w_t, ab_t, acc_t><<<grid, block, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        TORCH_INTERNAL_ASSERT(false, "lora_ext::", op, ": unexpected dtypes ", weight.scalar_type(), ", ",
                              lora_A.scalar_type());
      }
    });
  });
}

void merge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  merge_impl("merge_", weight, lora_A, lora_B, scale);
}

void unmerge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  merge_impl("unmerge_", weight, lora_A, lora_B, -scale);
}

}  // namespace

// merge_exact_codes / merge_exact_ / unmerge_exact_ stay CPU-only: on CUDA
// tensors the dispatcher reports that they have no CUDA kernel.
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("merge_", &merge_cuda);
  m.impl("unmerge_", &unmerge_cuda);
}

}  // namespace lora_ext::cuda
