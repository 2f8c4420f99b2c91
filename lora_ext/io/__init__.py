"""Adapter files: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` (``adapter``), written crash-safe
(``atomic``: unique temporary, fsync, rename, fsync of the folder)."""

from .adapter import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter, read_adapter, save_adapter

__all__ = ["save_adapter", "load_adapter", "read_adapter", "adapter_state_dict", "CONFIG_NAME", "WEIGHTS_NAME"]
