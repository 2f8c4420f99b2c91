"""Typed Python wrappers over the compiled ``torch.ops.lora_ext`` operators.

Notation (PEFT's): ``x`` ``[..., in]``, ``weight`` ``[out, in]``, ``bias`` ``[out]`` or
``None``, ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, ``scale`` = alpha / r
(rsLoRA: alpha / sqrt(r)).

Dtypes: float32, float64, bfloat16 and float16; the adapter has x's dtype or, on a
bfloat16/float16 base, may be float32 (PEFT's default). The LoRA branch accumulates in
the adapter's dtype, or in float32 for a bfloat16/float16 adapter; the ``[N, r]``
intermediate is float32 in that case too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the ops)

__all__ = ["lora_linear", "merge_", "unmerge_"]


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``y = x @ weight.T + bias + scale * (dropout(x) @ lora_A.T) @ lora_B.T``.

    Args:
        x: ``[..., in]``; any number of leading dims, including empty batches.
        weight: ``[out, in]`` frozen base weight (its gradient is computed only if it requires grad).
        bias: ``[out]`` or ``None``.
        lora_A: ``[r, in]``, r >= 1.
        lora_B: ``[out, r]``.
        scale: finite float, alpha / r (or alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout probability on the LoRA branch's input, ``0 <= p < 1``.
        training: dropout is applied only when True.

    Returns:
        ``[..., out]`` in x's dtype.

    The low-rank term is accumulated in place into the base GEMM's result; the only extra
    buffer is the ``[N, r]`` intermediate. With dropout, backward regenerates the mask from
    an 8-byte seed instead of saving the mask or the dropped copy of x.
    """
    return torch.ops.lora_ext.lora_linear.default(
        x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), bool(training)
    )


def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
    """In place ``weight += scale * lora_B @ lora_A`` with no weight-sized temporary.

    ``weight`` ``[out, in]``, ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``. For a
    bfloat16/float16 weight the update is computed in float32 over bounded row chunks and
    rounded once per element. Must run under ``torch.no_grad()`` if any argument requires grad.
    """
    torch.ops.lora_ext.merge_.default(weight, lora_A, lora_B, float(scale))


def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
    """In place ``weight -= scale * lora_B @ lora_A`` (the inverse of :func:`merge_`)."""
    torch.ops.lora_ext.unmerge_.default(weight, lora_A, lora_B, float(scale))
