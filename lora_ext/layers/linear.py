"""``LoraLinear``: LoRA on an existing ``nn.Linear`` through the compiled ``lora_linear`` op."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import saved_inputs
from .base import LoraLayer
from .per_row import current_batch, has_training_notes, multi_forward, training_batch


class LoraLinear(LoraLayer):
    r"""LoRA wrapper around an existing (frozen) ``nn.Linear``.

    .. math::
        y = x W^\top + b + \sum_{a \in \text{active}} s_a \,(\mathrm{dropout}_a(x)\, A_a^\top)\, B_a^\top,
        \qquad s_a = \alpha_a / r_a \ \ (\text{rsLoRA: } \alpha_a / \sqrt{r_a})

    with ``W`` ``[out, in]`` the base weight, ``A_a`` ``[r, in]`` and ``B_a`` ``[out, r]``.
    The base layer is wrapped, not copied, and frozen. Parameters use PEFT's names:
    ``base_layer.weight``, ``base_layer.bias``, ``lora_A.<name>.weight``, ``lora_B.<name>.weight``.
    When merged (``merge()``), forward is the plain base linear.

    ``LoraLinear(base_layer, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
    init_lora_weights=True, adapter_name="default")``; ``adapter_name=None`` adds no adapter.
    """

    base_types = (nn.Linear,)

    @property
    def in_features(self) -> int:
        return self._base_weight().shape[1]

    @property
    def out_features(self) -> int:
        return self._base_weight().shape[0]

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int):
        out_f, in_f = base_layer.weight.shape
        return (r, in_f), (out_f, r)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = current_batch(self)  # this thread's / task's adapter_batch, if any
        # (compiled code never re-runs this forward in Python for checkpointing: no note to read)
        if self.training and (batch is not None or (not torch.compiler.is_compiling() and has_training_notes())):
            batch = training_batch(self, batch)  # also in a recomputation (activation checkpointing)
        per_row = batch is not None and not self.disable_adapters
        names = None if per_row else self._adapters_for_forward()
        if not per_row and not names:
            return self.base_layer(x)
        hooks = saved_inputs.hooks_for(x, self._base_weight())  # compress_saved_inputs, when asked for
        with hooks or contextlib.nullcontext():
            return self._per_row_forward(x, batch) if per_row else self._lora_forward(x, names)

    def _per_row_forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        return multi_forward(self, x, batch)

    def _lora_op(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The base output plus adapter ``name``'s term, through the compiled op."""
        a, b = self.adapter_weights(name)
        return ops.lora_linear(
            x,
            self._base_weight(),
            self.base_layer.bias,
            a,
            b,
            self.scaling[name],
            self.lora_dropout[name],
            self.training,
        )

    def _lora_forward(self, x: torch.Tensor, names: list) -> torch.Tensor:
        first, *rest = names
        y = self._lora_op(x, first)
        for name in rest:  # further active adapters add their own low-rank terms
            a, b = self.adapter_weights(name)
            xd = F.dropout(x, self.lora_dropout[name], self.training).to(a.dtype)
            y = y + (F.linear(F.linear(xd, a), b) * self.scaling[name]).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={dict(self.r)}, active={self._active_adapters}, merged={self.merged}"
        )
