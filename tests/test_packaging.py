"""Packaging checks fast enough for the test suite: the import guard (the torch lora_ext was built against vs the
running one) with faked build information, and the build backend's torch-derived pieces (build directory key,
the wheel's torch pin). scripts/packaging_check.sh does the slow ones (sdist install in a fresh venv, wheel
metadata and twine, a wheel built for torch 2.13.0 imported under 2.14.1)."""

import importlib.machinery
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import lora_ext
from lora_ext import _torch_check

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = pathlib.Path(lora_ext.__file__).resolve().parent


def _running():
    return {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "torch_cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def _build(**changes):
    info = {"version": "0.1.0", **_running(), "with_cuda": False, "source_dir": str(ROOT)}
    info.update(changes)
    return info


def test_installed_build_info_matches_the_compiled_module_and_the_running_torch():
    from lora_ext import _build_info

    compiled = lora_ext.build_info()
    assert _build_info.torch_version == compiled["torch_version"] == torch.__version__
    assert _build_info.with_cuda == compiled["with_cuda"]
    assert _build_info.torch_cuda == torch.version.cuda
    assert _build_info.version == lora_ext.__version__
    assert _torch_check.mismatch_message(vars(_build_info)) is None
    _torch_check.check_torch()  # what `import lora_ext` ran


def test_same_torch_passes():
    assert _torch_check.mismatch_message(_build()) is None
    # another local label of the same version and flavour, another CUDA minor version: still loadable
    assert (
        _torch_check.mismatch_message(
            _build(torch_version="2.14.1", torch_cuda="13.0"),
            {"torch_version": "2.14.1+cu130", "torch_cuda": "13.1", "torch_hip": None, "torch_cxx11_abi": True},
        )
        is None
    )


def test_other_version_raises_naming_both_and_the_rebuild_command():
    build = _build(torch_version="2.13.0+cpu", torch_cuda=None)
    running = {"torch_version": "2.14.1+cu130", "torch_cuda": "13.0", "torch_hip": None, "torch_cxx11_abi": True}
    msg = _torch_check.mismatch_message(build, running)
    assert "built against torch 2.13.0+cpu (CPU)" in msg
    assert "imported with torch 2.14.1+cu130 (CUDA 13.0)" in msg
    assert "different version, CPU/CUDA flavour" in msg
    cmd = msg.splitlines()[-1].strip()
    assert cmd == f"{sys.executable} -m pip install --no-build-isolation --no-deps --force-reinstall {ROOT}"
    with pytest.raises(ImportError, match=r"built against torch 2\.0\.0\+cpu .* imported with torch "):
        _torch_check.check_torch(_build(torch_version="2.0.0+cpu"))  # against the running torch


@pytest.mark.parametrize(
    "built_cuda, running_cuda, flagged",
    [(None, "13.0", True), ("13.0", None, True), ("12.8", "13.0", True), ("13.0", "13.2", False), (None, None, False)],
)
def test_flavour(built_cuda, running_cuda, flagged):
    running = {"torch_version": "2.14.1", "torch_cuda": running_cuda, "torch_hip": None, "torch_cxx11_abi": True}
    msg = _torch_check.mismatch_message(_build(torch_version="2.14.1", torch_cuda=built_cuda), running)
    assert (msg is not None) == flagged
    if flagged:
        assert "different CPU/CUDA flavour" in msg


def test_cxx11_abi():
    running = dict(_running(), torch_cxx11_abi=True)
    msg = _torch_check.mismatch_message(_build(torch_cxx11_abi=False), running)
    assert "different C++ ABI" in msg and "pre-C++11 ABI" in msg


def test_rebuild_command_without_the_source_folder():
    cmd = _torch_check.rebuild_command(_build(source_dir="/nonexistent/tmp/pip-req-build-x"))
    assert cmd.endswith("--force-reinstall <lora_ext source folder or lora_ext-0.1.0.tar.gz>")


def test_import_raises_before_loading_the_compiled_module(tmp_path):
    """`import lora_ext` of an installed copy whose recorded torch is another one: the guard's ImportError, raised
    before lora_ext._C is loaded (here a file that is not a shared library at all)."""
    fake = tmp_path / "lora_ext"
    fake.mkdir()
    for entry in PKG.iterdir():
        if entry.name == "_build_info.py" or entry.name.startswith("_C.") or entry.name == "__pycache__":
            continue
        (fake / entry.name).symlink_to(entry)
    (fake / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared library")
    text = (PKG / "_build_info.py").read_text()
    text = text.replace(f'torch_version = "{torch.__version__}"', 'torch_version = "2.0.0+cpu"')
    assert "2.0.0+cpu" in text
    (fake / "_build_info.py").write_text(text)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-P", "-c", "import lora_ext"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()
    assert any(line.startswith("ImportError: lora_ext 0.1.0 was built against torch 2.0.0+cpu") for line in last), (
        r.stderr
    )
    assert "not a shared library" not in r.stderr and "invalid ELF" not in r.stderr
    assert f"imported with torch {torch.__version__}" in r.stderr
    assert "--no-build-isolation --no-deps --force-reinstall" in r.stderr


def _backend():
    pytest.importorskip("scikit_build_core")
    spec = importlib.util.spec_from_file_location(
        "lora_ext_backend_under_test", ROOT / "build_backend" / "lora_ext_backend.py"
    )
    if spec is None or not os.path.exists(spec.origin):
        pytest.skip("build_backend/ is not next to tests/")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_backend_build_dir_key_is_per_torch():
    b = _backend()
    here = b.installed_torch()
    assert here["version"] == torch.__version__ and here["cuda"] == torch.version.cuda
    cpu = b.torch_build_key({"version": "2.13.0+cpu", "cuda": None, "hip": None, "location": "/a/torch"})
    cuda = b.torch_build_key({"version": "2.14.1+cu130", "cuda": "13.0", "hip": None, "location": "/a/torch"})
    other_env = b.torch_build_key({"version": "2.13.0+cpu", "cuda": None, "hip": None, "location": "/b/torch"})
    assert cpu.startswith("torch-2.13.0-cpu-") and cuda.startswith("torch-2.14.1-cu130-")
    assert len({cpu, cuda, other_env}) == 3
    s = b._with_torch_build_dir({})
    assert s["build-dir"] == f"build/{b.torch_build_key()}/{{wheel_tag}}"
    assert b._with_torch_build_dir({"build-dir": "build/mine"}) == {"build-dir": "build/mine"}


def test_backend_pins_torch_in_wheels_not_in_the_sdist():
    b = _backend()
    settings = {"torch": "torch>=2.13", "requires": ["safetensors>=0.4"]}
    public = torch.__version__.split("+")[0]
    assert b.dynamic_metadata("dependencies", settings) == [f"torch=={public}", "safetensors>=0.4"]
    b._building_sdist = True
    try:
        assert b.dynamic_metadata("dependencies", settings) == ["torch>=2.13", "safetensors>=0.4"]
    finally:
        b._building_sdist = False
