"""Quantized frozen base weights (issue 15): int8, GGUF's q8_0 / q4_0 / q4_1, QLoRA's nf4.

A ``QuantizedWeight`` is the bytes of a quantized ``[out, in]`` weight in one of these layouts
(``csrc/ops/common/quant_formats.h`` documents them, and is the one source of their block sizes and of the
NF4 code book: this module reads them from there through ``lora_ext._C``):

=========  =====================================  ==========================  ==============================
qtype      qdata                                  qscale                      element (o, i)
=========  =====================================  ==========================  ==============================
``int8``   int8 ``[out, in]``                     float32 ``[out]``           ``q * scale[o]``
``q8_0``   uint8 ``[out, in/32*34]`` (GGUF)       None                        ``q * d`` per block of 32
``q4_0``   uint8 ``[out, in/32*18]`` (GGUF)       None                        ``(q - 8) * d``
``q4_1``   uint8 ``[out, in/32*20]`` (GGUF)       None                        ``q * d + m``
``nf4``    uint8 ``[out, in/2]``                  float32 ``[out, in/64]``    ``NF4[q] * absmax``
=========  =====================================  ==========================  ==============================

The GGUF formats are the file's blocks byte for byte (``from_gguf`` takes a tensor of ``gguf.GGUFReader``), and
``quantize`` reproduces ``gguf.quants.quantize`` bit for bit. ``dequantize`` is the compiled
``lora_ext::dequantize_weight`` op (float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import _C

__all__ = ["QTYPES", "QuantizedWeight", "quantize", "dequantize", "from_gguf", "NF4_VALUES"]

# The formats' numbers come from the compiled kernels' own header (csrc/ops/common/quant_formats.h), their one
# source: {qtype: {"block": elements per block along in_features, "block_bytes": bytes per block, "has_qscale"}}.
_FORMATS = _C.quant_formats()
QTYPES = tuple(_FORMATS)  # ("int8", "q8_0", "q4_0", "q4_1", "nf4")
_GGUF = {q: _FORMATS[q]["block_bytes"] for q in ("q8_0", "q4_0", "q4_1")}  # bytes per block of GGUF's formats

#: QLoRA's NF4 code book (the values 4-bit codes 0..15 stand for, times the block's absmax): the float32 table
#: the kernels decode with.
NF4_VALUES = torch.tensor(_C.nf4_values(), dtype=torch.float32)


def block_size(qtype: str) -> int:
    """Elements per block along ``in_features`` for ``qtype`` (``in_features`` must be a multiple of it)."""
    return _FORMATS[qtype]["block"]


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` weight: ``qdata`` (and ``qscale``) in ``qtype``'s layout."""

    qdata: torch.Tensor
    qscale: Optional[torch.Tensor]
    qtype: str
    out_features: int
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def nbytes(self) -> int:
        return self.qdata.nbytes + (self.qscale.nbytes if self.qscale is not None else 0)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """The float32 ``[out, in]`` weight (the compiled ``dequantize_weight`` op)."""
    return torch.ops.lora_ext.dequantize_weight.default(q.qdata, q.qscale, q.qtype, q.out_features, q.in_features)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as ggml and gguf-py round."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _nibbles_low_high(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] codes -> [n, 16] bytes: element j in the low nibble, j + 16 in the high (GGUF)."""
    return (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1).to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def quantize(weight: torch.Tensor, qtype: str) -> QuantizedWeight:
    """Quantizes a float ``[out, in]`` weight (computed in float32, as ggml does). ``in`` must be a multiple of
    the block (32 for the GGUF formats, 64 for nf4); the weight must be finite."""
    if qtype not in QTYPES:
        raise ValueError(f"quantize: expected qtype in {QTYPES}, got {qtype!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"quantize: expected a float [out, in] weight, got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    out_f, in_f = weight.shape
    block = block_size(qtype)
    if in_f % block:
        raise ValueError(
            f"quantize: {qtype} quantizes blocks of {block} along in_features: expected in_features "
            f"divisible by {block}, got {in_f}"
        )
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize: expected finite weights, got NaN or infinite values")
    if qtype == "int8":
        scale = w.abs().amax(dim=1) / 127 if in_f else torch.zeros(out_f)
        q = _roundf(w * _inv(scale)[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(q.contiguous(), scale.contiguous(), qtype, out_f, in_f)
    blocks = w.reshape(-1, block)
    if qtype == "nf4":
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        codes = ((blocks * _inv(absmax))[..., None] - NF4_VALUES).abs().argmin(dim=-1).to(torch.uint8)
        packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
        return QuantizedWeight(
            packed.reshape(out_f, in_f // block * _FORMATS[qtype]["block_bytes"]).contiguous(),
            absmax.reshape(out_f, in_f // block).contiguous(),
            qtype,
            out_f,
            in_f,
        )
    if qtype == "q8_0":
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        qs = _roundf(blocks * _inv(d)).to(torch.int8).view(torch.uint8)
        raw = torch.cat([_half_bytes(d), qs], dim=1)
    elif qtype == "q4_0":
        imax = blocks.abs().argmax(dim=1, keepdim=True)
        d = blocks.gather(1, imax) / -8
        qs = torch.trunc(blocks * _inv(d) + 8.5).clamp_(0, 15).to(torch.int64)
        raw = torch.cat([_half_bytes(d), _nibbles_low_high(qs)], dim=1)
    else:  # q4_1
        hi, lo = blocks.amax(dim=1, keepdim=True), blocks.amin(dim=1, keepdim=True)
        d = (hi - lo) / 15
        qs = torch.trunc((blocks - lo) * _inv(d) + 0.5).clamp_(0, 15).to(torch.int64)
        raw = torch.cat([_half_bytes(d), _half_bytes(lo), _nibbles_low_high(qs)], dim=1)
    return QuantizedWeight(raw.reshape(out_f, in_f // block * _GGUF[qtype]).contiguous(), None, qtype, out_f, in_f)


def from_gguf(tensor) -> QuantizedWeight:
    """A ``QuantizedWeight`` holding a q8_0 / q4_0 / q4_1 tensor of ``gguf.GGUFReader`` as stored (no
    dequantization; the file's bytes are copied once, so the reader's memory map can close)."""
    name = getattr(tensor.tensor_type, "name", str(tensor.tensor_type)).lower()
    if name not in _GGUF:
        raise ValueError(
            f"from_gguf: expected a tensor of type Q8_0, Q4_0 or Q4_1, got {name.upper()} "
            f"({getattr(tensor, 'name', '?')})"
        )
    shape = [int(v) for v in tensor.shape]  # GGUF lists ne0 (in_features) first
    if len(shape) != 2:
        raise ValueError(f"from_gguf: expected a 2-D weight, got shape {shape} ({getattr(tensor, 'name', '?')})")
    in_f, out_f = shape
    data = torch.from_numpy(tensor.data.copy()).reshape(out_f, -1)
    return QuantizedWeight(data.contiguous(), None, name, out_f, in_f)
