"""Replacing a submodule given by its dotted path (the one way lora_ext swaps layers in and out of a model)."""

from __future__ import annotations

from torch import nn


def replace_submodule(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` (e.g. ``"model.layers.0.self_attn.q_proj"``) in ``model``; returns the module that
    was there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
