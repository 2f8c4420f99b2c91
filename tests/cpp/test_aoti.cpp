// lora_ext::AotiModel on the packages of examples/cpp/generate/make_data.py --model tiny (DATA: base.pt2,
// slots.pt2, adapters/<name>/, prompt.safetensors, expected.safetensors): Python's tokens, refused adapters and
// inputs leave every weight unchanged, 100 merge/unmerge switches leave the base bit-identical, concurrent
// generation. Prints "ALL OK" and exits 0 on success.
//
// usage: test_aoti DATA
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>

#include <lora_ext/lora_ext.h>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << "\n";
  if (!ok) ++failures;
}

bool throws(const std::function<void()>& f, const std::string& text) {
  try {
    f();
  } catch (const std::exception& e) {
    const auto* c10e = dynamic_cast<const c10::Error*>(&e);
    const std::string msg = c10e ? c10e->what_without_backtrace() : e.what();
    if (msg.find(text) != std::string::npos) return true;
    std::cout << "     (message was: " << msg.substr(0, 400) << ")\n";
    return false;
  }
  std::cout << "     (nothing was thrown)\n";
  return false;
}

std::map<std::string, at::Tensor> snapshot(const lora_ext::AotiModel& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : m.weights()) out.emplace(name, t.clone());
  return out;
}

bool unchanged(const lora_ext::AotiModel& m, const std::map<std::string, at::Tensor>& snap) {
  for (const auto& [name, t] : snap) {
    if (!at::equal(m.weights().at(name), t)) {
      std::cout << "     (" << name << " changed)\n";
      return false;
    }
  }
  return true;
}

// `good` with one module's tensors replaced: the last module in key order (so a plan that applied modules in order
// before checking them would already have changed the others)
lora_ext::Adapter with_last_module(const lora_ext::Adapter& good,
                                   const std::function<void(at::Tensor&, at::Tensor&)>& f) {
  lora_ext::Adapter bad = good;
  std::string last_a;
  for (const auto& [k, v] : bad.tensors) {
    if (k.find(".lora_A.") != std::string::npos) last_a = k;
  }
  const std::string key_b = last_a.substr(0, last_a.find(".lora_A.")) + ".lora_B.weight";
  at::Tensor A = bad.tensors.at(last_a).clone(), B = bad.tensors.at(key_b).clone();
  f(A, B);
  bad.tensors[last_a] = A;
  bad.tensors[key_b] = B;
  return bad;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc != 2) {
    std::cerr << "usage: test_aoti DATA\n";
    return 2;
  }
  const std::string data = argv[1];
  c10::InferenceMode inference;
  auto prompt_file = lora_ext::read_safetensors(data + "/prompt.safetensors");
  const at::Tensor prompt = prompt_file.tensors.at("input_ids");
  const int64_t steps = std::stoll(prompt_file.metadata.at("steps"));
  const auto want = lora_ext::read_safetensors(data + "/expected.safetensors").tensors;
  const auto docs = lora_ext::load_adapter(data + "/adapters/docs");
  const auto code = lora_ext::load_adapter(data + "/adapters/code");

  lora_ext::AotiModel base(data + "/base.pt2");
  lora_ext::AotiModel slots(data + "/slots.pt2");
  check(base.adapter_slots() == 0 && slots.adapter_slots() == 2 && slots.max_rank() == 8, "metadata: slots, rank");
  const auto base_bits = snapshot(base);
  const auto slot_bits = snapshot(slots);

  // Python's tokens
  check(at::equal(base.generate(prompt, steps), want.at("base")), "base tokens equal Python's");
  base.merge_adapter(docs);
  check(base.merged_adapters() == 1, "one adapter merged");
  check(at::equal(base.generate(prompt, steps), want.at("merged.docs")), "docs merged: tokens equal Python's");
  base.unmerge_adapter();
  base.merge_adapter(code);
  check(at::equal(base.generate(prompt, steps), want.at("merged.code")), "code merged: tokens equal Python's");
  base.unmerge_adapter();
  check(unchanged(base, base_bits), "after unmerge the base is bit-identical");
  slots.load_adapter_slot(0, docs);
  slots.load_adapter_slot(1, code);
  const at::Tensor one = at::zeros({1}, at::kLong);  // slot 0 for one row (one + 1: slot 1, one - 1: the base)
  check(at::equal(slots.generate(prompt, steps, one), want.at("unmerged.docs")), "docs in slot 0: Python's tokens");
  check(at::equal(slots.generate(prompt, steps, one + 1), want.at("unmerged.code")), "code in slot 1: Python's tokens");
  check(at::equal(slots.generate(prompt, steps, one - 1), want.at("base")), "slot -1 rows: the base's tokens");
  const at::Tensor mixed = at::tensor({int64_t{0}, int64_t{1}}, at::kLong);
  check(at::equal(slots.generate(prompt.repeat({2, 1}), steps, mixed), want.at("per_row")),
        "both adapters in one batch: Python's per-row tokens");

  // mismatched adapters: refused before anything changes
  auto loaded = snapshot(slots);
  base.merge_adapter(docs);
  auto merged_bits = snapshot(base);
  const auto wrong_shape =
      with_last_module(docs, [](at::Tensor& A, at::Tensor& B) { A = at::randn({A.size(0), A.size(1) + 1}); });
  check(throws([&] { base.merge_adapter(wrong_shape); }, "nothing was changed"), "merge: wrong in_features refused");
  check(throws([&] { slots.load_adapter_slot(1, wrong_shape); }, "nothing was changed"),
        "slot: wrong in_features refused");
  auto renamed = docs;  // layer 1's modules renamed: paths the model does not have
  renamed.tensors.clear();
  for (const auto& [k, v] : docs.tensors) {
    std::string key = k;
    if (auto at = key.find("model.layers.1."); at != std::string::npos) key.replace(at, 13, "model.blocks.");
    renamed.tensors.emplace(key, v);
  }
  check(throws([&] { base.merge_adapter(renamed); }, "matches no parameter"), "merge: unknown module refused");
  check(throws([&] { slots.load_adapter_slot(0, renamed); }, "matches no parameter"), "slot: unknown module refused");
  auto head = docs;  // lm_head has a weight in the package but no slot (the export leaves the head out)
  head.tensors["base_model.model.lm_head.lora_A.weight"] = at::randn({docs.config.r, 64});
  head.tensors["base_model.model.lm_head.lora_B.weight"] = at::randn({base.vocab_size(), docs.config.r});
  check(throws([&] { slots.load_adapter_slot(0, head); }, "has no adapter slot"), "slot: a module without a slot");
  const auto nan = with_last_module(docs, [](at::Tensor& A, at::Tensor& B) { B[0][0] = NAN; });
  check(throws([&] { base.merge_adapter(nan); }, "non-finite"), "merge: NaN refused");
  check(throws([&] { slots.load_adapter_slot(0, nan); }, "non-finite"), "slot: NaN refused");
  auto big = docs;  // rank 16 > the package's max_rank 8, with a config that says so
  big.config.r = 16;
  for (auto& [k, v] : big.tensors) {
    v = k.find(".lora_A.") != std::string::npos ? at::randn({16, v.size(1)}) : at::randn({v.size(0), 16});
  }
  check(throws([&] { slots.load_adapter_slot(0, big); }, "max_rank"), "slot: rank above max_rank refused");
  auto half = with_last_module(docs, [](at::Tensor& A, at::Tensor& B) {
    A = A.narrow(0, 0, 2);
    B = B.narrow(1, 0, 2);
  });
  check(throws([&] { base.merge_adapter(half); }, "rank mismatch"), "merge: rank different from the config refused");
  check(throws([&] { slots.load_adapter_slot(7, docs); }, "expected a slot in [0, 2)"), "slot: index out of range");
  check(throws([&] { base.load_adapter_slot(0, docs); }, "no adapter slots"), "slot on a package without slots");
  check(unchanged(base, merged_bits) && base.merged_adapters() == 1, "merged weights unchanged by the refusals");
  check(unchanged(slots, loaded), "slots unchanged by the refusals");
  base.unmerge_adapter();
  check(throws([&] { base.unmerge_adapter(); }, "expected a merged adapter"), "unmerge with nothing merged");

  // bad inputs
  check(throws([&] { base.forward(at::full({1, 3}, base.vocab_size(), at::kLong)); }, "token ids in [0, "),
        "token id >= vocab refused");
  check(throws([&] { base.forward(prompt.to(at::kInt)); }, "int64"), "int32 ids refused");
  check(throws([&] { base.forward(at::zeros({1, base.max_seq() + 1}, at::kLong)); }, "exported ranges"),
        "sequence above max_seq refused");
  check(throws([&] { base.forward(prompt, one); }, "no adapter slots"), "adapter_ids on a base package refused");
  check(throws([&] { slots.forward(prompt); }, "expected adapter_ids"), "missing adapter_ids refused");
  check(throws([&] { slots.forward(prompt, one + 2); }, "adapter_ids in [-1, 2)"), "slot id out of range refused");
  check(throws([&] { base.generate(prompt, base.max_seq()); }, "exceed the exported max_seq"), "too many steps");
  check(throws([] { lora_ext::AotiModel("/nonexistent.pt2"); }, ""), "missing package refused");

  // 100 switches between the two adapters, merged, leave the base bit-identical
  for (int i = 0; i < 100; ++i) {
    base.merge_adapter(i % 2 ? code : docs);
    base.unmerge_adapter();
  }
  base.merge_adapter(docs);
  base.merge_adapter(code, 0.5);  // stacked merges undo in reverse order
  base.unmerge_adapter();
  base.unmerge_adapter();
  check(unchanged(base, base_bits), "100 merge/unmerge switches and a stacked merge: the base is bit-identical");
  for (int i = 0; i < 100; ++i) slots.load_adapter_slot(i % 2, i % 2 ? code : docs);
  slots.clear_adapter_slot(0);
  slots.clear_adapter_slot(1);
  check(unchanged(slots, slot_bits), "100 slot loads, then clear: the slot package is as exported");

  // several threads at once, each its own per-row mix: equal to serial
  slots.load_adapter_slot(0, docs);
  slots.load_adapter_slot(1, code);
  std::vector<at::Tensor> ids{mixed, mixed.flip(0), -mixed.abs(), at::tensor({int64_t{1}, int64_t{-1}}, at::kLong)};
  std::vector<at::Tensor> serial, parallel(ids.size());
  for (const auto& a : ids) serial.push_back(slots.generate(prompt.repeat({2, 1}), steps, a));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ids.size(); ++i) {
    threads.emplace_back([&, i] {
      c10::InferenceMode guard;
      parallel[i] = slots.generate(prompt.repeat({2, 1}), steps, ids[i]);
    });
  }
  for (auto& t : threads) t.join();
  bool same = true;
  for (size_t i = 0; i < ids.size(); ++i) same = same && at::equal(serial[i], parallel[i]);
  check(same, "4 threads with different per-row mixes: tokens equal the serial runs");

  if (failures) {
    std::cout << failures << " FAILED\n";
    return 1;
  }
  std::cout << "ALL OK\n";
  return 0;
} catch (const std::exception& e) {
  std::cout << "FAIL uncaught: " << e.what() << "\n";
  return 1;
}
