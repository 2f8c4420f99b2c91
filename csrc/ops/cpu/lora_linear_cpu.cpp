// CPU kernels of lora_linear and of the pieces its autograd formula uses.
//
// The forward is the backend-independent ops/common/lora_linear_forward.h over
// the CPU's mm_rows (skinny AVX2 row dots, dropout applied to bounded row
// chunks), chunk_rows and add_scaled_. Precision: the LoRA branch accumulates
// in the adapter's dtype, or in float32 when the adapter is bfloat16/float16
// (the [N, r] intermediate h is then float32 too).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/lora_linear_forward.h"
#include "ops/common/op_utils.h"
#include "ops/cpu/chunking.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/dropout_cpu.h"
#include "ops/cpu/skinny_gemm.h"

namespace lora_ext::cpu {

using at::Tensor;
using std::optional;

void rowdot_into(Tensor& out, const Tensor& a, const Tensor& w) {
  if (!skinny_rowdot(out, a, w)) at::mm_out(out, a, w.t());
}

Tensor mm_rows(const Tensor& a2d, const Tensor& w_, const optional<detail::DropoutParams>& drop) {
  const auto acc = w_.scalar_type();
  const Tensor w = w_.contiguous();
  const int64_t N = a2d.size(0), k = a2d.size(1);
  Tensor out = at::empty({N, w.size(0)}, w.options());
  if (N == 0) return out;
  if (!drop && a2d.scalar_type() == acc) {
    rowdot_into(out, a2d, w);
    return out;
  }
  const int64_t rows = std::min(N, chunk_rows(k, acc));
  Tensor buf = at::empty({rows, k}, w.options());
  for (int64_t s = 0; s < N; s += rows) {
    const int64_t n = std::min(rows, N - s);
    Tensor bv = buf.narrow(0, 0, n);
    if (drop) {
      dropout_rows(bv, a2d.narrow(0, s, n), s, *drop);  // convert + mask in one pass
    } else {
      bv.copy_(a2d.narrow(0, s, n));
    }
    Tensor ov = out.narrow(0, s, n);
    rowdot_into(ov, bv, w);
  }
  return out;
}

namespace {

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward_lora_cpu(
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
  const Tensor Bt_acc = B_acc.t().contiguous();  // [r, out]

  // grad_B = scale * grad_y^T h and grad_h = scale * grad_y B: one pass over
  // grad_y (converted in row chunks when it is not in the accumulation dtype).
  Tensor gB, gh;
  if (g2d.scalar_type() == acc) {
    // (h^T grad_y)^T rather than grad_y^T h: MKL runs this skinny reduction
    // several times faster with the small operand transposed on the left.
    gB = at::mm(h.t(), g2d).t();
    gh = mm_rows(g2d, Bt_acc, std::nullopt);
  } else {
    gB = at::zeros({out, r}, B_acc.options());
    gh = at::empty({N, r}, B_acc.options());
    const int64_t rows = std::min(N, chunk_rows(out, acc));
    Tensor buf = at::empty({rows, out}, B_acc.options());
    for (int64_t s = 0; s < N; s += rows) {
      const int64_t n = std::min(rows, N - s);
      Tensor bv = buf.narrow(0, 0, n);
      bv.copy_(g2d.narrow(0, s, n));
      gB.addmm_(bv.t(), h.narrow(0, s, n));
      Tensor gv = gh.narrow(0, s, n);
      rowdot_into(gv, bv, Bt_acc);
    }
  }
  gB.mul_(scale);
  gh.mul_(scale);

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
      if (drop) {
        dropout_rows(bv, x2d.narrow(0, s, n), s, *drop);
      } else {
        bv.copy_(x2d.narrow(0, s, n));
      }
      gA.addmm_(gh.narrow(0, s, n).t(), bv);
    }
  }
  return {gA.to(lora_A.scalar_type()), gB.contiguous().to(lora_B.scalar_type()), gh};
}

Tensor lora_linear_backward_input_cpu(
    const Tensor& grad_y,
    const Tensor& weight,
    const Tensor& lora_A,
    const Tensor& grad_h,
    double dropout_p,
    const optional<Tensor>& seed) {
  const char* op = "_lora_linear_backward_input";
  detail::check_seed(op, seed, dropout_p);
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
    // mask/(1-p) * (grad_h A) first (row chunks, masked in place), then the big
    // GEMM accumulates into it (beta = 1): no extra pass over grad_x.
    if (!drop) {
      gx = at::mm(grad_h, A_acc);
    } else {
      gx = at::empty({N, in}, grad_y.options());
      const int64_t rows = std::min(N, chunk_rows(in, acc));
      for (int64_t s = 0; s < N; s += rows) {
        const int64_t n = std::min(rows, N - s);
        Tensor gv = gx.narrow(0, s, n);
        at::mm_out(gv, grad_h.narrow(0, s, n), A_acc);
        dropout_rows(gv, gv, s, *drop);
      }
    }
    gx.addmm_(g2d, weight);
  } else {
    // half/bf16 grad_x: float32 chunks rounded once into the base product.
    gx = at::mm(g2d, weight);
    const int64_t rows = std::min(N, chunk_rows(in, acc));
    Tensor buf = at::empty({rows, in}, A_acc.options());
    for (int64_t s = 0; s < N; s += rows) {
      const int64_t n = std::min(rows, N - s);
      Tensor bv = buf.narrow(0, 0, n);
      at::mm_out(bv, grad_h.narrow(0, s, n), A_acc);
      if (drop) dropout_rows(bv, bv, s, *drop);  // in place
      Tensor gv = gx.narrow(0, s, n);
      add_scaled_(gv, bv, 1.0);
    }
  }
  return gx.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear", &detail::lora_linear_op<CpuBackend>);
  m.impl("_lora_linear_forward", &detail::lora_linear_forward_op<CpuBackend>);
  m.impl("_lora_linear_backward_input", &lora_linear_backward_input_cpu);
  m.impl("_lora_linear_backward_lora", &lora_linear_backward_lora_cpu);
}

}  // namespace lora_ext::cpu
