"""``add_weighted_adapter``: combine existing adapters into a new one (PEFT's semantics)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._utils.wrappers import check_not_wrapped
from .core import adapter_configs, inject_adapter, lora_layers

COMBINATIONS = ("linear", "cat", "svd")


def _rank(config) -> int:
    return config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
) -> None:
    """Add adapter ``adapter_name`` = the weighted combination of ``adapters``, as PEFT does.

    - ``"linear"`` (same rank for all): ``A = sum(sign * sqrt(|w s|) A_i)``, ``B = sum(sqrt(|w s|) B_i)``;
    - ``"cat"``: ranks add up, ``A = [w_i s_i A_i]`` stacked, ``B = [B_i]`` side by side (exactly
      ``sum_i w_i s_i B_i A_i``);
    - ``"svd"``: the rank-``svd_rank`` (default: largest rank) truncated SVD of ``sum_i w_i dW_i``.

    The new adapter has ``lora_alpha = r`` (so scaling 1 unless rsLoRA), targets the union of the
    modules, is not activated (see :func:`set_adapter`) and is frozen.
    """
    check_not_wrapped(model, "lora_ext.add_weighted_adapter")
    configs = adapter_configs(model)
    missing = [a for a in adapters if a not in configs]
    if not adapters or missing:
        raise ValueError(
            f"lora_ext.add_weighted_adapter: unknown adapter(s) {missing or adapters}; have {list(configs)}"
        )
    if len(weights) != len(adapters):
        raise ValueError(f"lora_ext.add_weighted_adapter: expected {len(adapters)} weights, got {len(weights)}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"lora_ext.add_weighted_adapter: expected finite numbers as weights, got {bad}")
    if adapter_name in configs:
        raise ValueError(f"lora_ext.add_weighted_adapter: adapter {adapter_name!r} already exists")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"lora_ext.add_weighted_adapter: combination_type must be one of {COMBINATIONS}, got {combination_type!r}"
        )
    ranks = [_rank(configs[a]) for a in adapters]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(
                f"lora_ext.add_weighted_adapter: 'linear' needs equal ranks, got {dict(zip(adapters, ranks))}"
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    kinds = {isinstance(configs[a].target_modules, str) for a in adapters}
    if len(kinds) > 1:
        raise ValueError("lora_ext.add_weighted_adapter: cannot combine list and regex target_modules")
    if kinds.pop():
        targets = "|".join(f"({configs[a].target_modules})" for a in adapters)
    else:
        targets = sorted(set().union(*(configs[a].target_modules for a in adapters)))
    config = configs[adapters[0]].replace(
        r=new_rank, lora_alpha=new_rank, target_modules=targets, alpha_pattern={}, rank_pattern={}, modules_to_save=None
    )
    paths = [p for p, layer in lora_layers(model) if any(layer.has_adapter(a) for a in adapters)]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    inject_adapter(model, config, adapter_name, target_names=paths)
    for p in model.parameters():  # adding an adapter does not change what trains
        p.requires_grad_(id(p) in trainable)
    with torch.no_grad():
        for path in paths:
            _combine(model.get_submodule(path), adapters, weights, adapter_name, combination_type, new_rank)


def _combine(layer, adapters, weights, name, kind, new_rank) -> None:
    ta, tb = layer.adapter_weights(name)
    present = [(a, w) for a, w in zip(adapters, weights) if layer.has_adapter(a)]
    ta.zero_()
    tb.zero_()
    if kind == "cat":
        As = [layer.adapter_weights(a)[0].float() * (w * layer.scaling[a]) for a, w in present]
        Bs = [layer.adapter_weights(a)[1].float() for a, _ in present]
        A, B = torch.cat(As, 0), torch.cat(Bs, 1)
        ta[: A.shape[0]] = A.to(ta.dtype)
        tb[:, : B.shape[1]] = B.to(tb.dtype)
    elif kind == "linear":
        for a, w in present:
            ws = w * layer.scaling[a]
            sign = 1.0 if ws >= 0 else -1.0
            A, B = layer.adapter_weights(a)
            ta.add_(A.float().mul(sign * math.sqrt(abs(ws))).to(ta.dtype))
            tb.add_(B.float().mul(math.sqrt(abs(ws))).to(tb.dtype))
    else:  # svd of the weighted sum of the [out, in]-layout updates
        delta = None
        for a, w in present:
            _, A, B = layer._merge_operands(a)
            d = (B.float() @ A.float()) * (w * layer.scaling[a])
            delta = d if delta is None else delta + d
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(new_rank, S.numel())
        tb.view(tb.shape[0], -1)[:, :k] = (U[:, :k] * S[:k]).to(tb.dtype)
        ta.view(ta.shape[0], -1)[:k] = Vh[:k].to(ta.dtype)
    for t in (ta, tb):
        t.requires_grad_(False)
