"""Model-level API: inject adapters into an existing model and manage them."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional, Union

from torch import nn

from .._utils.modules import replace_submodule
from .._utils.names import adapter_name_list, check_adapter_name
from .._utils.wrappers import (
    check_not_wrapped,
    check_trainable_fixed,
    holds_dtensors,
    is_tensor_parallel_layer,
    reshard_fsdp,
    unwrap,
)
from ..config import LoraConfig
from ..layers.base import LoraLayer
from ..layers.gpt2_conv1d import is_gpt2_conv1d
from . import hf_save
from .modules_to_save import ModulesToSave, find_modules_to_save
from .registry import layer_type_for
from .targeting import layer_r_alpha, resolve_targets

CONFIGS_ATTR = "lora_ext_configs"
ACTIVE_ATTR = "lora_ext_active"
INFERENCE_ATTR = "lora_ext_inference_mode"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(path, layer)`` for every LoRA layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """``(path, wrapper)`` for every module kept whole per adapter (``modules_to_save``)."""
    for name, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            yield name, m


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters injected into ``model``, by adapter name."""
    return getattr(unwrap(model), CONFIGS_ATTR, {})


def active_adapters(model: nn.Module) -> list[str]:
    """The model-wide active adapters (set by :func:`set_adapter`; the first adapter added)."""
    return list(getattr(unwrap(model), ACTIVE_ATTR, []))


def _wrap(module: nn.Module, path: str) -> LoraLayer:
    cls = layer_type_for(module)
    if cls is None:
        raise TypeError(f"lora_ext: cannot add LoRA to {path!r} of type {type(module).__name__}")
    return cls(module, adapter_name=None)


def inject_adapter(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", target_names: Optional[list[str]] = None
) -> nn.Module:
    """Add adapter ``adapter_name`` to the modules ``config`` targets, in place.

    Targeted ``nn.Linear`` modules are replaced by ``LoraLinear`` wrappers (no copy of the base
    weights); already wrapped modules get one more adapter. The first adapter of a model becomes
    active and trainable (plus biases per ``config.bias``), everything else frozen; a later one is
    added inactive and frozen, and what trains does not change (as PEFT). Every target is checked
    (type, rank <= min(in, out)) before the model is changed. Returns the same model object.

    Inject before wrapping the model in DDP or sharding it (FSDP, tensor parallel): a model they
    already hold is refused, except a tensor-parallel one whose targets are LoRA layers that
    ``lora_ext.distributed.tensor_parallel``'s styles parallelized (the new adapter gets their placements; with
    the styles' default ``src_data_rank=0`` rank 0's initial values, so every rank calls it) or
    hold no DTensor. A ``torch.compile``, DataParallel or activation-checkpointing
    wrapper around the model is looked through; saved keys never hold wrappers' prefixes.
    """
    check_not_wrapped(model, "lora_ext.inject_adapter", tensor_parallel_ok=True)
    given, model = model, unwrap(model)
    check_adapter_name(adapter_name, "lora_ext.inject_adapter")
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"lora_ext.inject_adapter: expected a lora_ext.LoraConfig, got {type(config).__name__} "
            "(a dict or a PEFT config: lora_ext.LoraConfig.from_dict(d) / .from_dict(cfg.to_dict()))"
        )
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"lora_ext.inject_adapter: adapter {adapter_name!r} already exists in the model")
    names = resolve_targets(model, config) if target_names is None else target_names
    if not config.fan_in_fan_out and any(is_gpt2_conv1d(_base(model.get_submodule(n))) for n in names):
        warnings.warn(
            "lora_ext: target modules include GPT-2 Conv1D layers (weight stored [in, out]); "
            "setting fan_in_fan_out=True",
            stacklevel=2,
        )
        config = config.replace(fan_in_fan_out=True)
    problems = []
    for path in names:
        module = model.get_submodule(path)
        cls = layer_type_for(module)
        if cls is None:
            problems.append(f"{path!r} is a {type(module).__name__}, which LoRA cannot wrap")
            continue
        if holds_dtensors(module) and not is_tensor_parallel_layer(module):
            problems.append(
                f"{path!r}: expected a LoRA layer that LoraColwiseParallel/LoraRowwiseParallel "
                f"parallelized or a module without DTensor parameters, got a {type(module).__name__} "
                "holding DTensors placed by something else (e.g. torch's ColwiseParallel)"
            )
            continue
        r, _ = layer_r_alpha(config, path)
        if r > cls.max_rank(_base(module)):
            problems.append(f"{path!r}: expected r <= min(in, out) = {cls.max_rank(_base(module))}, got r={r}")
    if problems:
        raise ValueError("lora_ext.inject_adapter: the model was not changed:\n  " + "\n  ".join(problems))
    save_paths = []
    if config.modules_to_save:
        save_paths = find_modules_to_save(model, config.modules_to_save)
        if not save_paths:
            raise ValueError(f"lora_ext.inject_adapter: modules_to_save={config.modules_to_save!r} matches no module")
        held = [p for p in save_paths if holds_dtensors(model.get_submodule(p))]
        if held:
            raise ValueError(
                f"lora_ext.inject_adapter: expected modules_to_save without DTensor parameters "
                f"(tensor parallel), got {held}; the model was not changed"
            )
    for path in names:
        module = model.get_submodule(path)
        layer = module if isinstance(module, LoraLayer) else _wrap(module, path)
        r, alpha = layer_r_alpha(config, path)
        layer.add_adapter(
            adapter_name,
            r=r,
            lora_alpha=alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
        )
        if layer is not module:
            layer.train(module.training)  # keep the model's train/eval mode
            replace_submodule(model, path, layer)
    for path in save_paths:
        module = model.get_submodule(path)
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(adapter_name)
        if wrapper is not module:
            wrapper.train(module.training)
            replace_submodule(model, path, wrapper)
    configs = dict(configs)
    configs[adapter_name] = config
    object.__setattr__(model, CONFIGS_ATTR, configs)
    # As PEFT: the first adapter becomes active; a later one is added inactive, in every layer
    # (also in layers that held no adapter before), and what trains does not change.
    _activate(model, active_adapters(model) or [adapter_name])
    hf_save.guard(model)  # transformers' save_pretrained would write keys from_pretrained does not load
    return given


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Add another adapter (it does not become active: see :func:`set_adapter`)."""
    check_not_wrapped(model, "lora_ext.add_adapter", tensor_parallel_ok=True)
    return inject_adapter(model, config, adapter_name)


def _activate(model: nn.Module, names: list[str], inference_mode: Optional[bool] = None) -> None:
    """Make ``names`` the model-wide active adapters, in every layer that has them, and make
    exactly their parameters trainable (none in inference mode; ``None`` keeps the model's mode):
    ``requires_grad`` always follows "active and used in forward", as in PEFT."""
    model = unwrap(model)
    if inference_mode is None:
        inference_mode = bool(getattr(model, INFERENCE_ATTR, False))
    object.__setattr__(model, ACTIVE_ATTR, list(names))
    object.__setattr__(model, INFERENCE_ATTR, inference_mode)
    for _, layer in lora_layers(model):
        present = [n for n in names if layer.has_adapter(n)]
        if layer.merged and present != layer._active_adapters:
            layer.unmerge()  # switching what is active: the merged weight no longer matches
        layer._active_adapters = present
    for _, wrapper in saved_modules(model):
        wrapper.set_adapter(names)
    configs = adapter_configs(model)
    biases = set() if inference_mode else {configs[n].bias for n in names if n in configs}
    _mark_trainable(
        model,
        [] if inference_mode else names,
        "all" if "all" in biases else "lora_only" if "lora_only" in biases else "none",
    )


def _mark_trainable(model: nn.Module, adapter_names: list[str], bias: str = "none") -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for n in layer.adapter_names:
            for w in layer.adapter_weights(n):
                w.requires_grad_(n in adapter_names)
        if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    for _, wrapper in saved_modules(model):
        for p in wrapper.original_module.parameters():
            p.requires_grad_(False)
        for n in wrapper.modules_to_save:
            for p in wrapper.modules_to_save[n].parameters():
                p.requires_grad_(n in adapter_names)


def _check_adapters(model: nn.Module, names: list[str], where: str) -> None:
    missing = [n for n in names if n not in adapter_configs(model)]
    if missing:
        raise ValueError(f"lora_ext.{where}: unknown adapter(s) {missing}; have {list(adapter_configs(model))}")


def set_adapter(model: nn.Module, name_or_names: Union[str, list[str]], inference_mode: bool = False) -> None:
    """Make the named adapter(s) active in every layer that has them; exactly they are trainable
    (none with ``inference_mode=True``), as PEFT's ``set_adapter``.

    This is a model-wide switch (it changes the shared modules), as in PEFT: a server that
    handles requests for different adapters concurrently uses :func:`lora_ext.adapter_batch`,
    whose selection is per thread / asyncio task, instead. Refused on a DDP-wrapped model (DDP
    fixed the parameters it all-reduces when it was built): set the adapter before wrapping.
    """
    check_trainable_fixed(model, "lora_ext.set_adapter", "switching the active adapters")
    names = adapter_name_list(name_or_names, "lora_ext.set_adapter")
    _check_adapters(model, names, "set_adapter")
    _activate(model, names, inference_mode)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter from every layer (unmerging it first where it is merged); refused on a
    DDP-wrapped model, as :func:`set_adapter`."""
    check_trainable_fixed(model, "lora_ext.delete_adapter", "removing an adapter")
    model = unwrap(model)
    _check_adapters(model, [adapter_name], "delete_adapter")
    for _, layer in lora_layers(model):
        if layer.has_adapter(adapter_name):
            layer.delete_adapter(adapter_name)
    for path, wrapper in list(saved_modules(model)):
        if wrapper.has_adapter(adapter_name):
            wrapper.delete_adapter(adapter_name)
        if not wrapper.modules_to_save:
            replace_submodule(model, path, wrapper.unwrap(keep_adapter=False))
    configs = dict(adapter_configs(model))
    del configs[adapter_name]
    object.__setattr__(model, CONFIGS_ATTR, configs)
    active = [n for n in active_adapters(model) if n != adapter_name]
    if not active and configs:  # as PEFT: the first remaining adapter becomes active (and trainable
        # unless the model is in inference mode: loaded with is_trainable=False or set so)
        active = [next(iter(configs))]
        warnings.warn(
            f"lora_ext.delete_adapter: adapter {adapter_name!r} was the active adapter; {active[0]!r} is active now",
            stacklevel=2,
        )
    _activate(model, active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model): ...`` runs the plain base model (merged adapters are unmerged)."""
    layers = [layer for _, layer in lora_layers(model)] + [w for _, w in saved_modules(model)]
    before = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            if isinstance(layer, LoraLayer) and layer.merged:
                layer.unmerge()
            layer.disable_adapters = True
        yield model
    finally:
        for layer, b in zip(layers, before):
            layer.disable_adapters = b


def merge(
    model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, exact: bool = False
) -> None:
    """Merge the active (or the named) adapters into the base weights of every LoRA layer
    (``exact=True``: :func:`unmerge` restores the weights bit for bit; see ``LoraLayer.merge``)."""
    if adapter_names is not None:
        adapter_names = adapter_name_list(adapter_names, "lora_ext.merge")
        _check_adapters(model, adapter_names, "merge")
    reshard_fsdp(model)  # FSDP2: merge into the sharded weights, not into gathered copies
    for _, layer in lora_layers(model):
        names = layer.active_adapters if adapter_names is None else [n for n in adapter_names if layer.has_adapter(n)]
        if names:
            layer.merge(names, safe_merge=safe_merge, exact=exact)


def unmerge(model: nn.Module) -> None:
    """Undo every merge in every LoRA layer."""
    reshard_fsdp(model)
    for _, layer in lora_layers(model):
        layer.unmerge()


def _replace_layers(given: nn.Module, merge_first: bool) -> nn.Module:
    what = "merge_and_unload" if merge_first else "unload"
    check_trainable_fixed(
        given,
        f"lora_ext.{what}",
        "removing the LoRA layers (for export, call it on the unwrapped "
        "model; the DDP wrapper cannot train that model afterwards)",
    )
    model = unwrap(given)
    reshard_fsdp(model)
    for path, layer in list(lora_layers(model)):
        replace_submodule(model, path, layer.unloaded_base(merge_first))
    for path, wrapper in list(saved_modules(model)):
        replace_submodule(model, path, wrapper.unwrap(keep_adapter=merge_first))
    for attr in (CONFIGS_ATTR, ACTIVE_ATTR, INFERENCE_ATTR):
        if hasattr(model, attr):
            object.__delattr__(model, attr)
    hf_save.unguard(model)
    return given


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put the plain base modules back; returns the model."""
    return _replace_layers(model, merge_first=True)


def unload(model: nn.Module) -> nn.Module:
    """Drop all adapters and put the plain (unmerged) base modules back; returns the model."""
    return _replace_layers(model, merge_first=False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
