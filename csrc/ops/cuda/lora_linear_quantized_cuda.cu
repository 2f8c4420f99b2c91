// CUDA kernels of lora_linear_quantized, linear_quantized and their autograd
// pieces: ops/common/quantized_base.h over the CUDA backend (32 MiB float32
// weight tiles from cuda::dequantize_rows, cuBLAS GEMMs on column blocks).
#include <torch/library.h>

#include "ops/common/quantized_base.h"
#include "ops/cuda/cuda_backend.h"

namespace lora_ext::cuda {

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear_quantized", &detail::lora_linear_quantized_op<CudaBackend>);
  m.impl("linear_quantized", &detail::linear_quantized_op<CudaBackend>);
  m.impl("_lora_linear_quantized_forward", &detail::lora_linear_quantized_forward_op<CudaBackend>);
  m.impl("_lora_linear_quantized_backward_input", &detail::lora_linear_quantized_backward_input_op<CudaBackend>);
}

}  // namespace lora_ext::cuda
