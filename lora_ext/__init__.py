"""lora_ext: compiled LoRA ops and modules for PyTorch.

Importing this package loads the compiled library, which registers the
``torch.ops.lora_ext.*`` operators (CPU, Meta and autograd kernels in C++).
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from ._torch_check import check_torch as _check_torch

# Before _C: a lora_ext built against another torch can fail to load with an undefined symbol.
_check_torch()

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only hit with a broken/missing build
    raise ImportError(
        "lora_ext: the compiled module lora_ext._C could not be loaded. Build and install the package "
        "against the installed torch with `pip install --no-build-isolation .`; if you run Python from the "
        "repository root, the source folder lora_ext/ shadows the installed package (use `python -P`, or "
        f"run from another directory). Original error: {e}"
    ) from e

from . import _compat, distributed, export, io, layers, model, ops, quant
from ._utils.names import BASE
from .config import LoraConfig
from .io import load_adapter, read_adapter, save_adapter
from .layers import AdapterBatch, LoraConv, LoraEmbedding, LoraGPT2Conv1D, LoraLayer, LoraLinear
from .layers.saved_inputs import compress_saved_inputs
from .model import (
    adapter_batch,
    add_adapter,
    add_weighted_adapter,
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
from .quant import LoraQuantLinear, QuantEmbedding, QuantLinear, load_gguf_llama, quantize_linear_layers

_compat.install()  # the flat layout's module paths (lora_ext.quant.gguf, ...) still import, with a warning

# lora_ext.integrations.peft imports PEFT: loaded on first use of one of its names.
_PEFT_NAMES = ("use_lora_ext", "to_peft", "from_peft")


def __getattr__(name: str):
    if name in _PEFT_NAMES:
        from .integrations import peft

        return getattr(peft, name)
    raise AttributeError(f"module 'lora_ext' has no attribute {name!r}")


__version__ = _C.build_info()["version"]

import os as _os

#: The folder to add to CMAKE_PREFIX_PATH for ``find_package(LoraExt)`` (like torch.utils.cmake_prefix_path).
cmake_prefix_path: str = _os.path.join(_os.path.dirname(_C.__file__), "share", "cmake")


def build_info() -> dict:
    """How the compiled library was built (version, torch version, CUDA, compiler, flags)."""
    return _C.build_info()


__all__ = [
    # layers and config
    "LoraConfig",
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "LoraGPT2Conv1D",
    "BASE",
    # the model-level API
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
    "add_weighted_adapter",
    # adapter files
    "save_adapter",
    "load_adapter",
    "read_adapter",
    # several adapters in one batch; training memory
    "adapter_batch",
    "AdapterBatch",
    "compress_saved_inputs",
    # a quantized base
    "QuantLinear",
    "QuantEmbedding",
    "LoraQuantLinear",
    "quantize_linear_layers",
    "load_gguf_llama",
    # PEFT backend (imports PEFT on first use)
    "use_lora_ext",
    "to_peft",
    "from_peft",
    # subpackages and the compiled library
    "ops",
    "model",
    "layers",
    "io",
    "quant",
    "distributed",
    "export",
    "build_info",
    "cmake_prefix_path",
    "__version__",
]
