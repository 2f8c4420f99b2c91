"""The model-level API (PEFT's ``LoraModel`` without the wrapper): inject adapters into an existing model and
manage them in place.

``core`` (inject / add / set / delete / merge / unload), ``targeting`` (which modules a config targets),
``registry`` (which LoRA layer wraps which base layer type), ``modules_to_save``, ``weighted``
(``add_weighted_adapter``), ``batch`` (``adapter_batch``: a different adapter per row) and ``hf_save``
(transformers' ``save_pretrained`` on an injected model refuses what ``from_pretrained`` would load wrong).
"""

from .batch import adapter_batch
from .core import (
    active_adapters,
    adapter_configs,
    add_adapter,
    delete_adapter,
    disable_adapters,
    inject_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from .weighted import add_weighted_adapter

__all__ = [
    "inject_adapter",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "trainable_parameters",
    "lora_layers",
    "adapter_configs",
    "active_adapters",
    "add_weighted_adapter",
    "adapter_batch",
]
