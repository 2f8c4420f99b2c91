"""Multi-adapter batches: each row of a batch uses its own adapter (or none).

``with lora_ext.adapter_batch(model, ["task_a", "__base__", "task_b", ...]):`` makes every
LoRA linear layer of ``model`` run the compiled ``lora_linear_multi`` op with one adapter name
per batch row (the first dim of the layer's input; PEFT's ``adapter_names=`` convention, with
``"__base__"`` for the base model). The row grouping is computed once per batch and layer
adapter set and shared by all layers; each layer keeps its adapters stacked (zero-padded to the
largest rank) and re-stacks only when an adapter changes. In training mode, gradients reach
each adapter from its own rows only, so several adapters train at once on one frozen base.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

BASE = "__base__"


class AdapterBatch:
    """One adapter name per batch row, and the row groupings derived from it (cached)."""

    def __init__(self, adapter_names: list[str]):
        self.adapter_names = list(adapter_names)
        self._groupings: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.adapter_names)

    def grouping(self, layer_adapters: tuple[str, ...], rows_per_item: int, device: torch.device):
        """``(adapter_ids, order, offsets)`` for a layer whose adapter stack is ``layer_adapters``
        and whose input has ``rows_per_item`` rows per batch row. Rows whose adapter the layer
        lacks (or ``"__base__"``) get id -1: base only, as in PEFT."""
        key = (layer_adapters, rows_per_item, device)
        hit = self._groupings.get(key)
        if hit is None:
            index = {n: i for i, n in enumerate(layer_adapters)}
            ids = torch.tensor([index.get(n, -1) for n in self.adapter_names], dtype=torch.long)
            ids = ids.repeat_interleave(rows_per_item).to(device)
            hit = (ids, *ops.lora_group_rows(ids, len(layer_adapters)))
            self._groupings[key] = hit
        return hit


def stacked_adapters(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lora_A [n, r_max, in], lora_B [n, out, r_max], scales float32 [n])`` of all of
    ``layer``'s adapters in ``layer.adapter_names`` order, zero-padded to the largest rank.

    B is a transposed view of a contiguous ``[n, r_max, out]`` stack, the layout the kernels
    read without a copy. Without autograd the stacks are cached on the layer until an adapter
    is added, removed or changed in place; with autograd they are rebuilt (differentiably)
    on every call so gradients reach each adapter's own parameters.
    """
    names = tuple(layer.adapter_names)
    weights = [layer.adapter_weights(n) for n in names]
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for ab in weights for t in ab)
    key = (names, tuple((id(a), a._version, id(b), b._version) for a, b in weights),
           tuple(layer.scaling[n] for n in names))
    cached = getattr(layer, "_stack_cache", None)
    if not need_grad and cached is not None and cached[0] == key:
        return cached[1]
    r_max = max(a.shape[0] for a, _ in weights)
    A = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a, _ in weights])
    Bt = torch.stack([F.pad(b.t(), (0, 0, 0, r_max - b.shape[1])) for _, b in weights])
    scales = torch.tensor([layer.scaling[n] for n in names], dtype=torch.float32, device=A.device)
    out = (A, Bt.transpose(1, 2), scales)
    layer._stack_cache = None if need_grad else (key, out)
    return out


def multi_forward(layer, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
    """``LoraLinear`` forward with per-row adapters (called by the layer inside ``adapter_batch``)."""
    where = f"adapter_batch ({type(layer).__name__})"
    if layer.merged:
        raise ValueError(f"{where}: adapters are merged into the weight; unmerge() before per-row adapters")
    if x.dim() < 2 or x.shape[0] != len(batch):
        raise ValueError(f"{where}: expected an input whose first dim is the batch of {len(batch)} rows "
                         f"(one adapter name per row), got x of shape {tuple(x.shape)}")
    names = tuple(layer.adapter_names)
    if not names:
        return layer.base_layer(x)
    used = {n for n in batch.adapter_names if n in layer.r}
    p = 0.0
    if layer.training:
        ps = {layer.lora_dropout[n] for n in used}
        if len(ps) > 1:
            raise ValueError(f"{where}: the adapters in this batch have different lora_dropout {sorted(ps)}; "
                             "per-row adapters share one dropout probability in training")
        p = ps.pop() if ps else 0.0
    A, B, scales = stacked_adapters(layer)
    ids, order, offsets = batch.grouping(names, math.prod(x.shape[1:-1]), x.device)
    return ops.lora_linear_multi(x, layer._base_weight(), layer.base_layer.bias, A, B, scales, ids, p,
                                 layer.training, order, offsets)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: list[str]) -> Iterator[AdapterBatch]:
    """Run ``model`` with one adapter per batch row: ``adapter_names[i]`` for row ``i`` of every
    LoRA linear layer's input (``"__base__"``: no adapter). Works in eval and training mode.

    Raises ``ValueError`` for unknown names or merged adapters, and ``NotImplementedError`` when
    a batch adapter sits on an Embedding/Conv layer or in ``modules_to_save`` (per-row adapters
    are implemented for linear layers).
    """
    from .linear import LoraLinear
    from .model import lora_layers, saved_modules

    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_batch: expected a list of adapter names (one per batch row), got {adapter_names!r}")
    layers = list(lora_layers(model))
    wanted = set(adapter_names) - {BASE}
    known = {n for _, layer in layers for n in layer.adapter_names}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"adapter_batch: unknown adapter(s) {unknown}; the model has {sorted(known)} "
                         f"(use {BASE!r} for rows without an adapter)")
    other = [p or "<root>" for p, layer in layers
             if not isinstance(layer, LoraLinear) and wanted & set(layer.adapter_names)]
    other += [p for p, m in saved_modules(model) if wanted & set(m.modules_to_save.keys())]
    if other:
        raise NotImplementedError(f"adapter_batch: per-row adapters are implemented for linear layers; "
                                  f"{other} hold adapters of this batch (Embedding/Conv LoRA or modules_to_save)")
    merged = [p or "<root>" for p, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"adapter_batch: {merged} have merged adapters; unmerge() first")
    batch = AdapterBatch(adapter_names)
    previous: list[tuple[nn.Module, Optional[AdapterBatch]]] = []
    for _, layer in layers:
        if isinstance(layer, LoraLinear):
            previous.append((layer, layer._adapter_batch))
            layer._adapter_batch = batch
    try:
        yield batch
    finally:
        for layer, prev in previous:
            layer._adapter_batch = prev
