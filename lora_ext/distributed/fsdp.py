"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models with LoRA adapters.

:func:`shard_lora_model` shards a model the way torchtune's LoRA recipe does: ``fully_shard``
on every transformer block, then on the root (the embeddings, final norm and head, and whatever
no block holds). Each block is one communication group: its parameters are all-gathered before
its forward and backward, and the gradients of its trainable parameters (the adapters) are
reduce-scattered after its backward. Frozen parameters get no gradient, so a step reduce-scatters
only the adapters' bytes (padded to a multiple of the world size per parameter).

Adapters are injected, added or loaded **before** sharding (``fully_shard`` fixes the parameters
it manages); ranks whose adapters were initialised with different seeds call
``lora_ext.distributed.broadcast_adapters`` first (FSDP2 keeps each rank's own shard of what the
rank holds). After sharding, ``lora_ext.save_adapter`` is collective and writes the same file as
one process; ``lora_ext.merge`` merges into the sharded weights (``lora_ext/_utils/dtensors.py``).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from torch import nn

from .._utils import dtensors
from .._utils.wrappers import reshard_fsdp, wrapped_by

__all__ = ["shard_lora_model", "transformer_blocks", "reshard"]

# A transformer block: the i-th module of a ModuleList named like the block lists of LLaMA/Mistral/Qwen
# (model.layers.<i>), GPT-2 (transformer.h.<i>), BERT (encoder.layer.<i>) and T5 (encoder.block.<i>).
_BLOCK_PATH = re.compile(r"(?:^|\.)(?:layers|h|layer|block|blocks)\.\d+$")


def transformer_blocks(model: nn.Module, block_types: Optional[Iterable[type]] = None) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the outermost blocks of ``model``: instances of ``block_types`` when
    given, else the elements of a ``ModuleList`` whose path ends in ``layers.<i>``, ``h.<i>``,
    ``layer.<i>``, ``block.<i>`` or ``blocks.<i>``. A block inside another block is not listed."""
    types = tuple(block_types) if block_types is not None else None
    if types is not None and (not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types)):
        raise ValueError(f"transformer_blocks: expected block_types as nn.Module subclasses, got {block_types!r}")
    lists = {path for path, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    found: list[tuple[str, nn.Module]] = []
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p, _ in found):
            continue  # inside a block already listed
        if types is not None:
            hit = isinstance(m, types)
        else:
            hit = bool(_BLOCK_PATH.search(path)) and path.rsplit(".", 1)[0] in lists
        if hit:
            found.append((path, m))
    return found


def _group_dtype_problems(groups: list[tuple[str, nn.Module]], root: nn.Module) -> list[str]:
    """FSDP2 reduce-scatters one flat buffer per group: its trainable parameters must share a dtype."""
    in_block = {id(p) for _, m in groups for p in m.parameters()}
    problems = []
    for path, params in [(p or "<root>", list(m.named_parameters())) for p, m in groups] + [
        ("<root>", [(n, p) for n, p in root.named_parameters() if id(p) not in in_block])
    ]:
        by_dtype: dict = {}
        for name, p in params:
            if p.requires_grad:
                by_dtype.setdefault(p.dtype, []).append(name)
        if len(by_dtype) > 1:
            listed = "; ".join(
                f"{str(d).replace('torch.', '')}: {names[:3]}{' ...' if len(names) > 3 else ''}"
                for d, names in by_dtype.items()
            )
            problems.append(f"group {path!r} trains parameters of {len(by_dtype)} dtypes ({listed})")
    return problems


def shard_lora_model(
    model: nn.Module, *, mesh=None, block_types: Optional[Iterable[type]] = None, **fully_shard_kwargs
) -> nn.Module:
    """``fully_shard`` every transformer block of ``model`` (:func:`transformer_blocks`), then the
    root; returns ``model`` (now an FSDP2 module, sharded in place).

    ``mesh``: the ``DeviceMesh`` to shard over (default: FSDP2's, the whole default process group);
    further keyword arguments go to every ``fully_shard`` call (``reshard_after_forward``,
    ``mp_policy``, ``offload_policy``, ...). Raises ``ValueError`` when the model is already held by
    DDP or FSDP, or when a group would train parameters of several dtypes (FSDP2 asserts on that;
    keep the adapters in one dtype, e.g. float32 on a bfloat16 base with bfloat16 ``modules_to_save``
    cast to float32).

    With ``reshard_after_forward=False``, a forward leaves FSDP2's gathered copies registered as the
    modules' parameters, so ``model.parameters()`` then returns those copies: an optimizer built from
    them never sees the gradients (which go to the shards) and trains nothing. Build the optimizer
    right after sharding, or call :func:`reshard` first."""
    where = "lora_ext.distributed.shard_lora_model"
    held = [w for w in wrapped_by(model) if not w.startswith("DTensor")]  # tensor parallel first is fine
    if held:
        raise ValueError(f"{where}: expected a model that no DDP or FSDP holds yet, got one with {', '.join(held)}")
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model, block_types)
    if block_types is not None and not blocks:
        raise ValueError(
            f"{where}: expected modules of block_types {[t.__name__ for t in block_types]} in the model, got none"
        )
    problems = _group_dtype_problems(blocks, model)
    if problems:
        raise ValueError(
            f"{where}: expected the trainable parameters of each FSDP group to share one dtype, got "
            + "; ".join(problems)
        )
    dtensors.register_strategies()  # merging into the sharded weights
    for _, block in blocks:
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def reshard(model: nn.Module) -> nn.Module:
    """Register the sharded parameters of every FSDP2 module in ``model`` again (``FSDPModule.reshard()``),
    freeing gathered copies; returns ``model``. ``lora_ext.merge`` / ``unmerge`` / ``save_adapter`` do
    this themselves; call it before building an optimizer from ``model.parameters()`` after a forward
    with ``reshard_after_forward=False``."""
    reshard_fsdp(model)
    return model
