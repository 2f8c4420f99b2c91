// CPU kernels of lora_linear_quantized, linear_quantized and their autograd
// pieces: ops/common/quantized_base.h over the CPU backend (4 MiB float32
// weight tiles from cpu::dequantize_rows, MKL GEMMs on column blocks).
#include <torch/library.h>

#include "ops/common/quantized_base.h"
#include "ops/cpu/cpu_backend.h"

namespace lora_ext::cpu {

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear_quantized", &detail::lora_linear_quantized_op<CpuBackend>);
  m.impl("linear_quantized", &detail::linear_quantized_op<CpuBackend>);
  m.impl("_lora_linear_quantized_forward", &detail::lora_linear_quantized_forward_op<CpuBackend>);
  m.impl("_lora_linear_quantized_backward_input", &detail::lora_linear_quantized_backward_input_op<CpuBackend>);
}

}  // namespace lora_ext::cpu
