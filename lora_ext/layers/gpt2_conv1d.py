"""``LoraGPT2Conv1D``: LoRA on HF transformers' GPT-2 ``Conv1D`` (weight stored ``[in, out]``)."""

from __future__ import annotations

import torch
from torch import nn

from .linear import LoraLinear


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (checked without importing transformers)."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers")


class LoraGPT2Conv1D(LoraLinear):
    r"""LoRA on a GPT-2 ``Conv1D``: ``y = x W + b`` with ``W`` ``[in, out]`` (PEFT's ``fan_in_fan_out``).

    The adapter has the Linear layout (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``); the
    compiled op and the merge kernels see the base weight through the transposed view ``W^T``,
    so nothing is copied.
    """

    base_types = ()

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return is_gpt2_conv1d(module)

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int):
        in_f, out_f = base_layer.weight.shape
        return (r, in_f), (out_f, r)

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.t()  # [out, in] view
