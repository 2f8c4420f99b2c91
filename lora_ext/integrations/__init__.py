"""lora_ext inside other libraries' models: ``peft`` (lora_ext's compiled layers as PEFT's LoRA backend:
``use_lora_ext``, ``to_peft``, ``from_peft``; ``lora_ext.use_lora_ext`` and friends load it on first use). Not
imported by ``import lora_ext``: ``lora_ext.integrations.peft`` imports PEFT."""
