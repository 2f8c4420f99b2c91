#pragma once
#include <string>

#include <lora_ext/export.h>

namespace lora_ext {

// How this copy of the core library was built.
struct BuildInfo {
  std::string version;         // lora_ext package version
  std::string torch_version;   // torch the library was compiled against
  bool with_cuda = false;      // whether CUDA kernels were compiled in
  std::string cuda_arch_list;  // TORCH_CUDA_ARCH_LIST used for the CUDA kernels ("" if none)
  std::string compiler;        // e.g. "GNU 12.2.0"
  std::string cxx_flags;       // CMAKE_CXX_FLAGS + build-type flags
  std::string build_type;      // Release, Debug, ...
};

LORA_EXT_API BuildInfo build_info();

}  // namespace lora_ext
