// CUDA kernels of lora_linear and of the pieces its autograd formula uses:
// the same semantics, outputs and validation as ops/cpu/lora_linear_cpu.cpp.
//
// The forward and the backward pieces are the backend-independent
// ops/common/lora_linear_forward.h (output built in place, no output-sized
// temporaries) and ops/common/lora_linear_backward.h over CudaBackend
// (cuda_backend.h). The GEMMs run through ATen (cuBLAS). The CUDA primitives
// here: chunk_rows, mm_rows and grad_B_h (scale as cuBLAS' alpha). Dropout:
// h = dropout(x) A^T comes from a kernel that masks x while reading it
// (dropout_cuda.cu); the backward regenerates the same mask from the seed,
// which is the mask the CPU kernels draw for that seed.
#include <algorithm>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/dropout_rng.h"
#include "ops/common/lora_linear_backward.h"
#include "ops/common/lora_linear_forward.h"
#include "ops/common/op_utils.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/dropout_cuda.h"

namespace lora_ext::cuda {

using at::Tensor;
using std::optional;

int64_t chunk_rows(int64_t cols, at::ScalarType t) {
  const int64_t row_bytes = std::max<int64_t>(1, cols) * static_cast<int64_t>(c10::elementSize(t));
  return std::max<int64_t>(1, kChunkBytes / row_bytes);
}

// a2d [N, k] (any float dtype) @ w [m, k]^T -> [N, m] in w's dtype (float32 /
// float64). With dropout the masking shrink kernel; a2d in w's dtype: one
// GEMM; otherwise rows converted in bounded chunks, one GEMM per chunk.
Tensor mm_rows(const Tensor& a2d, const Tensor& w, const optional<detail::DropoutParams>& drop) {
  const auto acc = w.scalar_type();
  const int64_t N = a2d.size(0), k = a2d.size(1);
  if (drop) return dropout_shrink(a2d, w, drop);
  if (a2d.scalar_type() == acc) return at::mm(a2d, w.t());
  Tensor out = at::empty({N, w.size(0)}, w.options());
  if (N == 0) return out;
  detail::for_row_chunks(N, chunk_rows(k, acc), k, w.options(), [&](int64_t s, int64_t n, Tensor& bv) {
    bv.copy_(a2d.narrow(0, s, n));
    Tensor ov = out.narrow(0, s, n);
    at::mm_out(ov, bv, w.t());
  });
  return out;
}

std::tuple<Tensor, Tensor> grad_B_h(const Tensor& g2d, const Tensor& h, const Tensor& B, double scale) {
  const auto acc = B.scalar_type();
  const int64_t N = g2d.size(0), out = B.size(0), r = B.size(1);
  Tensor gB = at::empty({out, r}, B.options());
  Tensor gh = at::empty({N, r}, B.options());
  if (g2d.scalar_type() == acc) {
    at::addmm_out(gB, gB, g2d.t(), h, /*beta=*/0, /*alpha=*/scale);
    at::addmm_out(gh, gh, g2d, B, /*beta=*/0, /*alpha=*/scale);
  } else {
    gB.zero_();
    detail::for_row_chunks(N, chunk_rows(out, acc), out, B.options(), [&](int64_t s, int64_t n, Tensor& bv) {
      bv.copy_(g2d.narrow(0, s, n));
      gB.addmm_(bv.t(), h.narrow(0, s, n), /*beta=*/1, /*alpha=*/scale);
      Tensor gv = gh.narrow(0, s, n);
      at::addmm_out(gv, gv, bv, B, /*beta=*/0, /*alpha=*/scale);
    });
  }
  return {gB, gh};
}

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear", &detail::lora_linear_op<CudaBackend>);
  m.impl("_lora_linear_forward", &detail::lora_linear_forward_op<CudaBackend>);
  m.impl("_lora_linear_backward_input", &detail::lora_linear_backward_input_op<CudaBackend>);
  m.impl("_lora_linear_backward_lora", &detail::lora_linear_backward_lora_op<CudaBackend>);
}

}  // namespace lora_ext::cuda
