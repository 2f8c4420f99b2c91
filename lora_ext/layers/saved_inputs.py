"""Opt-in: keep the input a LoRA linear layer saves for backward in reduced precision.

A frozen linear layer needs no input to backpropagate (``grad_x = grad_y W``). A LoRA layer keeps its
input ``x`` for one thing only, the A gradient ``grad_A = grad_h^T dropout(x)``. That saved input is most of
the memory LoRA adds to a training step (issue 14: 161 of the 188 MiB on SmolLM2-135M, batch 4 x 128).
Inside ``with compress_saved_inputs(mode):`` every ``LoraLinear`` keeps that copy as

- ``"bf16"``: bfloat16 (half of float32; each element rounded to 8 significant bits), or
- ``"int8"``: int8 with one float32 scale per row (``amax(|row|) / 127``; a quarter of float32; each element
  off by at most ``amax / 254``),

and expands it again in backward. Only ``grad_A`` changes: ``grad_x``, ``grad_B`` and the loss are bit for bit
the uncompressed ones. The error ``grad_A`` gets is bounded per element by ``|grad_h|^T |x - x_saved|``
(``tests/test_saved_inputs.py`` checks that bound against float64).

Layers reading the same input tensor (q/k/v, gate/up) share one compressed copy. With "int8", a row holding
a NaN or an infinity is saved as NaN: grad_A turns NaN (uncompressed, the columns it touches would be NaN
or infinite), never silently finite.

The setting is a ``contextvars`` value, so it is per thread and per asyncio task, never state on a shared
module. Nothing is compressed where it cannot be done safely: inputs already in 16 bits or smaller
("bf16"), a base weight that trains (its gradient needs the exact input), under activation checkpointing
(which keeps no layer input at all), and inside ``torch.compile`` (the compiled graph decides what it
saves). Other ``saved_tensors_hooks`` (``torch.autograd.graph.save_on_cpu``, a user's) still apply: they get
the compressed copy instead of ``x``.

    with lora_ext.compress_saved_inputs("int8"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()   # may run outside the ``with``
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from typing import Iterator, Optional

import torch

__all__ = ["compress_saved_inputs", "MODES"]

MODES = ("bf16", "int8")

_STATE: contextvars.ContextVar[Optional["_Compressor"]] = contextvars.ContextVar("lora_ext_saved_inputs", default=None)
_open_blocks = 0  # compress_saved_inputs blocks open in any thread: 0 keeps the common path free (torch.compile)
_open_lock = threading.Lock()


def _pack_int8(x: torch.Tensor):
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.shape[1]:
        amax = rows.abs().amax(dim=1, keepdim=True).float()
    else:
        amax = rows.new_zeros(rows.shape[0], 1, dtype=torch.float32)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(amax, float("nan")))
    q = (rows.float() / scale).nan_to_num_(0.0).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


class _Saved:
    """A compressed saved input: how to expand it again."""

    __slots__ = ("mode", "data", "scale", "shape", "dtype")

    def __init__(self, x: torch.Tensor, mode: str):
        self.mode, self.shape, self.dtype = mode, x.shape, x.dtype
        if mode == "bf16":
            self.data, self.scale = x.detach().to(torch.bfloat16), None
        else:
            self.data, self.scale = _pack_int8(x)

    def expand(self, data: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        if self.mode == "bf16":
            return data.to(self.dtype)
        return (data.float() * scale).to(self.dtype).reshape(self.shape)


class _Packed:
    """What autograd keeps for a compressed input: its ``_Saved`` and the data/scale as the hooks outside
    ours packed them (e.g. ``save_on_cpu`` moves the compressed copy to the CPU)."""

    __slots__ = ("saved", "data", "scale")

    def __init__(self, saved: _Saved, data, scale):
        self.saved, self.data, self.scale = saved, data, scale


class _Compressor:
    def __init__(self, mode: str):
        self.mode = mode
        # id(input) -> (weakref to it, its version, its copy): one copy per input tensor (q/k/v read one)
        self._shared: dict[int, tuple[weakref.ref, int, _Saved]] = {}

    def saved(self, x: torch.Tensor) -> _Saved:
        hit = self._shared.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2]
        saved = _Saved(x, self.mode)
        key = id(x)
        self._shared[key] = (
            weakref.ref(x, lambda _, key=key, shared=self._shared: shared.pop(key, None)),
            x._version,
            saved,
        )
        return saved

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        if not torch.is_grad_enabled() or weight.requires_grad or not x.is_floating_point():
            return False
        return not (self.mode == "bf16" and x.element_size() <= 2)


def _outer_hooks():
    """The saved-tensor hooks active outside a LoRA layer, or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


@contextlib.contextmanager
def compress_saved_inputs(mode: Optional[str] = "int8") -> Iterator[None]:
    """Within this block, LoRA linear layers keep the input saved for the A gradient as ``mode``
    (``"bf16"`` or ``"int8"``, see the module docstring). ``mode=None`` turns it off inside an outer block."""
    global _open_blocks
    if mode is not None and mode not in MODES:
        raise ValueError(f"compress_saved_inputs: expected mode in {MODES} or None, got {mode!r}")
    token = _STATE.set(_Compressor(mode) if mode is not None else None)
    with _open_lock:
        _open_blocks += 1
    try:
        yield
    finally:
        with _open_lock:
            _open_blocks -= 1
        _STATE.reset(token)


def hooks_for(x: torch.Tensor, weight: torch.Tensor):
    """For ``LoraLinear.forward``: the ``saved_tensors_hooks`` that compress the tensor ``x`` when the op
    saves it, or None when nothing is to be compressed.

    Hooks already active (``save_on_cpu``, a user's) still see every saved tensor: the compressed copy
    goes through them instead of ``x``. Under activation checkpointing nothing is compressed: checkpointing
    keeps no layer input at all and recomputes it."""
    if not _open_blocks or torch.compiler.is_compiling():
        return None
    comp = _STATE.get()
    if comp is None or not comp.applies(x, weight):
        return None
    outer = _outer_hooks()
    if outer is not None and getattr(outer[0], "__module__", "") == "torch.utils.checkpoint":
        return None
    outer_pack, outer_unpack = outer if outer is not None else (lambda t: t, lambda t: t)

    x_ref = weakref.ref(x)  # autograd keeps the hooks with every saved tensor: they must not keep x alive

    def pack(t: torch.Tensor):
        if t is not x_ref():
            return outer_pack(t)
        saved = comp.saved(t)
        return _Packed(saved, outer_pack(saved.data), None if saved.scale is None else outer_pack(saved.scale))

    def unpack(p):
        if not isinstance(p, _Packed):
            return outer_unpack(p)
        return p.saved.expand(outer_unpack(p.data), None if p.scale is None else outer_unpack(p.scale))

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
