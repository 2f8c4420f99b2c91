#include "ops/common/quant_checks.h"

#include "ops/common/checks.h"
#include "ops/common/op_utils.h"

#include <array>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lora_ext::detail {

const quant::Format& check_quantized_weight(const char* op, const at::Tensor& qdata,
                                            const std::optional<at::Tensor>& qscale, std::string_view qtype,
                                            int64_t out_features, int64_t in_features) {
  const quant::Format* f = quant::find_format(qtype);
  TORCH_CHECK_VALUE(f != nullptr, "lora_ext::", op, ": expected qtype 'int8', 'q8_0', 'q4_0', 'q4_1' or 'nf4', got '",
                    std::string(qtype), "'");
  TORCH_CHECK_VALUE(out_features >= 0 && in_features >= 0, "lora_ext::", op,
                    ": expected out_features >= 0 and in_features >= 0, got ", out_features, " and ", in_features);
  TORCH_CHECK_VALUE(in_features % f->block == 0, "lora_ext::", op, ": ", f->name, " quantizes blocks of ", f->block,
                    " along in_features: expected in_features divisible by ", f->block, ", got ", in_features);
  const int64_t row_bytes = in_features / f->block * f->block_bytes;
  const auto want = f->type == quant::QType::Int8 ? at::kChar : at::kByte;
  TORCH_CHECK(qdata.scalar_type() == want, "lora_ext::", op, ": expected ", f->name, " qdata of dtype ",
              want == at::kChar ? "int8" : "uint8", ", got ", qdata.scalar_type());
  TORCH_CHECK(qdata.dim() == 2 && qdata.sym_size(0) == out_features && qdata.sym_size(1) == row_bytes, "lora_ext::", op,
              ": expected ", f->name, " qdata of shape [", out_features, ", ", row_bytes, "] for a [", out_features,
              ", ", in_features, "] weight, got ", qdata.sym_sizes());
  TORCH_CHECK(qdata.is_contiguous(), "lora_ext::", op, ": expected a contiguous qdata (the format's byte layout)");
  if (!f->has_qscale) {
    TORCH_CHECK_VALUE(!qscale.has_value(), "lora_ext::", op, ": ", f->name,
                      " keeps its scales inside its blocks: expected qscale None, got a tensor of shape ",
                      qscale->sym_sizes());
    return *f;
  }
  TORCH_CHECK_VALUE(qscale.has_value(), "lora_ext::", op, ": expected a float32 qscale for ", f->name, ", got None");
  const at::Tensor& s = *qscale;
  const bool int8 = f->type == quant::QType::Int8;
  const int64_t cols = int8 ? 1 : in_features / f->block;
  TORCH_CHECK(s.scalar_type() == at::kFloat, "lora_ext::", op, ": expected ", f->name, " qscale of dtype float32, got ",
              s.scalar_type());
  TORCH_CHECK(int8 ? (s.dim() == 1 && s.sym_size(0) == out_features)
                   : (s.dim() == 2 && s.sym_size(0) == out_features && s.sym_size(1) == cols),
              "lora_ext::", op, ": expected ", f->name, " qscale of shape ",
              int8 ? "[" + std::to_string(out_features) + "] (one scale per output row)"
                   : "[" + std::to_string(out_features) + ", " + std::to_string(cols) + "] (one absmax per " +
                         std::to_string(f->block) + ")",
              ", got ", s.sym_sizes());
  TORCH_CHECK(s.device() == qdata.device(), "lora_ext::", op, ": expected qscale on ", qdata.device(), ", got ",
              s.device());
  return *f;
}

namespace {

bool half_like_dtype(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

bool activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

const quant::Format& check_lora_linear_quantized_args(const char* op, const at::Tensor& x, const at::Tensor& qdata,
                                                      const std::optional<at::Tensor>& qscale, std::string_view qtype,
                                                      int64_t out_features, int64_t in_features,
                                                      const std::optional<at::Tensor>& bias, const at::Tensor* lora_A,
                                                      const at::Tensor* lora_B, double scale, double dropout_p) {
  const auto& f = check_quantized_weight(op, qdata, qscale, qtype, out_features, in_features);
  TORCH_CHECK(x.dim() >= 1, "lora_ext::", op,
              ": expected x of shape [..., in] with at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK(x.device() == qdata.device(), "lora_ext::", op, ": expected x on qdata's device ", qdata.device(),
              ", got ", x.device());
  TORCH_CHECK(activation_dtype(x.scalar_type()), "lora_ext::", op,
              ": expected x of dtype float32, float64, bfloat16 or float16, got ", x.scalar_type());
  TORCH_SYM_CHECK(x.sym_size(-1).sym_eq(in_features), "lora_ext::", op,
                  ": expected x of shape [..., in] with in = ", in_features, " (in_features), got x of shape ",
                  x.sym_sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == out_features, "lora_ext::", op, ": expected bias of shape [",
                out_features, "], got ", bias->sym_sizes());
    TORCH_CHECK(bias->device() == x.device(), "lora_ext::", op, ": expected bias on device ", x.device(), ", got ",
                bias->device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "lora_ext::", op, ": expected bias of dtype ", x.scalar_type(),
                " (x's dtype), got ", bias->scalar_type());
  }
  if (lora_A != nullptr) {
    TORCH_CHECK(lora_A->defined() && lora_B->defined(), "lora_ext::", op,
                ": expected defined tensors for lora_A and lora_B");
    check_adapter(op, "x", x, c10::SymInt(in_features), c10::SymInt(out_features), *lora_A, *lora_B, scale);
  }
  check_dropout_p(op, dropout_p);
  return f;
}

const quant::Format& check_quantized_backward_input_args(const char* op, const at::Tensor& grad_y,
                                                         const at::Tensor& qdata,
                                                         const std::optional<at::Tensor>& qscale,
                                                         std::string_view qtype, int64_t out_features,
                                                         int64_t in_features, const std::optional<at::Tensor>& lora_A,
                                                         const std::optional<at::Tensor>& grad_h, double dropout_p) {
  const auto& f = check_quantized_weight(op, qdata, qscale, qtype, out_features, in_features);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.sym_size(-1) == out_features, "lora_ext::", op,
              ": expected grad_y of shape [..., ", out_features, "], got ", grad_y.sym_sizes());
  TORCH_CHECK(grad_y.device() == qdata.device() && activation_dtype(grad_y.scalar_type()), "lora_ext::", op,
              ": expected a float grad_y on ", qdata.device(), ", got ", grad_y.scalar_type(), " on ", grad_y.device());
  TORCH_CHECK(lora_A.has_value() == grad_h.has_value(), "lora_ext::", op,
              ": expected lora_A and grad_h given together or not at all");
  if (lora_A.has_value()) {
    const auto acc = lora_acc_dtype(lora_A->scalar_type());
    TORCH_CHECK(lora_A->dim() == 2 && lora_A->sym_size(1) == in_features && lora_A->device() == grad_y.device(),
                "lora_ext::", op, ": expected lora_A of shape [r, ", in_features, "] on ", grad_y.device(), ", got ",
                lora_A->sym_sizes(), " on ", lora_A->device());
    TORCH_CHECK(grad_h->dim() == 2 && grad_h->sym_size(0) == leading_numel(grad_y.sym_sizes()) &&
                    grad_h->sym_size(1) == lora_A->sym_size(0) && grad_h->scalar_type() == acc &&
                    grad_h->device() == grad_y.device(),
                "lora_ext::", op, ": expected grad_h of shape [N, r] = [", leading_numel(grad_y.sym_sizes()), ", ",
                lora_A->sym_size(0), "] and dtype ", acc, ", got ", grad_h->sym_sizes(), " and ",
                grad_h->scalar_type());
    TORCH_CHECK(acc == (half_like_dtype(grad_y.scalar_type()) ? at::kFloat : grad_y.scalar_type()), "lora_ext::", op,
                ": expected lora_A of a dtype that accumulates in grad_y's, got ", lora_A->scalar_type(),
                " with grad_y ", grad_y.scalar_type());
  }
  check_dropout_p(op, dropout_p);
  return f;
}

const quant::Format& check_lora_linear_multi_quantized_args(
    const char* op, const at::Tensor& x, const at::Tensor& qdata, const std::optional<at::Tensor>& qscale,
    std::string_view qtype, int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids,
    double dropout_p, const std::optional<at::Tensor>& group_order, const std::optional<at::Tensor>& group_offsets) {
  TORCH_CHECK(x.defined() && qdata.defined() && lora_A.defined() && lora_B.defined() && scales.defined() &&
                  adapter_ids.defined(),
              "lora_ext::", op, ": expected defined tensors for x, qdata, lora_A, lora_B, scales and adapter_ids");
  const auto& f = check_lora_linear_quantized_args(op, x, qdata, qscale, qtype, out_features, in_features, bias,
                                                   nullptr, nullptr, 1.0, dropout_p);
  const c10::SymInt in(in_features), out(out_features);
  const std::array<c10::SymInt, 2> sizes{out, in};
  check_multi_adapter_args(op, x, in, out, sizes, lora_A, lora_B, scales, adapter_ids, dropout_p, group_order,
                           group_offsets);
  return f;
}

int64_t check_multi_quantized_backward_input_args(const char* op, const at::Tensor& grad_y, const at::Tensor& qdata,
                                                  const std::optional<at::Tensor>& qscale, std::string_view qtype,
                                                  int64_t out_features, int64_t in_features, const at::Tensor& lora_A,
                                                  const at::Tensor& grad_h, const at::Tensor& order,
                                                  const at::Tensor& offsets) {
  check_quantized_weight(op, qdata, qscale, qtype, out_features, in_features);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.sym_size(-1) == out_features, "lora_ext::", op,
              ": expected grad_y of shape [..., ", out_features, "], got ", grad_y.sym_sizes());
  TORCH_CHECK(grad_y.device() == qdata.device() && activation_dtype(grad_y.scalar_type()), "lora_ext::", op,
              ": expected a float grad_y on ", qdata.device(), ", got ", grad_y.scalar_type(), " on ", grad_y.device());
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.sym_size(2) == in_features && lora_A.device() == grad_y.device(),
              "lora_ext::", op, ": expected lora_A of shape [n_adapters, r_max, ", in_features, "] on ",
              grad_y.device(), ", got ", lora_A.sym_sizes(), " on ", lora_A.device());
  const auto acc = lora_acc_dtype(lora_A.scalar_type());
  TORCH_CHECK(acc == (half_like_dtype(grad_y.scalar_type()) ? at::kFloat : grad_y.scalar_type()), "lora_ext::", op,
              ": expected lora_A of a dtype that accumulates in grad_y's, got ", lora_A.scalar_type(), " with grad_y ",
              grad_y.scalar_type());
  int64_t N = 1;
  for (int64_t i = 0; i + 1 < grad_y.dim(); ++i) N *= grad_y.size(i);
  TORCH_CHECK(grad_h.dim() == 2 && grad_h.size(0) == N && grad_h.size(1) == lora_A.size(1) &&
                  grad_h.scalar_type() == acc && grad_h.device() == grad_y.device(),
              "lora_ext::", op, ": expected grad_h of shape [N, r_max] = [", N, ", ", lora_A.size(1), "] and dtype ",
              acc, ", got ", grad_h.sizes(), " and ", grad_h.scalar_type());
  check_grouping(op, order, offsets, N, lora_A.size(0));
  return N;
}

}  // namespace lora_ext::detail
