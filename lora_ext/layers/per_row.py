"""Multi-adapter batches: each row of a batch uses its own adapter (or none).

``with lora_ext.adapter_batch(model, ["task_a", "__base__", "task_b", ...]):`` (``batch.py``)
makes every LoRA linear layer of ``model`` run the compiled ``lora_linear_multi`` op with one
adapter name per batch row (the first dim of the layer's input; PEFT's ``adapter_names=``
convention, with ``"__base__"`` for the base model).

Which batch a layer serves is request state, so it never lives on the (shared) modules: it is
kept in a ``contextvars.ContextVar``. Every thread and every asyncio task sees only the
``adapter_batch`` it entered itself, so many requests can run through one model at once.
The caches that are shared (each layer's stacked adapters) are immutable tuples replaced
whole, so concurrent readers never see a half-built entry; the row groupings belong to one
batch. In training mode, gradients reach each adapter from its own rows only, so several
adapters train at once on one frozen base.
"""

from __future__ import annotations

import contextvars
import math
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops

# id(layer) -> the AdapterBatch it serves in the current thread / asyncio task.
_CURRENT: contextvars.ContextVar[Optional[dict[int, "AdapterBatch"]]] = contextvars.ContextVar(
    "lora_ext_adapter_batch", default=None
)
# How many adapter_batch contexts are open in the whole process. While none is, forward does
# not even look at the ContextVar (so torch.compile sees a plain global int, not a ContextVar).
_open_contexts = 0
_open_lock = threading.Lock()
# layer -> (key, stacked adapters): one entry per layer, dropped with the layer. Shared by all threads (the
# stacks depend on the adapters only), replaced whole, never mutated.
_stacks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class AdapterBatch:
    """One adapter name per batch row, the layers it applies to, and the row groupings
    derived from it (cached per batch; a batch belongs to one request)."""

    def __init__(self, adapter_names: list[str], layers: tuple = (), cache_stacks: bool = True):
        self.adapter_names = list(adapter_names)
        self.layers = tuple(layers)  # strong refs: the ids in the context stay unique
        # False where parameters change without their version counter moving (FSDP2's
        # re-gathered parameters): the layers' stacked adapters are then rebuilt on every forward
        self.cache_stacks = cache_stacks
        self._groupings: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.adapter_names)

    def grouping(self, layer_adapters: tuple[str, ...], rows_per_item: int, device: torch.device):
        """``(adapter_ids, order, offsets)`` for a layer whose adapter stack is ``layer_adapters``
        and whose input has ``rows_per_item`` rows per batch row. Rows whose adapter the layer
        lacks (or ``"__base__"``) get id -1: base only, as in PEFT."""
        key = (layer_adapters, rows_per_item, device)
        hit = self._groupings.get(key)
        if hit is None:
            index = {n: i for i, n in enumerate(layer_adapters)}
            ids = torch.tensor([index.get(n, -1) for n in self.adapter_names], dtype=torch.long)
            ids = ids.repeat_interleave(rows_per_item).to(device)
            hit = self._groupings.setdefault(key, (ids, *ops.lora_group_rows(ids, len(layer_adapters))))
        return hit


def current_batch(layer) -> Optional[AdapterBatch]:
    """The per-row batch ``layer`` serves in this thread / asyncio task, or None."""
    if not _open_contexts:
        return None
    current = _CURRENT.get()
    return None if current is None else current.get(id(layer))


def enter_batch(batch: AdapterBatch) -> contextvars.Token:
    """Make ``batch`` current for its layers in this context (nested batches of other models stay)."""
    global _open_contexts
    current = dict(_CURRENT.get() or {})
    current.update((id(layer), batch) for layer in batch.layers)
    token = _CURRENT.set(current)
    with _open_lock:
        _open_contexts += 1
    return token


def exit_batch(token: contextvars.Token, batch: AdapterBatch) -> None:
    global _open_contexts
    with _open_lock:
        _open_contexts -= 1
    _CURRENT.reset(token)
    me = threading.get_ident()
    with _notes_lock:  # this thread's training forwards under the batch can no longer be recomputed with it
        for layer in batch.layers:
            key = (me, id(layer))
            if _notes.get(key) is batch:
                _notes[key] = EXITED


class _Exited:
    """The note of a layer whose last training forward (in that thread) ran under an ``adapter_batch`` that has
    been exited since."""

    def __reduce__(self):  # one object, also through copy.deepcopy and pickle
        return "EXITED"


EXITED = _Exited()

# The training record activation checkpointing needs, owned here and never stored on the (shared) layer:
# (thread ident, id(layer)) -> the AdapterBatch of that thread's last training forward of the layer, or EXITED.
# Keyed by thread, so two threads training per-row batches through one model never overwrite each other's note.
_notes: dict[tuple[int, int], object] = {}
_notes_lock = threading.Lock()


def has_training_notes() -> bool:
    """Whether any per-row training forward has been noted (a plain read: the common case costs nothing)."""
    return bool(_notes)


def _recomputed_batch(layer) -> Optional[AdapterBatch]:
    """The batch a recomputation of ``layer``'s forward with no current batch must use: this thread's note, else
    (the autograd engine's device threads run backward on threads of their own) the one note every thread agrees
    on. Refused when the batch was exited or the notes disagree: never silently the model's active adapters."""
    with _notes_lock:
        mine = _notes.get((threading.get_ident(), id(layer)))
        seen = [mine] if mine is not None else [v for (_, lid), v in _notes.items() if lid == id(layer)]
    if not seen:
        return None
    if any(v is EXITED for v in seen):
        raise RuntimeError(
            f"adapter_batch ({type(layer).__name__}): activation checkpointing recomputes this layer's forward "
            "during backward, and the adapter_batch it ran under has been exited; expected backward() inside that "
            "`with lora_ext.adapter_batch(...)` (the recomputation must give each row the same adapter), got a "
            "recomputation after the `with`"
        )
    if len({id(v) for v in seen}) > 1:
        raise RuntimeError(
            f"adapter_batch ({type(layer).__name__}): activation checkpointing recomputes this layer's forward on "
            f"a thread other than the one that ran it, while {len(seen)} threads train different per-row batches "
            "through this layer; expected backward() on the thread that ran the forward (CPU), or one per-row "
            "training batch at a time per layer"
        )
    return seen[0]


def training_batch(layer, batch: Optional[AdapterBatch]) -> Optional[AdapterBatch]:
    """The per-row batch of a training-mode forward of ``layer``, given the current one (``batch``).

    Activation checkpointing (``torch.utils.checkpoint``, reentrant or not) runs the forward again
    during backward, where the ``adapter_batch`` of the original forward is not current when
    backward runs after the ``with`` or on another thread (the autograd engine's device threads).
    So every training forward notes its batch, per thread (``exit_batch`` replaces it by ``EXITED``),
    and a recomputation with no current batch uses the noted one while its ``with`` is open; after
    it, the recomputation is refused rather than silently run with the model's active adapters
    (wrong gradients).
    """
    if torch._C._current_graph_task_id() == -1 or not torch.is_grad_enabled():  # not a recomputation
        key = (threading.get_ident(), id(layer))
        if batch is not None or key in _notes:
            with _notes_lock:
                if batch is None:
                    _notes.pop(key, None)  # a plain training forward clears this thread's note
                else:
                    _notes[key] = batch
        return batch
    return batch if batch is not None else _recomputed_batch(layer)


def stacked_adapters(layer, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lora_A [n, r_max, in], lora_B [n, out, r_max], scales float32 [n])`` of all of
    ``layer``'s adapters in ``layer.adapter_names`` order, zero-padded to the largest rank.

    B is a transposed view of a contiguous ``[n, r_max, out]`` stack, the layout the kernels
    read without a copy. Without autograd the stacks are cached on the layer (one entry: bounded)
    until an adapter is added, removed or changed in place; with autograd they are rebuilt (differentiably)
    on every call so gradients reach each adapter's own parameters.

    The cache is keyed on each parameter's identity, storage address and version counter, which
    every in-place op (an optimizer step, ``load_adapter``) moves. Writes that bypass the counter
    are not seen: FSDP2 fills the same unsharded parameters with new values at every all-gather,
    so ``adapter_batch`` on a model holding FSDP2 modules or DTensors passes ``cache=False``
    (``AdapterBatch.cache_stacks``); so do writes through ``param.data`` (call
    :func:`drop_cached_stack` after them).
    """
    names = tuple(layer.adapter_names)
    weights = [layer.adapter_weights(n) for n in names]
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for ab in weights for t in ab)
    cache = cache and not need_grad
    key = (
        (
            names,
            tuple((id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version) for a, b in weights),
            tuple(layer.scaling[n] for n in names),
        )
        if cache
        else None
    )
    cached = _stacks.get(layer)  # one read: another thread may replace it meanwhile
    if cache and cached is not None and cached[0] == key:
        return cached[1]
    r_max = max(a.shape[0] for a, _ in weights)
    A = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a, _ in weights])
    Bt = torch.stack([F.pad(b.t(), (0, 0, 0, r_max - b.shape[1])) for _, b in weights])
    scales = torch.tensor([layer.scaling[n] for n in names], dtype=torch.float32, device=A.device)
    out = (A, Bt.transpose(1, 2), scales)
    if cache:
        _stacks[layer] = (key, out)  # replaced whole; never mutated
    return out


def cached_stack(layer):
    """The stacked adapters cached for ``layer`` (``stacked_adapters``' last cached result), or None."""
    hit = _stacks.get(layer)
    return None if hit is None else hit[1]


def drop_cached_stack(layer) -> None:
    """Forget ``layer``'s stacked adapters (after writes that bypass the version counter, e.g. ``param.data``)."""
    _stacks.pop(layer, None)


def per_row_plan(layer, x: torch.Tensor, batch: AdapterBatch):
    """The checks and grouping of a per-row forward: ``(names, dropout_p, ids, order, offsets)``, or None when the
    layer has no adapter (the base alone)."""
    where = f"adapter_batch ({type(layer).__name__})"
    if layer.merged:
        raise ValueError(f"{where}: adapters are merged into the weight; unmerge() before per-row adapters")
    if x.dim() < 2 or x.shape[0] != len(batch):
        raise ValueError(
            f"{where}: expected an input whose first dim is the batch of {len(batch)} rows "
            f"(one adapter name per row), got x of shape {tuple(x.shape)}"
        )
    names = tuple(layer.adapter_names)
    if not names:
        return None
    used = {n for n in batch.adapter_names if n in layer.r}
    p = 0.0
    if layer.training:
        ps = {layer.lora_dropout[n] for n in used}
        if len(ps) > 1:
            raise ValueError(
                f"{where}: the adapters in this batch have different lora_dropout {sorted(ps)}; "
                "per-row adapters share one dropout probability in training"
            )
        p = ps.pop() if ps else 0.0
    return (names, p, *batch.grouping(names, math.prod(x.shape[1:-1]), x.device))


def multi_forward(layer, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
    """``LoraLinear`` forward with per-row adapters (called by the layer inside ``adapter_batch``)."""
    plan = per_row_plan(layer, x, batch)
    if plan is None:
        return layer.base_layer(x)
    _, p, ids, order, offsets = plan
    A, B, scales = stacked_adapters(layer, batch.cache_stacks)
    return ops.lora_linear_multi(
        x, layer._base_weight(), layer.base_layer.bias, A, B, scales, ids, p, layer.training, order, offsets
    )
