"""Adapters whose tensors are DTensors (FSDP2 ``fully_shard``, tensor parallel): merging into
sharded weights, gathering adapters to save them, and placing loaded values on the shards.

**Merging.** ``W += s * B @ A`` on a weight sharded by rows (``Shard(0)``: FSDP2, colwise tensor
parallel) needs each rank's rows of ``B`` and all of ``A``; on a weight sharded by columns
(``Shard(1)``: rowwise tensor parallel) its columns of ``A`` and all of ``B``. Every element of
``W`` is then computed from the same numbers, in the same order, as in one process, so the merged
weight is the single-process merge bit for bit: one all-gather of the small factor per layer, the
rest local. :func:`register_strategies` registers exactly these placements with DTensor
(``torch.distributed.tensor.experimental.register_sharding``) for ``merge_``, ``unmerge_`` and
``merge_exact_``, so the ops work on DTensors as on tensors. The exact merge's side information
(``merge_exact_codes`` / ``unmerge_exact_``) describes each rank's own shard: its size depends
on the shard's bytes, not on the global shape, so it is kept per rank as plain tensors
(:func:`local_operands`) instead of as a DTensor.

**Saving.** :func:`gathered` turns a state dict's DTensors into full tensors (a collective:
every rank calls it); only the adapter's tensors are gathered, never the base weights.

Nothing here imports ``torch.distributed`` unless a DTensor is met, so ``lora_ext`` imports
where ``torch.distributed`` is unavailable.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

_registered = False


def dtensor_class() -> Optional[type]:
    """The DTensor class when ``torch.distributed.tensor`` has been imported (only then can a
    tensor be one), else None."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors) -> bool:
    cls = dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def register_strategies() -> None:
    """Register the DTensor sharding strategies of the in-place merge ops (idempotent).

    ``weight`` ``Shard(0)`` with ``lora_A`` ``Replicate`` and ``lora_B`` ``Shard(0)``;
    ``weight`` ``Shard(1)`` with ``lora_A`` ``Shard(1)`` and ``lora_B`` ``Replicate``; or all
    replicated. DTensor redistributes the factors to the strategy the weight's placement picks
    (the weight itself is never moved: in-place ops keep their placement)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.lora_ext

    @register_sharding([ops.merge_.default, ops.unmerge_.default, ops.merge_exact_.default])
    def _merge_strategy(weight, lora_A, lora_B, scale):  # noqa: ARG001 - the op's signature
        return [
            ([], [Shard(0), Replicate(), Shard(0), None]),
            ([], [Shard(1), Shard(1), Replicate(), None]),
            ([], [Replicate(), Replicate(), Replicate(), None]),
        ]

    _registered = True


def _factor_placements(weight_placements, which: str):
    """The placements of ``lora_A`` (``which="A"``) or ``lora_B`` that match a weight's: per mesh
    dim, a weight sharded by rows takes B's rows and all of A, by columns A's columns and all of B."""
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in weight_placements:
        if isinstance(p, Shard) and p.dim in (0, -2):
            out.append(Shard(0) if which == "B" else Replicate())
        elif isinstance(p, Shard) and p.dim in (1, -1):
            out.append(Shard(1) if which == "A" else Replicate())
        elif isinstance(p, Shard):
            raise ValueError(
                f"lora_ext merge: expected a weight sharded on dim 0 or 1, got placements {tuple(weight_placements)}"
            )
        elif p.is_replicate():
            out.append(Replicate())
        else:
            raise ValueError(
                f"lora_ext merge: expected a weight with Shard/Replicate placements, got "
                f"{tuple(weight_placements)} (a Partial weight has no values to merge into)"
            )
    return out


def local_operands(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """``(W, A, B)`` as this rank's plain tensors for the merge kernels: ``W``'s local shard and the
    factors redistributed to match it (one all-gather of the small factor). Plain tensors are
    returned as they are. A collective when ``weight`` is a DTensor."""
    if not is_dtensor(weight):
        if any_dtensor((lora_A, lora_B)):
            raise ValueError(
                "lora_ext merge: expected the adapter and the weight both DTensors or both plain "
                "tensors, got a plain weight and DTensor factors"
            )
        return weight, lora_A, lora_B
    mesh, placements = weight.device_mesh, weight.placements
    factors = []
    for t, which in ((lora_A, "A"), (lora_B, "B")):
        want = _factor_placements(placements, which)
        if not is_dtensor(t):
            raise ValueError(
                f"lora_ext merge: expected lora_{which} as a DTensor like the weight "
                f"({tuple(placements)}), got a plain tensor"
            )
        if t.device_mesh != mesh:
            raise ValueError(
                f"lora_ext merge: expected lora_{which} on the weight's device mesh {mesh}, got {t.device_mesh}"
            )
        factors.append(t.redistribute(mesh, want).to_local())
    return weight.to_local(), factors[0], factors[1]


def all_ranks_true(flag: bool, like: torch.Tensor) -> bool:
    """``flag`` and-ed over the ranks of ``like``'s device mesh (``flag`` itself for a plain tensor)."""
    if not is_dtensor(like):
        return flag
    import torch.distributed as dist

    mesh = like.device_mesh
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=like.to_local().device)
    for dim in range(mesh.ndim):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return int(t.item()) == 0


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` (all shards of a DTensor) is finite."""
    local = t.to_local() if is_dtensor(t) else t
    return all_ranks_true(bool(torch.isfinite(local).all()), t)


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor replaced by its full tensor, in key order (a collective:
    every rank of the tensors' meshes must call it, with the same keys)."""
    return {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in tensors.items()}


def distributed_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor, the same on every rank) laid out like ``param``: its shard on this
    rank for a DTensor ``param`` (no communication), ``value`` itself otherwise."""
    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements, src_data_rank=None)


def full_tensors(obj):
    """``obj`` (nested dicts / lists) with every DTensor replaced by its full tensor (a collective, in
    iteration order: every rank must call it with the same structure, e.g. an optimizer's state_dict)."""
    if is_dtensor(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v) for v in obj)
    return obj
