"""Frozen base layers whose weight stays quantized (issue 15): ``QuantLinear`` and ``QuantEmbedding``.

``QuantLinear`` computes ``y = x W^T + b`` through the compiled ``linear_quantized`` op, which dequantizes ``W``
tile by tile into bounded scratch: the float weight never exists whole. ``LoraQuantLinear``
(``lora_ext/lora_quant_linear.py``) adds adapters on top through ``lora_linear_quantized``.

The quantized bytes are buffers: ``qdata`` and, for int8/nf4, ``qscale_bits`` (the float32 scales stored as
int32 bits, so that ``model.to(torch.bfloat16)`` converts the bias but never rounds the scales). Activations may
be float32, float64, bfloat16 or float16; the output has the input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from .._utils.modules import replace_submodule
from .formats import QTYPES, QuantizedWeight, block_size, dequantize, quantize

__all__ = ["QuantLinear", "QuantEmbedding", "quantize_linear_layers"]


class _QuantizedBytes(nn.Module):
    """Holds one QuantizedWeight as buffers."""

    def _set_qweight(self, q: QuantizedWeight) -> None:
        if q.qtype not in QTYPES:
            raise ValueError(f"{type(self).__name__}: expected qtype in {QTYPES}, got {q.qtype!r}")
        self.qtype = q.qtype
        self.out_features, self.in_features = int(q.out_features), int(q.in_features)
        self.register_buffer("qdata", q.qdata)
        self.register_buffer("qscale_bits", None if q.qscale is None else q.qscale.contiguous().view(torch.int32))

    @property
    def qscale(self) -> Optional[torch.Tensor]:
        return None if self.qscale_bits is None else self.qscale_bits.view(torch.float32)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qdata, self.qscale, self.qtype, self.out_features, self.in_features)

    def nbytes(self) -> int:
        """Bytes of the quantized weight (qdata and scales)."""
        return self.qweight.nbytes()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole ``[out, in]`` weight (for export or merging; the forward never builds it)."""
        return dequantize(self.qweight).to(dtype)


class QuantLinear(_QuantizedBytes):
    r"""A frozen ``nn.Linear`` whose weight is kept quantized: :math:`y = x W^\top + b`, ``W = dequantize(qweight)``.

    ``QuantLinear(qweight, bias=None)``; ``QuantLinear.from_linear(linear, "nf4")`` quantizes an existing layer.
    The bias (if any) is a frozen parameter. ``lora_ext.inject_adapter`` wraps it in a ``LoraQuantLinear``.
    """

    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self._set_qweight(qweight)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"QuantLinear: expected a bias of shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str) -> "QuantLinear":
        """Quantize ``linear``'s weight to ``qtype`` (its bias is kept in its dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        q = quantize(linear.weight.detach(), qtype)
        q = QuantizedWeight(
            q.qdata.to(linear.weight.device),
            None if q.qscale is None else q.qscale.to(linear.weight.device),
            qtype,
            q.out_features,
            q.in_features,
        )
        return cls(q, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_quantized(x, self.qweight, self.bias)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (frozen, like this layer)."""
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.qdata.device, dtype=dtype
        )
        with torch.no_grad():
            lin.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"bias={self.bias is not None}"
        )


class QuantEmbedding(_QuantizedBytes):
    """A frozen ``nn.Embedding`` whose table ``[num_embeddings, embedding_dim]`` is kept quantized: a lookup
    dequantizes only the rows it reads (``dtype`` is the output's, float32 by default)."""

    def __init__(self, qweight: QuantizedWeight, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._set_qweight(qweight)
        self.num_embeddings, self.embedding_dim = self.out_features, self.in_features
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"QuantEmbedding: expected int32/int64 ids, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.numel() and not bool(((flat >= 0) & (flat < self.num_embeddings)).all()):
            raise IndexError(
                f"QuantEmbedding: expected ids in [0, {self.num_embeddings}), got "
                f"[{int(flat.min())}, {int(flat.max())}]"
            )
        q = self.qscale
        rows = QuantizedWeight(
            self.qdata.index_select(0, flat),
            None if q is None else q.index_select(0, flat),
            self.qtype,
            flat.numel(),
            self.embedding_dim,
        )
        return dequantize(rows).to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def quantize_linear_layers(model: nn.Module, qtype: str, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except the module names in ``skip``) by a ``QuantLinear`` of
    ``qtype``, in place; returns ``model``. Layers whose ``in_features`` is not a multiple of the format's block
    stay as they are. Quantize before ``inject_adapter``."""
    if qtype not in QTYPES:
        raise ValueError(f"quantize_linear_layers: expected qtype in {QTYPES}, got {qtype!r}")
    from ..layers.base import LoraLayer

    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError(
            "quantize_linear_layers: the model already holds LoRA layers; quantize the base first, then inject_adapter"
        )
    block = block_size(qtype)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in skip or module.in_features % block:
            continue
        replace_submodule(model, name, QuantLinear.from_linear(module, qtype))
    return model
