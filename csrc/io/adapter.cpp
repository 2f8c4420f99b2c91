#include <lora_ext/adapter.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <sstream>
#include <type_traits>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora_ext/safetensors.h>

#include "io/text.h"

namespace lora_ext {

namespace {

template <typename V>
const V* pattern_value(const std::vector<std::pair<std::string, V>>& patterns, const std::string& key) {
  for (const auto& [p, v] : patterns) {
    if (std::regex_match(key, std::regex("(.*\\.)?(" + p + ")"))) return &v;
  }
  return nullptr;
}

// Ranks are integers: get<int64_t>() would also take 8.5 or true, and converting a float
// outside int64's range (1e300) is undefined behaviour.
int64_t rank_of(const nlohmann::ordered_json& v, const std::string& what) {
  if (!v.is_number_integer())
    throw nlohmann::json::type_error::create(302, "expected an integer rank (" + what + "), got " + v.dump(), &v);
  return v.get<int64_t>();
}

// A quantifier on a quantifier ("a**", "a+{2}", "a*??"), outside escapes and [...] classes. Python's re
// (PEFT's matcher) refuses them ("multiple repeat"); std::regex takes them and backtracks exponentially
// on them, so that one rank/alpha pattern could hang scaling_for (found by fuzz_adapter_config).
bool has_multiple_repeat(const std::string& p) {
  int quantified = 0;  // 0: after an atom, 1: after a quantifier, 2: after a lazy '?'
  for (size_t i = 0; i < p.size(); ++i) {
    const char ch = p[i];
    if (ch == '*' || ch == '+' || ch == '?' || ch == '{') {
      if (quantified == 2 || (quantified == 1 && ch != '?')) return true;
      if (ch == '{') i = std::min(p.find('}', i), p.size());
      quantified = quantified == 1 ? 2 : 1;
      continue;
    }
    quantified = 0;
    if (ch == '\\') {
      ++i;
    } else if (ch == '(' && i + 1 < p.size() && p[i + 1] == '?') {
      ++i;                   // "(?:", "(?=", "(?!": group syntax, not a quantifier
    } else if (ch == '[') {  // skip the class; "[]...]" and "[^]...]" start with a literal ']'
      size_t j = i + 1 + (i + 1 < p.size() && p[i + 1] == '^');
      if (j < p.size() && p[j] == ']') ++j;
      while (j < p.size() && p[j] != ']') j += p[j] == '\\' ? 2 : 1;
      i = j;
    }
  }
  return false;
}

// lora_alpha, alpha_pattern values: a message that names the field (get<double>() says only "type must be number").
double number_of(const nlohmann::ordered_json& v, const std::string& what) {
  if (!v.is_number())
    throw nlohmann::json::type_error::create(302, "expected " + what + " to be a number, got " + v.dump(), &v);
  return v.get<double>();
}

// use_rslora, fan_in_fan_out: get<bool>() would say neither which field nor what it got.
bool bool_of(const nlohmann::ordered_json& v, const std::string& what) {
  if (!v.is_boolean())
    throw nlohmann::json::type_error::create(302, "expected " + what + " to be true or false, got " + v.dump(), &v);
  return v.get<bool>();
}

template <typename V>
std::vector<std::pair<std::string, V>> pattern_items(const nlohmann::ordered_json& obj, const std::string& what) {
  if (!obj.is_object())
    throw nlohmann::json::type_error::create(302,
                                             "expected " + what +
                                                 " to be a pattern object, "
                                                 "got " +
                                                 std::string(obj.type_name()),
                                             &obj);
  std::vector<std::pair<std::string, V>> out;
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    const std::string item = what + "[\"" + it.key() + "\"]";
    if constexpr (std::is_same_v<V, int64_t>)
      out.emplace_back(it.key(), rank_of(it.value(), item));
    else
      out.emplace_back(it.key(), number_of(it.value(), item));
  }
  return out;
}

// PEFT options that change what an adapter computes and that lora_ext does not implement, with the
// values that leave them off (the table of lora_ext/config.py, _UNSUPPORTED): any other value is refused.
struct Unsupported {
  const char* key;
  bool off_false, off_empty_list, off_empty_string;  // null is always "off"
};
constexpr Unsupported kUnsupported[] = {
    {"use_dora", true, false, false},
    {"lora_bias", true, false, false},
    {"use_qalora", true, false, false},
    {"layer_replication", false, false, false},
    {"layers_to_transform", false, true, false},
    {"layers_pattern", false, true, true},
    {"target_parameters", false, true, false},
    {"alora_invocation_tokens", false, false, false},
    {"trainable_token_indices", false, false, false},
    {"use_bdlora", true, false, false},
    {"arrow_config", false, false, false},
    {"megatron_config", false, false, false},
};

bool is_off(const nlohmann::ordered_json& v, const Unsupported& u) {
  if (v.is_null()) return true;
  // Python's equality, as config.py compares: False == 0 == 0.0
  if (u.off_false && (v == false || (v.is_number() && v.get<double>() == 0))) return true;
  if (u.off_empty_list && v.is_array() && v.empty()) return true;
  return u.off_empty_string && v.is_string() && v.get<std::string>().empty();
}

// A regex key of the config (rank/alpha patterns, target/exclude_modules): one Python's re and std::regex
// both accept, compiled here once so that a bad one is a lora_ext error, not a std::regex_error later.
void check_regex(const std::string& p, const std::string& what, const std::string& where) {
  TORCH_CHECK(!has_multiple_repeat(p), where, "expected ", what, " Python's re accepts, got \"", p,
              "\" (a quantifier on a quantifier: multiple repeat)");
  try {
    const std::regex compiled("(.*\\.)?(" + p + ")");
    (void)compiled;
  } catch (const std::regex_error& e) {
    TORCH_CHECK(false, where, what, " \"", detail::printable(p), "\" is not a valid regular expression: ", e.what());
  }
}

// target_modules / exclude_modules: null, a list of names, or one regex.
void read_modules(const nlohmann::ordered_json& j, const char* key, const std::string& where,
                  std::vector<std::string>* names, std::optional<std::string>* regex) {
  if (!j.contains(key) || j[key].is_null()) return;
  if (j[key].is_string()) {
    *regex = j[key].get<std::string>();
    check_regex(**regex, std::string(key) + " regex", where);
  } else {
    TORCH_CHECK(j[key].is_array(), where, "expected ", key, " to be a list of names or a regex string, got ",
                j[key].dump());
    *names = j[key].get<std::vector<std::string>>();
  }
}

}  // namespace

int64_t AdapterConfig::rank_for(const std::string& module_path) const {
  const auto* v = pattern_value(rank_pattern, module_path);
  return v ? *v : r;
}

double AdapterConfig::alpha_for(const std::string& module_path) const {
  const auto* v = pattern_value(alpha_pattern, module_path);
  return v ? *v : lora_alpha;
}

double AdapterConfig::scaling_for(const std::string& module_path) const {
  const double rank = static_cast<double>(rank_for(module_path));
  const double alpha = alpha_for(module_path);
  return use_rslora ? alpha / std::sqrt(rank) : alpha / rank;
}

namespace {

// Parses adapter_config.json's text; `where` names its source in error messages.
AdapterConfig parse_adapter_config(std::string text, const std::string& where) {
  AdapterConfig c;
  c.json = std::move(text);
  nlohmann::ordered_json j;  // keeps the patterns' order, which decides which one applies
  try {
    j = nlohmann::ordered_json::parse(c.json);
  } catch (const nlohmann::ordered_json::exception& e) {
    TORCH_CHECK(false, where, "not valid JSON: ", detail::printable(e.what()));
  }
  TORCH_CHECK(j.is_object(), where, "expected a JSON object");
  try {
    if (j.contains("peft_type") && !j["peft_type"].is_null()) {
      TORCH_CHECK(j["peft_type"] == "LORA", where, "expected peft_type \"LORA\", got ", j["peft_type"].dump());
    }
    for (const auto& u : kUnsupported) {
      TORCH_CHECK(!j.contains(u.key) || is_off(j[u.key], u), where, u.key,
                  " is set: lora_ext does not implement it and would compute something else (got ", j[u.key].dump(),
                  ")");
    }
    if (j.contains("r")) c.r = rank_of(j["r"], "r");
    TORCH_CHECK(c.r >= 1, where, "expected r >= 1, got ", c.r);
    if (j.contains("lora_alpha")) c.lora_alpha = number_of(j["lora_alpha"], "lora_alpha");
    TORCH_CHECK(std::isfinite(c.lora_alpha) && c.lora_alpha > 0, where, "expected a finite lora_alpha > 0, got ",
                c.lora_alpha);
    // The fields lora_ext's Python reader checks too, although a merge does not use them: both readers
    // refuse the same configs (tests/test_cpp_apply.py::test_both_readers_refuse_the_same_adapters).
    if (j.contains("lora_dropout")) {
      const auto& p = j["lora_dropout"];
      TORCH_CHECK(p.is_number() && p.get<double>() >= 0 && p.get<double>() < 1, where,
                  "expected a number 0 <= lora_dropout < 1, got ", p.dump());
    }
    if (j.contains("bias")) {
      const auto& b = j["bias"];
      TORCH_CHECK(b == "none" || b == "all" || b == "lora_only", where,
                  "expected bias \"none\", \"all\" or \"lora_only\", got ", b.dump());
    }
    if (j.contains("use_rslora")) c.use_rslora = bool_of(j["use_rslora"], "use_rslora");
    if (j.contains("fan_in_fan_out")) c.fan_in_fan_out = bool_of(j["fan_in_fan_out"], "fan_in_fan_out");
    if (j.contains("rank_pattern")) c.rank_pattern = pattern_items<int64_t>(j["rank_pattern"], "rank_pattern");
    for (const auto& [p, rank] : c.rank_pattern)
      TORCH_CHECK(rank >= 1, where, "expected rank_pattern ranks >= 1, got ", rank, " for \"", p, "\"");
    if (j.contains("alpha_pattern")) c.alpha_pattern = pattern_items<double>(j["alpha_pattern"], "alpha_pattern");
    for (const auto& [p, alpha] : c.alpha_pattern)
      TORCH_CHECK(std::isfinite(alpha) && alpha > 0, where,
                  "expected alpha_pattern values that are finite and > 0, got ", alpha, " for \"", p, "\"");
    for (const auto& [p, _] : c.rank_pattern) check_regex(p, "rank/alpha pattern key", where);
    for (const auto& [p, _] : c.alpha_pattern) check_regex(p, "rank/alpha pattern key", where);
    read_modules(j, "target_modules", where, &c.target_modules, &c.target_modules_regex);
    std::vector<std::string> exclude_names;
    std::optional<std::string> exclude_regex;
    read_modules(j, "exclude_modules", where, &exclude_names, &exclude_regex);
    if (j.contains("modules_to_save") && !j["modules_to_save"].is_null())
      c.modules_to_save = j["modules_to_save"].get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, where, "a field has the wrong type: ", e.what());
  }
  return c;
}

}  // namespace

AdapterConfig load_adapter_config(const std::string& path) {
  namespace fs = std::filesystem;
  const std::string file = fs::is_directory(path) ? (fs::path(path) / "adapter_config.json").string() : path;
  const std::string where = "lora_ext::load_adapter_config: " + file + ": ";
  TORCH_CHECK(fs::exists(file),
              "lora_ext::load_adapter_config: expected an adapter folder containing "
              "adapter_config.json (or the file itself), got ",
              path, fs::exists(path) ? " (no adapter_config.json in it)" : " (no such file or folder)");
  std::ifstream in(file);
  TORCH_CHECK(in.good(), where, "cannot open the file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_adapter_config(ss.str(), where);
}

Adapter load_adapter(const std::string& dir, bool allow_nonfinite) {
  namespace fs = std::filesystem;
  static const char* kEmbedded = "lora_ext.adapter_config";  // written by lora_ext.save_adapter
  const std::string where = "lora_ext::load_adapter: " + dir + ": ";
  const auto cfg_file = fs::path(dir) / "adapter_config.json";
  const auto st = fs::path(dir) / "adapter_model.safetensors";
  TORCH_CHECK(fs::is_directory(dir),
              "lora_ext::load_adapter: expected an adapter folder (adapter_config.json + "
              "adapter_model.safetensors), got ",
              dir, fs::exists(dir) ? " (not a folder)" : " (no such file or folder)");
  TORCH_CHECK(fs::exists(st), where, "no adapter_model.safetensors");
  // The config first: a save running meanwhile replaces the weights first (see lora_ext/adapter_io.py).
  std::optional<AdapterConfig> from_file;
  if (fs::exists(cfg_file)) from_file = load_adapter_config(cfg_file.string());
  Adapter a;
  SafetensorsFile f = read_safetensors(st.string());
  a.tensors = std::move(f.tensors);
  auto emb = f.metadata.find(kEmbedded);
  if (emb != f.metadata.end()) {
    // lora_ext saves carry their exact config: if the folder's config differs (a save interrupted
    // between its two renames), the weights' own config is the one that belongs to them.
    AdapterConfig own = parse_adapter_config(emb->second, where + "the weights' " + kEmbedded + " metadata: ");
    bool same = false;
    if (from_file) {
      try {
        same = nlohmann::json::parse(from_file->json) == nlohmann::json::parse(own.json);
      } catch (const nlohmann::json::exception&) {
      }
    }
    if (!same && from_file) {
      TORCH_WARN(where,
                 "adapter_config.json does not match the config saved with the weights (an interrupted "
                 "save, or the file was edited); using the weights' own config");
    }
    a.config = std::move(own);
  } else {
    TORCH_CHECK(from_file.has_value(), where, "no adapter_config.json");
    a.config = std::move(*from_file);
  }
  if (!allow_nonfinite) {
    std::string bad;
    for (const auto& [key, t] : a.tensors) {
      if (at::isFloatingType(t.scalar_type()) && !at::isfinite(t).all().item<bool>()) bad += "\n  " + key;
    }
    TORCH_CHECK(bad.empty(), where, "NaN/Inf values in (pass allow_nonfinite=true to load anyway):", bad);
  }
  return a;
}

std::vector<AdapterModule> adapter_modules(const Adapter& adapter, bool ignore_other_keys) {
  static const std::string kPrefix = "base_model.model.";
  static const std::pair<std::string, std::string> kPairs[] = {{".lora_A.weight", ".lora_B.weight"},
                                                               {".lora_embedding_A", ".lora_embedding_B"}};
  auto ends_with = [](const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  std::vector<AdapterModule> out;
  std::vector<std::string> problems;
  for (const auto& [key, t] : adapter.tensors) {
    bool lora = false;
    for (const auto& [sa, sb] : kPairs) {
      const bool is_a = ends_with(key, sa), is_b = ends_with(key, sb);
      if (!is_a && !is_b) continue;
      const std::string& suffix = is_a ? sa : sb;
      if (key.size() <= kPrefix.size() + suffix.size() || key.compare(0, kPrefix.size(), kPrefix) != 0) continue;
      lora = true;
      const std::string path = key.substr(kPrefix.size(), key.size() - kPrefix.size() - suffix.size());
      const std::string partner = kPrefix + path + (is_a ? sb : sa);
      auto it = adapter.tensors.find(partner);
      if (it == adapter.tensors.end()) {
        problems.push_back("missing key " + partner + " (the partner of " + key + ")");
      } else if (is_a) {
        out.push_back({path, t, it->second, adapter.config.scaling_for(path), sa == ".lora_embedding_A"});
      }
    }
    if (!lora && !ignore_other_keys) problems.push_back("unexpected key " + key + " (not a LoRA A/B weight)");
  }
  if (!problems.empty()) {
    std::string msg;
    for (const auto& p : problems) msg += "\n  " + p;
    TORCH_CHECK(false, "lora_ext::adapter_modules: the adapter's keys do not pair up:", msg);
  }
  return out;
}

}  // namespace lora_ext
