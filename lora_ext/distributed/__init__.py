"""``lora_ext.distributed``: training LoRA adapters on several processes.

**DDP** (``torch.nn.parallel.DistributedDataParallel``) works as it is on a model with adapters::

    lora_ext.inject_adapter(model, cfg)              # inject / add / load every adapter first
    ddp = DDP(model)                                 # default find_unused_parameters=False
    ... train ddp as usual ...
    lora_ext.save_adapter(ddp, "out/")               # the same file as saving `model`

Only the trainable parameters (the active adapters, ``modules_to_save`` copies, ``bias`` per the
config) are in DDP's buckets, so each step all-reduces exactly their bytes. Per-row training of
several adapters (``lora_ext.adapter_batch``) works too when a rank's batch has no row of some
adapter: every adapter of a layer takes part in the stacked per-row op, so each gets a gradient
(zero for an adapter without rows). What would break a wrapped model is refused with a
``ValueError`` (see ``_utils/wrappers.py``): adding adapters to a model DDP/FSDP/tensor parallel
already holds, and ``set_adapter`` / ``delete_adapter`` on a DDP model (DDP fixed its buckets).

:func:`broadcast_adapters` copies rank ``src``'s adapters to every rank (differently seeded ranks,
FSDP2, or adapters added before a later re-wrap). :func:`training_state` / :func:`save_training_state`
/ :func:`load_training_state` checkpoint LoRA training (adapters, optimizer, each rank's RNG) so that
a resumed run continues bitwise as the uninterrupted one.

**FSDP2**: :func:`shard_lora_model` (``fsdp.py``) applies ``fully_shard`` per transformer block, then
to the root; each step then reduce-scatters only the adapters' gradients. ``save_adapter`` on a
sharded model is collective (only the adapter is gathered; rank 0 writes the file one process would
write), ``lora_ext.merge`` / ``unmerge`` work on the sharded weights (``_utils/dtensors.py``: local merges
plus one all-gather of the small factor, bit for bit the single-process result), and per-row
batches never serve stale stacked adapters (FSDP2 refills parameters without moving their version
counters). :func:`load_adapter_values` puts a saved adapter's values into the matching adapter of a
model that is already sharded or wrapped.

This package may import the model-level API (``lora_ext.model`` and ``lora_ext.io`` import only
``_utils/wrappers.py`` and ``_utils/dtensors.py``).

Importing this module does not import ``torch.distributed``: it works, and ``is_wrapped`` is
False for every model, where ``torch.distributed.is_available()`` is False.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .._utils import dtensors
from .._utils.wrappers import is_wrapped, unwrap, wrapped_by
from ..io.adapter import adapter_state_dict, read_adapter
from ..model.core import adapter_configs
from .fsdp import reshard, shard_lora_model, transformer_blocks
from .training_state import _dist, _names, load_training_state, read_training_state, save_training_state, training_state

__all__ = [
    "unwrap",
    "is_wrapped",
    "wrapped_by",
    "broadcast_adapters",
    "training_state",
    "save_training_state",
    "read_training_state",
    "load_training_state",
    "shard_lora_model",
    "transformer_blocks",
    "reshard",
    "load_adapter_values",
]
# Also LoraColwiseParallel, LoraRowwiseParallel and reduce_replicated_grads (tensor_parallel.py, which imports
# torch.distributed.tensor): loaded on first use, so this module imports where torch.distributed is missing.
_TENSOR_PARALLEL = ("LoraColwiseParallel", "LoraRowwiseParallel", "reduce_replicated_grads")


def __getattr__(name: str):
    if name in _TENSOR_PARALLEL:
        from . import tensor_parallel

        return getattr(tensor_parallel, name)
    raise AttributeError(f"module 'lora_ext.distributed' has no attribute {name!r}")


def broadcast_adapters(model: nn.Module, src: int = 0, adapter_names=None) -> nn.Module:
    """Copy every (or each named) adapter's tensors from rank ``src`` to all ranks, in place:
    lora_A/lora_B, ``modules_to_save`` copies and the biases the config trains (``bias``).

    A collective: every rank of the initialized default process group calls it. Freshly initialised
    adapters differ between ranks whose seeds differ; FSDP2 does not broadcast parameters, and DDP
    broadcasts only when it is built. ``model`` may be wrapped (DDP, ...). The ranks first check that
    they hold the same tensors (names, shapes, dtypes): a mismatch raises the same ``ValueError`` on
    every rank instead of a hang or a silent mix-up."""
    where = "lora_ext.distributed.broadcast_adapters"
    dist = _dist()
    if dist is None:
        raise ValueError(
            f"{where}: expected an initialized process group (torch.distributed.init_process_group), got none"
        )
    model = unwrap(model)
    names = _names(model, adapter_names, where)
    tensors = [(f"{name}:{key}", t) for name in names for key, t in adapter_state_dict(model, name).items()]
    signature = "\n".join(f"{k} {tuple(t.shape)} {t.dtype}" for k, t in tensors)
    digest = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:7], "little")
    device = tensors[0][1].device if tensors and dist.get_backend() != "gloo" else torch.device("cpu")
    check = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if int(check[0]) != digest or int(check[1]) != -digest:
        raise ValueError(
            f"{where}: expected every rank to hold the same adapter tensors (names, shapes, dtypes), "
            f"got ranks that differ; this rank ({dist.get_rank()}) has {len(tensors)} tensors of "
            f"adapters {names}"
        )
    with torch.no_grad():
        for _, t in tensors:
            buf = t if t.is_contiguous() else t.contiguous()
            dist.broadcast(buf, src=src)
            if buf is not t:
                t.copy_(buf)
    return model


_COMPUTE_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "modules_to_save")


def load_adapter_values(
    model: nn.Module,
    path: str,
    adapter_name: str = "default",
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Copy the adapter saved in ``path`` into the model's existing adapter ``adapter_name``, on a plain,
    DDP, FSDP2 or tensor-parallel model (DTensor parameters: each rank keeps its own shard of the
    file's values; no communication). Every rank reads the file.

    Everything is checked before anything changes, and every problem is listed in one ``ValueError``:
    the file's keys must be exactly the adapter's keys, each shape the (global) shape, the config's
    fields that decide what the adapter computes (r, alpha, rsLoRA, rank/alpha patterns, bias,
    modules_to_save) equal, and the values finite (unless ``allow_nonfinite``). Values are cast to
    the parameters' dtypes. Use it to resume or reset an adapter after the model was wrapped or
    sharded, where ``lora_ext.load_adapter`` (which adds a new adapter) is refused."""
    where = "lora_ext.distributed.load_adapter_values"
    inner = unwrap(model)
    configs = adapter_configs(inner)
    if adapter_name not in configs:
        raise ValueError(
            f"{where}: expected the name of an adapter the model has ({list(configs)}), got {adapter_name!r}"
        )
    config, tensors = read_adapter(path, allow_pickle=allow_pickle)
    targets = adapter_state_dict(inner, adapter_name)
    problems = []
    have, want = configs[adapter_name].to_dict(), config.to_dict()
    differ = [f for f in _COMPUTE_FIELDS if have.get(f) != want.get(f)]
    if differ:
        problems.append(
            "the config differs in " + ", ".join(f"{f} (model {have.get(f)!r}, file {want.get(f)!r})" for f in differ)
        )
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing:
        problems.append(f"{len(missing)} of the adapter's tensors are not in the file: {missing[:5]}")
    if unexpected:
        problems.append(f"the file has {len(unexpected)} tensors the adapter lacks: {unexpected[:5]}")
    for key in sorted(set(targets) & set(tensors)):
        t, value = targets[key], tensors[key]
        if tuple(value.shape) != tuple(t.shape):
            problems.append(f"{key}: expected shape {tuple(t.shape)}, got {tuple(value.shape)}")
        elif not value.is_floating_point():
            problems.append(f"{key}: expected a floating-point tensor, got {value.dtype}")
        elif not allow_nonfinite and not torch.isfinite(value).all():
            problems.append(f"{key}: holds NaN/Inf values (allow_nonfinite=True loads them anyway)")
    if problems:
        raise ValueError(
            f"{where}: {path!r} does not fit adapter {adapter_name!r}; nothing was changed:\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for key, t in targets.items():
            value = tensors[key].to(t.dtype)
            if dtensors.is_dtensor(t):
                t.to_local().copy_(dtensors.distributed_like(t, value).to_local())
            else:
                t.copy_(value.to(t.device))
    return model
