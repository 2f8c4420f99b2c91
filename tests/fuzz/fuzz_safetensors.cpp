// libFuzzer harness: lora_ext::read_safetensors on arbitrary bytes. A rejected file must be a
// thrown exception (no crash, leak or UB). An accepted file must round-trip through
// lora_ext::write_safetensors: read back, the same names, dtypes, shapes, bytes and metadata.
#include <lora_ext/safetensors.h>

#include "fuzz_common.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto in = fuzz::scratch_dir() / "in.safetensors";
  fuzz::write_file(in, data, size);
  lora_ext::SafetensorsFile f;
  if (!fuzz::accepts([&] { f = lora_ext::read_safetensors(in.string()); })) return 0;
  // the writer refuses the one name the reader takes and cannot write back: ""
  if (f.tensors.count("")) return 0;
  const auto out = fuzz::scratch_dir() / "out.safetensors";
  lora_ext::write_safetensors(out.string(), f.tensors, f.metadata);  // must not throw
  const auto g = lora_ext::read_safetensors(out.string());
  if (g.metadata != f.metadata) fuzz::fail("metadata changed in a write/read round trip");
  if (g.tensors.size() != f.tensors.size()) fuzz::fail("tensor count changed in a write/read round trip");
  for (const auto& [name, t] : f.tensors) {
    auto it = g.tensors.find(name);
    if (it == g.tensors.end() || !fuzz::same_bits(t, it->second))
      fuzz::fail("tensor \"" + name + "\" changed in a write/read round trip");
  }
  return 0;
}
