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

from . import distributed, ops
from .adapter_io import load_adapter, read_adapter, save_adapter
from .config import LoraConfig
from .layer import LoraLayer
from .batch import adapter_batch
from .multi import AdapterBatch
from .names import BASE
from .linear import LoraLinear
from .lora_quant_linear import LoraQuantLinear
from .quant_linear import QuantEmbedding, QuantLinear, quantize_linear_layers
from . import aoti, quant
from .weighted import add_weighted_adapter
from .saved_inputs import compress_saved_inputs
from .model import (
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

__version__ = _C.build_info()["version"]

import os as _os

#: The folder to add to CMAKE_PREFIX_PATH for ``find_package(LoraExt)`` (like torch.utils.cmake_prefix_path).
cmake_prefix_path: str = _os.path.join(_os.path.dirname(_C.__file__), "share", "cmake")


def build_info() -> dict:
    """How the compiled library was built (version, torch version, CUDA, compiler, flags)."""
    return _C.build_info()


__all__ = [
    "cmake_prefix_path", "LoraConfig", "LoraLayer", "LoraLinear", "ops", "distributed", "build_info", "__version__",
    "inject_adapter", "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "merge", "unmerge",
    "merge_and_unload", "unload", "trainable_parameters", "lora_layers",
    "save_adapter", "load_adapter", "read_adapter", "add_weighted_adapter", "adapter_batch", "AdapterBatch", "BASE",
    "compress_saved_inputs", "aoti", "quant", "QuantLinear", "QuantEmbedding", "LoraQuantLinear", "quantize_linear_layers",
]
