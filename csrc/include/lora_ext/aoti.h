#pragma once
// A causal LM compiled by AOTInductor (Python: lora_ext.export.export_causal_lm), run from C++ with PEFT
// adapters applied to its weights by PEFT key names, without Python and without re-exporting per adapter.
//
// The package computes the last position's logits [B, vocab] from input_ids int64 [B, T] (plus adapter_ids
// int64 [B] when it has adapter slots); generation recomputes the prefix at every step (no KV cache).
//   - merge_adapter: W += s B A in place in the package's own weights, exactly (unmerge_adapter restores
//     every bit); zero overhead per token.
//   - adapter slots (packages exported with adapter_slots = n > 0): every targeted linear layer runs
//     lora_ext::lora_linear_multi, so each batch row uses the slot adapter_ids[row] (-1: the base);
//     load_adapter_slot writes an adapter into slot i (switching costs a copy of the adapter's weights).
// Every change is validated for all modules first and throws c10::Error with nothing changed when the
// adapter does not fit. forward/generate may run on several threads at once; the changes wait for them
// (and they for the change).
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

#include <lora_ext/adapter.h>
#include <lora_ext/export.h>

namespace lora_ext {

class LORA_EXT_API AotiModel {
 public:
  // Loads the package (a .pt2 file written by lora_ext.export.export_causal_lm). The lora_ext ops the
  // package calls are registered by this library, so programs link liblora_ext.
  explicit AotiModel(const std::string& package_path);
  ~AotiModel();
  AotiModel(const AotiModel&) = delete;
  AotiModel& operator=(const AotiModel&) = delete;

  int64_t adapter_slots() const;  // 0: the plain base (merge only)
  int64_t max_rank() const;       // the largest adapter rank a slot holds
  int64_t vocab_size() const;
  int64_t max_batch() const;  // the exported dynamic ranges
  int64_t max_seq() const;
  const std::map<std::string, std::string>& metadata() const;
  // The live weights by the base model's parameter names ("model.layers.0.self_attn.q_proj.weight", the
  // names PEFT keys refer to) and, with slots, "<module>.lora_A" [n, max_rank, in], "<module>.lora_Bt"
  // [n, max_rank, out] and "<module>.lora_scales" float32 [n]. They alias what the model reads.
  const std::map<std::string, at::Tensor>& weights() const;

  // Logits of the last position, [B, vocab_size]. adapter_ids (int64 [B], values in [-1, adapter_slots))
  // is required with slots and refused without.
  at::Tensor forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& adapter_ids = std::nullopt);
  // Greedy decoding: `steps` new tokens per row, int64 [B, steps].
  at::Tensor generate(const at::Tensor& input_ids, int64_t steps,
                      const std::optional<at::Tensor>& adapter_ids = std::nullopt);

  // Merges `weight` x the adapter into the base weights (exact merge: side information is kept).
  void merge_adapter(const Adapter& adapter, double weight = 1.0);
  // Undoes the most recent merge bit for bit; throws when nothing is merged.
  void unmerge_adapter();
  size_t merged_adapters() const;

  // Puts the adapter into slot `slot` (its modules; the slot's other modules get no update).
  void load_adapter_slot(int64_t slot, const Adapter& adapter);
  void clear_adapter_slot(int64_t slot);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lora_ext
