"""Wrappers around a model: what they are, what is inside, and whether adapters may still change.

Two kinds of wrapper matter to the model-level API:

- **Transparent** ones only add a level to module paths: ``DistributedDataParallel`` and
  ``DataParallel`` (``module.``), ``torch.compile`` (``_orig_mod.``), activation checkpointing
  (``_checkpoint_wrapped_module.``) and FSDP1 (``_fsdp_wrapped_module.``). :func:`unwrap` strips
  them from the top of a model, :func:`path_cleaner` from module paths anywhere inside it, so that
  saved keys never depend on how the model was wrapped.
- **Fixing** ones take a snapshot of the parameters when they are built: DDP (its gradient
  buckets hold the parameters that require grad), FSDP1/FSDP2 (``fully_shard``) and DTensor
  parameters (tensor parallel). :func:`wrapped_by` finds them anywhere in a model; adapters must be
  injected before (``check_not_wrapped``), and DDP's set of trainable parameters must not change
  after it (``check_trainable_fixed``). The one exception: ``inject_adapter``/``add_adapter`` on a
  model that only tensor parallel holds, with LoRA layers that ``lora_ext.distributed.tensor_parallel``'s styles
  parallelized (a new adapter there gets the layer's placements).

Nothing here imports ``torch.distributed`` (or ``torch._dynamo``): a model can only hold an
instance of a class whose module has been imported, so each class is looked up in
``sys.modules``. This keeps the module importable, and cheap, where ``torch.distributed`` is
unavailable. It imports nothing from lora_ext, so every lora_ext module may import it.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from torch import nn

from .dtensors import dtensor_class

# (module that defines the class, class name, attribute holding the wrapped module)
_TRANSPARENT = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper", "_checkpoint_wrapped_module"),
    ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel", "_fsdp_wrapped_module"),
)
# (module, class name, how an error message names it)
_FIXING = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "DistributedDataParallel"),
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
        "FSDP (FullyShardedDataParallel)",
    ),
    ("torch.distributed.fsdp", "FSDPModule", "FSDP2 (fully_shard)"),
    ("torch.distributed._composable.fsdp", "FSDPModule", "FSDP2 (fully_shard)"),  # torch < 2.6
)


def _class(module_name: str, class_name: str) -> Optional[type]:
    return getattr(sys.modules.get(module_name), class_name, None)


def _inner(module: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """``(attribute, wrapped module)`` when ``module`` is a transparent wrapper, else None."""
    for mod_name, cls_name, attr in _TRANSPARENT:
        cls = _class(mod_name, cls_name)
        if cls is not None and isinstance(module, cls):
            inner = module._modules.get(attr)
            if isinstance(inner, nn.Module):
                return attr, inner
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any number of DDP / DataParallel / ``torch.compile`` / activation
    checkpointing / FSDP1 wrappers (the model itself when it is not wrapped). FSDP2's
    ``fully_shard`` and tensor parallel do not wrap: they return the model as it is."""
    while True:
        hit = _inner(model)
        if hit is None:
            return model
        model = hit[1]


def path_cleaner(model: nn.Module) -> Callable[[str], str]:
    """A function mapping a parameter or module name of ``model`` to the name it has without the
    wrappers inside it (``blocks.0._checkpoint_wrapped_module.fc1.weight`` -> ``blocks.0.fc1.weight``).
    Only the slots that hold a wrapped module are removed, never a user's module of the same name."""
    slots = set()
    for path, m in model.named_modules():
        hit = _inner(m)
        if hit is not None:
            slots.add(f"{path}.{hit[0]}" if path else hit[0])
    if not slots:
        return lambda name: name

    def clean(name: str) -> str:
        parts = name.split(".")
        return ".".join(p for i, p in enumerate(parts) if ".".join(parts[: i + 1]) not in slots)

    return clean


def holds_dtensors(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor."""
    dtensor = dtensor_class()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def is_tensor_parallel_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a LoRA layer that ``lora_ext.distributed.tensor_parallel``'s styles parallelized."""
    return getattr(module, "_tp_layout", None) is not None


def wrapped_by(model: nn.Module) -> list[str]:
    """What in ``model`` fixed its parameters: DDP, FSDP1 or FSDP2 modules (also inside the
    model) and DTensor parameters, as ``"<what> at '<path>'"``; empty when nothing did."""
    classes = [(c, what) for m, n, what in _FIXING if (c := _class(m, n)) is not None]
    dtensor = dtensor_class()
    found = []
    if classes:
        for path, m in model.named_modules():
            what = next((w for c, w in classes if isinstance(m, c)), None)
            if what is not None:
                found.append(f"{what} at {path or '<root>'!r}")
    if dtensor is not None:
        names = [n for n, p in model.named_parameters() if isinstance(p, dtensor)]
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            found.append(f"DTensor parameters ({names[0]!r}{more})")
    return found


def is_wrapped(model: nn.Module) -> bool:
    """Whether DDP, FSDP1, FSDP2 (``fully_shard``) or tensor parallel (DTensor parameters)
    holds ``model`` or any module inside it."""
    return bool(wrapped_by(model))


def check_not_wrapped(model: nn.Module, where: str, tensor_parallel_ok: bool = False) -> None:
    """Raise when adapters would be added to a model whose parameters a wrapper has fixed.

    ``tensor_parallel_ok``: pass a model whose only "wrapper" is tensor parallel (DTensor parameters,
    no DDP/FSDP) with at least one LoRA layer ``lora_ext.distributed.tensor_parallel`` parallelized; the caller
    then refuses targets holding DTensors that are not such layers."""
    found = wrapped_by(model)
    if (
        found
        and tensor_parallel_ok
        and len(found) == 1
        and found[0].startswith("DTensor parameters")
        and any(is_tensor_parallel_layer(m) for m in model.modules())
    ):
        return
    if found:
        raise ValueError(
            f"{where}: inject adapters before fully_shard/DDP: expected a model that no DDP, FSDP or "
            f"tensor parallel holds yet, got one with {', '.join(found)}. Those fixed the parameters they "
            "reduce or shard when they were built, so a new adapter would never be synchronised. Inject, "
            "add or load every adapter first (adapters that do not train stay frozen and cost nothing), "
            "then wrap or shard the model"
        )


def _ddp_modules(model: nn.Module) -> list[str]:
    cls = _class("torch.nn.parallel.distributed", "DistributedDataParallel")
    if cls is None:
        return []
    return [path or "<root>" for path, m in model.named_modules() if isinstance(m, cls)]


def check_trainable_fixed(model: nn.Module, where: str, what: str) -> None:
    """Raise when ``what`` (which changes the parameters that train) is asked of a DDP model."""
    found = _ddp_modules(model)
    if found:
        raise ValueError(
            f"{where}: expected a model that DistributedDataParallel does not hold, got one wrapped at "
            f"{found}: DDP fixed its gradient buckets (the parameters that require grad) at construction, "
            f"and {what} would change which parameters train, so their gradients would not be all-reduced "
            "(or DDP would wait for gradients that never come). Call it before wrapping (the plain model is "
            "lora_ext.distributed.unwrap(ddp_model); wrap it again afterwards), or train several adapters "
            "at once with lora_ext.adapter_batch, which picks an adapter per batch row"
        )


def shards_parameters(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) or tensor parallel (DTensor parameters) holds any of ``model``'s
    parameters: their values may then change without their version counters moving (FSDP2
    re-gathers into the same unsharded tensors), so nothing may be cached on a version."""
    return any(not w.startswith("DistributedDataParallel") for w in wrapped_by(model))


def reshard_fsdp(model: nn.Module) -> None:
    """Register the sharded parameters of every FSDP2 module in ``model`` (``FSDPModule.reshard()``).
    After a forward with ``reshard_after_forward=False`` the modules hold gathered copies, which FSDP2
    drops at the next reshard: merging must write into the sharded parameters instead."""
    cls = _class("torch.distributed.fsdp", "FSDPModule") or _class("torch.distributed._composable.fsdp", "FSDPModule")
    if cls is not None:
        for m in model.modules():
            if isinstance(m, cls):
                m.reshard()
