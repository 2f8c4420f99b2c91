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
``ValueError`` (see ``wrappers.py``): adding adapters to a model DDP/FSDP/tensor parallel
already holds, and ``set_adapter`` / ``delete_adapter`` on a DDP model (DDP fixed its buckets).

Not here yet (issue 13's later parts): FSDP2 (``fully_shard``), tensor parallel, merging into
DTensor weights, collective save, a training-state checkpoint. They belong in this module, which
may import the model-level API (``model.py`` and ``adapter_io.py`` import only ``wrappers.py``).

Importing this module does not import ``torch.distributed``: it works, and ``is_wrapped`` is
False for every model, where ``torch.distributed.is_available()`` is False.
"""
from __future__ import annotations

from .wrappers import is_wrapped, unwrap, wrapped_by

__all__ = ["unwrap", "is_wrapped", "wrapped_by"]
