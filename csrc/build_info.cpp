#include <lora_ext/build_info.h>

namespace lora_ext {

BuildInfo build_info() {
  BuildInfo info;
  info.version = LORA_EXT_VERSION;
  info.torch_version = LORA_EXT_TORCH_VERSION;
#ifdef LORA_EXT_WITH_CUDA
  info.with_cuda = true;
  info.cuda_arch_list = LORA_EXT_CUDA_ARCH_LIST;
#endif
  info.compiler = LORA_EXT_COMPILER;
  info.cxx_flags = LORA_EXT_CXX_FLAGS;
  info.build_type = LORA_EXT_BUILD_TYPE;
  return info;
}

}  // namespace lora_ext
