// CPU kernels of lora_linear and of the pieces its autograd formula uses.
//
// The forward and the backward pieces are the backend-independent
// ops/common/lora_linear_forward.h and ops/common/lora_linear_backward.h over
// CpuBackend (cpu_backend.h). The CPU primitives here: mm_rows (skinny AVX2 row
// dots, dropout applied to bounded row chunks), grad_B_h (grad_B as
// (h^T grad_y)^T, which MKL runs several times faster than grad_y^T h; grad_h
// from the skinny row dots; both scaled once at the end) and masked_mm (grad_h A
// masked row chunk by row chunk while in cache). Precision: the LoRA branch
// accumulates in the adapter's dtype, or in float32 when the adapter is
// bfloat16/float16 (the [N, r] intermediate h is then float32 too).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/lora_linear_backward.h"
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
  detail::for_row_chunks(N, chunk_rows(k, acc), k, w.options(), [&](int64_t s, int64_t n, Tensor& bv) {
    CpuBackend::convert_rows(bv, a2d.narrow(0, s, n), s, drop);  // convert + mask in one pass
    Tensor ov = out.narrow(0, s, n);
    rowdot_into(ov, bv, w);
  });
  return out;
}

std::tuple<Tensor, Tensor> grad_B_h(const Tensor& g2d, const Tensor& h, const Tensor& B, double scale) {
  const auto acc = B.scalar_type();
  const int64_t N = g2d.size(0), out = B.size(0), r = B.size(1);
  const Tensor Bt = B.t().contiguous();  // [r, out]
  Tensor gB, gh;
  if (g2d.scalar_type() == acc) {
    // (h^T grad_y)^T rather than grad_y^T h: MKL runs this skinny reduction
    // several times faster with the small operand transposed on the left.
    gB = at::mm(h.t(), g2d).t();
    gh = mm_rows(g2d, Bt, std::nullopt);
  } else {
    gB = at::zeros({out, r}, B.options());
    gh = at::empty({N, r}, B.options());
    detail::for_row_chunks(N, chunk_rows(out, acc), out, B.options(), [&](int64_t s, int64_t n, Tensor& bv) {
      bv.copy_(g2d.narrow(0, s, n));
      gB.addmm_(bv.t(), h.narrow(0, s, n));
      Tensor gv = gh.narrow(0, s, n);
      rowdot_into(gv, bv, Bt);
    });
  }
  gB.mul_(scale);
  gh.mul_(scale);
  return {gB, gh};
}

Tensor masked_mm(const Tensor& a, const Tensor& w, const optional<detail::DropoutParams>& drop) {
  if (!drop) return at::mm(a, w);
  const int64_t N = a.size(0), cols = w.size(1);
  Tensor out = at::empty({N, cols}, w.options());
  detail::for_chunks(N, chunk_rows(cols, w.scalar_type()), [&](int64_t s, int64_t n) {
    Tensor ov = out.narrow(0, s, n);
    at::mm_out(ov, a.narrow(0, s, n), w);
    dropout_rows(ov, ov, s, *drop);
  });
  return out;
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear", &detail::lora_linear_op<CpuBackend>);
  m.impl("_lora_linear_forward", &detail::lora_linear_forward_op<CpuBackend>);
  m.impl("_lora_linear_backward_input", &detail::lora_linear_backward_input_op<CpuBackend>);
  m.impl("_lora_linear_backward_lora", &detail::lora_linear_backward_lora_op<CpuBackend>);
}

}  // namespace lora_ext::cpu
