// CPU kernels of the multi-adapter ops: lora_group_rows, lora_linear_multi and
// the pieces of its autograd formula. The entry points (checks, grouping,
// seed, empty batches, result dtypes) are ops/common/lora_linear_multi.h over
// CpuMulti below; this file holds the CPU's algorithm.
//
// Rows are processed adapter by adapter through the grouping (order, offsets),
// so each adapter's A and B are read once per group of rows and stay in cache,
// and x is never gathered into a sorted copy as a whole. float32 without
// dropout (inference) runs the base GEMM, then one fused serial kernel per block
// of rows, blocks in parallel: h = A[a] x_row (AVX2 dot products over row
// pointers), then y_row += s_a * B[a] h (AVX2), in place. Other dtypes, dropout and the backward use ATen
// per group on bounded row chunks. Precision is lora_linear's: the LoRA branch
// and h [N, r_max] are float32 for half/bf16 adapters.
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/lora_linear_multi.h"
#include "ops/common/lora_linear_multi_quantized.h"
#include "ops/common/op_utils.h"
#include "ops/cpu/chunking.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/dropout_cpu.h"
#include "ops/cpu/skinny_gemm.h"

namespace lora_ext::cpu {

using at::Tensor;
using std::optional;

namespace {

// A validated grouping, read on the host.
struct Groups {
  Tensor order_t;  // int64 [N], contiguous
  const int64_t* order;
  std::vector<int64_t> offsets;  // n + 2 entries
  int64_t n;

  int64_t begin(int64_t a) const { return offsets[a]; }
  int64_t count(int64_t a) const { return offsets[a + 1] - offsets[a]; }
  Tensor rows(int64_t a, int64_t start, int64_t len) const { return order_t.narrow(0, offsets[a] + start, len); }
  // fn(a, idx) for the rows idx (int64) of every adapter a < n, `chunk` rows at a time.
  template <typename Fn>
  void for_adapter_chunks(int64_t chunk, Fn&& fn) const {
    for (int64_t a = 0; a < n; ++a) {
      detail::for_chunks(count(a), chunk, [&](int64_t s, int64_t c) { fn(a, rows(a, s, c)); });
    }
  }
};

// A stable counting sort of ids (shape and dtype checked), checking their values.
std::tuple<Tensor, Tensor> group_rows(const Tensor& ids, int64_t n) {
  const char* op = "lora_group_rows";
  const int64_t N = ids.size(0);
  const Tensor idc = ids.contiguous();
  std::vector<int64_t> slot(N);
  std::vector<int64_t> counts(n + 1, 0);
  AT_DISPATCH_INDEX_TYPES(idc.scalar_type(), "lora_group_rows", [&] {
    const index_t* p = idc.const_data_ptr<index_t>();
    for (int64_t i = 0; i < N; ++i) {
      const int64_t v = p[i];
      TORCH_CHECK_INDEX(v >= -1 && v < n, "lora_ext::", op, ": expected adapter ids in [-1, ", n,
                        ") (-1 = base only; n_adapters = ", n, "), got adapter_ids[", i, "] = ", v);
      slot[i] = v < 0 ? n : v;
      ++counts[slot[i]];
    }
  });
  Tensor offsets = at::empty({n + 2}, ids.options().dtype(at::kLong));
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t a = 0; a <= n; ++a) off[a + 1] = off[a] + counts[a];
  Tensor order = at::empty({N}, ids.options().dtype(at::kLong));
  int64_t* ord = order.data_ptr<int64_t>();
  std::vector<int64_t> pos(off, off + n + 1);
  for (int64_t i = 0; i < N; ++i) ord[pos[slot[i]]++] = i;  // stable: rows keep their order within a group
  return {order, offsets};
}

// The grouping read on the host as given (checked before, or by construction).
Groups host_groups(const Tensor& order, const Tensor& offsets, int64_t n) {
  Groups g;
  g.n = n;
  g.order_t = order.contiguous();
  g.order = g.order_t.const_data_ptr<int64_t>();
  const Tensor offc = offsets.contiguous();
  g.offsets.assign(offc.const_data_ptr<int64_t>(), offc.const_data_ptr<int64_t>() + n + 2);
  return g;
}

struct Run {
  int64_t start, len, a;  // rows start .. start + len - 1 all use adapter a (-1: base)
};

// Maximal runs of consecutive rows (in row order) that use the same adapter.
std::vector<Run> row_runs(const Groups& g, int64_t N) {
  std::vector<int64_t> adapter(N);
  for (int64_t a = 0; a <= g.n; ++a) {
    for (int64_t k = g.offsets[a]; k < g.offsets[a + 1]; ++k) adapter[g.order[k]] = a < g.n ? a : -1;
  }
  std::vector<Run> runs;
  for (int64_t i = 0; i < N; ++i) {
    if (!runs.empty() && runs.back().a == adapter[i])
      ++runs.back().len;
    else
      runs.push_back({i, 1, adapter[i]});
  }
  return runs;
}

// The scales (checked) on the host.
std::vector<double> host_scales(const Tensor& scales) {
  const Tensor s = scales.to(at::kDouble).contiguous();
  return std::vector<double>(s.const_data_ptr<double>(), s.const_data_ptr<double>() + s.numel());
}

// Rows `idx` of x2d (any dtype) in the acc dtype, dropped out by their own row index.
Tensor rows_acc(const Tensor& x2d, const Tensor& idx, at::ScalarType acc, const optional<detail::DropoutParams>& drop) {
  if (!drop) return x2d.index_select(0, idx).to(acc);
  Tensor buf = at::empty({idx.numel(), x2d.size(1)}, x2d.options().dtype(acc));
  const int64_t* rows = idx.const_data_ptr<int64_t>();
  for (int64_t m = 0; m < idx.numel(); ++m) {
    Tensor dst = buf.narrow(0, m, 1);
    dropout_rows(dst, x2d.narrow(0, rows[m], 1), rows[m], *drop);
  }
  return buf;
}

// The float32 inference kernel: for every adapter row, h[row] = A[a] x[row]
// (row order) and, with `expand`, y[row] += s_a B[a] h[row]. Base rows are left
// alone (h stays 0). Bt: [n, r, out] contiguous. Rows of one adapter go
// in blocks of kBlock so A[a] and B[a] stay in cache; blocks run in parallel.
void fused_lora_f32(Tensor& y, Tensor& h, const Tensor& x2d, const Tensor& A, const Tensor& Bt,
                    const std::vector<double>& scales, const Groups& g, bool expand) {
  constexpr int64_t kBlock = 8;
  const int64_t in = x2d.size(1), out = y.size(1), r = A.size(1), n = g.n;
  struct Block {
    int64_t a, start, len;
  };
  std::vector<Block> blocks;
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t s = 0; s < g.count(a); s += kBlock)
      blocks.push_back({a, g.begin(a) + s, std::min(kBlock, g.count(a) - s)});
  }
  const float* xp = x2d.const_data_ptr<float>();
  const int64_t ldx = x2d.stride(0);
  const float* Ap = A.const_data_ptr<float>();
  const float* Btp = Bt.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  // grain: enough blocks to cover ~1M multiply-adds per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, kBlock * r * (in + out)));
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), grain, [&](int64_t b0, int64_t b1) {
    const float* xr[kBlock];
    float* yr[kBlock];
    float hs[kBlock * 256];  // r <= 256
    for (int64_t b = b0; b < b1; ++b) {
      const Block& blk = blocks[b];
      for (int64_t m = 0; m < blk.len; ++m) {
        const int64_t row = g.order[blk.start + m];
        xr[m] = xp + row * ldx;
        yr[m] = yp + row * out;
      }
      rowdot_ptrs(xr, blk.len, Ap + blk.a * r * in, in, r, hs, r);
      if (!expand) {
        for (int64_t m = 0; m < blk.len; ++m) std::copy(hs + m * r, hs + (m + 1) * r, hp + g.order[blk.start + m] * r);
        continue;
      }
      const float s = static_cast<float>(scales[blk.a]);
      for (int64_t m = 0; m < blk.len; ++m) {
        float* hrow = hp + g.order[blk.start + m] * r;
        for (int64_t k = 0; k < r; ++k) {
          hrow[k] = hs[m * r + k];
          hs[m * r + k] *= s;
        }
      }
      expand_ptrs(hs, blk.len, Btp + blk.a * r * out, r, out, yr);
    }
  });
}

// y [N, out] and h (zeros [N, r]) filled on the adapter rows, N >= 1. The base product x W^T is base's
// (a DenseBase or a QuantizedBase: ops/common/lora_linear_forward.h).
template <typename Base>
Tensor multi_forward(const Tensor& x2d, const Base& base, const optional<Tensor>& bias, const Tensor& lora_A,
                     const Tensor& lora_B, const std::vector<double>& scales, const Groups& g,
                     const optional<detail::DropoutParams>& drop, Tensor& h) {
  const int64_t in = x2d.size(1), out = base.out_features(), r = lora_A.size(1);
  const int64_t N = x2d.size(0);
  const auto acc = h.scalar_type();
  const auto xt = x2d.scalar_type();
  const Tensor A_acc = lora_A.to(acc).contiguous();
  Tensor y = at::empty({N, out}, x2d.options());

  const bool fast =
      xt == at::kFloat && acc == at::kFloat && !drop && has_avx2_fma() && x2d.stride(1) == 1 && r <= 256 && in >= 8;
  if (fast) {
    // lora_B given as the transpose of a contiguous [n, r, out] stack (the module's layout) is used as is
    const Tensor Bt = lora_B.transpose(1, 2).to(acc).contiguous();
    const auto runs = row_runs(g, N);
    if (N * out >= (int64_t(1) << 22) && static_cast<int64_t>(runs.size()) * 8 <= N) {
      // Large outputs in long runs of one adapter (prefill): y = bias + s_a h B[a]^T run by run
      // through BLAS, which writes y's fresh pages once, then the base GEMM accumulates into y
      // (beta = 1), as lora_linear does.
      fused_lora_f32(y, h, x2d, A_acc, Bt, scales, g, /*expand=*/false);
      for (const auto& [start, len, a] : runs) {
        Tensor yv = y.narrow(0, start, len);
        if (a < 0) {
          if (bias)
            yv.copy_(bias->expand({len, out}));
          else
            yv.zero_();
        } else if (bias) {
          at::addmm_out(yv, *bias, h.narrow(0, start, len), Bt[a], 1, scales[a]);
        } else {
          at::addmm_out(yv, yv, h.narrow(0, start, len), Bt[a], 0, scales[a]);
        }
      }
      base.accumulate(y, x2d);
    } else {
      // Small outputs or short runs (decode): the base GEMM first, then the LoRA rows are added
      // in place by the fused kernel (y is small enough to stay in cache).
      base.assign(y, bias, x2d);
      fused_lora_f32(y, h, x2d, A_acc, Bt, scales, g, /*expand=*/true);
    }
    return y;
  }

  // h = dropout(x) A[a]^T per group, in bounded row chunks
  const int64_t rows_per_chunk = chunk_rows(std::max(in, out), acc);
  g.for_adapter_chunks(rows_per_chunk, [&](int64_t a, const Tensor& idx) {
    h.index_copy_(0, idx, at::mm(rows_acc(x2d, idx, acc, drop), A_acc[a].t()));
  });
  const Tensor B_acc = lora_B.to(acc);
  if (xt == acc) {
    // y = bias + s_a h B[a]^T first, then the base GEMM accumulates into y
    if (bias)
      y.copy_(bias->expand({N, out}));
    else
      y.zero_();
    g.for_adapter_chunks(rows_per_chunk, [&](int64_t a, const Tensor& idx) {
      y.index_add_(0, idx, at::mm(h.index_select(0, idx), B_acc[a].t()), scales[a]);
    });
    base.accumulate(y, x2d);
  } else {
    // half/bf16 output: the float32 branch is added to the base rows and rounded once
    base.assign(y, bias, x2d);
    g.for_adapter_chunks(rows_per_chunk, [&](int64_t a, const Tensor& idx) {
      Tensor v = y.index_select(0, idx).to(acc);
      v.addmm_(h.index_select(0, idx), B_acc[a].t(), 1, scales[a]);
      y.index_copy_(0, idx, v.to(xt));
    });
  }
  return y;
}

// grad_A, grad_B (in the acc dtype) and grad_h, adapter by adapter, N >= 1.
std::tuple<Tensor, Tensor, Tensor> multi_backward_lora(const char* op, const Tensor& g2d, const Tensor& x2d,
                                                       const Tensor& lora_A, const Tensor& B_acc, const Tensor& scales,
                                                       const Groups& g, const Tensor& h,
                                                       const optional<detail::DropoutParams>& drop) {
  const int64_t n = lora_A.size(0), r = lora_A.size(1), in = lora_A.size(2), out = B_acc.size(1);
  const int64_t N = g2d.size(0);
  const auto acc = B_acc.scalar_type();
  Tensor gA = at::zeros({n, r, in}, lora_A.options().dtype(acc));
  Tensor gB = at::zeros({n, out, r}, lora_A.options().dtype(acc));
  Tensor gh = at::zeros({N, r}, lora_A.options().dtype(acc));
  detail::check_finite_scales(op, scales, lora_A.scalar_type());
  const auto sc = host_scales(scales);
  g.for_adapter_chunks(chunk_rows(std::max(in, out), acc), [&](int64_t a, const Tensor& idx) {
    const Tensor G = g2d.index_select(0, idx).to(acc);      // [c, out]
    gB[a].addmm_(G.t(), h.index_select(0, idx), 1, sc[a]);  // s G^T H
    const Tensor GH = at::mm(G, B_acc[a]).mul_(sc[a]);      // [c, r]
    gh.index_copy_(0, idx, GH);
    gA[a].addmm_(GH.t(), rows_acc(x2d, idx, acc, drop));  // GH^T dropout(X)
  });
  return {gA, gB, gh};
}

// grad_x = grad_y W + mask/(1-p) * (grad_h A[a]) per group, N >= 1; grad_y W is base's.
template <typename Base>
Tensor multi_backward_input(const Tensor& g2d, const Base& base, const Tensor& A_acc, const Tensor& grad_h,
                            const Groups& g, const optional<detail::DropoutParams>& drop) {
  const int64_t in = base.in_features(), N = g2d.size(0);
  const auto acc = A_acc.scalar_type();
  const int64_t rows_per_chunk = chunk_rows(in, acc);
  // per group: T = mask/(1-p) * (grad_h A[a]) [c, in], in acc
  auto lora_rows = [&](int64_t a, const Tensor& idx) {
    Tensor T = at::mm(grad_h.index_select(0, idx), A_acc[a]);
    if (drop) {
      const int64_t* rows = idx.const_data_ptr<int64_t>();
      for (int64_t m = 0; m < idx.numel(); ++m) {
        Tensor t = T.narrow(0, m, 1);
        dropout_rows(t, t, rows[m], *drop);
      }
    }
    return T;
  };
  Tensor gx;
  if (g2d.scalar_type() == acc) {
    gx = at::zeros({N, in}, g2d.options());
    g.for_adapter_chunks(rows_per_chunk,
                         [&](int64_t a, const Tensor& idx) { gx.index_copy_(0, idx, lora_rows(a, idx)); });
    base.accumulate_t(gx, g2d, /*assign=*/false);
  } else {
    gx = at::empty({N, in}, g2d.options());
    base.accumulate_t(gx, g2d, /*assign=*/true);
    g.for_adapter_chunks(rows_per_chunk, [&](int64_t a, const Tensor& idx) {
      Tensor v = gx.index_select(0, idx).to(acc).add_(lora_rows(a, idx));
      gx.index_copy_(0, idx, v.to(g2d.scalar_type()));
    });
  }
  return gx;
}

// The CPU's part of ops/common/lora_linear_multi.h: groupings read on the host.
struct CpuMulti {
  using Guard = CpuBackend::Guard;
  using Groups = cpu::Groups;
  static std::tuple<Tensor, Tensor> group_rows(const Tensor& ids, int64_t n) { return cpu::group_rows(ids, n); }
  static void check_grouping(const char* op, const Tensor& ids, const Tensor& order, const Tensor& offsets, int64_t n) {
    detail::check_grouping_values(op, ids, order, offsets, n);  // O(N)
  }
  static void check_scales(const char* op, const Tensor& scales, at::ScalarType adapter_dtype) {
    detail::check_finite_scales(op, scales, adapter_dtype);
  }
  static Groups groups(const Tensor& order, const Tensor& offsets, int64_t /*N*/, int64_t n) {
    return host_groups(order, offsets, n);
  }
  template <typename Base>
  static Tensor forward(const char* /*op*/, const Tensor& x2d, const Base& base, const optional<Tensor>& bias,
                        const Tensor& lora_A, const Tensor& lora_B, const Tensor& scales, const Groups& g,
                        const optional<detail::DropoutParams>& drop, Tensor& h) {
    return multi_forward(x2d, base, bias, lora_A, lora_B, host_scales(scales), g, drop, h);
  }
  static std::tuple<Tensor, Tensor, Tensor> backward_lora(const char* op, const Tensor& g2d, const Tensor& x2d,
                                                          const Tensor& lora_A, const Tensor& B_acc,
                                                          const Tensor& scales, const Groups& g, const Tensor& h,
                                                          const optional<detail::DropoutParams>& drop) {
    return multi_backward_lora(op, g2d, x2d, lora_A, B_acc, scales, g, h, drop);
  }
  template <typename Base>
  static Tensor backward_input(const char* /*op*/, const Tensor& g2d, const Base& base, const Tensor& A_acc,
                               const Tensor& grad_h, const Groups& g, const optional<detail::DropoutParams>& drop) {
    return multi_backward_input(g2d, base, A_acc, grad_h, g, drop);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_group_rows", &detail::lora_group_rows_op<CpuMulti>);
  m.impl("lora_linear_multi", &detail::lora_linear_multi_op<CpuMulti>);
  m.impl("_lora_linear_multi_forward", &detail::lora_linear_multi_forward_op<CpuMulti>);
  m.impl("_lora_linear_multi_backward_lora", &detail::lora_linear_multi_backward_lora_op<CpuMulti>);
  m.impl("_lora_linear_multi_backward_input", &detail::lora_linear_multi_backward_input_op<CpuMulti>);
  m.impl("lora_linear_multi_quantized", &detail::lora_linear_multi_quantized_op<CpuMulti, CpuBackend>);
  m.impl("_lora_linear_multi_quantized_forward", &detail::lora_linear_multi_quantized_forward_op<CpuMulti, CpuBackend>);
  m.impl("_lora_linear_multi_quantized_backward_input",
         &detail::lora_linear_multi_quantized_backward_input_op<CpuMulti, CpuBackend>);
}

}  // namespace lora_ext::cpu
