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

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the ops)

__all__ = [
    "lora_linear",
    "lora_linear_quantized",
    "linear_quantized",
    "lora_group_rows",
    "lora_linear_multi",
    "lora_linear_multi_quantized",
    "merge_",
    "unmerge_",
    "ExactMergeCodes",
    "merge_exact_codes",
    "merge_exact_",
    "unmerge_exact_",
]


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


def lora_linear_quantized(
    x: Tensor,
    qweight,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """:func:`lora_linear` over a quantized frozen base ``qweight`` (a ``lora_ext.quant.QuantizedWeight``), which is
    dequantized tile by tile into bounded scratch, never whole. Gradients reach ``x``, ``bias`` (if it requires
    grad), ``lora_A`` and ``lora_B``; the base gets none."""
    return torch.ops.lora_ext.lora_linear_quantized.default(
        x,
        qweight.qdata,
        qweight.qscale,
        qweight.qtype,
        int(qweight.out_features),
        int(qweight.in_features),
        bias,
        lora_A,
        lora_B,
        float(scale),
        float(dropout_p),
        bool(training),
    )


def linear_quantized(x: Tensor, qweight, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for a quantized ``W`` (``QuantizedWeight``), without building ``W``; ``x`` gets a gradient."""
    return torch.ops.lora_ext.linear_quantized.default(
        x, qweight.qdata, qweight.qscale, qweight.qtype, int(qweight.out_features), int(qweight.in_features), bias
    )


def lora_group_rows(adapter_ids: Tensor, n_adapters: int) -> tuple[Tensor, Tensor]:
    """Group batch rows by adapter once per batch (stable counting sort).

    ``adapter_ids`` int32/int64 ``[N]`` with values in ``[-1, n_adapters)`` (-1: base only).
    Returns ``(order, offsets)``: ``order`` int64 ``[N]`` lists the rows of adapter 0, then
    adapter 1, ..., then the base rows; adapter ``a``'s rows are
    ``order[offsets[a]:offsets[a + 1]]`` (``offsets`` int64 ``[n_adapters + 2]``, last = N).
    """
    order, offsets = torch.ops.lora_ext.lora_group_rows.default(adapter_ids, int(n_adapters))
    return order, offsets


def lora_linear_multi(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    group_order: Optional[Tensor] = None,
    group_offsets: Optional[Tensor] = None,
) -> Tensor:
    """Row ``i``: ``y_i = x_i W^T + bias + scales[a] * (dropout(x_i) A[a]^T) B[a]^T``, ``a = adapter_ids[i]``.

    Args:
        x: ``[..., in]``; its rows (all leading dims flattened) are the rows of ``adapter_ids``.
        weight, bias: as for :func:`lora_linear`.
        lora_A: ``[n_adapters, r_max, in]``; adapters of smaller rank zero-padded.
        lora_B: ``[n_adapters, out, r_max]``. Any strides; the transposed view of a contiguous
            ``[n_adapters, r_max, out]`` stack is read without a copy.
        scales: float32 ``[n_adapters]``, alpha / r per adapter.
        adapter_ids: int32/int64 ``[N]``, -1 for base-only rows.
        dropout_p, training: dropout on the LoRA branch's input, as for :func:`lora_linear`.
        group_order, group_offsets: :func:`lora_group_rows` of ``adapter_ids`` (computed here when
            omitted; pass them to share one grouping across the layers of a model).

    Gradients reach ``x``, ``lora_A``/``lora_B`` (each adapter only from its own rows) and
    ``weight``/``bias`` when they require grad; ``scales`` and ids are not differentiable. The
    ``[N, r_max]`` intermediate is float32 for half/bf16 adapters.
    """
    return torch.ops.lora_ext.lora_linear_multi.default(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        scales,
        adapter_ids,
        float(dropout_p),
        bool(training),
        group_order,
        group_offsets,
    )


def lora_linear_multi_quantized(
    x: Tensor,
    qweight,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    group_order: Optional[Tensor] = None,
    group_offsets: Optional[Tensor] = None,
) -> Tensor:
    """:func:`lora_linear_multi` over a quantized frozen base ``qweight`` (a ``lora_ext.quant.QuantizedWeight``),
    dequantized tile by tile as in :func:`lora_linear_quantized`, never whole. The per-row arguments, dropout masks
    and gradients are :func:`lora_linear_multi`'s (gradients reach ``x``, ``bias`` if it requires grad, ``lora_A`` and
    ``lora_B``; the base gets none)."""
    return torch.ops.lora_ext.lora_linear_multi_quantized.default(
        x,
        qweight.qdata,
        qweight.qscale,
        qweight.qtype,
        int(qweight.out_features),
        int(qweight.in_features),
        bias,
        lora_A,
        lora_B,
        scales,
        adapter_ids,
        float(dropout_p),
        bool(training),
        group_order,
        group_offsets,
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


class ExactMergeCodes(NamedTuple):
    """Side information that makes an exact merge reversible bit for bit."""

    codes: Tensor  # uint8 [ceil(numel / 4)]: 2 bits per weight element
    exc_index: Tensor  # int64 [n]: flat indices the codes cannot express
    exc_value: Tensor  # [n], weight dtype: their original values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)

    def to(self, device) -> "ExactMergeCodes":
        """The codes on ``device``: every backend computes the same bits, so codes made on one
        device unmerge the weight on another (e.g. after ``model.cpu()`` while merged)."""
        return ExactMergeCodes(*(t.to(device) for t in self))


def merge_exact_codes(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> ExactMergeCodes:
    """Side information for :func:`merge_exact_` of the current ``weight`` (which it does not change).

    Delta W is recomputed deterministically in float32; per weight element a 2-bit code says
    which of ``round(merged - dW)`` and its two neighbours the original value is, and a sparse
    list keeps the rare elements outside that window. float32/bfloat16/float16 weights.
    """
    return ExactMergeCodes(*torch.ops.lora_ext.merge_exact_codes.default(weight, lora_A, lora_B, float(scale)))


def merge_exact_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
    """In place ``weight = round(weight + dW)`` with the deterministic float32 ``dW`` of the exact merge."""
    torch.ops.lora_ext.merge_exact_.default(weight, lora_A, lora_B, float(scale))


def unmerge_exact_(weight: Tensor, codes: ExactMergeCodes, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
    """Restore, bit for bit, the weight that :func:`merge_exact_` merged (given its side information)."""
    torch.ops.lora_ext.unmerge_exact_.default(weight, *codes, lora_A, lora_B, float(scale))


@torch.library.register_fake("lora_ext::merge_exact_codes")
def _merge_exact_codes_fake(weight, lora_A, lora_B, scale):
    # The sparse list's length depends on the data: an unbacked size.
    n = torch.library.get_ctx().new_dynamic_size()
    codes = weight.new_empty(((weight.numel() + 3) // 4,), dtype=torch.uint8)
    return codes, weight.new_empty((n,), dtype=torch.long), weight.new_empty((n,))
