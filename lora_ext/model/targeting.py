"""Which modules an adapter targets, and with which rank/alpha: PEFT's matching rules."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

from ..config import LoraConfig
from ..layers.base import LoraLayer
from .modules_to_save import ModulesToSave
from .registry import is_linear_like, layer_type_for


def matches(spec: Optional[Union[str, Iterable[str]]], key: str) -> bool:
    """PEFT's rule: a string is a regex that must fullmatch the module path; a list matches a
    path equal to an entry or ending in ``.<entry>``."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{t}") for t in spec)


def pattern_value(pattern: dict, key: str, default):
    """PEFT's ``get_pattern_key``: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", key)``."""
    for p, v in pattern.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def layer_r_alpha(config: LoraConfig, key: str) -> tuple[int, float]:
    return pattern_value(config.rank_pattern, key, config.r), pattern_value(
        config.alpha_pattern, key, config.lora_alpha
    )


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA could wrap, by path (already wrapped ones under their own path)."""
    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, ModulesToSave):  # whole-module copies are not LoRA targets
            skip.append(name + ".")
            continue
        if isinstance(module, LoraLayer):
            out[name] = module
            skip.append(name + ".")
        elif layer_type_for(module) is not None:
            out[name] = module
    return out


def _output_layer_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        return None
    for name, m in model.named_modules():
        if m is emb:
            return name
    return None


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` targets; raises when it targets none."""
    cands = candidate_modules(model)
    if config.target_modules is None:
        raise ValueError("LoraConfig.target_modules is None: name the modules to adapt, or use 'all-linear'")
    if config.target_modules == "all-linear":
        head = _output_layer_name(model)
        names = [n for n, m in cands.items() if n != head and is_linear_like(m)]
    else:
        names = [n for n in cands if matches(config.target_modules, n)]
    names = [n for n in names if not matches(config.exclude_modules, n)]
    if config.modules_to_save:  # as PEFT: a module to save whole never also gets LoRA
        saved = config.modules_to_save
        names = [
            n
            for n in names
            if not any(n == m or n.endswith("." + m) or ("." + m + ".") in ("." + n + ".") for m in saved)
        ]
    if not names:
        raise ValueError(
            f"LoraConfig(target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}) "
            f"matches no module of {type(model).__name__}; modules it could target: {sorted(cands)}"
        )
    return names
