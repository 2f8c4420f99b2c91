// Autograd kernels of merge_ / unmerge_ and the exact merge's merge_exact_ /
// unmerge_exact_: these in-place updates are not differentiable, so they refuse
// a weight that would need a gradient and bump the weight's version counter so
// stale saved tensors are detected.
#include <initializer_list>
#include <string>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "ops/common/op_handles.h"

namespace lora_ext::autograd {

namespace {

void refuse_grad(const std::string& name, std::initializer_list<const at::Tensor*> ts) {
  bool any = false;
  for (auto* t : ts) any = any || t->requires_grad();
  TORCH_CHECK(!(at::GradMode::is_enabled() && any), name,
              ": expected to run under torch.no_grad() when weight, lora_A or lora_B require grad "
              "(merging is an in-place, non-differentiable update), got grad mode enabled");
}

// call() below autograd, then the weight's version bump autograd would have made.
template <typename Fn>
void update_in_place(at::Tensor& weight, Fn&& call) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    call();
  }
  if (!weight.is_inference()) torch::autograd::impl::bump_version(weight);
}

template <const handles::MergeHandle& (*Op)()>
void merge_autograd(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  const auto& op = Op();
  refuse_grad(op.schema().name(), {&weight, &lora_A, &lora_B});
  update_in_place(weight, [&] { op.call(weight, lora_A, lora_B, scale); });
}

void unmerge_exact_autograd(at::Tensor& weight, const at::Tensor& codes, const at::Tensor& exc_index,
                            const at::Tensor& exc_value, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scale) {
  const auto& op = handles::unmerge_exact_();
  refuse_grad(op.schema().name(), {&weight, &lora_A, &lora_B});
  update_in_place(weight, [&] { op.call(weight, codes, exc_index, exc_value, lora_A, lora_B, scale); });
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) {
  m.impl("merge_", &merge_autograd<handles::merge_>);
  m.impl("unmerge_", &merge_autograd<handles::unmerge_>);
  m.impl("merge_exact_", &merge_autograd<handles::merge_exact_>);
  m.impl("unmerge_exact_", &unmerge_exact_autograd);
}

}  // namespace lora_ext::autograd
