"""Export a Hugging Face causal LM for C++ inference: ``torch.export`` + AOTInductor, adapters applied from C++.

``export_causal_lm(model, "lm.pt2")`` writes an AOTInductor package computing the last position's logits
``[B, vocab]`` from ``input_ids`` int64 ``[B, T]``, with a dynamic batch and sequence length. C++ loads it with
``lora_ext::AotiModel`` (``<lora_ext/aoti.h>``) and applies PEFT adapter folders to its weights by PEFT key:

- ``adapter_slots=0`` (form a): the plain base graph; C++ merges an adapter into the weights in place (exactly
  undone by unmerge), so a merged adapter costs nothing per token.
- ``adapter_slots=n`` (form b): every targeted ``nn.Linear`` runs ``lora_ext::lora_linear_multi`` with ``n``
  zero-filled adapter slots (rank up to ``max_rank``) as weights, and the package takes a second input,
  ``adapter_ids`` int64 ``[B]`` (the slot of each row, -1 for the base). C++ writes adapters into slots
  between requests, and one batch can mix adapters. The package calls lora_ext's ops through the dispatcher,
  so the program running it links ``liblora_ext``.

No KV cache is exported: a generation step runs the whole prefix again, so a step costs what a forward over the
sequence costs (the head runs on the last position only).
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import torch
from torch import nn

from .. import ops
from .._utils.modules import replace_submodule
from ..model.core import lora_layers

__all__ = ["export_causal_lm", "FORMAT"]

FORMAT = "lora_ext.causal_lm/1"
_PREFIX = "model."  # the wrapper's attribute: the package's constants are "model.<the model's parameter name>"


class _Rows:
    """The row plan of the forward being traced (export-time only: a fresh wrapper per export, one thread)."""

    plan: Optional[tuple] = None


class _SlotLinear(nn.Module):
    """``nn.Linear`` plus ``n`` adapter slots: ``y = lora_linear_multi(x, W, b, A, B, scales, row slots)``.

    Buffers: ``lora_A`` ``[n, r_max, in]``, ``lora_Bt`` ``[n, r_max, out]`` (B transposed: the layout the
    kernel reads without a copy), ``lora_scales`` float32 ``[n]``; zeros until C++ loads an adapter.
    """

    def __init__(self, linear: nn.Linear, slots: int, max_rank: int, rows: _Rows):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        kw = dict(dtype=linear.weight.dtype, device=linear.weight.device)
        self.register_buffer("lora_A", torch.zeros(slots, max_rank, linear.in_features, **kw))
        self.register_buffer("lora_Bt", torch.zeros(slots, max_rank, linear.out_features, **kw))
        self.register_buffer("lora_scales", torch.zeros(slots, dtype=torch.float32, device=linear.weight.device))
        self._rows = rows

    def forward(self, x):
        ids, order, offsets = self._rows.plan
        return ops.lora_linear_multi(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_Bt.transpose(1, 2),
            self.lora_scales,
            ids,
            0.0,
            False,
            order,
            offsets,
        )


class _LastLogits(nn.Module):
    """``input_ids [B, T]`` (and ``adapter_ids [B]``) -> the last position's logits ``[B, vocab]``."""

    def __init__(self, model: nn.Module, slots: int, rows: _Rows):
        super().__init__()
        self.model = model
        self.slots = slots
        self._rows = rows

    def forward(self, input_ids, adapter_ids=None):
        if self.slots:
            ids = adapter_ids.repeat_interleave(input_ids.shape[1])
            self._rows.plan = (ids, *ops.lora_group_rows(ids, self.slots))
        hidden = self.model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.model.get_output_embeddings()(hidden[:, -1])


def _slot_targets(model: nn.Module, target_modules: Optional[Sequence[str]]) -> list[str]:
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if target_modules is None:
        return names
    wanted = list(target_modules)
    chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in chosen)]
    if missing:
        raise ValueError(
            f"export_causal_lm: expected every target module to name nn.Linear layers, got {missing} "
            f"matching none (e.g. {names[:3]})"
        )
    return chosen


def export_causal_lm(
    model: nn.Module,
    package_path: str | os.PathLike,
    *,
    adapter_slots: int = 0,
    max_rank: int = 8,
    target_modules: Optional[Sequence[str]] = None,
    max_batch: int = 64,
    max_seq: int = 512,
) -> dict:
    """Export ``model`` (a Hugging Face causal LM on the CPU, e.g. ``LlamaForCausalLM``, without LoRA layers) to an
    AOTInductor package at ``package_path`` (``.pt2``) for ``lora_ext::AotiModel``.

    Args:
        adapter_slots: 0 for the plain base (form a), ``n > 0`` for ``n`` adapter slots on every targeted linear
            layer (form b).
        max_rank: the largest adapter rank a slot holds (form b).
        target_modules: module names or suffixes (PEFT's ``target_modules``) that get slots; default every
            ``nn.Linear`` but the output head.
        max_batch, max_seq: the dynamic ranges of the batch and the sequence length.

    The model is changed only for the duration of the call (its linear layers are wrapped and then restored).
    Returns ``{"package": path, "export_s": ..., "compile_s": ..., "bytes": ...}``.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError(
            "export_causal_lm: expected the base model, got one with LoRA layers; export "
            "lora_ext.unload(model) and apply the adapters in C++ (or export lora_ext.merge_and_unload)"
        )
    for name, v in (
        ("adapter_slots", adapter_slots),
        ("max_rank", max_rank),
        ("max_batch", max_batch),
        ("max_seq", max_seq),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "adapter_slots" else 1):
            raise ValueError(
                f"export_causal_lm: expected {name} to be an int >= {0 if name == 'adapter_slots' else 1}, got {v!r}"
            )
    if max_batch < 2 or max_seq < 2:
        raise ValueError(
            f"export_causal_lm: expected max_batch >= 2 and max_seq >= 2 (dynamic ranges), got {max_batch}, {max_seq}"
        )
    if not (
        callable(getattr(model, "get_decoder", None))
        and callable(getattr(model, "get_output_embeddings", None))
        and isinstance(model.get_output_embeddings(), nn.Linear)
    ):
        raise ValueError(
            f"export_causal_lm: expected a Hugging Face causal LM (get_decoder() and an nn.Linear "
            f"get_output_embeddings()), got {type(model).__name__}"
        )
    dev = next(model.parameters()).device
    if dev.type != "cpu":
        raise ValueError(f"export_causal_lm: expected a model on the CPU (AotiModel runs on the CPU), got {dev}")
    rows = _Rows()
    replaced = []
    if adapter_slots:
        for name in _slot_targets(model, target_modules):
            linear = model.get_submodule(name)
            replaced.append((name, replace_submodule(model, name, _SlotLinear(linear, adapter_slots, max_rank, rows))))
    was_training = model.training
    model.eval()
    try:
        wrapper = _LastLogits(model, adapter_slots, rows)
        vocab = model.get_output_embeddings().out_features
        example = (torch.randint(0, vocab, (2, min(8, max_seq))),)
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        seq = torch.export.Dim("seq", min=1, max=max_seq)
        shapes = {"input_ids": {0: batch, 1: seq}}
        if adapter_slots:
            example += (torch.tensor([0, -1]),)
            shapes["adapter_ids"] = {0: batch}
        t0 = time.perf_counter()
        with torch.no_grad():
            ep = torch.export.export(wrapper, example, dynamic_shapes=shapes, strict=False)
        t1 = time.perf_counter()
        meta = {
            "lora_ext.format": FORMAT,
            "lora_ext.param_prefix": _PREFIX,
            "lora_ext.adapter_slots": str(adapter_slots),
            "lora_ext.max_rank": str(max_rank if adapter_slots else 0),
            "lora_ext.vocab_size": str(vocab),
            "lora_ext.max_batch": str(max_batch),
            "lora_ext.max_seq": str(max_seq),
        }
        path = torch._inductor.aoti_compile_and_package(
            ep,
            package_path=os.fspath(package_path),
            # otherwise Inductor replaces uniform constants (the zero-filled slots, a fresh model's norm weights) by
            # `full` calls and inlines small ones (the slots' scales) into the code: no longer weights C++ can write
            inductor_configs={
                "aot_inductor.metadata": meta,
                "joint_graph_constant_folding": False,
                "always_keep_tensor_constants": True,
            },
        )
        t2 = time.perf_counter()
    finally:
        for name, linear in replaced:
            replace_submodule(model, name, linear)
        model.train(was_training)
    return {"package": path, "export_s": t1 - t0, "compile_s": t2 - t1, "bytes": os.path.getsize(path)}
