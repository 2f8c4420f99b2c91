"""``ModulesToSave``: full trainable copies of whole modules per adapter (PEFT's ``modules_to_save``)."""

from __future__ import annotations

import copy

from torch import nn

from .._utils.names import check_adapter_name


class ModulesToSave(nn.Module):
    """Wraps ``original_module``; each adapter that lists the module in ``modules_to_save`` gets a
    trainable copy in ``modules_to_save.<adapter>`` (PEFT's in-memory names). Forward runs the
    copy of the first active adapter that has one, otherwise the original module."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def add_adapter(self, adapter_name: str) -> None:
        check_adapter_name(adapter_name, "ModulesToSave.add_adapter")
        if adapter_name in self.modules_to_save:
            raise ValueError(f"ModulesToSave: adapter {adapter_name!r} already exists")
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        for p in self.modules_to_save[adapter_name].parameters():
            p.requires_grad_(True)
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.modules_to_save

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def _current(self) -> nn.Module:
        if not self.disable_adapters:
            for n in self.active_adapters:
                return self.modules_to_save[n]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. .weight of a wrapped Linear head
            return getattr(self._current(), name)

    def unwrap(self, keep_adapter: bool) -> nn.Module:
        """The module to put back: the active adapter's copy (``keep_adapter``) or the original."""
        m = self._current() if keep_adapter else self.original_module
        for p in m.parameters():
            p.requires_grad_(False)
        return m


def find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Paths of the modules named (exactly, or as a ``.suffix`` of their path) in ``names``."""
    out: list[str] = []
    for path, _ in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in out):
            continue
        if any(path == n or path.endswith("." + n) for n in names):
            out.append(path)  # a plain module, or a wrapper from an earlier adapter
    return out
