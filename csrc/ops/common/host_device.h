#pragma once
// LORA_EXT_HOST_DEVICE: an inline function callable from host code and, when
// compiled by nvcc, from CUDA kernels (for the plain-C++ headers shared by the
// CPU and CUDA backends).
#if defined(__CUDACC__)
#define LORA_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORA_EXT_HOST_DEVICE inline
#endif
