"""lora_ext as PEFT's LoRA backend: ``peft.get_peft_model`` / ``PeftModel.from_pretrained`` build layers whose
forward runs lora_ext's compiled ops, and the result is a stock ``PeftModel``.

    import lora_ext.integrations.peft
    lora_ext.integrations.peft.use_lora_ext()          # once, before building PEFT models
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules="all-linear"))

``LoraExtLinear`` *is* PEFT's ``lora.Linear`` (a subclass): construction, initialisation, adapters, merging,
saving, ``disable_adapter()``, ``set_adapter``, ``add_weighted_adapter`` and every ``LoraConfig`` option are
PEFT's own code, so Trainer, TRL and accelerate see the PEFT model they know (``isinstance(m, PeftModel)``:
adapter-only checkpoints, the disabled adapter as DPO's reference). Only the forward changes:

    y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ      one active adapter: ``lora_linear``
    row i: the same with adapter a_i           ``adapter_names=[...]``: ``lora_linear_multi``

with lora_ext's dropout (a seed, no mask or dropped copy of x kept; other masks than ``nn.Dropout``'s), the
low-rank term accumulated into the base GEMM's output, and autocast's rule for ``linear``. Whatever lora_ext
does not compute (DoRA and the other LoRA variants, several active adapters, ``lora_bias``, a merged or
disabled layer, a base that is not a plain ``nn.Linear``, dtypes the ops refuse) runs PEFT's own forward for
that call, so the model is never silently different from PEFT's.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._utils.names import BASE

__all__ = ["LoraExtLinear", "dispatch_lora_ext", "use_lora_ext", "lora_ext_enabled", "to_peft", "from_peft"]

try:  # PEFT is optional for lora_ext; this module needs it
    import peft as _peft
    from peft.tuners.lora import layer as _peft_lora_layer
    from peft.tuners.lora.model import LoraModel as _PeftLoraModel
except ImportError as e:  # pragma: no cover - exercised only without peft installed
    raise ImportError(f"lora_ext.integrations.peft: needs PEFT (`pip install peft`): {e}") from e

_HALF = (torch.bfloat16, torch.float16)


def _dropout_p(module: nn.Module) -> Optional[float]:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    return None  # another dropout module: PEFT's forward


def _op_accepts(x: torch.Tensor, weight: torch.Tensor, adapter_dtype: torch.dtype) -> bool:
    """The dtype rule of the ops (checks.cpp), on the dtypes the op will see after autocast's casts."""
    compute = x.dtype
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, *_HALF):
        compute = torch.get_autocast_dtype(x.device.type)
        if weight.dtype not in (torch.float32, *_HALF):
            return False
    elif weight.dtype != x.dtype:
        return False
    if adapter_dtype == compute:
        return True
    return compute in _HALF and adapter_dtype in (torch.float32, *_HALF)


class LoraExtLinear(_peft_lora_layer.Linear):
    """PEFT's LoRA ``Linear`` (same parameters, names, init, merge and files) with the forward of lora_ext."""

    def _plain(self, name: str) -> bool:
        return (
            name in self.lora_A
            and name not in self.lora_variant
            and not self.lora_bias.get(name, False)
            and _dropout_p(self.lora_dropout[name]) is not None
        )

    def _fast_path(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[list[str]]:
        """The adapters lora_ext computes this call (one name, or the batch's names), or None for PEFT's forward."""
        base = self.get_base_layer()
        if args or self.disable_adapters or self.merged or type(base) is not nn.Linear or self.fan_in_fan_out:
            return None
        extra = {k: v for k, v in kwargs.items() if v is not None and k != "adapter_names"}
        if extra:
            return None
        names = kwargs.get("adapter_names")
        if names is None:
            active = [n for n in self.active_adapters if n in self.lora_A]
            ok = len(active) == 1 and self._plain(active[0])
            return active if ok and _op_accepts(x, base.weight, self.lora_A[active[0]].weight.dtype) else None
        used = [n for n in dict.fromkeys(names) if n != BASE and n in self.lora_A]
        if not used or not all(self._plain(n) for n in used):
            return None
        ps = {_dropout_p(self.lora_dropout[n]) for n in used}
        dtypes = {self.lora_A[n].weight.dtype for n in used}
        if len(ps) != 1 or len(dtypes) != 1 or not _op_accepts(x, base.weight, dtypes.pop()) or x.dim() < 2:
            return None
        return used

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        names = self._fast_path(x, args, kwargs)
        if names is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        batch = kwargs.get("adapter_names")
        if batch is None:
            (name,) = names
            return ops.lora_linear(
                x,
                base.weight,
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                _dropout_p(self.lora_dropout[name]),
                self.training,
            )
        return self._per_row(x, base, names, batch)

    def _per_row(self, x: torch.Tensor, base: nn.Linear, names: list[str], batch: list[str]) -> torch.Tensor:
        """``adapter_names`` (one per sample, ``"__base__"`` for none) through one ``lora_linear_multi`` call."""
        index = {n: i for i, n in enumerate(names)}
        r_max = max(self.r[n] for n in names)
        A = torch.stack([F.pad(self.lora_A[n].weight, (0, 0, 0, r_max - self.r[n])) for n in names])
        B = torch.stack([F.pad(self.lora_B[n].weight, (0, r_max - self.r[n])) for n in names])
        scales = torch.tensor([float(self.scaling[n]) for n in names], dtype=torch.float32, device=x.device)
        per_sample = torch.tensor([index.get(n, -1) for n in batch], dtype=torch.long, device=x.device)
        ids = per_sample.repeat_interleave(math.prod(x.shape[1:-1]))  # one id per row of x as the op sees it
        p = _dropout_p(self.lora_dropout[names[0]])
        return ops.lora_linear_multi(x, base.weight, base.bias, A, B, scales, ids, p, self.training)


def dispatch_lora_ext(
    target: nn.Module, adapter_name: str, config, parameter_name: Optional[str] = None, **kwargs
) -> Optional[nn.Module]:
    """PEFT's dispatcher contract: a ``LoraExtLinear`` for a plain ``nn.Linear`` target, else None (PEFT's own)."""
    if parameter_name is not None:
        return None
    base = target.get_base_layer() if isinstance(target, _peft_lora_layer.LoraLayer) else target
    if type(base) is not nn.Linear:  # quantized and other Linear subclasses keep PEFT's dispatchers
        return None
    if config.fan_in_fan_out:  # what PEFT's dispatch_default does for an nn.Linear
        import warnings

        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
            "Setting fan_in_fan_out to False.",
            stacklevel=2,
        )
        config.fan_in_fan_out = False
    return LoraExtLinear(target, adapter_name, config=config, **kwargs)


_lock = threading.Lock()
_original_create = None  # PEFT's LoraModel._create_new_module while lora_ext is installed


def _create_new_module(lora_config, adapter_name, target, **kwargs):
    new = dispatch_lora_ext(target, adapter_name, lora_config, **kwargs)
    return new if new is not None else _original_create.__func__(lora_config, adapter_name, target, **kwargs)


def use_lora_ext(enabled: bool = True) -> None:
    """Make PEFT build ``LoraExtLinear`` for every plain ``nn.Linear`` it targets (``enabled=False``: PEFT's own
    layers again). Models built before the call keep their layers. Idempotent and thread-safe."""
    global _original_create
    with _lock:
        if enabled and _original_create is None:
            _original_create = _PeftLoraModel.__dict__["_create_new_module"]
            _PeftLoraModel._create_new_module = staticmethod(_create_new_module)
        elif not enabled and _original_create is not None:
            _PeftLoraModel._create_new_module = _original_create
            _original_create = None


def lora_ext_enabled() -> bool:
    """Whether :func:`use_lora_ext` is in effect."""
    return _original_create is not None


# -- a lora_ext-injected model <-> a PEFT model, sharing every tensor ------------------------------------------
def _peft_config(config) -> "_peft.LoraConfig":
    import dataclasses

    d = config.to_dict()
    known = {f.name for f in dataclasses.fields(_peft.LoraConfig)}
    return _peft.LoraConfig(**{k: v for k, v in d.items() if k in known and k != "peft_type"})


def to_peft(model: nn.Module) -> "_peft.PeftModel":
    """``model`` (from :func:`lora_ext.inject_adapter`) as a stock ``PeftModel`` with :class:`LoraExtLinear`
    layers. Nothing is copied: the base modules and every adapter's A/B are the same ``Parameter`` objects
    (PEFT builds its adapters on the meta device, then takes ours). Same adapters, active adapters and outputs.
    ``model`` is changed in place (its lora_ext layers replaced); use the returned model. Raises ``ValueError``
    for what PEFT's Linear backend cannot hold: Embedding/Conv LoRA, ``modules_to_save``, merged adapters."""
    from ..layers.linear import LoraLinear
    from ..model.core import active_adapters, adapter_configs, lora_layers, saved_modules, unload

    layers = dict(lora_layers(model))
    other = [
        p for p, layer in layers.items() if not isinstance(layer, LoraLinear) or type(layer.base_layer) is not nn.Linear
    ]
    if other or list(saved_modules(model)):
        raise ValueError(
            f"to_peft: expected LoRA on nn.Linear layers only, got other LoRA layers {other[:3]} or "
            "modules_to_save; keep the lora_ext model, or save_adapter() and load it with PEFT"
        )
    merged = [p for p, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"to_peft: {merged[:3]} have merged adapters; lora_ext.unmerge(model) first")
    configs, active = adapter_configs(model), active_adapters(model)
    if not configs:
        raise ValueError("to_peft: expected a model with lora_ext adapters (inject_adapter), found none")
    shared = {(p, n): layer.adapter_weights(n) for p, layer in layers.items() for n in layer.adapter_names}
    unload(model)
    names = list(configs)
    was = lora_ext_enabled()
    use_lora_ext()
    try:
        pm = _peft.get_peft_model(model, _peft_config(configs[names[0]]), adapter_name=names[0], low_cpu_mem_usage=True)
        for n in names[1:]:
            pm.add_adapter(n, _peft_config(configs[n]), low_cpu_mem_usage=True)
    finally:
        use_lora_ext(was)
    built = {(p, n): m for p, m in model.named_modules() if isinstance(m, LoraExtLinear) for n in m.lora_A}
    if built.keys() != shared.keys():
        raise RuntimeError(
            f"to_peft: PEFT targeted other modules than lora_ext did: {sorted(built.keys() ^ shared.keys())[:3]}"
        )
    for (path, name), m in built.items():
        m.lora_A[name].weight, m.lora_B[name].weight = shared[path, name]
    pm.base_model.set_adapter(active if len(active) > 1 else active[0])
    return pm


def from_peft(peft_model: "_peft.PeftModel") -> nn.Module:
    """The inverse of :func:`to_peft`: the base model with lora_ext's layers holding the same ``Parameter``
    objects as ``peft_model``'s LoRA Linear layers (stock or :class:`LoraExtLinear`). Raises ``ValueError`` for
    options lora_ext does not implement (DoRA, ``lora_bias``, other layer types), as ``LoraConfig`` does."""
    from ..config import LoraConfig
    from ..layers.linear import LoraLinear
    from ..model.core import add_adapter, inject_adapter, lora_layers, set_adapter

    configs = {n: LoraConfig.from_dict(c.to_dict()) for n, c in peft_model.peft_config.items()}
    inner = peft_model.base_model.model
    peft_layers = {p: m for p, m in inner.named_modules() if isinstance(m, _peft_lora_layer.LoraLayer)}
    other = [
        p
        for p, m in peft_layers.items()
        if not isinstance(m, _peft_lora_layer.Linear) or type(m.get_base_layer()) is not nn.Linear
    ]
    if other:
        raise ValueError(f"from_peft: expected PEFT LoRA Linear layers only, got {other[:3]}")
    shared = {(p, n): (m.lora_A[n].weight, m.lora_B[n].weight) for p, m in peft_layers.items() for n in m.lora_A}
    active = list(peft_model.base_model.active_adapters)
    model = peft_model.unload()
    names = list(configs)
    inject_adapter(model, configs[names[0]], names[0])
    for n in names[1:]:
        add_adapter(model, configs[n], n)
    layers = dict(lora_layers(model))
    have = {(p, n) for p, layer in layers.items() for n in layer.adapter_names}
    if have != shared.keys() or not all(isinstance(layer, LoraLinear) for layer in layers.values()):
        raise RuntimeError(
            f"from_peft: lora_ext targeted other modules than PEFT did: {sorted(have ^ shared.keys())[:3]}"
        )
    for (path, name), (a, b) in shared.items():
        holder_a, holder_b = (getattr(layers[path], c)[name] for c in layers[path].container_names)
        holder_a.weight, holder_b.weight = a, b
    set_adapter(model, active)
    return model
