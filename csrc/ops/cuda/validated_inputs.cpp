#include "ops/cuda/validated_inputs.h"

#include <algorithm>
#include <iterator>

namespace lora_ext::cuda {

namespace {

int64_t version_of(const at::Tensor& t) {
  return t.is_inference() ? -1 : t._version();
}

}  // namespace

bool ValidatedInputs::matches(const Entry& e, std::initializer_list<at::Tensor> ts) const {
  if (e.tensors.size() != ts.size()) return false;
  size_t i = 0;
  for (const auto& t : ts) {
    const Weak& w = e.tensors[i];
    if (w.expired() || w._unsafe_get_target() != t.unsafeGetTensorImpl() || e.versions[i] != version_of(t)) {
      return false;
    }
    ++i;
  }
  return true;
}

bool ValidatedInputs::contains(std::initializer_list<at::Tensor> ts) const {
  if (ts.size() == 0) return false;
  const std::lock_guard<std::mutex> lock(mu_);
  const auto [lo, hi] = entries_.equal_range(ts.begin()->unsafeGetTensorImpl());
  return std::any_of(lo, hi, [&](const auto& kv) { return matches(kv.second, ts); });
}

void ValidatedInputs::insert(std::initializer_list<at::Tensor> ts) {
  if (ts.size() == 0) return;
  Entry e;
  for (const auto& t : ts) {
    e.tensors.emplace_back(t.getIntrusivePtr());
    e.versions.push_back(version_of(t));
  }
  const c10::TensorImpl* key = ts.begin()->unsafeGetTensorImpl();
  const std::lock_guard<std::mutex> lock(mu_);
  // older entries of this first tensor (an earlier version, or gone) are stale
  for (auto [it, hi] = entries_.equal_range(key); it != hi;) {
    const Entry& old = it->second;
    it = (old.tensors[0].expired() || old.versions[0] != e.versions[0]) ? entries_.erase(it) : std::next(it);
  }
  if (entries_.size() >= capacity_) entries_.clear();
  entries_.emplace(key, std::move(e));
}

}  // namespace lora_ext::cuda
