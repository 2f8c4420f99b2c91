#include <lora_ext/apply.h>

#include <cmath>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <lora_ext/ops.h>

#include "io/apply_plan.h"
#include "ops/common/checks.h"

namespace lora_ext {

namespace detail {

// Validates every adapter key against the parameters; returns the updates.
std::vector<Update> plan_updates(const std::map<std::string, at::Tensor>& params, const Adapter& adapter,
                                 double weight, const char* op, bool exact) {
  std::vector<Update> out;
  std::vector<std::string> problems;
  std::vector<AdapterModule> modules;
  try {
    modules = adapter_modules(adapter);
  } catch (const c10::Error& e) {
    problems.push_back(e.what_without_backtrace());
  }
  for (const auto& m : modules) {
    auto pit = params.find(m.path + ".weight");
    if (pit == params.end()) {
      problems.push_back("module " + m.path + " matches no parameter " + m.path + ".weight");
      continue;
    }
    const at::Tensor& W = pit->second;
    const at::Tensor& A = m.lora_A;
    const at::Tensor& B = m.lora_B;
    at::Tensor target;
    if (m.embedding) {
      target = W.dim() == 2 ? W.t() : W;  // [num, dim] -> [dim, num]
    } else if (W.dim() == 2 && adapter.config.fan_in_fan_out) {
      target = W.t();  // GPT-2 Conv1D stores [in, out]
    } else {
      target = W.dim() >= 2 ? W.view({W.size(0), -1}) : W;
    }
    if (!at::isFloatingType(A.scalar_type()) || !at::isFloatingType(B.scalar_type())) {
      problems.push_back("adapter tensors of " + m.path + " are not floating point (" +
                         std::string(c10::toString(A.scalar_type())) + ", " + c10::toString(B.scalar_type()) + ")");
      continue;
    }
    // conv adapters are A [r, in, kh, kw] and B [out, r, 1, 1]: only those extra dims are flattened
    const bool a_ok = A.dim() >= 2 && A.size(0) >= 1;
    const bool b_ok = B.dim() >= 2 && B.numel() == B.size(0) * B.size(1);
    if (!a_ok || !b_ok) {
      std::ostringstream ss;
      ss << "shape mismatch at " << m.path << ": expected A [r >= 1, in, ...] and B [out, r, 1...], got A "
         << A.sizes() << ", B " << B.sizes();
      problems.push_back(ss.str());
      continue;
    }
    const at::Tensor A2 = A.reshape({A.size(0), -1});
    const at::Tensor B2 = B.reshape({B.size(0), B.size(1)});
    const int64_t want_r = adapter.config.rank_for(m.path);
    if (A2.size(0) != want_r) {
      problems.push_back("rank mismatch at " + m.path + ": the config says r = " + std::to_string(want_r) +
                         " (its scaling depends on r), the tensors have rank " + std::to_string(A2.size(0)));
      continue;
    }
    if (target.dim() != 2 || A2.dim() != 2 || B2.dim() != 2 || A2.size(1) != target.size(1) ||
        B2.size(0) != target.size(0) || A2.size(0) != B2.size(1)) {
      std::ostringstream ss;
      ss << "shape mismatch at " << m.path << ": parameter " << W.sizes() << ", A " << A.sizes() << ", B "
         << B.sizes();
      problems.push_back(ss.str());
      continue;
    }
    if (!at::isfinite(A2).all().item<bool>() || !at::isfinite(B2).all().item<bool>()) {
      problems.push_back("non-finite (NaN/Inf) adapter values at " + m.path);
      continue;
    }
    // the adapter may be float32 on a half base (PEFT's default) or match the base's dtype
    const auto wt = W.scalar_type();
    const auto adt = (wt == at::kHalf || wt == at::kBFloat16) ? at::kFloat : wt;
    Update u{m.path, target, A2.to(W.device(), adt), B2.to(W.device(), adt), weight * m.scaling};
    try {  // merge_'s own checks (dtypes, a finite scale in range) here, so it cannot throw halfway through
      if (exact) {
        check_merge_exact_args("merge_exact_", u.target, u.A, u.B, u.scale);
      } else {
        check_merge_args("merge_", u.target, u.A, u.B, u.scale);
      }
    } catch (const c10::Error& e) {
      problems.push_back("module " + m.path + ": " + e.what_without_backtrace());
      continue;
    }
    out.push_back(std::move(u));
  }
  if (!problems.empty()) {
    std::string msg;
    for (const auto& p : problems) msg += "\n  " + p;
    TORCH_CHECK(false, "lora_ext::", op, ": the adapter does not fit the module (nothing was changed):", msg);
  }
  return out;
}

}  // namespace detail

namespace {

void apply(const std::map<std::string, at::Tensor>& params, const Adapter& adapter, double weight, bool merge,
           const char* op) {
  TORCH_CHECK(std::isfinite(weight), "lora_ext::", op, ": expected a finite weight, got ", weight);
  auto updates = detail::plan_updates(params, adapter, weight, op);
  torch::NoGradGuard no_grad;
  for (auto& u : updates) {
    if (merge) {
      ops::merge_(u.target, u.A, u.B, u.scale);
    } else {
      ops::unmerge_(u.target, u.A, u.B, u.scale);
    }
  }
}

std::map<std::string, at::Tensor> params_of(torch::jit::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters(/*recurse=*/true)) out.emplace(p.name, p.value);
  for (const auto& b : m.named_buffers(/*recurse=*/true)) out.emplace(b.name, b.value);
  return out;
}

std::map<std::string, at::Tensor> params_of(torch::nn::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters(/*recurse=*/true)) out.emplace(p.key(), p.value());
  return out;
}

}  // namespace

void merge_adapter(torch::jit::Module& module, const Adapter& adapter, double weight) {
  apply(params_of(module), adapter, weight, true, "merge_adapter");
}
void unmerge_adapter(torch::jit::Module& module, const Adapter& adapter, double weight) {
  apply(params_of(module), adapter, weight, false, "unmerge_adapter");
}
void merge_adapter(torch::nn::Module& module, const Adapter& adapter, double weight) {
  apply(params_of(module), adapter, weight, true, "merge_adapter");
}
void unmerge_adapter(torch::nn::Module& module, const Adapter& adapter, double weight) {
  apply(params_of(module), adapter, weight, false, "unmerge_adapter");
}

}  // namespace lora_ext
