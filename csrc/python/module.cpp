// lora_ext._C: the pybind11 module. Loading it loads the core library, whose
// static initialisers register every lora_ext op with the dispatcher. It holds
// what is not an op (build information; later the C++ adapter reader).
#include <pybind11/pybind11.h>

#include <torch/extension.h>

#include <lora_ext/lora_ext.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lora_ext compiled module: importing it registers the torch.ops.lora_ext operators";
  m.def(
      "build_info",
      []() {
        const auto info = lora_ext::build_info();
        py::dict d;
        d["version"] = info.version;
        d["torch_version"] = info.torch_version;
        d["with_cuda"] = info.with_cuda;
        d["cuda_arch_list"] = info.cuda_arch_list;
        d["compiler"] = info.compiler;
        d["cxx_flags"] = info.cxx_flags;
        d["build_type"] = info.build_type;
        return d;
      },
      "How the compiled library was built: package version, torch version compiled against, "
      "whether CUDA kernels were compiled, compiler and flags.");
}
