// libFuzzer harness: an adapter folder written from the input (adapter_config.json = the bytes
// before the first NUL, adapter_model.safetensors = the bytes after it), read with
// lora_ext::load_adapter and applied to a small torch::nn network with every layer kind PEFT
// writes (Embedding, Linear fp32/bf16/fp16 in a ModuleList, Conv2d). Checked properties:
//  - merge_adapter either succeeds and unmerge_adapter then succeeds too, or it throws and has
//    changed nothing (apply.h: "throws c10::Error before anything is changed");
//  - every A/B pair, merged exactly into a weight holding special or plain values (merge_exact_codes,
//    merge_exact_, unmerge_exact_) in float32/bfloat16/float16, comes back bit for bit;
//  - an A/B pair in nn::LoraLinear: add_adapter validates it, forward runs.
#include <lora_ext/adapter.h>
#include <lora_ext/apply.h>
#include <lora_ext/nn.h>
#include <lora_ext/ops.h>

#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include "fuzz_common.h"

namespace {

struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    q = register_module("q", torch::nn::Linear(6, 6));
    v = register_module("v", torch::nn::Linear(6, 6));
    q->to(at::kBFloat16);
    v->to(at::kHalf);
  }
  torch::nn::Linear q{nullptr}, v{nullptr};
};
TORCH_MODULE(Block);

// The C++ twin of make_corpus.py's Net: parameter names emb.weight, l1.weight, blocks.0.q.weight,
// blocks.0.v.weight, conv.weight (and biases).
struct NetImpl : torch::nn::Module {
  NetImpl() {
    register_module("emb", torch::nn::Embedding(10, 8));
    register_module("l1", torch::nn::Linear(8, 6));
    register_module("blocks", torch::nn::ModuleList(Block()));
    register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 2)));
  }
};
TORCH_MODULE(Net);

struct State {
  Net net;
  std::vector<std::pair<at::Tensor, at::Tensor>> params;  // (parameter, its pristine copy)
  std::vector<at::Tensor> exact_bases;                    // special / plain values, in each dtype
};

State& state() {
  static State* s = [] {
    torch::manual_seed(0);
    auto* st = new State{Net(), {}, {}};
    for (auto& p : st->net->parameters()) st->params.emplace_back(p, p.detach().clone());
    // finite values of every magnitude, signed zeros, subnormals, extremes, Inf and NaN
    const float specials[] = {0.f,     -0.f,  1e-45f,         -1e-40f,  6e-8f,     1e-5f, 1.f,  -3.5f,
                              65504.f, 3e38f, -3.4028235e38f, INFINITY, -INFINITY, NAN,   0.1f, 1e4f};
    const auto base = at::tensor(at::ArrayRef<float>(specials, std::size(specials)));
    // and plain finite values, where the sparse list is usually empty (a NaN weight always goes there)
    const auto plain = at::linspace(-2.f, 3.f, 13);
    for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
      st->exact_bases.push_back(base.to(dt));
      st->exact_bases.push_back(plain.to(dt));
    }
    return st;
  }();
  return *s;
}

bool unchanged(const State& s) {
  for (const auto& [p, orig] : s.params)
    if (!fuzz::same_bits(p.detach(), orig)) return false;
  return true;
}

// A [r, in] / B [out, r] small enough to build a weight for (all sizes come from the file).
bool small_linear_pair(const lora_ext::AdapterModule& m) {
  const auto &A = m.lora_A, &B = m.lora_B;
  return !m.embedding && A.dim() == 2 && B.dim() == 2 && A.numel() > 0 && B.numel() > 0 && A.size(0) == B.size(1) &&
         A.size(1) * B.size(0) <= 4096;
}

// merge_exact_codes + merge_exact_ + unmerge_exact_ must restore W bit for bit.
void exact_round_trip(const State& s, const lora_ext::AdapterModule& m) {
  const int64_t out = m.lora_B.size(0), in = m.lora_A.size(1);
  for (const auto& base : s.exact_bases) {
    at::Tensor W =
        base.repeat({(out * in + base.numel() - 1) / base.numel()}).narrow(0, 0, out * in).reshape({out, in});
    const at::Tensor W0 = W.clone();
    const at::Tensor A = m.lora_A.to(at::kFloat), B = m.lora_B.to(at::kFloat);  // any base takes fp32
    lora_ext::ops::ExactMergeCodes codes;
    if (!fuzz::accepts([&] { codes = lora_ext::ops::merge_exact_codes(W, A, B, m.scaling); })) continue;
    lora_ext::ops::merge_exact_(W, A, B, m.scaling);
    lora_ext::ops::unmerge_exact_(W, codes, A, B, m.scaling);
    if (!fuzz::same_bits(W, W0)) fuzz::fail("exact merge/unmerge of " + m.path + " did not restore the weight");
  }
}

void lora_linear_forward(const lora_ext::AdapterModule& m) {
  const int64_t out = m.lora_B.size(0), in = m.lora_A.size(1);
  lora_ext::nn::LoraLinear layer(at::ones({out, in}), at::zeros({out}));
  if (!fuzz::accepts([&] { layer->add_adapter("fuzz", m.lora_A, m.lora_B, m.scaling); })) return;
  layer->forward(at::ones({2, in}));  // accepted adapters must run
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  state();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto* nul = static_cast<const uint8_t*>(std::memchr(data, 0, size));
  const size_t config_size = nul ? static_cast<size_t>(nul - data) : size;
  const auto& dir = fuzz::scratch_dir();
  fuzz::write_file(dir / "adapter_config.json", data, config_size);
  fuzz::write_file(dir / "adapter_model.safetensors", nul ? nul + 1 : data + size, nul ? size - config_size - 1 : 0);
  lora_ext::Adapter adapter;
  if (!fuzz::accepts([&] { adapter = lora_ext::load_adapter(dir.string()); })) return 0;

  State& s = state();
  {
    torch::NoGradGuard no_grad;
    for (auto& [p, orig] : s.params) p.copy_(orig);
  }
  // weight 2: a finite scaling near the double range then overflows, which merge_adapter must refuse
  if (fuzz::accepts([&] { lora_ext::merge_adapter(*s.net, adapter, 2.0); })) {
    lora_ext::unmerge_adapter(*s.net, adapter, 2.0);  // the same plan fits again: must not throw
  } else if (!unchanged(s)) {
    fuzz::fail("merge_adapter threw after changing a parameter");
  }

  std::vector<lora_ext::AdapterModule> modules;
  if (!fuzz::accepts([&] { modules = lora_ext::adapter_modules(adapter, /*ignore_other_keys=*/true); })) return 0;
  for (const auto& m : modules) {
    if (!small_linear_pair(m)) continue;
    exact_round_trip(s, m);
    lora_linear_forward(m);
  }
  return 0;
}
