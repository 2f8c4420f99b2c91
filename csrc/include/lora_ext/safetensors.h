#pragma once
// A validating reader for the safetensors format: an 8-byte little-endian
// header length N, a JSON header of N bytes, then raw little-endian data.
#include <map>
#include <string>

#include <ATen/core/Tensor.h>

#include <lora_ext/export.h>

namespace lora_ext {

struct SafetensorsFile {
  std::map<std::string, at::Tensor> tensors;    // name -> CPU tensor (owns its memory)
  std::map<std::string, std::string> metadata;  // the optional "__metadata__" object
};

// Reads a whole .safetensors file. Everything is validated before a tensor is
// read: header length against the file size, JSON syntax and types, known
// dtypes, shape x dtype size equal to the byte span, offsets inside the data
// section and not overlapping. Bytes are read once, straight into each
// tensor's storage. A malformed file throws c10::Error (a std::exception)
// whose message names the file and the problem.
LORA_EXT_API SafetensorsFile read_safetensors(const std::string& path);

// Writes tensors (any device, layout or strides; copied to contiguous CPU
// memory one at a time) and optional metadata as a .safetensors file that the
// safetensors library and read_safetensors read back. Tensors are laid out in
// name order, 8-byte aligned header as the safetensors library writes it.
// Crash-safe, as lora_ext's Python writer: the file goes to a unique temporary
// in the same folder (mode 0666 & ~umask), is fsync'ed and renamed over `path`,
// and the folder is fsync'ed; after a crash at any moment `path` holds its old or
// its new content, concurrent writers of one path never mix their bytes, and
// temporaries of dead writers are removed by the next write in that folder.
// Throws c10::Error on an unsupported dtype, an empty name, or an I/O failure
// (the existing file is then left as it was).
LORA_EXT_API void write_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                                    const std::map<std::string, std::string>& metadata = {});

}  // namespace lora_ext
