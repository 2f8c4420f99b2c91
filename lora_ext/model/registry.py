"""Which LoRA layer type wraps which base module type."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..layers.base import LoraLayer
from ..layers.conv import LoraConv
from ..layers.embedding import LoraEmbedding
from ..layers.gpt2_conv1d import LoraGPT2Conv1D
from ..layers.linear import LoraLinear
from ..quant.lora_layer import LoraQuantLinear

LAYER_TYPES: tuple[type[LoraLayer], ...] = (LoraLinear, LoraQuantLinear, LoraEmbedding, LoraConv, LoraGPT2Conv1D)


def layer_type_for(module: nn.Module) -> Optional[type[LoraLayer]]:
    """The LoRA layer class for a base module, or None when LoRA cannot wrap it."""
    if isinstance(module, LoraLayer):
        return type(module)
    for cls in LAYER_TYPES:
        if cls.accepts(module):
            return cls
    return None


def is_linear_like(module: nn.Module) -> bool:
    """What ``target_modules="all-linear"`` selects: nn.Linear, QuantLinear and GPT-2 Conv1D."""
    return layer_type_for(module) in (LoraLinear, LoraQuantLinear, LoraGPT2Conv1D)
