// Calls the lora_ext ops through the public C++ header, with no Python, and
// checks them against plain ATen float64 computations. Prints "ALL OK" and
// exits 0 on success; prints the failed check and exits 1 otherwise.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/nn.h>

#include <lora_ext/lora_ext.h>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << "\n";
  if (!ok) ++failures;
}

bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  return at::allclose(a.to(at::kDouble), b.to(at::kDouble), tol, tol);
}

// A known bug, as a strict xfail: prints XFAIL while `fixed` is false; once the bug is fixed it
// prints XPASS and fails the program, so that the check is turned into a check().
[[maybe_unused]] void xfail(bool fixed, const std::string& what) {  // none open at the moment
  std::cout << (fixed ? "XPASS " : "XFAIL ") << what << "\n";
  if (fixed) ++failures;
}

// f() throws a c10::Error whose message contains `text`.
bool throws(const std::function<void()>& f, const std::string& text) {
  try {
    f();
  } catch (const c10::Error& e) {
    if (std::string(e.what_without_backtrace()).find(text) != std::string::npos) return true;
    std::cout << "     (threw, but without \"" << text << "\": " << e.what_without_backtrace() << ")\n";
    return false;
  }
  return false;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({3, 5, 16}, opt);
  auto w = at::randn({12, 16}, opt) / 4.0;
  auto b = at::randn({12}, opt);
  auto A = at::randn({4, 16}, opt) / 4.0;
  auto B = at::randn({12, 4}, opt) / 2.0;
  const double s = 0.75;

  // forward
  auto y = lora_ext::ops::lora_linear(x, w, b, A, B, s);
  auto ref = at::matmul(x, w.t()) + b + s * at::matmul(at::matmul(x, A.t()), B.t());
  check(y.sizes() == ref.sizes() && close(y, ref, 1e-12), "lora_linear forward (float64, 3-D x, bias)");
  auto y32 = lora_ext::ops::lora_linear(x.to(at::kFloat), w.to(at::kFloat), std::nullopt, A.to(at::kFloat),
                                        B.to(at::kFloat), s);
  check(close(y32, ref - b, 1e-4), "lora_linear forward (float32, no bias)");
  auto ybf = lora_ext::ops::lora_linear(x.to(at::kBFloat16), w.to(at::kBFloat16), b.to(at::kBFloat16), A.to(at::kFloat),
                                        B.to(at::kFloat), s);
  check(ybf.scalar_type() == at::kBFloat16 && close(ybf, ref, 5e-2), "lora_linear forward (bf16 base, fp32 adapter)");

  // under autocast (what torch.autocast sets): fp32 x, weight and bias run in bf16, the fp32 adapter is kept;
  // the same as casting by hand, bit for bit
  {
    const auto xf = x.to(at::kFloat), wf = w.to(at::kFloat), bf = b.to(at::kFloat);
    const auto Af = A.to(at::kFloat), Bf = B.to(at::kFloat);
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    auto yac = lora_ext::ops::lora_linear(xf, wf, bf, Af, Bf, s);
    at::autocast::set_autocast_enabled(at::kCPU, false);
    at::autocast::clear_cache();
    auto yhand =
        lora_ext::ops::lora_linear(xf.to(at::kBFloat16), wf.to(at::kBFloat16), bf.to(at::kBFloat16), Af, Bf, s);
    check(yac.scalar_type() == at::kBFloat16 && at::equal(yac, yhand), "lora_linear under CPU autocast (bf16)");
  }

  // autograd in C++: gradients of x, A, B; none for the frozen weight
  auto xg = x.clone().set_requires_grad(true);
  auto Ag = A.clone().set_requires_grad(true);
  auto Bg = B.clone().set_requires_grad(true);
  auto yg = lora_ext::ops::lora_linear(xg, w, b, Ag, Bg, s);
  auto g = at::randn(yg.sizes(), opt);
  yg.backward(g);
  auto g2 = g.reshape({-1, 12});
  auto x2 = x.reshape({-1, 16});
  auto gA_ref = s * at::mm(at::mm(g2, B).t(), x2);
  auto gB_ref = s * at::mm(g2.t(), at::mm(x2, A.t()));
  auto gx_ref = (at::mm(g2, w) + s * at::mm(at::mm(g2, B), A)).reshape(x.sizes());
  check(xg.grad().defined() && close(xg.grad(), gx_ref, 1e-12), "grad x");
  check(Ag.grad().defined() && close(Ag.grad(), gA_ref, 1e-12), "grad lora_A");
  check(Bg.grad().defined() && close(Bg.grad(), gB_ref, 1e-12), "grad lora_B");
  check(!w.grad().defined(), "no grad for the frozen weight");

  // dropout: reproducible under the same seed
  at::manual_seed(7);
  auto d1 = lora_ext::ops::lora_linear(x, w, b, A, B, s, 0.5, true);
  at::manual_seed(7);
  auto d2 = lora_ext::ops::lora_linear(x, w, b, A, B, s, 0.5, true);
  check(at::equal(d1, d2) && !close(d1, y, 1e-6), "dropout reproducible under manual_seed and active");

  // merge / unmerge in place
  auto wm = w.clone();
  lora_ext::ops::merge_(wm, A, B, s);
  check(close(wm, w + s * at::mm(B, A), 1e-12), "merge_");
  check(close(at::linear(x, wm, b), y, 1e-12), "merged forward == unmerged forward");
  lora_ext::ops::unmerge_(wm, A, B, s);
  check(close(wm, w, 1e-12), "unmerge_ restores the weight");

  // bad input: a clear c10::Error naming the op
  bool threw = false;
  try {
    lora_ext::ops::lora_linear(x, w, b, A.narrow(1, 0, 8), B, s);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("lora_ext::lora_linear: expected lora_A") != std::string::npos;
  }
  check(threw, "mismatched lora_A throws c10::Error naming the op");

  // quantized base (int8, one scale per row): the op equals lora_linear on the dequantized weight, and trains
  {
    auto q = at::randint(-127, 128, {12, 16}, at::TensorOptions().dtype(at::kChar));
    auto qs = at::rand({12}, at::TensorOptions().dtype(at::kFloat)) / 50.0 + 0.01;
    const lora_ext::ops::QuantizedWeight qw{q, qs, "int8", 12, 16};
    const auto wd = lora_ext::ops::dequantize_weight(qw);
    check(close(wd, q.to(at::kFloat) * qs.unsqueeze(1), 1e-6), "dequantize_weight (int8)");
    auto xf = x.to(at::kFloat);
    auto Af = A.to(at::kFloat).set_requires_grad(true);
    auto yq = lora_ext::ops::lora_linear_quantized(xf, qw, b.to(at::kFloat), Af, B.to(at::kFloat), s);
    check(close(yq, lora_ext::ops::lora_linear(xf, wd, b.to(at::kFloat), Af, B.to(at::kFloat), s), 1e-4),
          "lora_linear_quantized == lora_linear on the dequantized weight");
    yq.sum().backward();
    check(Af.grad().defined() && Af.grad().abs().sum().item<float>() > 0, "lora_linear_quantized trains lora_A");
    check(close(lora_ext::ops::linear_quantized(xf, qw), at::linear(xf, wd), 1e-4), "linear_quantized");
    bool threw_q = false;
    try {
      lora_ext::ops::linear_quantized(xf, {q, qs, "q5_k", 12, 16});
    } catch (const c10::Error& e) {
      threw_q = std::string(e.what()).find("expected qtype 'int8'") != std::string::npos;
    }
    check(threw_q, "an unknown qtype throws c10::Error");
  }

  // native safetensors reader: a valid file, then a truncated one
  {
    const std::string header = R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"k":"v"}})";
    const float vals[4] = {1.f, 2.f, 3.f, 4.f};
    const auto path = (std::filesystem::temp_directory_path() / "lora_ext_cpp_test.safetensors").string();
    auto write = [&](size_t data_bytes) {
      std::ofstream f(path, std::ios::binary);
      const uint64_t n = header.size();
      unsigned char len[8];
      for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
      f.write(reinterpret_cast<const char*>(len), 8);
      f.write(header.data(), static_cast<std::streamsize>(n));
      f.write(reinterpret_cast<const char*>(vals), static_cast<std::streamsize>(data_bytes));
    };
    write(16);
    const auto file = lora_ext::read_safetensors(path);
    const auto& w = file.tensors.at("w");
    check(w.sizes() == at::IntArrayRef({2, 2}) && w[1][0].item<float>() == 3.f && file.metadata.at("k") == "v",
          "read_safetensors reads a valid file");
    write(12);
    bool threw_trunc = false;
    try {
      lora_ext::read_safetensors(path);
    } catch (const c10::Error& e) {
      threw_trunc = std::string(e.what()).find("outside the data section") != std::string::npos;
    }
    check(threw_trunc, "a truncated file throws c10::Error with a clear message");
    std::filesystem::remove(path);
  }

  // lora_ext::nn::LoraLinear: adapters by name, switchable, trainable
  {
    lora_ext::nn::LoraLinear layer(w.clone(), b.clone());
    layer->add_adapter("one", A.clone(), B.clone(), s);
    layer->add_adapter("two", A.clone() * 2, B.clone(), 0.5);
    check(layer->active_adapter() == std::optional<std::string>("one"), "first adapter is active");
    check(close(layer->forward(x), y, 1e-12), "nn::LoraLinear forward == ops::lora_linear");
    layer->set_adapter("two");
    check(close(layer->forward(x), lora_ext::ops::lora_linear(x, w, b, A * 2, B, 0.5), 1e-12), "set_adapter");
    layer->set_adapter(std::nullopt);
    check(close(layer->forward(x), at::linear(x, w, b), 1e-12), "no adapter: the base linear");
    layer->set_adapter("one");
    layer->forward(x).sum().backward();
    const auto params = layer->named_parameters();
    check(params["lora_A_one"].grad().defined() && !params["weight"].grad().defined(),
          "training reaches the adapter, not the frozen weight");
    bool threw_nn = false;
    try {
      layer->add_adapter("bad", A.narrow(1, 0, 3), B, s);
    } catch (const c10::Error& e) {
      threw_nn = std::string(e.what()).find("lora_ext::lora_linear: expected lora_A") != std::string::npos;
    }
    check(threw_nn, "nn::LoraLinear refuses a mismatched adapter");
    layer->delete_adapter("two");
    check(layer->adapters() == std::vector<std::string>{"one"}, "delete_adapter");
  }

  // bad input to the C++ API: a c10::Error naming the function, and nothing changed
  {
    lora_ext::nn::LoraLinear layer(w.clone(), b.clone());
    layer->add_adapter("one", A.clone(), B.clone(), s);
    check(throws([&] { layer->set_adapter("nope"); }, "lora_ext::nn::LoraLinear: unknown adapter \"nope\""),
          "nn::LoraLinear::set_adapter refuses an unknown name");
    check(throws([&] { layer->delete_adapter("nope"); }, "lora_ext::nn::LoraLinear: unknown adapter \"nope\""),
          "nn::LoraLinear::delete_adapter refuses an unknown name");
    check(
        throws([&] { layer->add_adapter("one", A, B, s); }, "lora_ext::nn::LoraLinear: adapter \"one\" already exists"),
        "nn::LoraLinear::add_adapter refuses an existing name");
    check(throws([&] { layer->add_adapter("a.b", A, B, s); }, "expected an adapter name without '.'"),
          "nn::LoraLinear::add_adapter refuses a dotted name");
    check(throws([&] { layer->add_adapter("p", A, B, s, 1.0); }, "lora_ext::lora_linear: expected 0 <= dropout_p < 1"),
          "nn::LoraLinear::add_adapter refuses dropout_p = 1");
    check(throws([&] { lora_ext::nn::LoraLinear bad(w[0]); },
                 "lora_ext::nn::LoraLinear: expected weight of shape [out, in]"),
          "nn::LoraLinear refuses a 1-D weight");
    check(layer->adapters() == std::vector<std::string>{"one"} &&
              layer->active_adapter() == std::optional<std::string>("one"),
          "refused calls leave the layer's adapters as they were");
    auto wm = w.clone();
    check(throws([&] { lora_ext::ops::merge_(wm, A.narrow(1, 0, 8), B, s); },
                 "lora_ext::merge_: expected lora_A of shape [r, in] with in = 16") &&
              at::equal(wm, w),
          "ops::merge_ refuses a mismatched lora_A and leaves the weight unchanged");

    torch::nn::Sequential net(torch::nn::Linear(16, 12));
    const auto w0 = net->named_parameters()["0.weight"].detach().clone();
    lora_ext::Adapter adapter;
    adapter.config.r = 4;
    adapter.config.lora_alpha = 8;
    adapter.tensors["base_model.model.0.lora_A.weight"] = A.to(at::kFloat);
    adapter.tensors["base_model.model.0.lora_B.weight"] = B.to(at::kFloat);
    adapter.tensors["base_model.model.9.lora_A.weight"] = A.to(at::kFloat);
    adapter.tensors["base_model.model.9.lora_B.weight"] = B.to(at::kFloat);
    check(throws([&] { lora_ext::merge_adapter(*net, adapter); },
                 "lora_ext::merge_adapter: the adapter does not fit the module (nothing was changed):\n"
                 "  module 9 matches no parameter 9.weight") &&
              at::equal(net->named_parameters()["0.weight"], w0),
          "merge_adapter (torch::nn::Module) refuses an adapter key without a parameter, changing nothing");
    adapter.tensors.erase("base_model.model.9.lora_B.weight");
    check(throws([&] { lora_ext::adapter_modules(adapter); },
                 "lora_ext::adapter_modules: the adapter's keys do not pair up:\n  missing key "
                 "base_model.model.9.lora_B.weight"),
          "adapter_modules refuses a lora_A without its lora_B");
    check(throws([&] { lora_ext::merge_adapter(*net, adapter, std::nan("")); },
                 "lora_ext::merge_adapter: expected a finite weight"),
          "merge_adapter refuses a NaN weight factor");

    // A rank_pattern entry of 0 gives module "1" an infinite scaling (alpha / 0); load_adapter_config
    // refuses it, but a config built in C++ can hold it: merge_adapter's plan runs merge_'s own checks,
    // so it refuses before merging module "0".
    torch::nn::Sequential two(torch::nn::Linear(16, 12), torch::nn::Linear(12, 12));
    const auto two0 = two->named_parameters()["0.weight"].detach().clone();
    lora_ext::Adapter inf_scale;
    inf_scale.config.r = 4;
    inf_scale.config.lora_alpha = 8;
    inf_scale.config.rank_pattern = {{"1", 0}};
    inf_scale.tensors["base_model.model.0.lora_A.weight"] = A.to(at::kFloat);
    inf_scale.tensors["base_model.model.0.lora_B.weight"] = B.to(at::kFloat);
    inf_scale.tensors["base_model.model.1.lora_A.weight"] = at::randn({4, 12});
    inf_scale.tensors["base_model.model.1.lora_B.weight"] = at::randn({12, 4});
    const bool refused = throws([&] { lora_ext::merge_adapter(*two, inf_scale); }, "lora_ext::merge_adapter");
    check(refused && at::equal(two->named_parameters()["0.weight"], two0),
          "merge_adapter refuses an adapter with an infinite per-module scaling before changing anything");
  }

  // multi-adapter batches: row i uses adapter ids[i] (-1: base), grouping computed once
  {
    auto xs = x.reshape({-1, 16});  // 15 rows
    auto As = at::stack({A, A * 0.5, A.flip(0)});
    auto Bs = at::stack({B, B * 2.0, B.flip(1)});
    auto scales = at::tensor({0.75, 0.25, 1.5}, at::TensorOptions().dtype(at::kFloat));
    auto ids = at::tensor({0, 2, -1, 1, 1, 0, 2, -1, 0, 2, 1, 1, -1, 0, 2}, at::TensorOptions().dtype(at::kLong));
    auto [order, offsets] = lora_ext::ops::lora_group_rows(ids, 3);
    auto ym = lora_ext::ops::lora_linear_multi(xs, w, b, As, Bs, scales, ids, 0.0, false, order, offsets);
    bool rows_ok = ym.sizes() == at::IntArrayRef({15, 12});
    for (int64_t i = 0; i < 15; ++i) {
      const int64_t a = ids[i].item<int64_t>();
      auto want = a < 0 ? at::linear(xs[i], w, b)
                        : lora_ext::ops::lora_linear(xs[i], w, b, As[a], Bs[a], scales[a].item<double>());
      rows_ok = rows_ok && close(ym[i], want, 1e-6);
    }
    check(rows_ok, "lora_linear_multi == lora_linear row by row (float64, base rows, grouping passed)");
    auto Ag = As.clone().set_requires_grad(true);
    lora_ext::ops::lora_linear_multi(xs, w, b, Ag, Bs, scales, ids).square().sum().backward();
    check(Ag.grad().defined() && Ag.grad()[1].abs().sum().item<double>() > 0, "lora_linear_multi trains in C++");
    bool threw_ids = false;
    try {
      lora_ext::ops::lora_linear_multi(xs, w, b, As, Bs, scales, ids + 1);
    } catch (const c10::Error& e) {
      threw_ids = std::string(e.what()).find("adapter ids in [-1, 3)") != std::string::npos;
    }
    check(threw_ids, "lora_linear_multi refuses an out-of-range adapter id");
  }

  const auto info = lora_ext::build_info();
  check(!info.version.empty() && !info.torch_version.empty(), "build_info");

  if (failures) {
    std::cout << failures << " FAILED\n";
    return 1;
  }
  std::cout << "ALL OK\n";
  return 0;
}
