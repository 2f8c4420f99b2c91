"""The package layout is a contract (docs/architecture.md): the public surface is what ``lora_ext`` exports, the
subpackages import each other in one direction only, and the flat layout's old module paths still import (with a
DeprecationWarning) and give the same objects."""

import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

import lora_ext
from lora_ext import _compat

PKG = pathlib.Path(lora_ext.__file__).parent

# Lower layers never import higher ones (same-layer imports are allowed inside a subpackage only).
LAYERS = [
    {"_build_info", "_C"},
    {"_torch_check", "_compat"},
    {"_utils", "config", "ops"},
    {"layers"},
    {"quant"},
    {"model"},
    {"io"},
    {"distributed"},
    {"export", "integrations"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module_path: pathlib.Path) -> str:
    rel = module_path.relative_to(PKG).parts
    return rel[0].removesuffix(".py")


def _imports(path: pathlib.Path):
    """(top-level lora_ext part imported, line) for every import of lora_ext code in ``path``."""
    tree = ast.parse(path.read_text())
    pkg_parts = list(path.relative_to(PKG).parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                if parts:
                    yield parts[0], node.lineno
                else:  # from . import a, b (at the package root)
                    for alias in node.names:
                        yield alias.name, node.lineno
            elif node.module and node.module.split(".")[0] == "lora_ext":
                parts = node.module.split(".")[1:]
                yield (parts[0] if parts else node.names[0].name), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lora_ext" and len(parts) > 1:
                    yield parts[1], node.lineno


def test_subpackages_import_downwards_only():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path.parent == PKG and path.name == "__init__.py":
            continue  # the package root assembles the public API
        me = _top(path)
        for other, line in _imports(path):
            if other == me:
                continue
            assert other in RANK, f"{path.relative_to(PKG)}:{line} imports lora_ext.{other}, not in the layer map"
            if RANK[other] >= RANK[me]:
                bad.append(f"{path.relative_to(PKG)}:{line} ({me}) imports {other}")
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)


def test_every_public_name_resolves():
    for name in lora_ext.__all__:
        assert getattr(lora_ext, name) is not None, name
    for sub in ("model", "layers", "io", "quant", "distributed", "export"):
        mod = getattr(lora_ext, sub)
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"lora_ext.{sub}.{name}"


def test_the_same_object_under_the_top_level_and_its_subpackage():
    assert lora_ext.LoraLinear is lora_ext.layers.LoraLinear is lora_ext.layers.linear.LoraLinear
    assert lora_ext.inject_adapter is lora_ext.model.inject_adapter
    assert lora_ext.load_gguf_llama is lora_ext.quant.load_gguf_llama
    assert lora_ext.save_adapter is lora_ext.io.save_adapter


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_old_module_paths_import_with_a_deprecation_warning(old):
    new = importlib.import_module(f"lora_ext.{_compat.MOVED[old]}")
    sys.modules.pop(f"lora_ext.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(f"lora_ext.{old}")
    msgs = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(f"lora_ext.{old} moved to lora_ext.{_compat.MOVED[old]}" in m for m in msgs), msgs
    public = [n for n in vars(new) if not n.startswith("_")]
    assert public
    for name in public:
        assert getattr(mod, name) is getattr(new, name), name


def test_an_unknown_old_path_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lora_ext.no_such_module")


def test_import_lora_ext_does_not_import_peft_or_torch_distributed_tensor():
    code = (
        "import sys, lora_ext; bad = [m for m in ('peft', 'transformers', 'torch.distributed.tensor', 'gguf') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


REPO = pathlib.Path(__file__).resolve().parents[1]


def test_no_file_edits_sys_path():
    """What tests, benchmarks and examples share lives in dev/lora_ext_dev (installed by scripts/run.sh)."""
    pattern = "sys" + ".path."
    hits = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith((".venv", "build")) or "site-packages" in rel.parts:
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern + "insert" in line or pattern + "append" in line or pattern + "extend" in line:
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)
