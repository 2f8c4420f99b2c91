#pragma once
// Host launchers of the CUDA dropout / elementwise kernels (dropout_cuda.cu)
// used by lora_linear's CUDA kernels. Every launcher runs on the current
// stream of the tensors' device (the caller holds the device guard) and
// returns at once on empty inputs. The dropout mask is the one of
// ops/common/dropout_rng.h: element e = row * cols + col of the [N, cols] view,
// identical to the CPU kernels' mask for the same seed.
#include <optional>

#include <ATen/core/Tensor.h>

#include "ops/common/dropout_rng.h"

namespace lora_ext::cuda {

// h = dropout(x2d) @ A^T, [N, r] in A_acc's dtype (float32/float64): x2d [N, in]
// with any strides and any float dtype (float64 only with a float64 A_acc),
// A_acc [r, in]. The mask is applied while x is read: no dropped copy of x is
// written. Without `drop` a plain (converting) product.
at::Tensor dropout_shrink(const at::Tensor& x2d, const at::Tensor& A_acc,
                          const std::optional<detail::DropoutParams>& drop);

// dst = dropout(src) for rows row0 .. row0 + src.size(0) of an [N, cols]
// matrix (as lora_ext::cpu::dropout_rows): src 2-D, any float dtype and
// strides; dst contiguous float32/float64 of the same shape, may be src itself.
// Without `drop` a plain conversion.
void dropout_rows(at::Tensor& dst, const at::Tensor& src, int64_t row0,
                  const std::optional<detail::DropoutParams>& drop);

// dst += alpha * dropout(src) (rows row0.. of an [N, cols] matrix for the
// mask), computed in src's dtype (float32/float64) and rounded once into dst:
// dst 2-D, any float dtype and strides; src contiguous, same shape.
void add_scaled_(at::Tensor& dst, const at::Tensor& src, double alpha, int64_t row0 = 0,
                 const std::optional<detail::DropoutParams>& drop = std::nullopt);

}  // namespace lora_ext::cuda
