#pragma once
// Small helpers shared by the kernels of every op (header-only).
#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "ops/common/dropout_rng.h"

namespace lora_ext::detail {

// sizes with the last dim replaced: x [..., in] -> y [..., out]
inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

inline c10::SymDimVector with_last(c10::SymIntArrayRef sizes, const c10::SymInt& last) {
  c10::SymDimVector v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

// product of all dims but the last: the rows of x [..., in]
inline c10::SymInt leading_numel(c10::SymIntArrayRef sizes) {
  c10::SymInt n = 1;
  for (size_t i = 0; i + 1 < sizes.size(); ++i) n = n * sizes[i];
  return n;
}

// t [..., k] as [N, k], N the product of the leading dims. Unlike reshape({-1, k}), which
// cannot infer N from an empty tensor, this also works for k = 0 (in or out = 0).
inline at::Tensor as_rows(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) n *= t.size(d);
  return t.reshape({n, t.size(-1)});
}

// The 8-byte dropout seed, or nullopt without dropout. A factory op (not a
// C++-side draw) so that traced graphs draw a fresh seed on every call;
// reproducible under torch.manual_seed.
inline std::optional<at::Tensor> draw_dropout_seed(double p) {
  if (p <= 0.0) return std::nullopt;
  // A 0-dim CPU tensor: FakeTensor (torch.compile, opcheck) accepts CPU scalars next to CUDA tensors,
  // not a one-element 1-D CPU tensor. The value drawn is the same either way.
  return at::randint(std::numeric_limits<int64_t>::max(), {}, at::TensorOptions().dtype(at::kLong));
}

// The mask parameters for a seed tensor (one int64 element on the host, as
// draw_dropout_seed makes it), or nullopt without dropout.
inline std::optional<DropoutParams> dropout_from_seed(const std::optional<at::Tensor>& seed, double dropout_p) {
  if (!(seed.has_value() && seed->defined()) || dropout_p <= 0.0) return std::nullopt;
  return make_dropout_params(seed->item<int64_t>(), dropout_p);
}

// fn(s, n) for the consecutive chunks [s, s + n) of N rows, `rows` (>= 1) at a time.
template <typename Fn>
void for_chunks(int64_t N, int64_t rows, Fn&& fn) {
  for (int64_t s = 0; s < N; s += rows) fn(s, std::min(rows, N - s));
}

// The same with scratch: fn(s, n, buf), buf an [n, cols] view of one tensor of
// min(N, rows) rows allocated with opts (a row chunk converted or masked
// there instead of a whole-matrix temporary).
template <typename Fn>
void for_row_chunks(int64_t N, int64_t rows, int64_t cols, const at::TensorOptions& opts, Fn&& fn) {
  at::Tensor buf = at::empty({std::min(N, rows), cols}, opts);
  for_chunks(N, rows, [&](int64_t s, int64_t n) {
    at::Tensor bv = buf.narrow(0, 0, n);
    fn(s, n, bv);
  });
}

inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

}  // namespace lora_ext::detail
