// libFuzzer harness: lora_ext::load_adapter_config on arbitrary adapter_config.json bytes, then
// PEFT's per-module rank/alpha/scaling rules (the rank/alpha patterns are regexes from the file).
// A rejected file must be a thrown exception; an accepted one must hold r >= 1.
#include <lora_ext/adapter.h>

#include "fuzz_common.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::write_file(fuzz::scratch_dir() / "adapter_config.json", data, size);
  lora_ext::AdapterConfig c;
  if (!fuzz::accepts([&] { c = lora_ext::load_adapter_config(fuzz::scratch_dir().string()); })) return 0;
  if (c.r < 1) fuzz::fail("accepted a config with r < 1");
  static const char* const kPaths[] = {"l1", "blocks.0.q", "model.layers.0.self_attn.q_proj", "", "a.b.c.d.e.f.g"};
  for (const char* p : kPaths) {
    fuzz::accepts([&] {
      c.rank_for(p);
      c.alpha_for(p);
      c.scaling_for(p);
    });
  }
  return 0;
}
