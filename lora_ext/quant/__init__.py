"""A quantized frozen base under LoRA.

``formats`` (the byte layouts: int8, q8_0, q4_0, q4_1 as GGUF stores them, nf4; ``quantize`` / ``dequantize`` /
``from_gguf``), ``layers`` (``QuantLinear`` / ``QuantEmbedding``: frozen layers holding those bytes),
``lora_layer`` (``LoraQuantLinear``: LoRA over a ``QuantLinear``) and ``gguf`` (``load_gguf_llama``: a LLaMA
straight from a GGUF file, its quantized blocks kept as they are).
"""

from .formats import NF4_VALUES, QTYPES, QuantizedWeight, dequantize, from_gguf, quantize
from .gguf import load_gguf_llama
from .layers import QuantEmbedding, QuantLinear, quantize_linear_layers
from .lora_layer import LoraQuantLinear

__all__ = [
    "QTYPES",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "from_gguf",
    "NF4_VALUES",
    "QuantLinear",
    "QuantEmbedding",
    "quantize_linear_layers",
    "LoraQuantLinear",
    "load_gguf_llama",
]
