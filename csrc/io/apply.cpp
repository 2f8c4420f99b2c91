#include <lora_ext/apply.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
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

namespace {

// Whether a module of this class takes embedding keys (true), linear/conv keys (false), or is not known.
std::optional<bool> takes_embedding_keys(std::string type) {
  static const std::string kNn = "torch::nn::", kImpl = "Impl";
  if (type.rfind(kNn, 0) == 0) type = type.substr(kNn.size());  // torch::nn::LinearImpl -> Linear
  if (type.size() > kImpl.size() && type.compare(type.size() - kImpl.size(), kImpl.size(), kImpl) == 0)
    type.resize(type.size() - kImpl.size());
  if (type == "Embedding") return true;
  for (const char* t : {"Linear", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d", "Conv3d", "Conv1D"})
    if (type == t) return false;
  return std::nullopt;
}

}  // namespace

// Validates every adapter key against the parameters; returns the updates.
std::vector<Update> plan_updates(const std::map<std::string, at::Tensor>& params, const Adapter& adapter, double weight,
                                 const char* op, bool exact, const std::map<std::string, std::string>& module_types) {
  std::vector<Update> out;
  std::vector<std::string> problems;
  std::vector<AdapterModule> modules;
  try {
    modules = adapter_modules(adapter);
  } catch (const c10::Error& e) {
    problems.push_back(e.what_without_backtrace());
  }
  if (modules.empty() && problems.empty()) problems.push_back("the adapter holds no LoRA weights");
  for (const auto& m : modules) {
    auto pit = params.find(m.path + ".weight");
    if (pit == params.end()) {
      problems.push_back("module " + m.path + " matches no parameter " + m.path + ".weight");
      continue;
    }
    const auto type = module_types.find(m.path);
    const auto embedding_keys = type == module_types.end() ? std::nullopt : takes_embedding_keys(type->second);
    if (embedding_keys && *embedding_keys != m.embedding) {
      auto keys = [](bool embedding) {
        return embedding ? ".lora_embedding_A / .lora_embedding_B" : ".lora_A.weight / .lora_B.weight";
      };
      problems.push_back("module " + m.path + " is a " + type->second + ", whose adapter keys end in " +
                         keys(*embedding_keys) + ", got " + keys(m.embedding));
      continue;
    }
    const at::Tensor& W = pit->second;
    const at::Tensor& A = m.lora_A;
    const at::Tensor& B = m.lora_B;
    at::Tensor target;
    // embeddings ([num, dim]) and GPT-2's Conv1D ([in, out]) are stored transposed
    const bool transposed = W.dim() == 2 && (m.embedding || adapter.config.fan_in_fan_out);
    if (transposed) {
      target = W.t();
    } else {
      target = W.dim() >= 2 ? W.view({W.size(0), -1}) : W;
    }
    if (!at::isFloatingType(A.scalar_type()) || !at::isFloatingType(B.scalar_type())) {
      problems.push_back("adapter tensors of " + m.path + " are not floating point (" +
                         std::string(c10::toString(A.scalar_type())) + ", " + c10::toString(B.scalar_type()) + ")");
      continue;
    }
    // PEFT's shapes for the weight's layer (lora_ext's adapter_shapes): A [r, in] and B [out, r]; conv weights
    // [out, in, k...] take A [r, in, k...] and B [out, r, 1...]. No other extra dims (a [r, in, 1, 1] A on a
    // linear layer) are flattened away.
    const int64_t dims = transposed ? 2 : std::max<int64_t>(W.dim(), 2);
    const bool a_ok =
        A.dim() == dims && A.size(0) >= 1 && (transposed || W.dim() <= 2 || A.sizes().slice(2) == W.sizes().slice(2));
    const bool b_ok = B.dim() == dims && B.numel() == B.size(0) * B.size(1);
    if (!a_ok || !b_ok) {
      std::ostringstream ss;
      ss << "shape mismatch at " << m.path << ": expected A [r >= 1, in, ...] and B [out, r, 1...], got A " << A.sizes()
         << ", B " << B.sizes();
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
      ss << "shape mismatch at " << m.path << ": parameter " << W.sizes() << ", A " << A.sizes() << ", B " << B.sizes();
      problems.push_back(ss.str());
      continue;
    }
    const int64_t max_rank = std::min(target.size(0), target.size(1));
    if (A2.size(0) > max_rank) {  // a larger B @ A has no more rank, only more parameters (as in Python)
      problems.push_back("rank too large at " + m.path + ": expected r <= min(in, out) = " + std::to_string(max_rank) +
                         ", got r = " + std::to_string(A2.size(0)));
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

void apply(const std::map<std::string, at::Tensor>& params, const std::map<std::string, std::string>& types,
           const Adapter& adapter, double weight, bool merge, const char* op) {
  TORCH_CHECK(std::isfinite(weight), "lora_ext::", op, ": expected a finite weight, got ", weight);
  auto updates = detail::plan_updates(params, adapter, weight, op, /*exact=*/false, types);
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

// module path -> class name ("Linear", "Embedding"; torch::nn: "torch::nn::LinearImpl")
std::map<std::string, std::string> types_of(torch::jit::Module& m) {
  std::map<std::string, std::string> out;
  for (const auto& s : m.named_modules()) {
    if (!s.name.empty() && s.value.type()->name()) out.emplace(s.name, s.value.type()->name()->name());
  }
  return out;
}

std::map<std::string, std::string> types_of(torch::nn::Module& m) {
  std::map<std::string, std::string> out;
  for (const auto& s : m.named_modules("", /*include_self=*/false)) out.emplace(s.key(), s.value()->name());
  return out;
}

template <typename M>
void apply(M& module, const Adapter& adapter, double weight, bool merge, const char* op) {
  apply(params_of(module), types_of(module), adapter, weight, merge, op);
}

}  // namespace

void merge_adapter(torch::jit::Module& module, const Adapter& adapter, double weight) {
  apply(module, adapter, weight, true, "merge_adapter");
}
void unmerge_adapter(torch::jit::Module& module, const Adapter& adapter, double weight) {
  apply(module, adapter, weight, false, "unmerge_adapter");
}
void merge_adapter(torch::nn::Module& module, const Adapter& adapter, double weight) {
  apply(module, adapter, weight, true, "merge_adapter");
}
void unmerge_adapter(torch::nn::Module& module, const Adapter& adapter, double weight) {
  apply(module, adapter, weight, false, "unmerge_adapter");
}

}  // namespace lora_ext
