// Autograd kernels of merge_ / unmerge_: these in-place updates are not
// differentiable, so they refuse a weight that would need a gradient and bump
// the weight's version counter so stale saved tensors are detected.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace lora_ext::autograd {

namespace {

using MergeFn = void(at::Tensor&, const at::Tensor&, const at::Tensor&, double);

template <const char* Name>
void merge_autograd(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").typed<MergeFn>();
  TORCH_CHECK(
      !(at::GradMode::is_enabled() && (weight.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad())),
      Name, ": expected to run under torch.no_grad() when weight, lora_A or lora_B require grad "
      "(merging is an in-place, non-differentiable update), got grad mode enabled");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(weight, lora_A, lora_B, scale);
  }
  if (!weight.is_inference()) torch::autograd::impl::bump_version(weight);
}

constexpr char kMerge[] = "lora_ext::merge_";
constexpr char kUnmerge[] = "lora_ext::unmerge_";
constexpr char kMergeExact[] = "lora_ext::merge_exact_";

void refuse_grad(const char* name, std::initializer_list<const at::Tensor*> ts) {
  bool any = false;
  for (auto* t : ts) any = any || t->requires_grad();
  TORCH_CHECK(!(at::GradMode::is_enabled() && any), name,
              ": expected to run under torch.no_grad() when weight, lora_A or lora_B require grad "
              "(merging is an in-place, non-differentiable update), got grad mode enabled");
}

void unmerge_exact_autograd(at::Tensor& weight, const at::Tensor& codes, const at::Tensor& exc_index,
                            const at::Tensor& exc_value, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::unmerge_exact_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, double)>();
  refuse_grad("lora_ext::unmerge_exact_", {&weight, &lora_A, &lora_B});
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(weight, codes, exc_index, exc_value, lora_A, lora_B, scale);
  }
  if (!weight.is_inference()) torch::autograd::impl::bump_version(weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) {
  m.impl("merge_", &merge_autograd<kMerge>);
  m.impl("unmerge_", &merge_autograd<kUnmerge>);
  m.impl("merge_exact_", &merge_autograd<kMergeExact>);
  m.impl("unmerge_exact_", &unmerge_exact_autograd);
}

}  // namespace lora_ext::autograd
