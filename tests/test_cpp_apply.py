"""lora_ext::merge_adapter / unmerge_adapter (C++, by parameter names) on a TorchScript model,
through a test hook in lora_ext._C: same weights and outputs as the Python merge_and_unload."""
import copy
import json
import re
import os

import pytest
import torch

import lora_ext
from lora_ext import LoraConfig
from models import TinyNet


def _setup(tmp_path):
    torch.manual_seed(0)
    base = TinyNet().eval()
    model = copy.deepcopy(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "l1", "l2"], use_rslora=True,
                     rank_pattern={"l2": 2}, alpha_pattern={"l1": 3}, init_lora_weights=False)
    lora_ext.inject_adapter(model, cfg)
    lora_ext.save_adapter(model, str(tmp_path / "adapter"))
    scripted = str(tmp_path / "base.pt")
    torch.jit.script(base).save(scripted)
    return base, model, scripted


def test_cpp_merge_matches_python(tmp_path):
    base, model, scripted = _setup(tmp_path)
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        want = model(ids)
    out = str(tmp_path / "merged.pt")
    lora_ext._C.merge_adapter_into_script_file(scripted, str(tmp_path / "adapter"), out)
    merged = torch.jit.load(out)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=1e-5)
    py_merged = lora_ext.merge_and_unload(copy.deepcopy(model)).state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, py_merged[k], atol=1e-6, rtol=1e-6)
    # merge then unmerge in C++ gives the base weights back
    back = str(tmp_path / "back.pt")
    lora_ext._C.merge_adapter_into_script_file(scripted, str(tmp_path / "adapter"), back, unmerge_after=True)
    for k, v in torch.jit.load(back).state_dict().items():
        torch.testing.assert_close(v, base.state_dict()[k], atol=1e-6, rtol=1e-6)


def test_cpp_merge_refuses_mismatched_adapter(tmp_path):
    _, _, scripted = _setup(tmp_path)
    from safetensors.torch import load_file, save_file

    st = tmp_path / "adapter" / "adapter_model.safetensors"
    t = load_file(str(st))
    t["base_model.model.nothing.lora_A.weight"] = torch.zeros(4, 16)
    t["base_model.model.nothing.lora_B.weight"] = torch.zeros(8, 4)
    save_file(t, str(st))
    out = str(tmp_path / "never.pt")
    with pytest.raises(RuntimeError, match="(?s)lora_ext::merge_adapter: .*nothing was changed.*matches no parameter nothing.weight"):
        lora_ext._C.merge_adapter_into_script_file(scripted, str(tmp_path / "adapter"), out)
    assert not os.path.exists(out)
    t = load_file(str(st))
    del t["base_model.model.nothing.lora_A.weight"], t["base_model.model.nothing.lora_B.weight"]
    t["base_model.model.l1.lora_A.weight"] = torch.zeros(4, 15)
    save_file(t, str(st))
    with pytest.raises(RuntimeError, match="(?s)lora_ext::merge_adapter: .*shape mismatch at l1"):
        lora_ext._C.merge_adapter_into_script_file(scripted, str(tmp_path / "adapter"), out)
    # a lone A without its B, and a key that is no LoRA weight: both listed, nothing changed
    t = load_file(str(st))
    del t["base_model.model.l1.lora_A.weight"]
    t["base_model.model.l1.bias"] = torch.zeros(8)
    save_file(t, str(st))
    with pytest.raises(RuntimeError, match="(?s)^lora_ext::merge_adapter: .*nothing was changed") as e:
        lora_ext._C.merge_adapter_into_script_file(scripted, str(tmp_path / "adapter"), out)
    msg = str(e.value)
    assert "missing key base_model.model.l1.lora_A.weight" in msg and "unexpected key base_model.model.l1.bias" in msg
    assert "frame #" not in msg  # no C++ backtrace in the Python error
    assert not os.path.exists(out)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_cpp_merge_refuses_non_finite_weight(tmp_path, weight):
    _, _, scripted = _setup(tmp_path)
    out = str(tmp_path / "never.pt")
    with pytest.raises(RuntimeError, match=f"lora_ext::merge_adapter: expected a finite weight, got {weight}"):
        lora_ext._C.merge_adapter_into_script_file(scripted, str(tmp_path / "adapter"), out, weight=weight)
    assert not os.path.exists(out)


@pytest.mark.parametrize("case", ["config r", "3-D lora_B", "empty lora_A", "integer A"])
def test_cpp_merge_refuses_what_python_refuses(tmp_path, case):
    """The C++ merge checks each module's rank against the config (its scaling depends on r) and the
    tensors' shapes and dtypes before reshaping anything (found by the property tests)."""
    from safetensors.torch import load_file, save_file

    _, _, scripted = _setup(tmp_path)
    folder = tmp_path / "adapter"
    st = folder / "adapter_model.safetensors"
    t = load_file(str(st))  # saved again below without lora_ext's metadata: a PEFT-style folder
    key_a, key_b = "base_model.model.l1.lora_A.weight", "base_model.model.l1.lora_B.weight"
    if case == "config r":
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["r"] = 3  # l1 has rank 4 (rank_pattern only covers l2)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        want = "rank mismatch at l1: the config says r = 3 (its scaling depends on r), the tensors have rank 4"
    elif case == "3-D lora_B":
        t[key_b] = t[key_b][:, :, None].expand(-1, -1, 2).contiguous()
        want = "shape mismatch at l1: expected A [r >= 1, in, ...] and B [out, r, 1...]"
    elif case == "empty lora_A":
        t[key_a], t[key_b] = t[key_a][:0], t[key_b][:, :0]
        want = "shape mismatch at l1: expected A [r >= 1, in, ...]"
    else:
        t[key_a] = t[key_a].to(torch.int32)
        want = "adapter tensors of l1 are not floating point (Int, Float)"
    save_file(t, str(st))
    out = str(tmp_path / "never.pt")
    with pytest.raises(RuntimeError, match=r"(?s)^lora_ext::merge_adapter: .*nothing was changed.*" + re.escape(want)):
        lora_ext._C.merge_adapter_into_script_file(scripted, str(folder), out)
    assert not os.path.exists(out)


def test_cpp_merge_refuses_overflowing_scale_before_changing_anything(tmp_path):
    # weight x scaling: emb 1.6e308 and l1 6e307 are finite, l2 (8/sqrt(2)) overflows. merge_ would refuse
    # l2's scale only after merging emb and l1 (found by tests/fuzz/fuzz_load_apply.cpp); the plan refuses
    # first, with merge_'s own checks (all three scales are beyond float32's range for float32 weights)
    _, _, scripted = _setup(tmp_path)
    with pytest.raises(RuntimeError, match="(?s)nothing was changed.*module l2: lora_ext::merge_: expected a finite"):
        lora_ext._C.merge_adapter_into_script_file(scripted, str(tmp_path / "adapter"), str(tmp_path / "x.pt"),
                                                   weight=4e307)
