// CUDA kernels of lora_linear and of the pieces its autograd formula uses:
// the same semantics, outputs and validation as ops/cpu/lora_linear_cpu.cpp.
//
// The GEMMs run through ATen (cuBLAS). The forward is the backend-independent
// ops/common/lora_linear_forward.h (output built in place, no output-sized
// temporaries) over CUDA's mm_rows, chunk_rows and add_scaled_ kernel.
// Dropout: h = dropout(x) A^T comes from a kernel that masks x while reading it
// (dropout_cuda.cu); the backward regenerates the same mask from the seed,
// which is the mask the CPU kernels draw for that seed.
#include <algorithm>
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/lora_linear_forward.h"
#include "ops/common/dropout_rng.h"
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
  const int64_t rows = std::min(N, chunk_rows(k, acc));
  Tensor buf = at::empty({rows, k}, w.options());
  for (int64_t s = 0; s < N; s += rows) {
    const int64_t n = std::min(rows, N - s);
    Tensor bv = buf.narrow(0, 0, n);
    bv.copy_(a2d.narrow(0, s, n));
    Tensor ov = out.narrow(0, s, n);
    at::mm_out(ov, bv, w.t());
  }
  return out;
}

namespace {

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward_lora_cuda(
    const Tensor& grad_y,
    const Tensor& x,
    const Tensor& lora_A,
    const Tensor& lora_B,
    const Tensor& h,
    double scale,
    double dropout_p,
    const optional<Tensor>& seed) {
  const char* op = "_lora_linear_backward_lora";
  detail::check_seed(op, seed, dropout_p);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t in = lora_A.size(1), out = lora_B.size(0), r = lora_A.size(0);
  const auto acc = detail::lora_acc_dtype(lora_A.scalar_type());
  const int64_t N = detail::check_backward_lora_args(op, grad_y, x, lora_A, lora_B, h);
  const Tensor g2d = detail::as_rows(grad_y);
  const Tensor x2d = detail::as_rows(x);
  if (N == 0) {
    return {at::zeros_like(lora_A), at::zeros_like(lora_B), at::empty({0, r}, lora_A.options().dtype(acc))};
  }
  const auto drop = detail::dropout_from_seed(seed, dropout_p);
  const Tensor B_acc = lora_B.to(acc);

  // grad_B = scale * grad_y^T h and grad_h = scale * grad_y B: one pass over
  // grad_y (converted in row chunks when it is not in the accumulation dtype).
  Tensor gB = at::empty({out, r}, B_acc.options());
  Tensor gh = at::empty({N, r}, B_acc.options());
  if (g2d.scalar_type() == acc) {
    at::addmm_out(gB, gB, g2d.t(), h, /*beta=*/0, /*alpha=*/scale);
    at::addmm_out(gh, gh, g2d, B_acc, /*beta=*/0, /*alpha=*/scale);
  } else {
    gB.zero_();
    const int64_t rows = std::min(N, chunk_rows(out, acc));
    Tensor buf = at::empty({rows, out}, B_acc.options());
    for (int64_t s = 0; s < N; s += rows) {
      const int64_t n = std::min(rows, N - s);
      Tensor bv = buf.narrow(0, 0, n);
      bv.copy_(g2d.narrow(0, s, n));
      gB.addmm_(bv.t(), h.narrow(0, s, n), /*beta=*/1, /*alpha=*/scale);
      Tensor gv = gh.narrow(0, s, n);
      at::addmm_out(gv, gv, bv, B_acc, /*beta=*/0, /*alpha=*/scale);
    }
  }

  // grad_A = grad_h^T dropout(x), with x converted / masked in row chunks.
  Tensor gA;
  if (!drop && x2d.scalar_type() == acc) {
    gA = at::mm(gh.t(), x2d);
  } else {
    gA = at::zeros({r, in}, B_acc.options());
    const int64_t rows = std::min(N, chunk_rows(in, acc));
    Tensor buf = at::empty({rows, in}, B_acc.options());
    for (int64_t s = 0; s < N; s += rows) {
      const int64_t n = std::min(rows, N - s);
      Tensor bv = buf.narrow(0, 0, n);
      dropout_rows(bv, x2d.narrow(0, s, n), s, drop);  // convert (+ mask) in one pass
      gA.addmm_(gh.narrow(0, s, n).t(), bv);
    }
  }
  return {gA.to(lora_A.scalar_type()), gB.to(lora_B.scalar_type()), gh};
}

Tensor lora_linear_backward_input_cuda(
    const Tensor& grad_y,
    const Tensor& weight,
    const Tensor& lora_A,
    const Tensor& grad_h,
    double dropout_p,
    const optional<Tensor>& seed) {
  const char* op = "_lora_linear_backward_input";
  detail::check_seed(op, seed, dropout_p);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t in = weight.size(1), out = weight.size(0);
  const int64_t N = detail::check_backward_input_args(op, grad_y, weight, lora_A, grad_h);
  const auto acc = detail::lora_acc_dtype(lora_A.scalar_type());
  const Tensor g2d = detail::as_rows(grad_y);
  const auto shape = detail::with_last(grad_y.sizes(), in);
  if (N == 0) return at::empty(shape, grad_y.options());
  const auto drop = detail::dropout_from_seed(seed, dropout_p);
  const Tensor A_acc = lora_A.to(acc);

  Tensor gx;
  if (grad_y.scalar_type() == acc) {
    // mask/(1-p) * (grad_h A) first (masked in place), then the big GEMM
    // accumulates into it (beta = 1): no extra pass over grad_x.
    gx = at::mm(grad_h, A_acc);
    if (drop) dropout_rows(gx, gx, 0, drop);
    gx.addmm_(g2d, weight);
  } else {
    // half/bf16 grad_x: float32 chunks of grad_h A, masked and rounded once
    // into the base product by one elementwise kernel.
    gx = at::mm(g2d, weight);
    const int64_t rows = std::min(N, chunk_rows(in, acc));
    Tensor buf = at::empty({rows, in}, A_acc.options());
    for (int64_t s = 0; s < N; s += rows) {
      const int64_t n = std::min(rows, N - s);
      Tensor bv = buf.narrow(0, 0, n);
      at::mm_out(bv, grad_h.narrow(0, s, n), A_acc);
      Tensor gv = gx.narrow(0, s, n);
      add_scaled_(gv, bv, 1.0, s, drop);
    }
  }
  return gx.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear", &detail::lora_linear_op<CudaBackend>);
  m.impl("_lora_linear_forward", &detail::lora_linear_forward_op<CudaBackend>);
  m.impl("_lora_linear_backward_input", &lora_linear_backward_input_cuda);
  m.impl("_lora_linear_backward_lora", &lora_linear_backward_lora_cuda);
}

}  // namespace lora_ext::cuda
