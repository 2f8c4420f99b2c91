#pragma once
// A validating reader for the safetensors format: an 8-byte little-endian
// header length N, a JSON header of N bytes, then raw little-endian data.
#include <map>
#include <string>

#include <ATen/core/Tensor.h>

#include <lora_ext/export.h>

namespace lora_ext {

struct SafetensorsFile {
  std::map<std::string, at::Tensor> tensors;        // name -> CPU tensor (owns its memory)
  std::map<std::string, std::string> metadata;      // the optional "__metadata__" object
};

// Reads a whole .safetensors file. Everything is validated before a tensor is
// read: header length against the file size, JSON syntax and types, known
// dtypes, shape x dtype size equal to the byte span, offsets inside the data
// section and not overlapping. Bytes are read once, straight into each
// tensor's storage. A malformed file throws c10::Error (a std::exception)
// whose message names the file and the problem.
LORA_EXT_API SafetensorsFile read_safetensors(const std::string& path);

}  // namespace lora_ext
