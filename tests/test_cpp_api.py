"""Builds tests/cpp (a libtorch-only program) against the installed lora_ext and runs it:
the ops work through the public C++ header with no Python in the process."""

import os
import pathlib
import shutil
import subprocess

import torch

import lora_ext

HERE = pathlib.Path(__file__).parent


def test_cpp_program_uses_ops_without_python(tmp_path_factory):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the C++ test"
    # the compiled files' folder (site-packages/lora_ext, also for editable installs)
    pkg = pathlib.Path(lora_ext._C.__file__).parent
    assert (pkg / "include" / "lora_ext" / "lora_ext.h").is_file()
    assert (pkg / "lib" / "liblora_ext.so").is_file()
    assert (pathlib.Path(lora_ext.cmake_prefix_path) / "LoraExt" / "LoraExtConfig.cmake").is_file()
    build = tmp_path_factory.mktemp("cpp_build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        [
            cmake,
            "-S",
            str(HERE / "cpp"),
            "-B",
            str(build),
            *gen,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{lora_ext.cmake_prefix_path}",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    r = subprocess.run([cmake, "--build", str(build), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    exe = build / "test_ops"
    # the library is linked (its op registrations kept) and found through the package's rpath
    assert "liblora_ext.so" in subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ALL OK" in out.stdout, out.stdout + out.stderr
    # no Python in the process: the binary does not link libpython / torch_python
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "libpython" not in ldd and "torch_python" not in ldd, ldd


def test_core_library_does_not_link_python():
    lib = pathlib.Path(lora_ext._C.__file__).parent / "lib" / "liblora_ext.so"
    ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
    assert "libtorch_cpu" in ldd or "libtorch.so" in ldd, ldd
    assert "libpython" not in ldd and "torch_python" not in ldd, ldd
