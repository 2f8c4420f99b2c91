// lora_infer: runs a TorchScript transformer (examples/cpp/make_example.py's TinyLM) with PEFT
// adapter folders, from C++ only:
//   (a) merged:        lora_ext::merge_adapter into the TorchScript model's weights, then its forward
//   (b) unmerged:      the C++ twin of the model (tiny_lm.h), every linear a lora_ext::nn::LoraLinear
//                      holding all adapters, switched with set_adapter
//   (c) after unmerge: lora_ext::unmerge_adapter, back to the base model
// Prints a table of timings and differences; --out writes every output as a .safetensors file.
//
// usage: lora_infer MODEL.pt INPUTS.safetensors [NAME=]ADAPTER_DIR... [--out OUT.safetensors] [--repeat N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <torch/script.h>
#include <torch/torch.h>

#include <lora_ext/lora_ext.h>

#include "tiny_lm.h"

namespace {

struct Args {
  std::string model, inputs, out;
  std::vector<std::pair<std::string, std::string>> adapters;  // name, folder
  int repeat = 10;
};

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--out" && i + 1 < argc) {
      a.out = argv[++i];
    } else if (s == "--repeat" && i + 1 < argc) {
      a.repeat = std::max(1, std::stoi(argv[++i]));
    } else if (s.starts_with("--")) {
      throw std::runtime_error("unknown option " + s);
    } else {
      pos.push_back(s);
    }
  }
  if (pos.size() < 3) {
    throw std::runtime_error(
        "usage: lora_infer MODEL.pt INPUTS.safetensors [NAME=]ADAPTER_DIR... [--out OUT.safetensors] [--repeat N]");
  }
  a.model = pos[0];
  a.inputs = pos[1];
  for (size_t i = 2; i < pos.size(); ++i) {
    std::string dir = pos[i], name;
    if (const auto eq = dir.find('='); eq != std::string::npos) {
      name = dir.substr(0, eq);
      dir = dir.substr(eq + 1);
    } else {
      while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
      name = dir.substr(dir.find_last_of('/') + 1);
      if (name.starts_with("adapter_")) name = name.substr(8);
    }
    a.adapters.emplace_back(name, dir);
  }
  return a;
}

// median wall time of `repeat` calls of f, in ms; returns the last result in `out`
template <typename F>
double time_ms(int repeat, F&& f, torch::Tensor& out) {
  std::vector<double> ms;
  for (int i = 0; i < repeat; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    out = f();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return ms[ms.size() / 2];
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

}  // namespace

int main(int argc, char** argv) try {
  const Args args = parse(argc, argv);
  torch::InferenceMode inference;  // no autograd bookkeeping; merge/unmerge are in-place on frozen weights

  torch::jit::Module model = torch::jit::load(args.model);
  model.eval();
  TinyLM net(model);  // its own copy of the weights
  const auto inputs = lora_ext::read_safetensors(args.inputs).tensors;
  if (!inputs.count("input_ids")) throw std::runtime_error(args.inputs + " has no tensor \"input_ids\"");
  const torch::Tensor ids = inputs.at("input_ids");
  auto run_script = [&] { return model.forward({ids}).toTensor(); };

  std::map<std::string, torch::Tensor> out;
  std::printf("%-32s %10s %16s\n", "run", "ms/forward", "max|y - base|");
  const double base_ms = time_ms(args.repeat, run_script, out["base"]);
  std::printf("%-32s %10.3f %16s\n", "base (TorchScript)", base_ms, "-");
  const double net_ms = time_ms(args.repeat, [&] { return net.forward(ids); }, out["base.cpp_net"]);
  std::printf("%-32s %10.3f %16.3g\n", "base (C++ net, no adapter)", net_ms,
              max_diff(out["base.cpp_net"], out["base"]));

  std::vector<std::pair<std::string, lora_ext::Adapter>> adapters;
  for (const auto& [name, dir] : args.adapters) adapters.emplace_back(name, lora_ext::load_adapter(dir));

  for (const auto& [name, adapter] : adapters) {
    // (a) merged into the TorchScript model's weights (in place, PEFT's per-module scaling)
    const auto t0 = std::chrono::steady_clock::now();
    lora_ext::merge_adapter(model, adapter);
    const double merge_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const double ms = time_ms(args.repeat, run_script, out[name + ".merged"]);
    std::printf("%-32s %10.3f %16.3g   (merge took %.3f ms)\n", (name + " merged").c_str(), ms,
                max_diff(out[name + ".merged"], out["base"]), merge_ms);
    // (c) unmerged again: back to the base model
    lora_ext::unmerge_adapter(model, adapter);
    const double ms_after = time_ms(args.repeat, run_script, out[name + ".after_unmerge"]);
    std::printf("%-32s %10.3f %16.3g\n", (name + " after unmerge").c_str(), ms_after,
                max_diff(out[name + ".after_unmerge"], out["base"]));
    // (b) attached to the C++ net's LoraLinear layers, kept separate from the weights
    net.add_adapter(name, adapter);
  }
  // (b) switching between adapters on one network, unmerged
  for (const auto& [name, adapter] : adapters) {
    net.set_adapter(name);
    const double ms = time_ms(args.repeat, [&] { return net.forward(ids); }, out[name + ".unmerged"]);
    std::printf("%-32s %10.3f %16.3g   (max|unmerged - merged| %.3g)\n", (name + " unmerged (LoraLinear)").c_str(), ms,
                max_diff(out[name + ".unmerged"], out["base"]),
                max_diff(out[name + ".unmerged"], out[name + ".merged"]));
  }
  net.set_adapter(std::nullopt);

  if (!args.out.empty()) {
    lora_ext::write_safetensors(args.out, out, {{"producer", "lora_infer"}});
    std::printf("wrote %s\n", args.out.c_str());
  }
  return 0;
} catch (const c10::Error& e) {
  std::cerr << "lora_infer: " << e.what_without_backtrace() << "\n";
  return 1;
} catch (const std::exception& e) {
  std::cerr << "lora_infer: " << e.what() << "\n";
  return 1;
}
