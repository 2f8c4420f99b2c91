"""``LoraEmbedding``: LoRA on an ``nn.Embedding`` (PEFT's layout and names)."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


class LoraEmbedding(LoraLayer):
    r"""LoRA wrapper around an ``nn.Embedding`` with weight ``W`` ``[num_embeddings, dim]``.

    .. math:: y = W[x] + s\,(A^\top[x])\,B^\top

    with ``A`` = ``lora_embedding_A.<name>`` ``[r, num_embeddings]`` and ``B`` =
    ``lora_embedding_B.<name>`` ``[dim, r]``, as PEFT stores them (parameters, no ``.weight``).
    As in PEFT, ``init_lora_weights=True`` sets A = 0 and B ~ N(0, 1), and dropout is not
    applied to token ids. Merging adds ``s (B A)^T`` through the compiled merge kernel on a
    transposed view of W.
    """

    container_names = ("lora_embedding_A", "lora_embedding_B")
    adapter_as_parameters = True
    file_suffixes = (".lora_embedding_A", ".lora_embedding_B")

    base_types = (nn.Embedding,)

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int):
        num, dim = base_layer.weight.shape
        return (r, num), (dim, r)

    def _init_weights(self, a: torch.Tensor, b: torch.Tensor, r: int, init: Union[bool, str]) -> None:
        with torch.no_grad():
            if init is False:
                nn.init.normal_(a)
                nn.init.normal_(b)
            else:
                nn.init.zeros_(a)
                nn.init.normal_(b)

    def _merge_operands(self, name: str):
        a, b = self.adapter_weights(name)
        return self._base_weight().t(), a, b  # W^T [dim, num] += s B A

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        e = self.base_layer
        return F.embedding(x, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name in self._adapters_for_forward():
            a, b = self.adapter_weights(name)
            y = y + ((self._embed(x, a.t()) @ b.t()) * self.scaling[name]).to(y.dtype)
        return y
