// generate: greedy text generation from C++ with an AOTInductor package of a causal LM and PEFT adapters
// (no Python in the process). DATA is the folder make_data.py writes:
//   base.pt2            form (a), the plain base: each adapter is merged into its weights, then unmerged exactly
//   slots.pt2           form (b), adapter slots: each adapter unmerged in its slot, then both in one batch
//   prompt.safetensors  input_ids [1, T]; metadata "adapters" (names, in slot order) and "steps"
//   adapters/<name>/    PEFT adapter folders
// It prints each run's token ids and writes them (base, merged.<name>, unmerged.<name>, per_row) to --out.
// --bench N adds the figures: N rounds (alternating order) of tokens/s at batch 1 and 8 per variant, merge /
// unmerge / slot-load times, and the process's RSS.
//
// usage: generate DATA [--out OUT.safetensors] [--bench ROUNDS] [--steps N] [--threads N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <lora_ext/lora_ext.h>

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// "VmRSS" / "VmHWM" of this process, MiB
double proc_status_mib(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stod(line.substr(key.size() + 1)) / 1024.0;
  }
  return -1;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);) out.push_back(item);
  return out;
}

std::string ids_str(const at::Tensor& t) {
  std::ostringstream ss;
  auto c = t.contiguous();
  for (int64_t i = 0; i < c.size(0); ++i) {
    ss << (i ? " | " : "");
    for (int64_t j = 0; j < c.size(1); ++j) ss << (j ? " " : "") << c[i][j].item<int64_t>();
  }
  return ss.str();
}

// true when every weight is bit-identical to the snapshot
bool same_bits(const std::map<std::string, at::Tensor>& now, const std::map<std::string, at::Tensor>& snap) {
  for (const auto& [name, t] : snap) {
    if (!at::equal(now.at(name), t)) return false;
  }
  return true;
}

std::map<std::string, at::Tensor> snapshot(const lora_ext::AotiModel& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : m.weights()) out.emplace(name, t.clone());
  return out;
}

struct Range {
  std::vector<double> v;
  std::string str(int prec = 1) const {
    if (v.empty()) return "-";
    auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    std::ostringstream ss;
    ss.setf(std::ios::fixed);
    ss.precision(prec);
    ss << *lo << "-" << *hi;
    return ss.str();
  }
};

}  // namespace

int main(int argc, char** argv) try {
  std::string data, out;
  int bench = 0, threads = 0;
  int64_t steps = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--out" && i + 1 < argc)
      out = argv[++i];
    else if (s == "--bench" && i + 1 < argc)
      bench = std::stoi(argv[++i]);
    else if (s == "--steps" && i + 1 < argc)
      steps = std::stoll(argv[++i]);
    else if (s == "--threads" && i + 1 < argc)
      threads = std::stoi(argv[++i]);
    else if (s.rfind("--", 0) == 0 || !data.empty())
      throw std::runtime_error("unknown argument " + s);
    else
      data = s;
  }
  if (data.empty()) {
    throw std::runtime_error("usage: generate DATA [--out OUT.safetensors] [--bench ROUNDS] [--steps N] [--threads N]");
  }
  if (threads > 0) at::set_num_threads(threads);
  c10::InferenceMode inference;
  const double rss0 = proc_status_mib("VmRSS");

  auto prompt_file = lora_ext::read_safetensors(data + "/prompt.safetensors");
  const at::Tensor prompt = prompt_file.tensors.at("input_ids");
  const auto names = split(prompt_file.metadata.at("adapters"), ',');
  if (steps < 0) steps = std::stoll(prompt_file.metadata.at("steps"));
  std::vector<lora_ext::Adapter> adapters;
  for (const auto& n : names) adapters.push_back(lora_ext::load_adapter(data + "/adapters/" + n));

  auto t0 = Clock::now();
  lora_ext::AotiModel base(data + "/base.pt2");
  const double load_base_s = seconds_since(t0);
  t0 = Clock::now();
  lora_ext::AotiModel slots(data + "/slots.pt2");
  const double load_slots_s = seconds_since(t0);
  const double rss_loaded = proc_status_mib("VmRSS"), anon_loaded = proc_status_mib("RssAnon");
  std::printf(
      "loaded base.pt2 in %.2f s, slots.pt2 (%lld slots, max rank %lld) in %.2f s; prompt %lld tokens, "
      "%lld new tokens per run\n",
      load_base_s, (long long)slots.adapter_slots(), (long long)slots.max_rank(), load_slots_s,
      (long long)prompt.size(1), (long long)steps);

  std::map<std::string, at::Tensor> tokens;
  auto show = [&](const std::string& key, const at::Tensor& t) {
    tokens[key] = t;
    std::printf("c++ %16s: %s\n", key.c_str(), ids_str(t).c_str());
  };
  const auto base_bits = snapshot(base);
  show("base", base.generate(prompt, steps));
  for (size_t i = 0; i < names.size(); ++i) {
    base.merge_adapter(adapters[i]);
    show("merged." + names[i], base.generate(prompt, steps));
    base.unmerge_adapter();
  }
  std::printf("base weights after merge/unmerge of every adapter: %s\n",
              same_bits(base.weights(), base_bits) ? "bit-identical" : "CHANGED");
  std::vector<int64_t> row_slots;
  for (size_t i = 0; i < names.size(); ++i) {
    slots.load_adapter_slot(static_cast<int64_t>(i), adapters[i]);
    row_slots.push_back(static_cast<int64_t>(i));
  }
  for (size_t i = 0; i < names.size(); ++i) {
    show("unmerged." + names[i], slots.generate(prompt, steps, at::full({1}, static_cast<int64_t>(i), at::kLong)));
  }
  const at::Tensor per_row_ids = at::tensor(row_slots, at::kLong);
  show("per_row", slots.generate(prompt.repeat({(int64_t)names.size(), 1}), steps, per_row_ids));
  if (!out.empty()) lora_ext::write_safetensors(out, tokens);

  if (bench > 0) {
    // tokens/s of every variant at batch 1 and 8, rounds interleaved with alternating order
    struct Variant {
      std::string name;
      std::function<void(int64_t)> run;                       // batch size
      std::function<void()> setup = [] {}, teardown = [] {};  // not timed
    };
    auto ids_for = [&](int64_t b, bool mixed) {
      std::vector<int64_t> v;
      for (int64_t i = 0; i < b; ++i) v.push_back(mixed ? i % (int64_t)names.size() : 0);
      return at::tensor(v, at::kLong);
    };
    std::vector<Variant> variants = {
        {"base (form a)", [&](int64_t b) { base.generate(prompt.repeat({b, 1}), steps); }},
        {"merged (form a)", [&](int64_t b) { base.generate(prompt.repeat({b, 1}), steps); },
         [&] { base.merge_adapter(adapters[0]); }, [&] { base.unmerge_adapter(); }},
        {"base (form b, slot -1)",
         [&](int64_t b) { slots.generate(prompt.repeat({b, 1}), steps, at::full({b}, -1, at::kLong)); }},
        {"unmerged (form b)", [&](int64_t b) { slots.generate(prompt.repeat({b, 1}), steps, ids_for(b, false)); }},
        {"per-row (form b)", [&](int64_t b) { slots.generate(prompt.repeat({b, 1}), steps, ids_for(b, true)); }},
    };
    std::map<std::pair<std::string, int64_t>, Range> tps;
    Range merge_s, unmerge_s, slot_s;
    for (int round = 0; round < bench; ++round) {
      for (size_t k = 0; k < variants.size(); ++k) {
        auto& v = variants[round % 2 ? variants.size() - 1 - k : k];
        v.setup();
        for (int64_t b : {int64_t{1}, int64_t{8}}) {
          auto t = Clock::now();
          v.run(b);
          tps[{v.name, b}].v.push_back(double(b * steps) / seconds_since(t));
        }
        v.teardown();
      }
      for (size_t i = 0; i < names.size(); ++i) {
        auto t = Clock::now();
        base.merge_adapter(adapters[i]);
        merge_s.v.push_back(seconds_since(t) * 1e3);
        t = Clock::now();
        base.unmerge_adapter();
        unmerge_s.v.push_back(seconds_since(t) * 1e3);
        t = Clock::now();
        slots.load_adapter_slot(static_cast<int64_t>(i), adapters[i]);
        slot_s.v.push_back(seconds_since(t) * 1e3);
      }
    }
    std::printf("\n%d rounds, %d threads, %lld new tokens from a %lld-token prompt (the prefix recomputed per token)\n",
                bench, at::get_num_threads(), (long long)steps, (long long)prompt.size(1));
    std::printf("%-26s %18s %18s\n", "C++ tokens/s (range)", "batch 1", "batch 8");
    for (const auto& v : variants) {
      std::printf("%-26s %18s %18s\n", v.name.c_str(), tps[{v.name, 1}].str().c_str(), tps[{v.name, 8}].str().c_str());
    }
    std::printf("merge_adapter (exact) %s ms, unmerge_adapter %s ms, load_adapter_slot %s ms\n", merge_s.str().c_str(),
                unmerge_s.str().c_str(), slot_s.str(2).c_str());
    std::printf("base weights after the rounds: %s\n",
                same_bits(base.weights(), base_bits) ? "bit-identical" : "CHANGED");
  }
  std::printf(
      "RSS: %.0f MiB at start, %.0f MiB with both packages loaded (anonymous %.0f), %.0f MiB now (anonymous "
      "%.0f, file-backed %.0f), peak %.0f MiB\n",
      rss0, rss_loaded, anon_loaded, proc_status_mib("VmRSS"), proc_status_mib("RssAnon"), proc_status_mib("RssFile"),
      proc_status_mib("VmHWM"));
  return 0;
} catch (const std::exception& e) {
  std::cerr << "generate: " << e.what() << "\n";
  return 1;
}
