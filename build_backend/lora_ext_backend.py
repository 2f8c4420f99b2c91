"""In-tree PEP 517 build backend: scikit-build-core plus two things that depend on the installed torch.

1. The persistent build directory is one per torch installation:
   ``build/torch-<version>-<cpu|cuXY|rocmX.Y>-<hash of torch's folder>/<wheel tag>`` (scikit-build-core's own
   placeholders cannot say which torch is installed). A build tree caches torch's paths, the CUDA toolchain
   and objects compiled against torch's headers, so switching torch (say the CPU 2.13.0 for the CUDA 2.14.1,
   in the same environment or another) and rebuilding uses, or makes, the tree for that torch, and switching
   back is incremental again. A build-dir given explicitly (``-C build-dir=...`` or ``SKBUILD_BUILD_DIR``) is used
   as is; CMakeLists.txt refuses a tree that was configured for another torch.
2. ``dependencies`` (pyproject: ``[tool.scikit-build.metadata.dependencies]``) pins the wheel to the torch
   it is compiled against, ``torch==<version>``, as compiled torch extensions publish theirs; the sdist,
   which is compiled later against whatever torch is installed then, keeps ``torch>=<minimum>``.

Torch is found without importing it (its version.py is read), so this costs nothing per build.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import re
from typing import Any, Mapping, Optional

from scikit_build_core import build as _skbuild
from scikit_build_core.build import (  # noqa: F401  (the PEP 517 hooks used unchanged)
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

_building_sdist = False


def installed_torch() -> Optional[dict]:
    """{"version", "cuda", "hip"} of the torch importable here (read from torch/version.py), or None."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    info = {"location": os.path.realpath(os.path.dirname(path))}
    for key, name in (("version", "__version__"), ("cuda", "cuda"), ("hip", "hip")):
        m = re.search(rf"^{name}\b[^=\n]*=\s*(.+)$", text, re.M)
        try:
            info[key] = ast.literal_eval(m.group(1).strip()) if m else None
        except (ValueError, SyntaxError):
            info[key] = None
    return info if info["version"] else None


def torch_build_key(torch: Optional[dict] = None) -> Optional[str]:
    """'torch-2.13.0-cpu-<h>', 'torch-2.14.1-cu130-<h>', 'torch-2.9.0-rocm6.4-<h>', or None without torch;
    <h> identifies the torch installation (its folder), since the tree caches paths into it."""
    torch = installed_torch() if torch is None else torch
    if not torch:
        return None
    if torch.get("hip"):
        flavour = "rocm" + str(torch["hip"]).split("-")[0]
    elif torch.get("cuda"):
        flavour = "cu" + str(torch["cuda"]).replace(".", "")
    else:
        flavour = "cpu"
    where = hashlib.sha1(str(torch.get("location", "")).encode()).hexdigest()[:8]
    return f"torch-{torch['version'].split('+')[0]}-{flavour}-{where}"


def _with_torch_build_dir(config_settings: Optional[Mapping[str, Any]]) -> dict:
    settings = dict(config_settings or {})
    if {"build-dir", "skbuild.build-dir"} & settings.keys() or os.environ.get("SKBUILD_BUILD_DIR"):
        return settings
    key = torch_build_key()
    if key:
        settings["build-dir"] = f"build/{key}/{{wheel_tag}}"
    return settings


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _skbuild.build_wheel(wheel_directory, _with_torch_build_dir(config_settings), metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _skbuild.build_editable(wheel_directory, _with_torch_build_dir(config_settings), metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    global _building_sdist
    _building_sdist = True
    try:
        return _skbuild.build_sdist(sdist_directory, config_settings)
    finally:
        _building_sdist = False


def dynamic_metadata(field: str, settings: Optional[Mapping[str, Any]] = None) -> list:
    """scikit-build-core metadata provider for ``dependencies``: ``settings["torch"]`` (the minimum, e.g.
    ``torch>=2.13``) becomes ``torch==<installed version>`` in a wheel, then ``settings["requires"]``."""
    if field != "dependencies":
        raise ValueError(f"lora_ext_backend provides only 'dependencies', not {field!r}")
    settings = dict(settings or {})
    torch_req = str(settings.get("torch", "torch"))
    torch = None if _building_sdist else installed_torch()
    if torch:
        torch_req = f"torch=={torch['version'].split('+')[0]}"
    return [torch_req, *settings.get("requires", [])]
