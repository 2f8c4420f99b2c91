"""transformers' ``save_pretrained`` on a model with lora_ext layers: refused when it would write a folder that
``from_pretrained`` loads wrong.

transformers saves ``model.state_dict()``, where a LoRA layer's wrapped weight is ``...q_proj.base_layer.weight``.
``from_pretrained`` of that folder finds ``...q_proj.weight`` missing and initialises it randomly; only its load
report says so. So ``inject_adapter`` gives a transformers model an instance ``save_pretrained`` that refuses
and says what to do instead. With ``state_dict=`` given (``Trainer``'s checkpoints), it saves as transformers
does: ``resume_from_checkpoint`` loads that state dict back into the same injected model. ``merge_and_unload``
and ``unload`` remove it.
"""

from __future__ import annotations

import types

from torch import nn

_MARK = "_lora_ext_save_guard"


def save_pretrained(self, save_directory, *args, **kwargs):  # named as the method: a pickled model unpickles
    if kwargs.get("state_dict") is None:
        raise ValueError(
            "lora_ext: model.save_pretrained() would write the LoRA layers' '...base_layer.weight' keys, which "
            "from_pretrained() does not load (those weights would come back randomly initialised). Save the "
            "adapter with lora_ext.save_adapter(model, path) (PEFT's format: PeftModel.from_pretrained and "
            "lora_ext.load_adapter read it), the merged model with lora_ext.merge_and_unload(model)"
            ".save_pretrained(path), or train through PEFT with lora_ext.integrations.peft.to_peft(model)"
        )
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def guard(model: nn.Module) -> None:
    """Install the refusing ``save_pretrained`` on a transformers model (``PreTrainedModel``: has a config)."""
    if (
        callable(getattr(type(model), "save_pretrained", None))
        and hasattr(model, "config")
        and _MARK not in model.__dict__
    ):
        object.__setattr__(model, "save_pretrained", types.MethodType(save_pretrained, model))
        object.__setattr__(model, _MARK, True)


def unguard(model: nn.Module) -> None:
    """Give the model transformers' own ``save_pretrained`` back (its LoRA layers are gone)."""
    if model.__dict__.pop(_MARK, None):
        model.__dict__.pop("save_pretrained", None)
