// The one place that declares every lora_ext operator schema. Kernels are
// registered per dispatch key in cpu/, meta/, autograd/ (and cuda/).
#include <torch/library.h>

TORCH_LIBRARY(lora_ext, m) {
  // Public ops.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scale, float dropout_p=0., bool training=False) -> Tensor");
  m.def("merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()");
  m.def("unmerge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()");

  // Exact (bit-for-bit reversible) merge of a float32/bfloat16/float16 weight.
  // merge_exact_codes reads the current weight and returns the side information
  // unmerge_exact_ needs after merge_exact_: 2-bit codes per element (uint8,
  // four per byte) and a sparse list (flat int64 indices, original values) of
  // the rare elements the codes cannot express.
  m.def(
      "merge_exact_codes(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) "
      "-> (Tensor codes, Tensor exc_index, Tensor exc_value)");
  m.def("merge_exact_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()");
  m.def(
      "unmerge_exact_(Tensor(a!) weight, Tensor codes, Tensor exc_index, Tensor exc_value, Tensor lora_A, "
      "Tensor lora_B, float scale) -> ()");

  // Pieces used by lora_linear's autograd formula. `seed` (int64 [1], or None
  // for no dropout) determines the dropout mask, which is regenerated from it
  // by every kernel that needs it, so no mask and no dropped copy of x is kept.
  // Returns (y, h) with h = dropout(x) A^T of shape [N, r] (fp32 for half/bf16).
  m.def(
      "_lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // (grad_A, grad_B, grad_h) with grad_h = scale * grad_y B ([N, r], the LoRA
  // intermediate's gradient), grad_A = grad_h^T dropout(x), grad_B = scale * grad_y^T h.
  m.def(
      "_lora_linear_backward_lora(Tensor grad_y, Tensor x, Tensor lora_A, Tensor lora_B, Tensor h, "
      "float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  // grad_x = grad_y W + mask/(1-p) * (grad_h A), accumulated in place into one buffer.
  m.def(
      "_lora_linear_backward_input(Tensor grad_y, Tensor weight, Tensor lora_A, Tensor grad_h, "
      "float dropout_p, Tensor? seed) -> Tensor");

  // Quantized frozen base weights [out, in] (ops/common/quant_formats.h has the
  // layouts): int8 per output row, GGUF's q8_0 / q4_0 / q4_1 blocks as stored in
  // the file, QLoRA's nf4. dequantize_weight returns the float32 weight.
  m.def("dequantize_weight(Tensor qdata, Tensor? qscale, str qtype, int out_features, int in_features) -> Tensor");
  // lora_linear over such a frozen base, which is never dequantized whole
  // (ops/common/quantized_base.h): the same dropout, dtype and autograd rules;
  // the base gets no gradient. linear_quantized is the base alone (bias + x W^T).
  m.def(
      "lora_linear_quantized(Tensor x, Tensor qdata, Tensor? qscale, str qtype, int out_features, int in_features, "
      "Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, float dropout_p=0., bool training=False) -> Tensor");
  m.def(
      "linear_quantized(Tensor x, Tensor qdata, Tensor? qscale, str qtype, int out_features, int in_features, "
      "Tensor? bias) -> Tensor");
  // Autograd pieces: the forward returns (y, h) as _lora_linear_forward does; the
  // LoRA gradients come from _lora_linear_backward_lora; grad_x = grad_y W
  // (+ mask/(1-p) * (grad_h A) when lora_A and grad_h are given).
  m.def(
      "_lora_linear_quantized_forward(Tensor x, Tensor qdata, Tensor? qscale, str qtype, int out_features, "
      "int in_features, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor)");
  m.def(
      "_lora_linear_quantized_backward_input(Tensor grad_y, Tensor qdata, Tensor? qscale, str qtype, "
      "int out_features, int in_features, Tensor? lora_A, Tensor? grad_h, float dropout_p, Tensor? seed) -> Tensor");

  // Multi-adapter batches: row i of x uses adapter adapter_ids[i] of a stack
  // (lora_A [n, r_max, in], lora_B [n, out, r_max], scales [n]); -1 = base only.
  // lora_group_rows sorts the rows by adapter once per batch (stable counting
  // sort): adapter a's rows are order[offsets[a] : offsets[a + 1]], the base
  // rows order[offsets[n] : offsets[n + 1]] (offsets has n + 2 entries, the last
  // is N). Every layer of a model can reuse it (group_order/group_offsets).
  m.def("lora_group_rows(Tensor adapter_ids, int n_adapters) -> (Tensor order, Tensor offsets)");
  m.def(
      "lora_linear_multi(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scales, "
      "Tensor adapter_ids, float dropout_p=0., bool training=False, Tensor? group_order=None, "
      "Tensor? group_offsets=None) -> Tensor");
  // Autograd pieces, as for lora_linear; h is [N, r_max] in row order (fp32 for
  // half/bf16 adapters), zero on base rows. The forward checks that the
  // grouping matches adapter_ids; the backward pieces take it as given.
  m.def(
      "_lora_linear_multi_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor scales, Tensor adapter_ids, Tensor order, Tensor offsets, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor)");
  m.def(
      "_lora_linear_multi_backward_lora(Tensor grad_y, Tensor x, Tensor lora_A, Tensor lora_B, Tensor scales, "
      "Tensor order, Tensor offsets, Tensor h, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_lora_linear_multi_backward_input(Tensor grad_y, Tensor weight, Tensor lora_A, Tensor grad_h, "
      "Tensor order, Tensor offsets, float dropout_p, Tensor? seed) -> Tensor");

  // lora_linear_multi over a quantized frozen base (the base arguments of lora_linear_quantized, the
  // per-row ones of lora_linear_multi): y = bias + x dequant(W)^T + the rows' LoRA terms, with W never
  // dequantized whole. Autograd pieces: the forward returns (y, h) as _lora_linear_multi_forward does; the
  // LoRA gradients come from _lora_linear_multi_backward_lora; grad_x = grad_y W + the rows' LoRA terms.
  m.def(
      "lora_linear_multi_quantized(Tensor x, Tensor qdata, Tensor? qscale, str qtype, int out_features, "
      "int in_features, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scales, Tensor adapter_ids, "
      "float dropout_p=0., bool training=False, Tensor? group_order=None, Tensor? group_offsets=None) -> Tensor");
  m.def(
      "_lora_linear_multi_quantized_forward(Tensor x, Tensor qdata, Tensor? qscale, str qtype, int out_features, "
      "int in_features, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scales, Tensor adapter_ids, "
      "Tensor order, Tensor offsets, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "_lora_linear_multi_quantized_backward_input(Tensor grad_y, Tensor qdata, Tensor? qscale, str qtype, "
      "int out_features, int in_features, Tensor lora_A, Tensor grad_h, Tensor order, Tensor offsets, "
      "float dropout_p, Tensor? seed) -> Tensor");
}
