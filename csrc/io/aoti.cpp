#include <lora_ext/aoti.h>

#include <cmath>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <lora_ext/ops.h>

#include "io/apply_plan.h"

namespace lora_ext {

namespace {

constexpr const char* kFormat = "lora_ext.causal_lm/1";

int64_t meta_int(const std::map<std::string, std::string>& meta, const std::string& key, const std::string& path) {
  auto it = meta.find(key);
  TORCH_CHECK(it != meta.end(), "lora_ext::AotiModel: ", path, " has no metadata ", key,
              "; expected a package written by lora_ext.export.export_causal_lm");
  try {
    size_t used = 0;
    const int64_t v = std::stoll(it->second, &used);
    if (used == it->second.size() && v >= 0) return v;
  } catch (const std::exception&) {
  }
  TORCH_CHECK(false, "lora_ext::AotiModel: ", path, ": expected metadata ", key, " to be an integer >= 0, got '",
              it->second, "'");
  return 0;
}

struct Slot {
  at::Tensor A, Bt, scales;  // [n, r_max, in], [n, r_max, out], float32 [n]
};

// An adapter module checked against a slot: [r, in] and [r, out] (B transposed), scaling.
struct SlotWrite {
  Slot* slot;
  at::Tensor A, Bt;
  double scale;
};

void zero_slot(std::map<std::string, Slot>& slots, int64_t slot) {
  for (auto& [path, s] : slots) {
    s.A[slot].zero_();
    s.Bt[slot].zero_();
    s.scales[slot].zero_();
  }
}

}  // namespace

struct AotiModel::Impl {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::map<std::string, std::string> meta;
  std::map<std::string, at::Tensor> weights;
  std::map<std::string, Slot> slots;  // by module path
  int64_t n_slots = 0, max_rank = 0, vocab = 0, max_batch = 0, max_seq = 0;
  struct Merged {
    std::vector<detail::Update> updates;
    std::vector<ops::ExactMergeCodes> codes;
  };
  std::vector<Merged> merged;
  mutable std::shared_mutex mu;  // forward: shared; changes of the weights: exclusive
};

AotiModel::AotiModel(const std::string& package_path) : impl_(std::make_unique<Impl>()) {
  auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package_path, "model");
  auto fmt = meta.find("lora_ext.format");
  TORCH_CHECK(fmt != meta.end() && fmt->second == kFormat, "lora_ext::AotiModel: expected a package written by ",
              "lora_ext.export.export_causal_lm (metadata lora_ext.format = ", kFormat, "), got ",
              fmt == meta.end() ? std::string("no lora_ext.format") : "'" + fmt->second + "'", " in ", package_path);
  impl_->meta.insert(meta.begin(), meta.end());
  auto& I = *impl_;
  I.n_slots = meta_int(I.meta, "lora_ext.adapter_slots", package_path);
  I.max_rank = meta_int(I.meta, "lora_ext.max_rank", package_path);
  I.vocab = meta_int(I.meta, "lora_ext.vocab_size", package_path);
  I.max_batch = meta_int(I.meta, "lora_ext.max_batch", package_path);
  I.max_seq = meta_int(I.meta, "lora_ext.max_seq", package_path);
  const std::string prefix = I.meta.count("lora_ext.param_prefix") ? I.meta.at("lora_ext.param_prefix") : "";
  I.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package_path, "model");
  // On the CPU the container copies the constants into a blob it owns; these tensors alias it
  for (auto& [fqn, t] : I.loader->get_runner()->extract_constants_map(/*use_inactive=*/false)) {
    const std::string name = fqn.compare(0, prefix.size(), prefix) == 0 ? fqn.substr(prefix.size()) : fqn;
    I.weights.emplace(name, t);
  }
  const std::string a_suffix = ".lora_A";
  for (const auto& [name, t] : I.weights) {
    if (name.size() <= a_suffix.size() || name.compare(name.size() - a_suffix.size(), a_suffix.size(), a_suffix))
      continue;
    const std::string path = name.substr(0, name.size() - a_suffix.size());
    auto bt = I.weights.find(path + ".lora_Bt");
    auto sc = I.weights.find(path + ".lora_scales");
    auto w = I.weights.find(path + ".weight");
    TORCH_CHECK(bt != I.weights.end() && sc != I.weights.end() && w != I.weights.end(),
                "lora_ext::AotiModel: slot module ", path, " lacks lora_Bt, lora_scales or weight in ", package_path);
    const at::Tensor& W = w->second;
    TORCH_CHECK(W.dim() == 2 && t.dim() == 3 && t.size(0) == I.n_slots && t.size(1) == I.max_rank &&
                    t.size(2) == W.size(1) &&
                    bt->second.sizes() == at::IntArrayRef({I.n_slots, I.max_rank, W.size(0)}) &&
                    sc->second.sizes() == at::IntArrayRef({I.n_slots}) && sc->second.scalar_type() == at::kFloat,
                "lora_ext::AotiModel: slot tensors of ", path, " do not match the metadata (", I.n_slots,
                " slots, rank ", I.max_rank, "): weight ", W.sizes(), ", lora_A ", t.sizes(), ", lora_Bt ",
                bt->second.sizes(), ", lora_scales ", sc->second.sizes());
    I.slots.emplace(path, Slot{t, bt->second, sc->second});
  }
  // every slot tensor must be its own memory: a constant shared between modules would make one module's adapter
  // another's (Inductor shares constants it considers the same)
  std::set<const void*> seen;
  for (const auto& [path, s] : I.slots) {
    for (const at::Tensor* t : {&s.A, &s.Bt, &s.scales}) {
      TORCH_CHECK(seen.insert(t->data_ptr()).second, "lora_ext::AotiModel: ", package_path, ": slot tensors of ", path,
                  " share memory with another module's; expected one buffer per module");
    }
  }
  TORCH_CHECK((I.n_slots == 0) == I.slots.empty(), "lora_ext::AotiModel: ", package_path, " declares ", I.n_slots,
              " adapter slots but holds slot tensors for ", I.slots.size(), " modules");
}

AotiModel::~AotiModel() = default;

int64_t AotiModel::adapter_slots() const {
  return impl_->n_slots;
}
int64_t AotiModel::max_rank() const {
  return impl_->max_rank;
}
int64_t AotiModel::vocab_size() const {
  return impl_->vocab;
}
int64_t AotiModel::max_batch() const {
  return impl_->max_batch;
}
int64_t AotiModel::max_seq() const {
  return impl_->max_seq;
}
const std::map<std::string, std::string>& AotiModel::metadata() const {
  return impl_->meta;
}
const std::map<std::string, at::Tensor>& AotiModel::weights() const {
  return impl_->weights;
}
size_t AotiModel::merged_adapters() const {
  std::shared_lock lock(impl_->mu);
  return impl_->merged.size();
}

at::Tensor AotiModel::forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& adapter_ids) {
  auto& I = *impl_;
  TORCH_CHECK(input_ids.defined() && input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong &&
                  input_ids.device().is_cpu(),
              "lora_ext::AotiModel::forward: expected input_ids int64 [batch, seq] on the CPU, got ",
              input_ids.defined() ? input_ids.toString() + " of shape " + c10::str(input_ids.sizes()) : "undefined");
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  TORCH_CHECK(B >= 1 && B <= I.max_batch && T >= 1 && T <= I.max_seq, "lora_ext::AotiModel::forward: expected ",
              "1 <= batch <= ", I.max_batch, " and 1 <= seq <= ", I.max_seq, " (the exported ranges), got [", B, ", ",
              T, "]");
  const auto [lo, hi] = at::aminmax(input_ids);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < I.vocab, "lora_ext::AotiModel::forward: expected ",
              "token ids in [0, ", I.vocab, "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  std::vector<at::Tensor> inputs{input_ids.contiguous()};
  if (I.n_slots > 0) {
    TORCH_CHECK(adapter_ids.has_value() && adapter_ids->defined() && adapter_ids->dim() == 1 &&
                    adapter_ids->scalar_type() == at::kLong && adapter_ids->size(0) == B &&
                    adapter_ids->device().is_cpu(),
                "lora_ext::AotiModel::forward: this package has ", I.n_slots, " adapter slots; expected adapter_ids ",
                "int64 [", B, "] on the CPU (one slot per row, -1: the base), got ",
                adapter_ids.has_value() && adapter_ids->defined()
                    ? adapter_ids->toString() + " of shape " + c10::str(adapter_ids->sizes())
                    : "none");
    const auto [alo, ahi] = at::aminmax(*adapter_ids);
    TORCH_CHECK(alo.item<int64_t>() >= -1 && ahi.item<int64_t>() < I.n_slots,
                "lora_ext::AotiModel::forward: ", "expected adapter_ids in [-1, ", I.n_slots, "), got values in [",
                alo.item<int64_t>(), ", ", ahi.item<int64_t>(), "]");
    inputs.push_back(adapter_ids->contiguous());
  } else {
    TORCH_CHECK(!adapter_ids.has_value(), "lora_ext::AotiModel::forward: this package has no adapter slots ",
                "(exported with adapter_slots=0); expected no adapter_ids, got one (use merge_adapter)");
  }
  std::shared_lock lock(I.mu);
  auto out = I.loader->run(inputs);
  TORCH_CHECK(out.size() == 1, "lora_ext::AotiModel::forward: expected one output from the package, got ", out.size());
  return out[0];
}

at::Tensor AotiModel::generate(const at::Tensor& input_ids, int64_t steps,
                               const std::optional<at::Tensor>& adapter_ids) {
  TORCH_CHECK(steps >= 0, "lora_ext::AotiModel::generate: expected steps >= 0, got ", steps);
  TORCH_CHECK(input_ids.dim() != 2 || input_ids.size(1) + steps - 1 <= impl_->max_seq,
              "lora_ext::AotiModel::generate: a prompt of ", input_ids.size(-1), " tokens and ", steps,
              " new tokens exceed the exported max_seq ", impl_->max_seq);
  at::Tensor ids = input_ids;
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < steps; ++i) {
    at::Tensor next = forward(ids, adapter_ids).argmax(-1, /*keepdim=*/true);
    out.push_back(next);
    ids = at::cat({ids, next}, 1);
  }
  return out.empty() ? at::empty({input_ids.size(0), 0}, input_ids.options()) : at::cat(out, 1);
}

void AotiModel::merge_adapter(const Adapter& adapter, double weight) {
  TORCH_CHECK(std::isfinite(weight), "lora_ext::AotiModel::merge_adapter: expected a finite weight, got ", weight);
  auto& I = *impl_;
  std::unique_lock lock(I.mu);
  Impl::Merged m;
  m.updates = detail::plan_updates(I.weights, adapter, weight, "AotiModel::merge_adapter", /*exact=*/true);
  at::NoGradGuard no_grad;
  for (auto& u : m.updates) m.codes.push_back(ops::merge_exact_codes(u.target, u.A, u.B, u.scale));
  for (auto& u : m.updates) ops::merge_exact_(u.target, u.A, u.B, u.scale);  // nothing throws past the plan
  I.merged.push_back(std::move(m));
}

void AotiModel::unmerge_adapter() {
  auto& I = *impl_;
  std::unique_lock lock(I.mu);
  TORCH_CHECK(!I.merged.empty(), "lora_ext::AotiModel::unmerge_adapter: expected a merged adapter, got none");
  at::NoGradGuard no_grad;
  auto& m = I.merged.back();
  for (size_t i = m.updates.size(); i-- > 0;) {
    auto& u = m.updates[i];
    ops::unmerge_exact_(u.target, m.codes[i], u.A, u.B, u.scale);
  }
  I.merged.pop_back();
}

void AotiModel::load_adapter_slot(int64_t slot, const Adapter& adapter) {
  auto& I = *impl_;
  TORCH_CHECK(I.n_slots > 0, "lora_ext::AotiModel::load_adapter_slot: this package has no adapter slots; export ",
              "with lora_ext.export.export_causal_lm(..., adapter_slots=n) or use merge_adapter");
  TORCH_CHECK(slot >= 0 && slot < I.n_slots, "lora_ext::AotiModel::load_adapter_slot: expected a slot in [0, ",
              I.n_slots, "), got ", slot);
  TORCH_CHECK(!adapter.config.fan_in_fan_out, "lora_ext::AotiModel::load_adapter_slot: expected an adapter of ",
              "nn.Linear layers, got fan_in_fan_out = true (GPT-2 Conv1D layers have no slots)");
  // the checks merge_adapter makes (every module: a weight of its name, shapes, rank, finite values) ...
  const auto updates = detail::plan_updates(I.weights, adapter, 1.0, "AotiModel::load_adapter_slot");
  // ... and the slot's own: the module has one, the rank fits in it
  std::vector<std::string> problems;
  std::vector<SlotWrite> writes;
  for (const auto& u : updates) {
    auto it = I.slots.find(u.path);
    if (it == I.slots.end() || u.target.sizes() != at::IntArrayRef({it->second.Bt.size(2), it->second.A.size(2)})) {
      problems.push_back("module " + u.path + " has no adapter slot (the package's slots are on " +
                         std::to_string(I.slots.size()) + " linear modules, e.g. " + I.slots.begin()->first + ")");
    } else if (u.A.size(0) > I.max_rank) {
      problems.push_back("rank " + std::to_string(u.A.size(0)) + " at " + u.path + " is above the package's max_rank " +
                         std::to_string(I.max_rank));
    } else {
      Slot& s = it->second;
      writes.push_back({&s, u.A.to(s.A.scalar_type()), u.B.t().to(s.Bt.scalar_type()), u.scale});
    }
  }
  if (!problems.empty()) {
    std::string msg;
    for (const auto& p : problems) msg += "\n  " + p;
    TORCH_CHECK(false, "lora_ext::AotiModel::load_adapter_slot: the adapter does not fit the package (nothing was ",
                "changed):", msg);
  }
  std::unique_lock lock(I.mu);
  at::NoGradGuard no_grad;
  zero_slot(I.slots, slot);
  for (auto& w : writes) {
    const int64_t r = w.A.size(0);
    w.slot->A[slot].narrow(0, 0, r).copy_(w.A);
    w.slot->Bt[slot].narrow(0, 0, r).copy_(w.Bt);
    w.slot->scales[slot].fill_(w.scale);
  }
}

void AotiModel::clear_adapter_slot(int64_t slot) {
  auto& I = *impl_;
  TORCH_CHECK(slot >= 0 && slot < I.n_slots, "lora_ext::AotiModel::clear_adapter_slot: expected a slot in [0, ",
              I.n_slots, "), got ", slot);
  std::unique_lock lock(I.mu);
  at::NoGradGuard no_grad;
  zero_slot(I.slots, slot);
}

}  // namespace lora_ext
