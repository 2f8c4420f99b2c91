"""The module paths of lora_ext <= 0.x's flat layout (``lora_ext.gguf_model``, ``lora_ext.peft_backend``, ...):
importing one still works, gives a DeprecationWarning naming the new place, and forwards every attribute to it.

Only ``lora_ext`` and its subpackages' ``__init__`` exports are the stable surface (docs/architecture.md); these
aliases go away in a later release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module (under lora_ext.) -> where its contents live now
MOVED = {
    "adapter_io": "io.adapter",
    "atomic": "io.atomic",
    "aoti": "export.aoti",
    "batch": "model.batch",
    "multi": "layers.per_row",
    "conv": "layers.conv",
    "embedding": "layers.embedding",
    "gpt2_conv1d": "layers.gpt2_conv1d",
    "linear": "layers.linear",
    "layer": "layers.base",
    "saved_inputs": "layers.saved_inputs",
    "registry": "model.registry",
    "modules_to_save": "model.modules_to_save",
    "targeting": "model.targeting",
    "weighted": "model.weighted",
    "fsdp": "distributed.fsdp",
    "tensor_parallel": "distributed.tensor_parallel",
    "training_state": "distributed.training_state",
    "dtensors": "_utils.dtensors",
    "wrappers": "_utils.wrappers",
    "names": "_utils.names",
    "gguf_model": "quant.gguf",
    "quant_linear": "quant.layers",
    "lora_quant_linear": "quant.lora_layer",
    "hf_save": "model.hf_save",
    "peft_backend": "integrations.peft",
}


class _MovedModule(types.ModuleType):
    """Stands in for an old module path; every attribute comes from the module's new place."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # what the import system asks of a module object
            raise AttributeError(name)
        return getattr(importlib.import_module(self.__dict__["_lora_ext_target"]), name)

    def __dir__(self):
        return dir(importlib.import_module(self.__dict__["_lora_ext_target"]))


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        pkg, _, leaf = fullname.rpartition(".")
        if pkg == "lora_ext" and leaf in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = _MovedModule(spec.name)
        module.__dict__["_lora_ext_target"] = f"lora_ext.{MOVED[spec.name.rpartition('.')[2]]}"
        return module

    def exec_module(self, module):
        target = module.__dict__["_lora_ext_target"]
        warnings.warn(
            f"{module.__name__} moved to {target} (public names: import them from lora_ext); the old "
            f"path will be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        importlib.import_module(target)


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
