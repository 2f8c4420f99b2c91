"""``LoraConv``: LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` (PEFT's layout and names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


class LoraConv(LoraLayer):
    r"""LoRA wrapper around an ``nn.Conv1d`` or ``nn.Conv2d``.

    .. math:: y = \mathrm{conv}(x; W) + s\,\mathrm{conv}_{1}(\mathrm{conv}(\mathrm{dropout}(x); A); B)

    ``A`` (``lora_A.<name>.weight``, ``[r, in, *kernel]``) is a convolution with the base's
    kernel size, stride and padding from ``in`` to ``r`` channels; ``B``
    (``lora_B.<name>.weight``, ``[out, r, 1, ...]``) is a 1x1 convolution from ``r`` to ``out``,
    as in PEFT. Merging adds ``s B A`` to W viewed as ``[out, in * prod(kernel)]`` through the
    compiled merge kernel. Grouped and dilated base convolutions are not supported.
    """

    base_types = (nn.Conv1d, nn.Conv2d)

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        super().check_base(base_layer)
        if base_layer.groups != 1 or any(d != 1 for d in base_layer.dilation) or base_layer.padding_mode != "zeros":
            raise NotImplementedError(
                "LoraConv: grouped, dilated or non-zero-padded convolutions are not supported, got "
                f"groups={base_layer.groups}, dilation={base_layer.dilation}, padding_mode={base_layer.padding_mode!r}"
            )

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int):
        out_c, in_c, *k = base_layer.weight.shape
        return (r, in_c, *k), (out_c, r, *([1] * len(k)))

    def _merge_operands(self, name: str):
        a, b = self.adapter_weights(name)
        w = self._base_weight()
        return w.view(w.shape[0], -1), a.view(a.shape[0], -1), b.view(b.shape[0], b.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self._adapters_for_forward()
        y = self.base_layer(x)
        conv = F.conv1d if isinstance(self.base_layer, nn.Conv1d) else F.conv2d
        base = self.base_layer
        for name in names:
            a, b = self.adapter_weights(name)
            xd = F.dropout(x, self.lora_dropout[name], self.training).to(a.dtype)
            h = conv(xd, a, None, base.stride, base.padding)
            y = y + (conv(h, b) * self.scaling[name]).to(y.dtype)
        return y
