"""``LoraQuantLinear``: LoRA on a quantized frozen base (``QuantLinear``) through ``lora_linear_quantized``."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..layers.linear import LoraLinear
from ..layers.per_row import per_row_plan, stacked_adapters
from .layers import QuantLinear


class LoraQuantLinear(LoraLinear):
    r"""LoRA around a :class:`~lora_ext.quant.layers.QuantLinear` (int8, q8_0, q4_0, q4_1 or nf4 base weight).

    .. math::
        y = x W_q^\top + b + \sum_{a} s_a \,(\mathrm{dropout}_a(x)\, A_a^\top)\, B_a^\top

    with :math:`W_q` the dequantized base, never built whole: the compiled op dequantizes it tile by tile
    (QLoRA's recipe on the CPU). Adapters, their file format and every model-level function are
    ``LoraLinear``'s: a saved adapter is an ordinary PEFT adapter of the dequantized model.

    Merging into a quantized weight would re-quantize it (lossy), so :meth:`merge` refuses;
    ``lora_ext.merge_and_unload`` replaces the layer by a dequantized ``nn.Linear`` with the active adapters merged.
    Per-row adapters (``adapter_batch``) add each row's adapter term to the quantized base's output.
    """

    base_types = (QuantLinear,)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int):
        return (r, base_layer.in_features), (base_layer.out_features, r)

    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype the adapters are made for: the bias's, or float32."""
        bias = self.base_layer.bias
        return bias.dtype if bias is not None else torch.float32

    def _base_weight(self) -> torch.Tensor:
        # A stand-in of the base's shape, dtype and device, backed by one element: what adapter creation and
        # saved-input compression read. Nothing computes with it (merge and both forwards are overridden).
        return torch.empty((), dtype=self.compute_dtype(), device=self.base_layer.qdata.device).expand(
            self.out_features, self.in_features
        )

    def _lora_op(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.adapter_weights(name)
        return ops.lora_linear_quantized(
            x,
            self.base_layer.qweight,
            self.base_layer.bias,
            a,
            b,
            self.scaling[name],
            self.lora_dropout[name],
            self.training,
        )

    def _per_row_forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        # The compiled multi-adapter op over the quantized base: one pass for all rows and adapters, the same
        # grouping, dropout masks and gradients as LoraLinear's lora_linear_multi over the dequantized weight.
        plan = per_row_plan(self, x, batch)
        if plan is None:
            return self.base_layer(x)
        _, p, ids, order, offsets = plan
        A, B, scales = stacked_adapters(self, batch.cache_stacks)
        return ops.lora_linear_multi_quantized(
            x, self.base_layer.qweight, self.base_layer.bias, A, B, scales, ids, p, self.training, order, offsets
        )

    def merge(self, adapter_names=None, safe_merge: bool = False, exact: bool = False) -> None:
        raise ValueError(
            "LoraQuantLinear.merge: merging into a quantized base would re-quantize it (lossy); "
            "lora_ext.merge_and_unload(model) replaces the layer by a dequantized nn.Linear with the "
            "adapters merged, or serve the adapters unmerged on the quantized base"
        )

    def unloaded_base(self, merge: bool) -> nn.Module:
        if not merge or self.disable_adapters or not self.active_adapters:
            return self.base_layer
        linear = self.base_layer.to_linear(self.compute_dtype())
        with torch.no_grad():
            for name in self.active_adapters:
                a, b = self.adapter_weights(name)
                ops.merge_(linear.weight, a, b, self.scaling[name])
        return linear
