#include "tiny_lm.h"

#include <algorithm>
#include <stdexcept>

TinyLM::TinyLM(const torch::jit::Module& scripted) {
  n_heads_ = scripted.attr("n_heads").toInt();
  std::map<std::string, torch::Tensor> all;
  for (const auto& p : scripted.named_parameters(/*recurse=*/true)) all[p.name] = p.value.detach().clone();
  for (const auto& [name, t] : all) {
    const std::string suffix = ".weight";
    const std::string path = name.size() > suffix.size() ? name.substr(0, name.size() - suffix.size()) : "";
    const bool is_linear = name.ends_with(suffix) && (name.ends_with("_proj.weight") || path == "lm_head");
    if (is_linear) {
      auto b = all.find(path + ".bias");
      linears_.emplace(
          path, lora_ext::nn::LoraLinear(t, b == all.end() ? std::nullopt : std::optional<torch::Tensor>(b->second)));
    }
    if (name.starts_with("blocks.")) n_layers_ = std::max<int64_t>(n_layers_, std::stoll(name.substr(7)) + 1);
  }
  for (const auto& [name, t] : all) {
    const auto dot = name.rfind('.');
    if (!linears_.count(name.substr(0, dot))) params_[name] = t;
  }
}

torch::Tensor TinyLM::param(const std::string& name) const {
  auto it = params_.find(name);
  if (it == params_.end()) throw std::runtime_error("TinyLM: the model has no parameter " + name);
  return it->second;
}

torch::Tensor TinyLM::linear(const std::string& path, const torch::Tensor& x) {
  auto it = linears_.find(path);
  if (it == linears_.end()) throw std::runtime_error("TinyLM: the model has no linear " + path);
  return it->second->forward(x);
}

torch::Tensor TinyLM::layer_norm(const std::string& path, const torch::Tensor& x) const {
  return torch::layer_norm(x, {x.size(-1)}, param(path + ".weight"), param(path + ".bias"), 1e-5);
}

torch::Tensor TinyLM::forward(const torch::Tensor& ids) {
  const int64_t b = ids.size(0), t = ids.size(1);
  auto x = torch::embedding(param("embed.weight"), ids) +
           torch::embedding(param("pos.weight"), torch::arange(t, ids.options().dtype(torch::kLong)));
  const int64_t d = x.size(-1), h = n_heads_;
  for (int64_t l = 0; l < n_layers_; ++l) {
    const std::string blk = "blocks." + std::to_string(l);
    auto y = layer_norm(blk + ".ln1", x);
    auto heads = [&](const std::string& proj) {
      return linear(blk + ".attn." + proj, y).view({b, t, h, d / h}).transpose(1, 2);
    };
    auto a = at::scaled_dot_product_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"), std::nullopt, 0.0,
                                              /*is_causal=*/true);
    x = x + linear(blk + ".attn.o_proj", a.transpose(1, 2).reshape({b, t, d}));
    y = layer_norm(blk + ".ln2", x);
    x = x + linear(blk + ".mlp.down_proj", torch::gelu(linear(blk + ".mlp.up_proj", y)));
  }
  return linear("lm_head", layer_norm("ln_f", x));
}

void TinyLM::add_adapter(const std::string& name, const lora_ext::Adapter& adapter) {
  const auto modules = lora_ext::adapter_modules(adapter);
  for (const auto& m : modules) {  // check everything first, so a bad adapter changes nothing
    if (m.embedding || !linears_.count(m.path)) {
      throw std::runtime_error("TinyLM: adapter \"" + name + "\" targets " + m.path +
                               ", which is not a linear of this model (run such adapters merged)");
    }
    const auto& w = linears_.at(m.path)->weight;
    if (m.lora_A.dim() != 2 || m.lora_B.dim() != 2 || m.lora_A.size(1) != w.size(1) || m.lora_B.size(0) != w.size(0) ||
        m.lora_A.size(0) != m.lora_B.size(1)) {
      throw std::runtime_error("TinyLM: adapter \"" + name + "\" does not fit " + m.path);
    }
    const auto names = linears_.at(m.path)->adapters();
    if (std::find(names.begin(), names.end(), name) != names.end()) {
      throw std::runtime_error("TinyLM: adapter \"" + name + "\" already exists");
    }
  }
  for (const auto& m : modules) linears_.at(m.path)->add_adapter(name, m.lora_A, m.lora_B, m.scaling);
}

void TinyLM::set_adapter(const std::optional<std::string>& name) {
  bool known = !name;
  for (auto& [path, lin] : linears_) {
    const auto names = lin->adapters();
    known = known || std::find(names.begin(), names.end(), *name) != names.end();
  }
  if (!known) throw std::runtime_error("TinyLM: unknown adapter \"" + *name + "\"");
  for (auto& [path, lin] : linears_) {
    const auto names = lin->adapters();
    const bool has = name && std::find(names.begin(), names.end(), *name) != names.end();
    lin->set_adapter(has ? name : std::nullopt);
  }
}
