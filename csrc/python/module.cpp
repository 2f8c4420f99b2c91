// lora_ext._C: the pybind11 module. Loading it loads the core library, whose
// static initialisers register every lora_ext op with the dispatcher. It holds
// what is not an op: build information, the quantized formats' constants (read
// by lora_ext/quant.py), the C++ readers and writers and test hooks of the C++ API.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>
#include <torch/script.h>

#include <lora_ext/lora_ext.h>

#include "io/atomic_file.h"
#include "ops/common/quant_formats.h"

namespace py = pybind11;

namespace {

// The fields of a C++ AdapterConfig that decide what the adapter computes, as a Python dict.
py::dict config_dict(const lora_ext::AdapterConfig& c) {
  py::dict d;
  d["r"] = c.r;
  d["lora_alpha"] = c.lora_alpha;
  d["use_rslora"] = c.use_rslora;
  d["fan_in_fan_out"] = c.fan_in_fan_out;
  py::dict rp, ap;  // in the file's order
  for (const auto& [k, v] : c.rank_pattern) rp[py::str(k)] = v;
  for (const auto& [k, v] : c.alpha_pattern) ap[py::str(k)] = v;
  d["rank_pattern"] = rp;
  d["alpha_pattern"] = ap;
  if (c.target_modules_regex) {
    d["target_modules"] = *c.target_modules_regex;
  } else {
    d["target_modules"] = c.target_modules;
  }
  d["modules_to_save"] = c.modules_to_save;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lora_ext compiled module: importing it registers the torch.ops.lora_ext operators";
  // c10::Error -> the matching Python exception with the message only (as torch does; no C++ backtrace)
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
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

  m.def(
      "quant_formats",
      []() {
        py::dict d;  // in kFormats' order
        for (const auto& f : lora_ext::quant::kFormats) {
          py::dict e;
          e["block"] = f.block;
          e["block_bytes"] = f.block_bytes;
          e["has_qscale"] = f.has_qscale;
          d[py::str(f.name)] = e;
        }
        return d;
      },
      "The quantized weight formats the kernels read (csrc/ops/common/quant_formats.h, their one source): "
      "{qtype: {block: elements per block along in_features, block_bytes: bytes per block, has_qscale}}.");
  m.def(
      "nf4_values",
      []() {
        std::vector<float> v;
        for (int c = 0; c < lora_ext::quant::kNF4Codes; ++c) v.push_back(lora_ext::quant::nf4_value(c));
        return v;
      },
      "The NF4 code book the kernels decode with: the float32 value of each 4-bit code 0..15 (times the "
      "block's absmax).");
  m.def(
      "read_safetensors",
      [](const std::string& path) {
        auto f = lora_ext::read_safetensors(path);
        py::dict d;
        for (auto& [k, t] : f.tensors) d[py::str(k)] = t;
        return d;
      },
      py::arg("path"),
      "Read a .safetensors file with the C++ reader (validates everything; raises RuntimeError naming "
      "the problem). Returns {name: tensor}.");
  m.def(
      "write_safetensors",
      [](const std::string& path, const std::map<std::string, at::Tensor>& tensors,
         const std::map<std::string, std::string>& metadata) {
        py::gil_scoped_release nogil;
        lora_ext::write_safetensors(path, tensors, metadata);
      },
      py::arg("path"), py::arg("tensors"), py::arg("metadata") = std::map<std::string, std::string>{},
      "Write {name: tensor} (and string metadata) as a .safetensors file with the C++ writer "
      "(crash-safe: unique temporary, fsync, rename, fsync of the folder).");
  m.def(
      "write_file_atomic",
      [](const std::string& path, const py::bytes& data) {
        std::string bytes = data;
        py::gil_scoped_release nogil;
        lora_ext::detail::write_file_atomic(path, bytes, "lora_ext::write_file_atomic: " + path + ": ");
      },
      py::arg("path"), py::arg("data"),
      "Replace a file by `data` with the C++ crash-safe file primitive (csrc/io/atomic_file.h) that every C++ "
      "writer uses: for tests and for C++ writers' Python bindings.");
  m.def(
      "read_safetensors_metadata", [](const std::string& path) { return lora_ext::read_safetensors(path).metadata; },
      py::arg("path"), "The __metadata__ of a .safetensors file, read by the C++ reader.");
  m.def(
      "load_adapter_config", [](const std::string& path) { return config_dict(lora_ext::load_adapter_config(path)); },
      py::arg("path"),
      "Read adapter_config.json (a file or its folder) with the C++ reader: the fields that decide what the "
      "adapter computes.");
  m.def(
      "load_adapter_native",
      [](const std::string& dir, bool allow_nonfinite) {
        torch::PyWarningHandler warnings;  // TORCH_WARN -> Python warnings
        try {
          const auto a = lora_ext::load_adapter(dir, allow_nonfinite);
          return py::make_tuple(config_dict(a.config), a.tensors);
        } catch (...) {
          warnings.set_in_exception();
          throw;
        }
      },
      py::arg("dir"), py::arg("allow_nonfinite") = false,
      "Read an adapter folder with the C++ lora_ext::load_adapter: (config fields, {key: tensor}).");
  m.def(
      "merge_adapter_into_script_file",
      [](const std::string& model_in, const std::string& adapter_dir, const std::string& model_out, double weight,
         bool unmerge_after) {
        auto module = torch::jit::load(model_in);
        const auto adapter = lora_ext::load_adapter(adapter_dir);
        lora_ext::merge_adapter(module, adapter, weight);
        if (unmerge_after) lora_ext::unmerge_adapter(module, adapter, weight);
        module.save(model_out);
      },
      py::arg("model_in"), py::arg("adapter_dir"), py::arg("model_out"), py::arg("weight") = 1.0,
      py::arg("unmerge_after") = false,
      "Test hook for the C++ API: load a TorchScript file, lora_ext::merge_adapter the adapter folder into it "
      "(optionally unmerge again), save it.");
  m.def(
      "adapter_scaling",
      [](const std::string& path, const std::string& module_path) {
        return lora_ext::load_adapter_config(path).scaling_for(module_path);
      },
      py::arg("path"), py::arg("module_path"), "The C++ reader's scaling for one module path (PEFT's rules).");
}
