"""LoRA layers: the modules that wrap a frozen base layer and add ``s·B(A·dropout(x))``.

``base.LoraLayer`` holds what every layer shares (adapters by name, merge/unmerge, active/disabled); one file per
base layer type (``linear``, ``embedding``, ``conv``, ``gpt2_conv1d``); ``per_row`` is the per-row (several
adapters in one batch) forward of a layer; ``saved_inputs`` compresses the activations a layer saves for backward.
A quantized base has its LoRA layer in :mod:`lora_ext.quant`.
"""

from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .gpt2_conv1d import LoraGPT2Conv1D
from .linear import LoraLinear
from .per_row import AdapterBatch

__all__ = ["LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "LoraGPT2Conv1D", "AdapterBatch"]
