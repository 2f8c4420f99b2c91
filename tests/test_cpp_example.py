"""examples/cpp as a new user runs it: make_example.py writes a TorchScript model, an adapter
trained with lora_ext, one trained with PEFT, and Python's outputs; the C++ program lora_infer is
built against the installed package and run with no Python in its process; its outputs (merged,
unmerged through lora_ext::nn::LoraLinear, after unmerge) must match Python's within fp32 tolerance."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora_ext

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "cpp"
ADAPTERS = ("lora_ext", "peft")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    data = tmp_path_factory.mktemp("example_data")
    r = subprocess.run(
        [sys.executable, "-P", str(EXAMPLE / "make_example.py"), str(data), "--steps", "40"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    build = tmp_path_factory.mktemp("example_build")
    cmake = shutil.which("cmake")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    r = subprocess.run(
        [
            cmake,
            "-S",
            str(EXAMPLE),
            "-B",
            str(build),
            *gen,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{lora_ext.cmake_prefix_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([cmake, "--build", str(build), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return data, build / "lora_infer"


def _run(exe, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_lora_infer_matches_python(example):
    data, exe = example
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "liblora_ext.so" in ldd and "libpython" not in ldd and "torch_python" not in ldd, ldd
    out = data / "outputs.safetensors"
    r = _run(
        exe,
        data / "model.pt",
        data / "inputs.safetensors",
        data / "adapter_lora_ext",
        data / "adapter_peft",
        "--out",
        out,
        "--repeat",
        "2",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    got = load_file(str(out))
    want = load_file(str(data / "expected.safetensors"))
    base = want["base"]
    torch.testing.assert_close(got["base"], base, rtol=0, atol=0)  # the same TorchScript model, same input
    torch.testing.assert_close(got["base.cpp_net"], base, rtol=1e-5, atol=1e-5)
    for name in ADAPTERS:
        ref = want[f"{name}.python"]
        assert (ref - base).abs().max() > 0.5, f"adapter {name} barely changes the model; the test would be weak"
        for how in ("merged", "unmerged"):
            torch.testing.assert_close(got[f"{name}.{how}"], ref, rtol=1e-4, atol=1e-4, msg=f"{name} {how}")
        torch.testing.assert_close(got[f"{name}.after_unmerge"], base, rtol=1e-5, atol=1e-5)
        for how in ("merged", "unmerged", "after unmerge"):
            assert f"{name} {how}" in r.stdout


def test_lora_infer_reports_bad_input(example, tmp_path):
    data, exe = example
    r = _run(exe, data / "model.pt", data / "inputs.safetensors")
    assert r.returncode == 1 and "usage: lora_infer" in r.stderr
    r = _run(exe, data / "model.pt", data / "inputs.safetensors", tmp_path / "missing")
    assert r.returncode == 1 and "adapter_config.json" in r.stderr and "no such file or folder" in r.stderr
    # an adapter for another model: refused by name, nothing applied
    bad = tmp_path / "adapter_bad"
    shutil.copytree(data / "adapter_lora_ext", bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    t["base_model.model.blocks.7.mlp.up_proj.lora_A.weight"] = torch.randn(8, 128)
    t["base_model.model.blocks.7.mlp.up_proj.lora_B.weight"] = torch.randn(512, 8)
    from safetensors.torch import save_file

    save_file(t, str(bad / "adapter_model.safetensors"))
    r = _run(exe, data / "model.pt", data / "inputs.safetensors", bad)
    assert r.returncode == 1 and "matches no parameter blocks.7.mlp.up_proj.weight" in r.stderr, r.stderr
    assert "nothing was changed" in r.stderr
