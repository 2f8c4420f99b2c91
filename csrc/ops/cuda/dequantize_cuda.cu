// CUDA kernel of dequantize_weight (and of the quantized base's weight tiles,
// cuda::dequantize_rows): one thread per 32 consecutive elements of a
// row (a GGUF block, half an nf4 block, or up to 32 int8 values), decoded with the
// same host/device functions as the CPU kernel (ops/common/quant_formats.h), so
// both give the same float32 bits. A non-finite block scale is an error naming
// the first such row, as on the CPU.
#include <limits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/quant_checks.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/utils.cuh"

namespace lora_ext::cuda {

namespace {

using quant::QType;

struct DequantParams {
  const uint8_t* q;
  const float* scales;      // int8: [out]; nf4: [out, in / 64]; GGUF: nullptr
  float* w;                 // rows [row0, row0 + rows) of the weight, leading dimension in
  unsigned long long* bad;  // the first row with a non-finite scale (atomicMin)
  int64_t row0, rows, in, row_bytes, block_bytes;
  QType type;
};

__global__ void dequantize_kernel(DequantParams p) {
  const int64_t units = ceil_div(p.in, 32);  // int8 rows may end in a partial chunk
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.rows * units) return;
  const int64_t local = idx / units, u = idx % units, row = p.row0 + local;
  const uint8_t* q = p.q + row * p.row_bytes;
  float* o = p.w + local * p.in + u * 32;
  bool ok = true;
  if (p.type == QType::Int8) {
    const float s = p.scales[row];
    const int8_t* qi = reinterpret_cast<const int8_t*>(q) + u * 32;
    const int64_t n = p.in - u * 32 < 32 ? p.in - u * 32 : 32;
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(qi[j]) * s;
    ok = s - s == 0.0f;
  } else if (p.type == QType::NF4) {
    const float s = p.scales[row * (p.in / 64) + u / 2];
    const uint8_t* b = q + u * 16;
    for (int j = 0; j < 16; ++j) {
      o[2 * j] = quant::nf4_value(b[j] >> 4) * s;
      o[2 * j + 1] = quant::nf4_value(b[j] & 0x0F) * s;
    }
    ok = s - s == 0.0f;
  } else {
    ok = quant::decode_gguf_block(p.type, q + u * p.block_bytes, o);
  }
  if (!ok) atomicMin(p.bad, static_cast<unsigned long long>(row));
}

at::Tensor dequantize_weight_cuda(const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                                  c10::string_view qtype, int64_t out_features, int64_t in_features) {
  const auto& f = detail::check_quantized_weight(
      "dequantize_weight", qdata, qscale, std::string_view(qtype.data(), qtype.size()), out_features, in_features);
  at::Tensor w = at::empty({out_features, in_features}, qdata.options().dtype(at::kFloat));
  if (w.numel() == 0) return w;
  const c10::cuda::CUDAGuard guard(qdata.device());
  dequantize_rows(f, qdata, qscale, 0, in_features, w);
  return w;
}

}  // namespace

void dequantize_rows(const quant::Format& f, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
                     int64_t row0, int64_t in_features, at::Tensor& tile) {
  const int64_t rows = tile.size(0);
  if (rows == 0 || in_features == 0) return;
  const at::Tensor sc = qscale ? qscale->contiguous() : at::Tensor();
  at::Tensor bad = at::full({1}, std::numeric_limits<int64_t>::max(), qdata.options().dtype(at::kLong));
  DequantParams p;
  p.q = static_cast<const uint8_t*>(qdata.const_data_ptr());
  p.scales = sc.defined() ? sc.const_data_ptr<float>() : nullptr;
  p.w = tile.mutable_data_ptr<float>();
  p.bad = reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>());
  p.row0 = row0;
  p.rows = rows;
  p.in = in_features;
  p.row_bytes = qdata.size(1);
  p.block_bytes = f.block_bytes;
  p.type = f.type;
  const int64_t threads = rows * ceil_div(in_features, 32);
  constexpr int kBlock = 256;
  const int64_t blocks = ceil_div(threads, kBlock);
  TORCH_CHECK(blocks <= 0x7FFFFFFF, "lora_ext::dequantize_weight: weight too large for the CUDA kernel");
  dequantize_kernel<<<static_cast<unsigned>(blocks), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t first = bad.item<int64_t>();  // synchronises: the error must name the row
  TORCH_CHECK_VALUE(first == std::numeric_limits<int64_t>::max(), "lora_ext::dequantize_weight: expected finite ",
                    f.name, " scales, got a non-finite scale in row ", first);
}

namespace {}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("dequantize_weight", &dequantize_weight_cuda);
}

}  // namespace lora_ext::cuda
