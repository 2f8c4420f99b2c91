"""lora_ext: compiled LoRA ops and modules for PyTorch.

Importing this package loads the compiled library, which registers the
``torch.ops.lora_ext.*`` operators (CPU, Meta and autograd kernels in C++).
"""
import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only hit with a broken/missing build
    raise ImportError(
        "lora_ext: the compiled module lora_ext._C could not be loaded. Build and install the package "
        "against the installed torch with `pip install --no-build-isolation .`; if you run Python from the "
        "repository root, the source folder lora_ext/ shadows the installed package (use `python -P`, or "
        f"run from another directory). Original error: {e}"
    ) from e

from . import ops
from .linear import LoraLinear

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How the compiled library was built (version, torch version, CUDA, compiler, flags)."""
    return _C.build_info()


__all__ = ["LoraLinear", "ops", "build_info", "__version__"]
