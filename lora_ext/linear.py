"""``LoraLinear``: LoRA on an existing ``nn.Linear`` through the compiled ``lora_linear`` op."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .layer import LoraLayer


class LoraLinear(LoraLayer):
    r"""LoRA wrapper around an existing (frozen) ``nn.Linear``.

    .. math::
        y = x W^\top + b + \sum_{a \in \text{active}} s_a \,(\mathrm{dropout}_a(x)\, A_a^\top)\, B_a^\top,
        \qquad s_a = \alpha_a / r_a \ \ (\text{rsLoRA: } \alpha_a / \sqrt{r_a})

    with ``W`` ``[out, in]`` the base weight, ``A_a`` ``[r, in]`` and ``B_a`` ``[out, r]``.
    The base layer is wrapped, not copied, and frozen. Parameters use PEFT's names:
    ``base_layer.weight``, ``base_layer.bias``, ``lora_A.<name>.weight``, ``lora_B.<name>.weight``.
    When merged (``merge()``), forward is the plain base linear.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_name: Optional[str] = "default",
    ):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear: expected an nn.Linear base layer, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        if adapter_name is not None:  # None: no adapter yet (the model-level API adds them)
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    def _adapter_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self.merged or not self._active_adapters:
            return self.base_layer(x)
        first, *rest = self._active_adapters
        y = ops.lora_linear(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A[first].weight,
            self.lora_B[first].weight,
            self.scaling[first],
            self.lora_dropout[first],
            self.training,
        )
        for name in rest:  # further active adapters add their own low-rank terms
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            xd = F.dropout(x, self.lora_dropout[name], self.training).to(a.dtype)
            y = y + (F.linear(F.linear(xd, a), b) * self.scaling[name]).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={ {n: self.r[n] for n in self.lora_A} }, active={self._active_adapters}, merged={self.merged}"
        )
