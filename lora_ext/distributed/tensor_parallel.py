r"""Tensor parallelism for ``LoraLinear`` on a ``DeviceMesh`` (DTensor; gloo on CPU, NCCL on GPUs).

A LoRA layer computes ``y = x W^T + b + s (d(x) A^T) B^T`` (``W`` ``[out, in]``, ``A`` ``[r, in]``,
``B`` ``[out, r]``, ``d`` dropout, ``h = d(x) A^T`` the ``[N, r]`` intermediate). On ``k`` ranks:

**Colwise** (:class:`LoraColwiseParallel`): ``W``, ``b`` and ``B`` are split by output rows
(``Shard(0)``), ``A`` is whole on every rank (``Replicate``), ``x`` is replicated. Rank ``i``
computes its output columns ``y_i = x W_i^T + b_i + s h B_i^T`` with ``h = d(x) A^T`` computed in
full on every rank (``N r in`` flops, no communication): ``y`` is ``Shard(-1)``. Backward, with
``g_i`` rank ``i``'s columns of ``dL/dy``:

- ``dL/dB_i = s g_i^T h`` (``Shard(0)``, local);
- ``dL/dh = s g B = sum_i s g_i B_i`` is a sum over ranks (``Partial``), so are
  ``dL/dA = (dL/dh)^T d(x)`` and ``dL/dx = g W + d'(dL/dh A) = sum_i (g_i W_i + ...)``. The base
  layer's own backward all-reduces ``dL/dx`` (``N in`` elements; the LoRA term rides in the same
  buffer); ``dL/dA`` (``r in`` elements) is the one reduction LoRA adds.

**Rowwise** (:class:`LoraRowwiseParallel`): ``W`` and ``A`` are split by input columns
(``Shard(1)``), ``B`` and ``b`` are whole, ``x`` is ``Shard(-1)``. Rank ``i`` computes
``h_i = x_i A_i^T`` (so ``h = sum_i h_i``) and ``y_i = x_i W_i^T + b/k + s h_i B^T``; ``y = sum_i y_i``
is ``Partial`` and the base layer's own all-reduce (or reduce-scatter) of the output (``N out``)
completes both terms at once, with the bias counted once (each rank adds ``b/k``, DTensor's
Replicate-to-Partial split, no communication; exact for ``k`` a power of two). Backward (``g``
replicated): ``dL/dh = s g B`` (replicated), ``dL/dA_i = (dL/dh)^T x_i`` and
``dL/dx_i = g W_i + dL/dh A_i`` are local, and ``dL/dB = s g^T h = sum_i s g^T h_i`` is
``Partial``: its all-reduce (``out r`` elements) is the one reduction LoRA adds.

So the LoRA branch adds **no** collective to the forward, and one all-reduce per layer to the backward,
of the replicated factor's gradient. DTensor leaves that gradient ``Partial`` in ``param.grad`` (see
the sharding strategies below); :func:`reduce_replicated_grads` reduces it once, between
``backward()`` and ``optimizer.step()``. Without it, every optimizer op that reads the gradient would
all-reduce it again (measured in ``tests/test_distributed_tp.py``: SGD 1, AdamW 3 per tensor and step).

**Dropout**: the op draws an 8-byte seed from torch's CPU generator and derives the mask from it
and the position in the local ``x``. Colwise, ``x`` is whole on every rank, so ranks that are seeded
alike (as TP needs anyway) draw the same mask as a single process. DTensor takes the plain
one-element seed tensor as replicated (``Replicate`` in every strategy below; its local value stays
the host tensor the kernels read, also next to CUDA tensors). Rowwise, each
rank would draw the mask of its *local* columns from the same seed, which is not its slice of the
whole mask: a training forward with ``lora_dropout > 0`` is refused with a ``ValueError``.

The strategies are registered for ``lora_linear`` (no-grad and inference calls) and for the pieces
its C++ autograd calls: ``_lora_linear_forward``, ``_lora_linear_backward_lora`` and
``_lora_linear_backward_input`` (the frozen weight's and bias's gradients, when asked for, are
plain ``mm``/``sum`` that DTensor already shards). Each op also has an all-``Replicate`` strategy.
Merging into the sharded weights is ``lora_ext/_utils/dtensors.py``'s (``lora_ext.merge`` / ``unmerge``). Not covered:
per-row adapter batches (``lora_linear_multi``), other LoRA layer types (embedding, conv, GPT-2 ``Conv1D``).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import (
    DeviceMesh,
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.placement_types import Placement

from .. import ops  # noqa: F401  (registers torch.ops.lora_ext)
from ..layers.base import LoraLayer
from ..layers.gpt2_conv1d import LoraGPT2Conv1D
from ..layers.linear import LoraLinear

__all__ = ["LoraColwiseParallel", "LoraRowwiseParallel", "reduce_replicated_grads", "tensor_parallel_layout"]

_R, _P = Replicate(), Partial()
_ops = torch.ops.lora_ext


# -- sharding strategies ------------------------------------------------------------------------
def _is_rowwise_input(x) -> bool:
    """Whether ``x`` (a DTensor or its spec) is split along its last (input-feature) dimension."""
    return any(isinstance(p, Shard) and p.dim in (-1, x.ndim - 1) for p in getattr(x, "placements", ()))


def _check_dropout(op: str, x, dropout: bool) -> None:
    if dropout and _is_rowwise_input(x):
        raise ValueError(
            f"lora_ext::{op} (tensor parallel): expected lora_dropout == 0 (or eval mode) when x is split along "
            f"its last dimension (rowwise, x placements {tuple(x.placements)}), got dropout on: each rank would "
            "draw the mask of its own columns from the shared seed, not its slice of the whole mask, so the "
            "result would differ from a single process. Use dropout on colwise layers only, or lora_dropout=0 here"
        )


def _forward_layouts(x, bias, seed, dropout: bool) -> list:
    """``(outputs [y, h], inputs [x, W, bias, A, B, scale, p, seed])`` placements, one per layout."""
    last, s = Shard(x.ndim - 1), (None if seed is None else _R)

    def b(p):
        return None if bias is None else p

    layouts = [
        ([last, _R], [_R, Shard(0), b(Shard(0)), _R, Shard(0), None, None, s]),  # colwise
        ([_R, _R], [_R, _R, b(_R), _R, _R, None, None, s]),  # replicated
    ]
    if not dropout:  # rowwise: y and h are sums over ranks; bias Partial = bias / k on each rank
        layouts.append(([_P, _P], [last, Shard(1), b(_P), Shard(1), _R, None, None, s]))
    return layouts


@register_sharding(_ops.lora_linear.default)
def _lora_linear_strategy(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, training=False):
    dropout = dropout_p > 0 and training
    _check_dropout("lora_linear", x, dropout)
    return [([outs[0]], ins[:7] + [None]) for outs, ins in _forward_layouts(x, bias, None, dropout)]


@register_sharding(_ops._lora_linear_forward.default)
def _forward_strategy(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    _check_dropout("_lora_linear_forward", x, seed is not None)
    return _forward_layouts(x, bias, seed, seed is not None)


@register_sharding(_ops._lora_linear_backward_lora.default)
def _backward_lora_strategy(grad_y, x, lora_A, lora_B, h, scale, dropout_p, seed):
    # outputs (grad_A, grad_B, grad_h); inputs (grad_y, x, A, B, h, scale, p, seed)
    _check_dropout("_lora_linear_backward_lora", x, seed is not None)
    s, gl, xl = (None if seed is None else _R), Shard(grad_y.ndim - 1), Shard(x.ndim - 1)
    layouts = [
        ([_P, Shard(0), _P], [gl, _R, _R, Shard(0), _R, None, None, s]),  # colwise
        ([_R, _R, _R], [_R, _R, _R, _R, _R, None, None, s]),
    ]
    if seed is None:
        layouts.append(([Shard(1), _P, _R], [_R, xl, Shard(1), _R, _P, None, None, s]))  # rowwise
    return layouts


@register_sharding(_ops._lora_linear_backward_input.default)
def _backward_input_strategy(grad_y, weight, lora_A, grad_h, dropout_p, seed):
    # output grad_x; inputs (grad_y, W, A, grad_h, p, seed)
    s, gl = (None if seed is None else _R), Shard(grad_y.ndim - 1)
    layouts = [
        ([_P], [gl, Shard(0), _R, _P, None, s]),  # colwise
        ([_R], [_R, _R, _R, _R, None, s]),
    ]
    if seed is None:
        layouts.append(([gl], [_R, Shard(1), Shard(1), _R, None, s]))  # rowwise
    return layouts


def _arg(args, kwargs, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _dtensor_handler(op_call, args, kwargs):
    """DTensor's handler for ``lora_linear`` and ``_lora_linear_forward``: refuse rowwise dropout with a
    ``ValueError`` before dispatch (raised from a sharding strategy, DTensor would turn it into a
    ``RuntimeError``), then dispatch as usual. The handler steps aside while the op runs (DTensor
    consults it on every call): a call from another thread meanwhile takes DTensor's own path, where
    the strategy refuses rowwise dropout as a ``RuntimeError``."""
    if op_call is _ops.lora_linear.default:
        dropout = _arg(args, kwargs, 6, "dropout_p", 0.0) > 0 and _arg(args, kwargs, 7, "training", False)
        _check_dropout("lora_linear", args[0], dropout)
    else:
        _check_dropout("_lora_linear_forward", args[0], _arg(args, kwargs, 7, "seed", None) is not None)
    handlers = DTensor._op_dispatcher._custom_op_handlers
    handler = handlers.pop(op_call, None)
    try:
        return op_call(*args, **kwargs)
    finally:
        if handler is not None:
            handlers[op_call] = handler


_handlers = getattr(DTensor._op_dispatcher, "_custom_op_handlers", None)
if isinstance(_handlers, dict):  # a private table of torch's (2.13); without it the refusal is a RuntimeError
    for _op in (_ops.lora_linear.default, _ops._lora_linear_forward.default):
        _handlers[_op] = _dtensor_handler


# -- parallel styles ----------------------------------------------------------------------------
class _Layout:
    """What a tensor-parallel LoRA layer's placements are; gives a new adapter's A and B theirs."""

    def __init__(self, kind: str, mesh: DeviceMesh, src_data_rank: Optional[int]):
        self.kind, self.mesh, self.src_data_rank = kind, mesh, src_data_rank
        colwise = kind == "colwise"
        self.weight, self.bias = (Shard(0), Shard(0)) if colwise else (Shard(1), _R)
        self.lora_A, self.lora_B = (_R, Shard(0)) if colwise else (Shard(1), _R)

    def distribute(self, t: torch.Tensor, placement: Placement) -> DTensor:
        return distribute_tensor(t.detach(), self.mesh, [placement], src_data_rank=self.src_data_rank)

    def place(self, a: torch.Tensor, b: torch.Tensor) -> tuple[DTensor, DTensor]:
        """``(A, B)`` as DTensors with this layout's placements (a collective unless the style's
        ``src_data_rank`` is None: rank ``src_data_rank``'s values are scattered / broadcast)."""
        return self.distribute(a, self.lora_A), self.distribute(b, self.lora_B)

    def __repr__(self) -> str:
        return f"{self.kind}(mesh={self.mesh}, A={self.lora_A}, B={self.lora_B})"


def tensor_parallel_layout(layer: nn.Module) -> Optional[str]:
    """``"colwise"`` / ``"rowwise"`` for a LoRA layer that :class:`LoraColwiseParallel` /
    :class:`LoraRowwiseParallel` parallelized, else None."""
    layout = getattr(layer, "_tp_layout", None)
    return None if layout is None else layout.kind


def _replace(module: nn.Module, name: str, value: DTensor) -> None:
    old = getattr(module, name)
    module.register_parameter(name, nn.Parameter(value, requires_grad=old.requires_grad))


class _LoraStyle:
    """The LoraLinear half of both styles; plain ``nn.Linear`` / ``nn.Embedding`` go to torch's."""

    _kind = ""
    _desired_input: tuple = ()  # what the op needs (torch's styles set desired_input_layouts per module type)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        where = type(self).__name__
        if not isinstance(module, LoraLayer):
            return super()._apply(module, device_mesh)  # torch's style (raises for other types)
        if not isinstance(module, LoraLinear) or isinstance(module, LoraGPT2Conv1D):
            raise TypeError(
                f"{where}: expected a LoraLinear on an nn.Linear (or a plain nn.Linear/nn.Embedding), "
                f"got a {type(module).__name__}, which lora_ext's tensor parallel does not support"
            )
        if getattr(module, "_tp_layout", None) is not None:
            raise ValueError(
                f"{where}: expected a LoraLinear that is not parallelized yet, got one already "
                f"parallelized as {module._tp_layout!r}"
            )
        if device_mesh.ndim != 1:
            raise ValueError(
                f"{where}: expected a 1-D DeviceMesh (slice the TP dimension, mesh['tp']), "
                f"got {device_mesh.ndim} dimensions"
            )
        if module.merged:
            raise ValueError(
                f"{where}: expected an unmerged LoraLinear, got one with merged adapters "
                f"{module.merged_adapters}: unmerge before parallelizing"
            )
        held = [n for n, p in module.named_parameters() if isinstance(p, DTensor)]
        if held:
            raise ValueError(
                f"{where}: expected plain parameters, got DTensor parameters {held} (FSDP2 or another "
                "style holds this layer)"
            )
        layout = _Layout(self._kind, device_mesh, self.src_data_rank)
        self._check_shapes(module, layout, where)
        return distribute_module(
            module,
            device_mesh,
            partial(self._partition, layout),
            partial(self._prepare_input, self.input_layouts, self._desired_input),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )

    @staticmethod
    def _check_shapes(module: LoraLinear, layout: _Layout, where: str) -> None:
        k, dim = layout.mesh.size(), layout.weight.dim
        size = module.base_layer.weight.shape[dim]
        if size < k:
            raise ValueError(
                f"{where}: expected the split dimension ({'out' if dim == 0 else 'in'}_features) "
                f"to be >= the mesh size {k}, got {size}"
            )

    @staticmethod
    def _partition(layout: _Layout, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if name:  # only the LoraLinear itself: its base layer and adapters
            return
        base = module.base_layer
        _replace(base, "weight", layout.distribute(base.weight, layout.weight))
        if base.bias is not None:
            _replace(base, "bias", layout.distribute(base.bias, layout.bias))
        for n in module.adapter_names:
            a, b = module.adapter_weights(n)
            da, db = layout.place(a, b)
            _replace(module.lora_A[n], "weight", da)
            _replace(module.lora_B[n], "weight", db)
        module._tp_layout = layout  # LoraLayer.add_adapter places later adapters with it

    @classmethod
    def _prepare_input(cls, input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        return cls._prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh)


class LoraColwiseParallel(_LoraStyle, ColwiseParallel):
    """torch's ``ColwiseParallel`` for ``LoraLinear`` (plain ``nn.Linear``/``nn.Embedding`` are passed to
    torch's): base weight and bias ``Shard(0)``, every adapter's ``lora_A`` ``Replicate`` and ``lora_B``
    ``Shard(0)``; input replicated, output ``Shard(-1)``. The same options as torch's:
    ``input_layouts`` (default ``Replicate()``), ``output_layouts`` (default ``Shard(-1)``),
    ``use_local_output`` (default True). Dropout works when the ranks' CPU generators are seeded alike
    (see the module docstring). Adapters added later get the same placements."""

    _kind = "colwise"
    _desired_input = (_R,)


class LoraRowwiseParallel(_LoraStyle, RowwiseParallel):
    """torch's ``RowwiseParallel`` for ``LoraLinear``: base weight ``Shard(1)``, bias ``Replicate`` (added
    once), every adapter's ``lora_A`` ``Shard(1)`` and ``lora_B`` ``Replicate``; input ``Shard(-1)``,
    output ``Replicate`` (the base's all-reduce). The same options as torch's: ``input_layouts``
    (default ``Shard(-1)``), ``output_layouts`` (default ``Replicate()``; ``Shard(1)`` for sequence
    parallel), ``use_local_output``. A training forward with an active adapter's ``lora_dropout > 0``
    raises ``ValueError`` (see the module docstring)."""

    _kind = "rowwise"
    _desired_input = (Shard(-1),)

    @classmethod
    def _prepare_input(cls, input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        if mod.training and not mod.disable_adapters and not mod.merged:
            on = {n: mod.lora_dropout[n] for n in mod.active_adapters if mod.lora_dropout[n] > 0}
            if on:
                raise ValueError(
                    f"LoraRowwiseParallel: expected lora_dropout == 0 for the active adapters of a rowwise layer "
                    f"in training mode, got {on}: each rank holds a slice of x's features and would draw the "
                    "mask of its own slice from the shared seed, not its part of a single process's mask. Use "
                    "lora_dropout=0 on rowwise layers (dropout works on colwise ones), or eval mode"
                )
        x = inputs[0]
        if (
            isinstance(x, torch.Tensor)
            and not isinstance(x, DTensor)
            and x.dim() > 0
            and tuple(input_layouts) in ((Shard(-1),), (Shard(x.dim() - 1),))
        ):
            # torch's from_local assumes even shards (global size = k * local size); the layer knows
            # in_features, so an uneven split (in % k != 0) needs no communication either
            shape = (*x.shape[:-1], mod.in_features)
            x = DTensor.from_local(
                x,
                device_mesh,
                input_layouts,
                run_check=False,
                shape=torch.Size(shape),
                stride=_contiguous_strides(shape),
            )
        return super()._prepare_input(input_layouts, desired_input_layouts, mod, (x, *inputs[1:]), device_mesh)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


# -- gradients ------------------------------------------------------------------------------------
def reduce_replicated_grads(model: nn.Module) -> int:
    """All-reduce, in place, every gradient that backward left as a sum over ranks (``Partial``)
    while its parameter is not: the replicated LoRA factor of each tensor-parallel layer (colwise
    ``lora_A``, ``r x in``; rowwise ``lora_B``, ``out x r``), one all-reduce per layer and trainable
    adapter. Call it on every rank after ``backward()`` (after the last micro-batch when
    accumulating) and before gradient clipping and ``optimizer.step()``. Returns how many gradients
    it reduced (0 when called twice)."""
    done = 0
    for p in model.parameters():
        g = p.grad
        if (
            isinstance(g, DTensor)
            and isinstance(p, DTensor)
            and g.placements != p.placements
            and any(pl.is_partial() for pl in g.placements)
        ):
            p.grad = g.redistribute(p.device_mesh, p.placements)
            done += 1
    return done
