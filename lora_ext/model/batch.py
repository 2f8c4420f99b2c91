"""``adapter_batch``: one adapter per batch row, scoped to the calling thread / asyncio task."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .._utils.names import BASE
from .._utils.wrappers import shards_parameters
from ..layers.linear import LoraLinear
from ..layers.per_row import AdapterBatch, enter_batch, exit_batch
from .core import lora_layers, saved_modules


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: list[str]) -> Iterator[AdapterBatch]:
    """Run ``model`` with one adapter per batch row: ``adapter_names[i]`` for row ``i`` of every
    LoRA linear layer's input (``"__base__"``: no adapter). Works in eval and training mode.

    The selection is request state: it holds only in the thread or asyncio task that entered
    the ``with`` (a ``contextvars.ContextVar``), never on the shared modules, so many threads
    and tasks can serve different adapter mixes through one model at the same time. (Threads
    started inside the ``with`` start with an empty context and do not see it.) Model-wide
    switches (``set_adapter``, ``merge``, ``disable_adapters``) are not per request.

    With activation checkpointing, call ``backward()`` inside the ``with``: the recomputed forward
    needs the same batch, and a recomputation after the ``with`` raises ``RuntimeError``.

    Raises ``ValueError`` for unknown names or merged adapters, and ``NotImplementedError`` when
    a batch adapter sits on an Embedding/Conv layer or in ``modules_to_save`` (per-row adapters
    are implemented for linear layers).
    """
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_batch: expected a list of adapter names (one per batch row), got {adapter_names!r}")
    layers = list(lora_layers(model))
    wanted = set(adapter_names) - {BASE}
    known = {n for _, layer in layers for n in layer.adapter_names}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"adapter_batch: unknown adapter(s) {unknown}; the model has {sorted(known)} "
            f"(use {BASE!r} for rows without an adapter)"
        )
    other = [
        p or "<root>" for p, layer in layers if not isinstance(layer, LoraLinear) and wanted & set(layer.adapter_names)
    ]
    other += [p for p, m in saved_modules(model) if wanted & set(m.modules_to_save.keys())]
    if other:
        raise NotImplementedError(
            f"adapter_batch: per-row adapters are implemented for linear layers; "
            f"{other} hold adapters of this batch (Embedding/Conv LoRA or modules_to_save)"
        )
    sharded = [p or "<root>" for p, layer in layers if getattr(layer, "_tp_layout", None) is not None]
    if sharded:
        raise NotImplementedError(
            f"adapter_batch: per-row adapters are not implemented for tensor-parallel layers "
            f"(the per-row op has no DTensor sharding strategy); {sharded[:3]} were "
            "parallelized by LoraColwiseParallel/LoraRowwiseParallel. Use set_adapter, or "
            "FSDP2/DDP, for several adapters"
        )
    merged = [p or "<root>" for p, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"adapter_batch: {merged} have merged adapters; unmerge() first")
    # FSDP2 re-gathers parameters in place without moving their version counters: no cached stacks
    batch = AdapterBatch(
        adapter_names,
        [layer for _, layer in layers if isinstance(layer, LoraLinear)],
        cache_stacks=not shards_parameters(model),
    )
    token = enter_batch(batch)
    try:
        yield batch
    finally:
        exit_batch(token, batch)
