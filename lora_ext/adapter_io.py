"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` with
the adapter name stripped. A non-default adapter lives in ``<path>/<adapter_name>``, as PEFT
saves it. Writes are atomic (temporary file + rename), loads validate everything before
touching the model.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

import torch
from torch import nn

from .config import LoraConfig
from .layer import LoraLayer
from .registry import LAYER_TYPES, layer_type_for
from .model import adapter_configs, inject_adapter, lora_layers, saved_modules
from .modules_to_save import ModulesToSave, find_modules_to_save
from .targeting import candidate_modules, layer_r_alpha

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# file-key suffix -> which matrix ("A"/"B"); longest first so that suffixes never shadow each other
_SUFFIXES = dict(sorted(
    ((suf, ab) for cls in LAYER_TYPES for suf, ab in zip(cls.file_suffixes, "AB")), key=lambda kv: -len(kv[0])
))


def _adapter_dir(path: str, adapter_name: str) -> str:
    return path if adapter_name == "default" else os.path.join(path, adapter_name)


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys."""
    out = {}
    config = adapter_configs(model).get(adapter_name)
    for path, layer in lora_layers(model):
        if layer.has_adapter(adapter_name):
            for suffix, w in zip(layer.file_suffixes, layer.adapter_weights(adapter_name)):
                out[f"{PREFIX}{path}{suffix}"] = w.detach()
            if config is not None and config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                out[f"{PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias.detach()
    for path, wrapper in saved_modules(model):
        if wrapper.has_adapter(adapter_name):
            for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                out[f"{PREFIX}{path}.{pname}"] = p.detach()
    if config is not None and config.bias == "all":
        wrapped = [p for p, _ in saved_modules(model)]
        for name, p in model.named_parameters():
            if name.endswith("bias") and "lora_" not in name and not any(name.startswith(w + ".") for w in wrapped):
                out[f"{PREFIX}{name}"] = p.detach()
    return out


def save_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> str:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``; returns the folder."""
    from safetensors.torch import save_file

    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"lora_ext.save_adapter: unknown adapter {adapter_name!r}; have {list(configs)}")
    config = configs[adapter_name]
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}
    out_dir = _adapter_dir(path, adapter_name)
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    cfg = json.dumps(config.to_dict(), indent=2, sort_keys=True)

    def write_cfg(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(cfg)

    _atomic_write(os.path.join(out_dir, CONFIG_NAME), write_cfg)
    return out_dir


def read_adapter(path: str, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter folder (config + tensors) without touching any model."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"lora_ext.load_adapter: no {CONFIG_NAME} in {path!r}")
    with open(cfg_path) as f:
        try:
            config = LoraConfig.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"lora_ext.load_adapter: {cfg_path} is not valid JSON: {e}") from e
    st_path = os.path.join(path, WEIGHTS_NAME)
    bin_path = os.path.join(path, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(st_path):
        tensors = load_file(st_path)
    elif os.path.isfile(bin_path):
        if not allow_pickle:
            raise ValueError(
                f"lora_ext.load_adapter: {path!r} holds only {PICKLE_WEIGHTS_NAME} (a pickle); pass "
                "allow_pickle=True to read it with torch.load(weights_only=True)"
            )
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"lora_ext.load_adapter: no {WEIGHTS_NAME} in {path!r}")
    return config, tensors


def _param_by_name(params: dict[str, torch.Tensor], name: str):
    """A parameter (from ``dict(model.named_parameters())``) by its name in an injected
    (``...base_layer.bias``, ``...original_module.bias``) or plain model."""
    for candidate in (name, name.replace(".base_layer.", "."), name.replace(".original_module.", ".")):
        if candidate in params:
            return params[candidate]
    return None


def _plan(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], adapter_name: str):
    """Validate the file against the model. Returns ``(lora, saved, biases)``: {module path: (A, B)},
    {module path: {param name: tensor}} for modules_to_save, {parameter name: tensor}. Raises a
    ``ValueError`` listing every problem."""
    cands = candidate_modules(model)
    save_paths = find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    problems: list[str] = []
    found: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {p: {} for p in save_paths}
    biases: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())

    def take_bias(name: str, key: str, t: torch.Tensor) -> None:
        want = _param_by_name(params, name)
        if want is None or tuple(want.shape) != tuple(t.shape):
            problems.append(f"unexpected bias key {key!r}")
        else:
            biases[name] = t

    for key, t in tensors.items():
        if not t.is_floating_point():
            problems.append(f"{key!r} has dtype {t.dtype}, expected a floating dtype")
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else None
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if name is not None and suffix is None:
            owner = next((p for p in save_paths if name.startswith(p + ".")), None)
            if owner is not None:
                module = model.get_submodule(owner)
                orig = module.original_module if isinstance(module, ModulesToSave) else module
                pname = name[len(owner) + 1:]
                if config.bias == "all" and pname.startswith("original_module."):
                    take_bias(name, key, t)  # PEFT's bias="all" also saves the original module's biases
                    continue
                if pname.startswith("modules_to_save."):  # PEFT's bias="all" duplicate of the copy's bias
                    pname = pname[len("modules_to_save."):]
                want = dict(orig.named_parameters()).get(pname)
                if want is None or tuple(want.shape) != tuple(t.shape):
                    problems.append(f"{key!r} does not match a parameter of the module to save {owner!r}"
                                    + ("" if want is None else f" (expected shape {tuple(want.shape)})"))
                else:
                    saved[owner][pname] = t
                continue
            if config.bias != "none" and name.endswith("bias"):
                take_bias(name, key, t)
                continue
        if name is None or suffix is None:
            problems.append(f"unexpected key {key!r}")
            continue
        path = name[:-len(suffix)]
        if path not in cands:
            problems.append(f"unexpected key {key!r}: the model has no LoRA-capable module {path!r}")
            continue
        cls = layer_type_for(cands[path])
        if suffix not in cls.file_suffixes:
            problems.append(f"unexpected key {key!r}: module {path!r} is a {type(cands[path]).__name__}, "
                            f"whose keys end in {cls.file_suffixes}")
            continue
        found.setdefault(path, {})[_SUFFIXES[suffix]] = t
    for owner, params in saved.items():
        module = model.get_submodule(owner)
        orig = module.original_module if isinstance(module, ModulesToSave) else module
        for pname, _ in orig.named_parameters():
            if pname not in params:
                problems.append(f"missing key {PREFIX}{owner}.{pname} (module to save)")
    plan = {}
    for path, ab in found.items():
        cls = layer_type_for(cands[path])
        if set(ab) != {"A", "B"}:
            missing = cls.file_suffixes[1] if "A" in ab else cls.file_suffixes[0]
            problems.append(f"missing key {PREFIX}{path}{missing}")
            continue
        module = cands[path]
        if isinstance(module, LoraLayer) and module.has_adapter(adapter_name):
            problems.append(f"module {path!r} already has an adapter named {adapter_name!r}")
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        r, _ = layer_r_alpha(config, path)
        want_a, want_b = cls.adapter_shapes(base, r)
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != tuple(want_a) or tuple(b.shape) != tuple(want_b):
            problems.append(
                f"shape mismatch at {path!r}: expected A {tuple(want_a)} and B {tuple(want_b)} "
                f"(r from the config), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
            continue
        plan[path] = (a, b)
    if not plan and not problems:
        problems.append("the file holds no LoRA weights")
    if problems:
        raise ValueError("lora_ext.load_adapter: the adapter does not fit the model:\n  " + "\n  ".join(problems))
    return plan, saved, biases


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False,
                 allow_pickle: bool = False) -> nn.Module:
    """Load a PEFT/lora_ext adapter folder into ``model`` (injecting LoRA layers as needed).

    Every key is mapped exactly (``base_model.model.<path>.lora_A.weight`` -> module ``<path>``);
    missing or unexpected keys, shape or dtype problems raise a ``ValueError`` listing them,
    before the model is changed. The loaded adapter becomes active; it is frozen unless
    ``is_trainable``. ``adapter_model.bin`` (pickle) is read only with ``allow_pickle=True``.
    """
    if adapter_name in adapter_configs(model):
        raise ValueError(f"lora_ext.load_adapter: adapter {adapter_name!r} already exists in the model")
    config, tensors = read_adapter(path, allow_pickle=allow_pickle)
    plan, saved, biases = _plan(model, config, tensors, adapter_name)
    inject_adapter(model, config.replace(init_lora_weights=True), adapter_name, target_names=sorted(plan))
    adapter_configs(model)[adapter_name] = config
    with torch.no_grad():
        for p, (a, b) in plan.items():
            wa, wb = model.get_submodule(p).adapter_weights(adapter_name)
            wa.copy_(a)
            wb.copy_(b)
        for owner, owned in saved.items():
            copy_ = dict(model.get_submodule(owner).modules_to_save[adapter_name].named_parameters())
            for pname, t in owned.items():
                copy_[pname].copy_(t)
        params = dict(model.named_parameters())
        for name, t in biases.items():
            _param_by_name(params, name).copy_(t)
    if not is_trainable:
        for _, layer in lora_layers(model):
            if layer.has_adapter(adapter_name):
                for w in layer.adapter_weights(adapter_name):
                    w.requires_grad_(False)
        for _, wrapper in saved_modules(model):
            if wrapper.has_adapter(adapter_name):
                for p in wrapper.modules_to_save[adapter_name].parameters():
                    p.requires_grad_(False)
        for name in biases:
            _param_by_name(params, name).requires_grad_(False)
    return model
