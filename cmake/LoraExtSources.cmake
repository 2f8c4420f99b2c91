# The core library's C++ sources, relative to the repository root: one list for the main build
# (CMakeLists.txt) and for the fuzz harnesses (tests/fuzz/CMakeLists.txt), which compile them
# with their own instrumentation.
set(LORA_EXT_CORE_SOURCES
  csrc/build_info.cpp
  csrc/io/adapter.cpp
  csrc/io/aoti.cpp
  csrc/io/apply.cpp
  csrc/io/atomic_file.cpp
  csrc/io/nn.cpp
  csrc/io/safetensors.cpp
  csrc/ops/registration.cpp
  csrc/ops/ops.cpp
  csrc/ops/common/checks.cpp
  csrc/ops/common/quant_checks.cpp
  csrc/ops/cpu/add_scaled_cpu.cpp
  csrc/ops/cpu/dequantize_cpu.cpp
  csrc/ops/cpu/dropout_cpu.cpp
  csrc/ops/cpu/lora_linear_cpu.cpp
  csrc/ops/cpu/lora_linear_quantized_cpu.cpp
  csrc/ops/cpu/lora_linear_multi_cpu.cpp
  csrc/ops/cpu/merge_cpu.cpp
  csrc/ops/cpu/merge_exact_cpu.cpp
  csrc/ops/cpu/quant_gemv.cpp
  csrc/ops/cpu/skinny_gemm.cpp
  csrc/ops/meta/dequantize_meta.cpp
  csrc/ops/meta/lora_linear_meta.cpp
  csrc/ops/meta/lora_linear_quantized_meta.cpp
  csrc/ops/meta/lora_linear_multi_meta.cpp
  csrc/ops/meta/merge_meta.cpp
  csrc/ops/autograd/lora_linear_autograd.cpp
  csrc/ops/autograd/lora_linear_multi_autograd.cpp
  csrc/ops/autograd/lora_linear_quantized_autograd.cpp
  csrc/ops/autograd/merge_autograd.cpp
  csrc/ops/autocast/lora_linear_autocast.cpp
)
# The exact merge recomputes Delta W bit-identically in every call and code path:
# no FMA contraction there (compile these with -ffp-contract=off).
set(LORA_EXT_NO_FP_CONTRACT_SOURCES csrc/ops/cpu/merge_exact_cpu.cpp)
