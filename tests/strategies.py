"""Hypothesis strategies and layout helpers shared by the property-based tests (no lora_ext code here)."""

from __future__ import annotations

import os

import torch
from hypothesis import strategies as st

# (base dtype, adapter dtype) pairs every op takes: the adapter has the base's dtype or, on a
# bfloat16/float16 base, float32 (PEFT's default) or the other half type.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.bfloat16),
]
# memory layouts of an operand with the same values (see ``place``)
LAYOUTS = ["contiguous", "permuted", "strided", "offset"]


def examples(n: int) -> int:
    """A test's number of examples, times LORA_EXT_HYPOTHESIS_EXAMPLES (default 1) for long runs."""
    return max(1, round(n * float(os.environ.get("LORA_EXT_HYPOTHESIS_EXAMPLES", "1"))))


def scales():
    """LoRA scales: 0, negative, fractional and plain ones."""
    return st.sampled_from([0.0, 1.0, -1.0, 0.5]) | st.floats(-2.0, 2.0, allow_nan=False, width=32)


def dropout_ps():
    return st.sampled_from([0.0, 0.5]) | st.floats(0.0, 0.95)


def seeds():
    return st.integers(0, 2**31 - 1)


def randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    """float64 N(0, 1) * scale with no exact zeros (a zero could hide a skipped element)."""
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return torch.where(t == 0, 1.0, t) * scale


def place(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in another memory layout. ``permuted``: the dims reversed in memory;
    ``strided``: every other element of the last dim of a larger buffer; ``offset``: a view at a
    storage offset. The rest of the buffer is NaN (or the dtype's max for integers), so a kernel
    that reads outside the view poisons its result; see ``outside_unchanged`` for writes."""
    if layout == "contiguous" or t.dim() == 0:
        return t.clone()
    fill = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max
    if layout == "permuted":
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).clone(memory_format=torch.contiguous_format).permute(dims)  # never t's storage
    if layout == "strided":
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), fill, dtype=t.dtype)
        view = big[..., 1::2]
    else:
        big = torch.full((t.numel() + 7,), fill, dtype=t.dtype)
        view = big[3 : 3 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def outside_unchanged(view: torch.Tensor, buffer_before: torch.Tensor) -> bool:
    """Whether an in-place op on ``view`` left every element of its buffer outside the view bit for bit
    as ``buffer_before`` (a clone of ``view._base`` taken before the op)."""
    base = view._base
    if base is None:
        return True
    after = base.clone()
    region = torch.as_strided(after, view.shape, view.stride(), view.storage_offset() - base.storage_offset())
    region.copy_(
        torch.as_strided(buffer_before, view.shape, view.stride(), view.storage_offset() - base.storage_offset())
    )
    return torch.equal(bits(after), bits(buffer_before))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN-safe bitwise comparison with torch.equal)."""
    # a clone, not .contiguous(): a view with a size-1 last dim counts as contiguous whatever its stride
    return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)
