"""Import guard: is the running torch the one this copy of lora_ext was compiled against?

A compiled torch extension only works with the torch it was built against (same version, same CPU/CUDA/ROCm
flavour, same C++ ABI): with another one, loading ``lora_ext._C`` fails with an undefined symbol, or worse, loads
and misbehaves. CMake records the build's torch in ``lora_ext/_build_info.py`` (from cmake/_build_info.py.in);
``lora_ext/__init__.py`` calls :func:`check_torch` before it imports ``_C`` and so turns a mismatch into an
ImportError naming both torches and the command that rebuilds (as torchvision checks its CUDA version).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Optional

__all__ = ["check_torch", "mismatch_message"]


def _flavour(cuda: Optional[str], hip: Optional[str]) -> str:
    if hip:
        return f"ROCm {hip}"
    if cuda:
        return f"CUDA {cuda}"
    return "CPU"


def _public(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0' (the flavour is compared on its own)."""
    return version.split("+", 1)[0]


def _running_torch() -> dict:
    import torch

    return {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "torch_cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def rebuild_command(build: Mapping[str, Any]) -> str:
    """The one command that rebuilds lora_ext against the running torch, in the running Python."""
    src = build.get("source_dir") or ""
    if not (src and os.path.isfile(os.path.join(src, "pyproject.toml"))):
        # built from an sdist in a temporary folder that is gone now
        src = f"<lora_ext source folder or lora_ext-{build.get('version', '<version>')}.tar.gz>"
    # --no-deps: pip must not touch torch; --no-build-isolation: compile against the installed torch.
    return f"{sys.executable} -m pip install --no-build-isolation --no-deps --force-reinstall {src}"


def mismatch_message(build: Mapping[str, Any], running: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """None if ``running`` (default: the imported torch) is the torch ``build`` was compiled against, else the
    message of the ImportError."""
    if running is None:
        running = _running_torch()
    problems = []
    if _public(build["torch_version"]) != _public(running["torch_version"]):
        problems.append("version")
    b_flav = _flavour(build.get("torch_cuda"), build.get("torch_hip"))
    r_flav = _flavour(running.get("torch_cuda"), running.get("torch_hip"))
    # Within one CUDA major version torch's CUDA builds are interchangeable for an extension (torchvision's rule).
    if b_flav.split(".")[0] != r_flav.split(".")[0]:
        problems.append("CPU/CUDA flavour")
    b_abi, r_abi = build.get("torch_cxx11_abi"), running.get("torch_cxx11_abi")
    if b_abi is not None and r_abi is not None and bool(b_abi) != bool(r_abi):
        problems.append("C++ ABI")
    if not problems:
        return None

    def describe(info: Mapping[str, Any], flav: str) -> str:
        abi = ""
        if "C++ ABI" in problems:
            abi = ", C++11 ABI" if info.get("torch_cxx11_abi") else ", pre-C++11 ABI"
        return f"torch {info['torch_version']} ({flav}{abi})"

    return (
        f"lora_ext {build.get('version', '')} was built against {describe(build, b_flav)} but is imported with "
        f"{describe(running, r_flav)} (different {', '.join(problems)}); a compiled extension only loads with the "
        f"torch it was built against. Rebuild lora_ext for this torch:\n    {rebuild_command(build)}"
    )


def check_torch(build: Optional[Mapping[str, Any]] = None) -> None:
    """Raise ImportError if the running torch is not the one lora_ext was built against.

    ``build`` defaults to the installed ``lora_ext/_build_info.py``. Without that file (running from the source
    folder, or no build installed) this returns and the import of ``lora_ext._C`` reports what to do.
    """
    if build is None:
        try:
            from . import _build_info
        except ImportError:
            return
        build = {k: v for k, v in vars(_build_info).items() if not k.startswith("_")}
    msg = mismatch_message(build)
    if msg:
        raise ImportError(msg)
