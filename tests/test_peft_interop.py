"""Adapter files in PEFT's format, both directions, against the real PEFT on a tiny Llama."""

import copy
import json
import os

import peft  # noqa: E402  (a test dependency, installed by scripts/run.sh)
import pytest
import torch

import lora_ext
from lora_ext import LoraConfig
from models import LLAMA_TARGETS, llama_inputs, logits, tiny_llama
from test_model_api import _train

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets


def test_peft_trained_adapter_loads_into_plain_model(tmp_path):
    base = tiny_llama()
    ids = llama_inputs()
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=LLAMA_TARGETS,
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.mlp\.down_proj": 3},
        ),
    )
    _train(pm)
    pm.save_pretrained(str(tmp_path))
    want = logits(pm, ids)
    model = copy.deepcopy(base)
    lora_ext.load_adapter(model, str(tmp_path))
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=1e-5)
    # merge_and_unload gives PEFT's merged weights
    ours = lora_ext.merge_and_unload(model).state_dict()
    theirs = pm.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5)


def test_lora_ext_trained_adapter_loads_into_peft(tmp_path):
    base = tiny_llama()
    ids = llama_inputs()
    model = copy.deepcopy(base)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_TARGETS,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"o_proj": 5},
        use_rslora=True,
    )
    lora_ext.inject_adapter(model, cfg)
    _train(model)
    lora_ext.save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(logits(pm, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    # and back into lora_ext gives the same again
    again = copy.deepcopy(base)
    lora_ext.load_adapter(again, str(tmp_path))
    torch.testing.assert_close(logits(again, ids), logits(model, ids))


def test_named_adapter_goes_to_subfolder_and_keys_are_exact(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    # an adapter name equal to a module-path component must not confuse the key mapping
    lora_ext.inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "self_attn")
    out = lora_ext.save_adapter(model, str(tmp_path), adapter_name="self_attn")
    assert out == os.path.join(str(tmp_path), "self_attn")
    from safetensors.torch import load_file

    keys = sorted(load_file(os.path.join(out, "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 4
    loaded = copy.deepcopy(base)
    lora_ext.load_adapter(loaded, out, adapter_name="self_attn")
    ids = llama_inputs()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))


def _saved(tmp_path):
    model = tiny_llama()
    lora_ext.inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora_ext.save_adapter(model, str(tmp_path))
    from safetensors.torch import load_file, save_file

    return load_file(os.path.join(tmp_path, "adapter_model.safetensors")), save_file


@pytest.mark.parametrize(
    "damage,match",
    [
        ("drop_B", "missing key .*q_proj.lora_B"),
        ("extra", "unexpected key 'base_model.model.model.layers.0.nothing.lora_A.weight'"),
        ("junk", "unexpected key 'something_else'"),
        ("shape", "shape mismatch at 'model.layers.0.self_attn.q_proj'"),
        ("dtype", "dtype torch.int64"),
    ],
)
def test_bad_files_raise_and_leave_model_unchanged(tmp_path, damage, match):
    tensors, save_file = _saved(tmp_path)
    k = "base_model.model.model.layers.0.self_attn.q_proj"
    if damage == "drop_B":
        del tensors[k + ".lora_B.weight"]
    elif damage == "extra":
        tensors["base_model.model.model.layers.0.nothing.lora_A.weight"] = torch.zeros(2, 32)
    elif damage == "junk":
        tensors["something_else"] = torch.zeros(1)
    elif damage == "shape":
        tensors[k + ".lora_A.weight"] = torch.zeros(3, 32)
    elif damage == "dtype":
        tensors[k + ".lora_A.weight"] = torch.zeros(2, 32, dtype=torch.int64)
    save_file(tensors, os.path.join(tmp_path, "adapter_model.safetensors"))
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        lora_ext.load_adapter(model, str(tmp_path))
    assert not list(lora_ext.lora_layers(model)) and model.state_dict().keys() == before.keys()


def test_pickle_needs_opt_in(tmp_path):
    tensors, _ = _saved(tmp_path)
    os.remove(os.path.join(tmp_path, "adapter_model.safetensors"))
    torch.save(tensors, os.path.join(tmp_path, "adapter_model.bin"))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        lora_ext.load_adapter(tiny_llama(), str(tmp_path))
    model = tiny_llama()
    lora_ext.load_adapter(model, str(tmp_path), allow_pickle=True)
    assert len(list(lora_ext.lora_layers(model))) == 4


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    model = tiny_llama()
    lora_ext.inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora_ext.save_adapter(model, str(tmp_path))
    before = {f: open(os.path.join(tmp_path, f), "rb").read() for f in os.listdir(tmp_path)}
    with torch.no_grad():
        for _, layer in lora_ext.lora_layers(model):
            layer.lora_A["default"].weight.add_(1.0)
    from lora_ext import atomic

    real_write = os.write

    def crash(fd, data):  # the disk fills up after a few bytes of the first file
        real_write(fd, bytes(data[:7]))
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "write", crash)
        with pytest.raises(OSError, match="disk full"):
            lora_ext.save_adapter(model, str(tmp_path))
    after = {f: open(os.path.join(tmp_path, f), "rb").read() for f in os.listdir(tmp_path)}
    assert after == before
    json.loads(after["adapter_config.json"])
