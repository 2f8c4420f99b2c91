"""The C++ safetensors / adapter_config.json readers (through lora_ext._C) against the Python
safetensors library and PEFT, and on malformed files: clear errors, never a crash."""

import json
import os
import struct

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_ext
from lora_ext import LoraConfig
from lora_ext_dev.hostile_files import BAD, BAD_CONFIGS, DTYPES
from lora_ext_dev.hostile_files import write as _write
from models import LLAMA_TARGETS, tiny_llama


def test_every_dtype_empty_tensors_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dt in enumerate(DTYPES):
        t = torch.randn(3, 5, generator=g) * 10
        tensors[f"t{i}"] = t.to(dt)
    tensors["empty"] = torch.empty(0, 7)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["big"] = torch.randn(300, 257, generator=g)
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "note": "hello"})
    ours = lora_ext._C.read_safetensors(path)
    ref = load_file(path)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        # bitwise equality (NaN-safe, any dtype)
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k
    assert lora_ext._C.read_safetensors_metadata(path) == {"format": "pt", "note": "hello"}


def test_cpp_writer_round_trips_with_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": (torch.randn(4, 3, generator=g) * 10).to(dt) for i, dt in enumerate(DTYPES)}
    tensors["empty"] = torch.empty(0, 7)
    tensors["scalar"] = torch.tensor(-2.25, dtype=torch.float64)
    tensors["strided"] = torch.randn(6, 8, generator=g)[::2, 1::3]  # non-contiguous view
    tensors["big"] = torch.randn(300, 257, generator=g, dtype=torch.bfloat16)
    path = str(tmp_path / "out.safetensors")
    lora_ext._C.write_safetensors(path, tensors, {"format": "pt", "who": "c++"})
    ref = load_file(path)  # the safetensors library accepts the file ...
    ours = lora_ext._C.read_safetensors(path)  # ... and so does our reader
    assert ref.keys() == ours.keys() == tensors.keys()
    for k, t in tensors.items():
        for got in (ref[k], ours[k]):
            assert got.dtype == t.dtype and got.shape == t.shape, k
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), k
    assert lora_ext._C.read_safetensors_metadata(path) == {"format": "pt", "who": "c++"}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    assert n % 8 == 0
    # overwriting is atomic: no temporary file is left behind
    lora_ext._C.write_safetensors(path, {"x": torch.ones(2)})
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert load_file(path).keys() == {"x"}


@pytest.mark.parametrize(
    "tensors,match",
    [
        ({"c": torch.ones(2, dtype=torch.complex64)}, "unsupported dtype"),
        ({"": torch.ones(2)}, "non-empty tensor name"),
        ({"__metadata__": torch.ones(2)}, "non-empty tensor name"),
        ({"s": torch.ones(2).to_sparse()}, "dense"),
    ],
)
def test_cpp_writer_rejects_bad_input_and_keeps_existing_file(tmp_path, tensors, match):
    path = str(tmp_path / "keep.safetensors")
    save_file({"old": torch.arange(3.0)}, path)
    with pytest.raises(RuntimeError, match=match):
        lora_ext._C.write_safetensors(path, tensors)
    assert torch.equal(load_file(path)["old"], torch.arange(3.0))
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_cpp_writer_unwritable_folder(tmp_path):
    with pytest.raises(RuntimeError, match="cannot open"):
        lora_ext._C.write_safetensors(str(tmp_path / "missing" / "x.safetensors"), {"x": torch.ones(1)})


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_files_raise_clear_errors(tmp_path, case):
    spec, match = BAD[case]
    path = str(tmp_path / "bad.safetensors")
    if spec is None:
        with open(path, "wb") as f:
            f.write(b"\x01\x02")
    else:
        _write(path, *spec)
    with pytest.raises(RuntimeError, match=f"lora_ext::read_safetensors: .*bad.safetensors: .*{match}"):
        lora_ext._C.read_safetensors(path)


def test_truncated_real_file(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"a": torch.randn(100)}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(RuntimeError, match="outside the data section"):
        lora_ext._C.read_safetensors(path)
    with pytest.raises(RuntimeError, match="cannot open"):
        lora_ext._C.read_safetensors(str(tmp_path / "missing.safetensors"))


def test_adapter_config_reader_matches_python_and_peft(tmp_path):
    model = tiny_llama()
    pm = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=LLAMA_TARGETS,
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.mlp\.down_proj": 3},
            modules_to_save=["lm_head"],
        ),
    )
    pm.save_pretrained(str(tmp_path))
    c = lora_ext._C.load_adapter_config(str(tmp_path))
    assert c["r"] == 4 and c["lora_alpha"] == 16 and c["use_rslora"] and not c["fan_in_fan_out"]
    assert c["rank_pattern"] == {"v_proj": 2} and c["alpha_pattern"] == {r"layers\.1\.mlp\.down_proj": 3.0}
    assert sorted(c["target_modules"]) == sorted(LLAMA_TARGETS) and c["modules_to_save"] == ["lm_head"]
    # per-module scaling exactly as PEFT computed it
    for name, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            path = name.replace("base_model.model.", "", 1)
            assert lora_ext._C.adapter_scaling(str(tmp_path), path) == pytest.approx(m.scaling["default"], rel=1e-12)
    # the tensors the C++ reader sees are PEFT's
    st = os.path.join(tmp_path, "adapter_model.safetensors")
    ref = load_file(st)
    ours = lora_ext._C.read_safetensors(st)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("q_first", [True, False])
def test_overlapping_patterns_first_in_file_order_wins_like_peft(tmp_path, q_first):
    # both patterns match layers.0's q_proj (and layers.1's v_proj); PEFT takes the first in the
    # order of the loaded file (PEFT itself writes sorted keys; hand-written files may not be)
    rank = [("q_proj", 2), (r"layers\.0\.self_attn\.q_proj", 6)]
    alpha = [("v_proj", 3), (r"layers\.1\.self_attn\.v_proj", 9)]
    if not q_first:
        rank, alpha = rank[::-1], alpha[::-1]
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": dict(rank),
        "alpha_pattern": dict(alpha),
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    c = lora_ext._C.load_adapter_config(str(tmp_path))
    assert list(c["rank_pattern"]) == [k for k, _ in rank] and list(c["alpha_pattern"]) == [k for k, _ in alpha]
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig.from_pretrained(str(tmp_path)))
    seen = set()
    for name, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            path = name.replace("base_model.model.", "", 1)
            seen.add(lora_ext._C.adapter_scaling(str(tmp_path), path))
            assert lora_ext._C.adapter_scaling(str(tmp_path), path) == pytest.approx(m.scaling["default"], rel=1e-12)
    assert len(seen) == (2 if q_first else 4)  # the order decides: 4.0, 0.75 vs. 8/6, 4.0, 0.75, 2.25


@pytest.mark.parametrize("content,match", BAD_CONFIGS)
def test_adapter_config_errors(tmp_path, content, match):
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(RuntimeError, match=f"lora_ext::load_adapter_config: .*{match}"):
        lora_ext._C.load_adapter_config(str(tmp_path))


def test_reads_lora_ext_saved_adapter(tmp_path):
    model = tiny_llama()
    lora_ext.inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora_ext.save_adapter(model, str(tmp_path))
    c = lora_ext._C.load_adapter_config(str(tmp_path))
    assert c["r"] == 2 and c["target_modules"] == ["q_proj"]
    t = lora_ext._C.read_safetensors(os.path.join(tmp_path, "adapter_model.safetensors"))
    a, _ = model.get_submodule("model.layers.0.self_attn.q_proj").adapter_weights("default")
    assert torch.equal(t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], a.detach())


def test_missing_adapter_folder_and_files(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(
        RuntimeError,
        match=r"lora_ext::load_adapter: expected an adapter folder \(adapter_config.json "
        r"\+ adapter_model.safetensors\), got .*nope \(no such file or folder\)",
    ):
        lora_ext._C.load_adapter_native(missing)
    with pytest.raises(
        RuntimeError,
        match=r"lora_ext::load_adapter_config: expected an adapter folder containing "
        r"adapter_config.json \(or the file itself\), got .*nope",
    ):
        lora_ext._C.load_adapter_config(missing)
    with pytest.raises(RuntimeError, match="lora_ext::load_adapter: .*: no adapter_model.safetensors"):
        lora_ext._C.load_adapter_native(str(tmp_path))  # an empty folder


@pytest.mark.parametrize(
    "content", ['{"r": 4, "lora_alpha": -2}', '{"r": 4, "lora_alpha": 0}', '{"r": 4, "alpha_pattern": {"x": -1}}']
)
def test_adapter_config_absurd_values_are_refused_like_python(tmp_path, content):
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError):  # what Python's reader does with the same file
        LoraConfig.from_dict(json.loads(content))
    with pytest.raises(
        RuntimeError,
        match=r"lora_ext::load_adapter_config: .*expected (a finite lora_alpha > 0|"
        r"alpha_pattern values that are finite and > 0), got -?[0-9]",
    ):
        lora_ext._C.load_adapter_config(str(tmp_path))
