"""C++ inference through torch.export + AOTInductor (lora_ext.export, lora_ext::AotiModel, examples/cpp/generate) on a
tiny Llama built from a config: the export in both forms, the packages in Python, the example program's tokens equal
Python's (transformers + lora_ext) for the base, each adapter merged, each adapter unmerged in a slot and both
adapters per row, and tests/cpp/test_aoti.cpp (refused adapters change nothing, 100 switches leave the base
bit-identical, bad inputs, threads)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora_ext
from lora_ext.export import export_causal_lm
from lora_ext_dev.generate import tiny_llama

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cpp" / "generate"

STEPS = 8


def _cmake_build(src: pathlib.Path, build: pathlib.Path, target: str) -> pathlib.Path:
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the C++ programs"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    r = subprocess.run(
        [
            cmake,
            "-S",
            str(src),
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
    r = subprocess.run([cmake, "--build", str(build), "-j2", "--target", target], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return build / target


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """make_data.py --model tiny: both packages, two random adapters, the prompt and Python's tokens."""
    out = tmp_path_factory.mktemp("aoti_data")
    r = subprocess.run(
        [sys.executable, "-P", str(EXAMPLE / "make_data.py"), str(out), "--model", "tiny", "--steps", str(STEPS)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_python_tokens_are_a_strong_reference(data):
    want = load_file(str(data / "expected.safetensors"))
    assert want["base"].shape == (1, STEPS) and want["per_row"].shape == (2, STEPS)
    # the adapters change the greedy tokens (else equal tokens would prove little), base tokens vary
    assert not torch.equal(want["merged.docs"], want["base"]) and not torch.equal(want["merged.code"], want["base"])
    assert not torch.equal(want["merged.docs"], want["merged.code"])
    assert len(set(want["base"].flatten().tolist())) > 1
    for name in ("docs", "code"):
        assert torch.equal(want[f"merged.{name}"], want[f"unmerged.{name}"])
    assert torch.equal(want["per_row"], torch.cat([want["unmerged.docs"], want["unmerged.code"]]))


def test_packages_in_python_equal_eager(data):
    """The packages loaded in Python: form (a) equals the model's last logits, form (b) with slot -1 too."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, -1]
    base = torch._inductor.aoti_load_package(str(data / "base.pt2"))
    torch.testing.assert_close(base(ids), want, rtol=1e-4, atol=1e-5)
    slots = torch._inductor.aoti_load_package(str(data / "slots.pt2"))
    torch.testing.assert_close(slots(ids, torch.full((3,), -1)), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(slots(ids, torch.tensor([0, 1, -1])), want, rtol=1e-4, atol=1e-5)  # empty slots


def test_generate_example_matches_python(data, tmp_path_factory):
    exe = _cmake_build(EXAMPLE, tmp_path_factory.mktemp("generate_build"), "generate")
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "liblora_ext.so" in ldd and "libpython" not in ldd and "torch_python" not in ldd, ldd
    out = data / "tokens.safetensors"
    r = _run(exe, data, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    assert "base weights after merge/unmerge of every adapter: bit-identical" in r.stdout
    got, want = load_file(str(out)), load_file(str(data / "expected.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key}: C++ {got[key].tolist()} != Python {want[key].tolist()}"


def test_cpp_aoti_api(data, tmp_path_factory):
    exe = _cmake_build(ROOT / "tests" / "cpp", tmp_path_factory.mktemp("cpp_aoti_build"), "test_aoti")
    r = _run(exe, data)
    print(r.stdout)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout + r.stderr


def test_export_refuses_bad_arguments(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="adapter_slots to be an int >= 0"):
        export_causal_lm(model, tmp_path / "x.pt2", adapter_slots=-1)
    with pytest.raises(ValueError, match="max_rank to be an int >= 1"):
        export_causal_lm(model, tmp_path / "x.pt2", adapter_slots=1, max_rank=0)
    with pytest.raises(ValueError, match="max_batch >= 2"):
        export_causal_lm(model, tmp_path / "x.pt2", max_batch=1)
    with pytest.raises(ValueError, match=r"matching none"):
        export_causal_lm(model, tmp_path / "x.pt2", adapter_slots=1, target_modules=["q_proj", "qkv"])
    with pytest.raises(ValueError, match="expected a Hugging Face causal LM"):
        export_causal_lm(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "x.pt2")
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="expected the base model, got one with LoRA layers"):
        export_causal_lm(model, tmp_path / "x.pt2")
    assert not (tmp_path / "x.pt2").exists()


def test_export_restores_the_model(tmp_path):
    """The slot wrappers exist only during the export; the model's modules and mode are as before."""
    model = tiny_llama().train()
    before = dict(model.named_modules())
    info = export_causal_lm(
        model, tmp_path / "s.pt2", adapter_slots=1, max_rank=2, target_modules=["v_proj"], max_seq=16
    )
    assert dict(model.named_modules()) == before and model.training
    assert info["bytes"] > 0 and info["compile_s"] > 0
    meta_fqns = torch._inductor.aoti_load_package(info["package"]).get_constant_fqns()
    slotted = sorted(n for n in meta_fqns if n.endswith(".lora_scales"))
    assert slotted == [f"model.model.layers.{i}.self_attn.v_proj.lora_scales" for i in range(2)], slotted
