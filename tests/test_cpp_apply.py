"""lora_ext::merge_adapter / unmerge_adapter (C++, by parameter names) on a TorchScript model,
through a test hook in lora_ext._C: same weights and outputs as the Python merge_and_unload."""

import copy
import json
import os
import re

import pytest
import torch

import lora_ext
from lora_ext import LoraConfig
from models import TinyNet


def _setup(tmp_path):
    torch.manual_seed(0)
    base = TinyNet().eval()
    model = copy.deepcopy(base)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["emb", "l1", "l2"],
        use_rslora=True,
        rank_pattern={"l2": 2},
        alpha_pattern={"l1": 3},
        init_lora_weights=False,
    )
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
    with pytest.raises(
        RuntimeError, match="(?s)lora_ext::merge_adapter: .*nothing was changed.*matches no parameter nothing.weight"
    ):
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
        lora_ext._C.merge_adapter_into_script_file(
            scripted, str(tmp_path / "adapter"), str(tmp_path / "x.pt"), weight=4e307
        )


# ---- the two readers refuse the same adapters ----------------------------------------------------------
# Python's load_adapter (lora_ext/adapter_io.py, _plan) and C++'s merge_adapter (csrc/io/apply.cpp,
# plan_updates) validate an adapter against a model separately. Each bad adapter below is a change to the
# TinyNet adapter of _setup (emb: A [4, 50], B [16, 4]; l1 (16 -> 32): A [4, 16], B [32, 4]; l2 (32 -> 8):
# A [2, 32], B [8, 2]), saved as PEFT saves it (no lora_ext metadata, so adapter_config.json is the config):
# both readers must refuse it, with messages that match the same regexes (the tensor or module, the reason).
L1A, L1B = "base_model.model.l1.lora_A.weight", "base_model.model.l1.lora_B.weight"
EA, EB = "base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B"


def _fit(t, **kw):
    """The tensors with keys set (a tensor, or a function of the original tensors) or deleted (None)."""
    out = dict(t)
    for k, v in kw.items():
        if v is None:
            del out[k]
        else:
            out[k] = v(t) if callable(v) else v
    return out


# case -> (config changes, tensor changes (a function of the tensors), regexes both messages must match)
BAD_ADAPTERS = {
    "A of the wrong width": ({}, lambda t: _fit(t, **{L1A: torch.zeros(4, 15)}), ["shape mismatch", "l1"]),
    "B of the wrong height": ({}, lambda t: _fit(t, **{L1B: torch.zeros(31, 4)}), ["shape mismatch", "l1"]),
    "A and B of different ranks": ({}, lambda t: _fit(t, **{L1B: torch.zeros(32, 3)}), ["shape mismatch", "l1"]),
    "4-D A on a linear": ({}, lambda t: _fit(t, **{L1A: lambda t: t[L1A][:, :, None, None]}), ["shape mismatch", "l1"]),
    "3-D B on a linear": ({}, lambda t: _fit(t, **{L1B: lambda t: t[L1B][:, :, None]}), ["shape mismatch", "l1"]),
    "empty A and B": ({}, lambda t: _fit(t, **{L1A: torch.zeros(0, 16), L1B: torch.zeros(32, 0)}), ["l1"]),
    "B missing": ({}, lambda t: _fit(t, **{L1B: None}), [f"missing key {re.escape(L1B)}"]),
    "A missing": ({}, lambda t: _fit(t, **{L1A: None}), [f"missing key {re.escape(L1A)}"]),
    "embedding B missing": ({}, lambda t: _fit(t, **{EB: None}), [f"missing key {re.escape(EB)}"]),
    "unknown module": (
        {},
        lambda t: _fit(
            t,
            **{
                "base_model.model.nothing.lora_A.weight": torch.zeros(4, 16),
                "base_model.model.nothing.lora_B.weight": torch.zeros(32, 4),
            },
        ),
        [r"\bno\b.*'?nothing\b"],
    ),
    "key without the prefix": (
        {},
        lambda t: _fit(t, **{"l1.lora_A.weight": torch.zeros(4, 16)}),
        [r"unexpected key '?l1\.lora_A\.weight"],
    ),
    "a bias key, bias none": (
        {},
        lambda t: _fit(t, **{"base_model.model.l1.bias": torch.zeros(32)}),
        [r"unexpected key '?base_model\.model\.l1\.bias"],
    ),
    "the adapter name in a key": (
        {},
        lambda t: _fit(t, **{L1A: None, "base_model.model.l1.lora_A.default.weight": lambda t: t[L1A]}),
        [r"unexpected key '?base_model\.model\.l1\.lora_A\.default\.weight", f"missing key {re.escape(L1A)}"],
    ),
    "embedding keys on a linear": (
        {},
        lambda t: _fit(
            t,
            **{
                L1A: None,
                L1B: None,  # shapes that fit l1.weight.T
                "base_model.model.l1.lora_embedding_A": torch.zeros(4, 32),
                "base_model.model.l1.lora_embedding_B": torch.zeros(16, 4),
            },
        ),
        [r"'?l1'? is a Linear"],
    ),
    "linear keys on an embedding": (
        {},
        lambda t: _fit(
            t,
            **{
                EA: None,
                EB: None,  # shapes that fit emb.weight
                "base_model.model.emb.lora_A.weight": torch.zeros(4, 16),
                "base_model.model.emb.lora_B.weight": torch.zeros(50, 4),
            },
        ),
        [r"'?emb'? is a.? Embedding"],
    ),
    "integer A": ({}, lambda t: _fit(t, **{L1A: lambda t: t[L1A].to(torch.int32)}), ["l1", "floating"]),
    "bool B": ({}, lambda t: _fit(t, **{L1B: lambda t: t[L1B] > 0}), ["l1", "floating"]),
    "NaN in A": (
        {},
        lambda t: _fit(t, **{L1A: lambda t: t[L1A].index_fill(1, torch.tensor([3]), float("nan"))}),
        ["NaN/Inf", "l1"],
    ),
    "Inf in an embedding B": (
        {},
        lambda t: _fit(t, **{EB: lambda t: t[EB].index_fill(0, torch.tensor([0]), float("-inf"))}),
        ["NaN/Inf", "emb"],
    ),
    "no tensors": ({}, lambda t: {}, ["holds no LoRA weights"]),
    "rank above min(in, out)": (
        {"rank_pattern": {"l2": 9}},
        lambda t: _fit(
            t,
            **{
                "base_model.model.l2.lora_A.weight": torch.zeros(9, 32),
                "base_model.model.l2.lora_B.weight": torch.zeros(8, 9),
            },
        ),
        [r"rank too large at '?l2\b", "8"],
    ),
    "config r other than the tensors'": ({"r": 3}, None, [r"'?l1\b", "config"]),
    "config r 0": ({"r": 0}, None, [r"r >= 1, got 0"]),
    "config r 2.5": ({"r": 2.5}, None, [r"integer (rank \()?r\b"]),
    "config r a string": ({"r": "4"}, None, [r"integer (rank \()?r\b"]),
    "config r true": ({"r": True}, None, [r"integer (rank \()?r\b"]),
    "config lora_alpha 0": ({"lora_alpha": 0}, None, ["finite lora_alpha > 0, got 0"]),
    "config lora_alpha true": ({"lora_alpha": True}, None, ["lora_alpha"]),
    "config lora_alpha null": ({"lora_alpha": None}, None, ["lora_alpha"]),
    "config rank_pattern 0": ({"rank_pattern": {"l2": 0}}, None, ["rank_pattern", "l2"]),
    "config rank_pattern null": ({"rank_pattern": None}, None, ["rank_pattern"]),
    "config alpha_pattern -3": ({"alpha_pattern": {"l1": -3}}, None, ["alpha_pattern", "l1"]),
    "config alpha_pattern true": ({"alpha_pattern": {"l1": True}}, None, ["alpha_pattern", "l1"]),
    "config pattern not a regex": ({"rank_pattern": {"(": 2}}, None, [r"\(.*(not a valid regular expression)"]),
    "config target_modules not a regex": ({"target_modules": "("}, None, ["target_modules", "regular expression"]),
    "config exclude_modules 5": ({"exclude_modules": 5}, None, ["exclude_modules"]),
    "config use_rslora null": ({"use_rslora": None}, None, ["use_rslora to be true or false"]),
    "config fan_in_fan_out 1": ({"fan_in_fan_out": 1}, None, ["fan_in_fan_out to be true or false"]),
    "config lora_dropout 1": ({"lora_dropout": 1.0}, None, ["0 <= lora_dropout < 1"]),
    "config bias other": ({"bias": "some"}, None, ["bias", "some"]),
    "config peft_type IA3": ({"peft_type": "IA3"}, None, ["peft_type", "IA3"]),
    # the PEFT options neither implements (lora_ext/config.py's _UNSUPPORTED, csrc/io/adapter.cpp's kUnsupported)
    "config use_dora": ({"use_dora": True}, None, ["use_dora"]),
    "config lora_bias": ({"lora_bias": True}, None, ["lora_bias"]),
    "config use_qalora": ({"use_qalora": True}, None, ["use_qalora"]),
    "config layer_replication": ({"layer_replication": [[0, 1]]}, None, ["layer_replication"]),
    "config layers_to_transform": ({"layers_to_transform": [0]}, None, ["layers_to_transform"]),
    "config layers_pattern": ({"layers_pattern": "layers"}, None, ["layers_pattern"]),
    "config target_parameters": ({"target_parameters": ["l1.weight"]}, None, ["target_parameters"]),
    "config alora_invocation_tokens": ({"alora_invocation_tokens": [1, 2]}, None, ["alora_invocation_tokens"]),
    "config trainable_token_indices": ({"trainable_token_indices": [1]}, None, ["trainable_token_indices"]),
    "config use_bdlora": ({"use_bdlora": True}, None, ["use_bdlora"]),
    "config arrow_config": ({"arrow_config": {"top_k": 2}}, None, ["arrow_config"]),
    "config megatron_config": ({"megatron_config": {}}, None, ["megatron_config"]),
}
# ... and both accept these unusual but good ones
GOOD_ADAPTERS = {
    "float64 tensors": ({}, lambda t: {k: v.double() for k, v in t.items()}),
    "bfloat16 tensors": ({}, lambda t: {k: v.bfloat16() for k, v in t.items()}),
    "options at their neutral values": (
        {
            "use_dora": False,
            "lora_bias": None,
            "layers_pattern": "",
            "layers_to_transform": [],
            "use_bdlora": 0,
            "megatron_config": None,
        },
        None,
    ),
    "other PEFT fields": (
        {
            "lora_dropout": 0.5,
            "bias": "none",
            "target_modules": "emb|l[12]",
            "task_type": "X",
            "exclude_modules": ["nothing"],
            "inference_mode": False,
            "foo": {"bar": [1]},
        },
        None,
    ),
}


def _peft_style_folder(tmp_path, cfg_changes, tensor_changes):
    from safetensors.torch import load_file, save_file

    _setup(tmp_path)
    folder = tmp_path / "adapter"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(cfg_changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    st = str(folder / "adapter_model.safetensors")
    t = load_file(st)
    save_file(
        {k: v.contiguous() for k, v in (tensor_changes(t) if tensor_changes else t).items()},
        st,
        metadata={"format": "pt"},
    )
    return str(folder)


def _outcomes(tmp_path, folder):
    """(Python's error or None, C++'s error or None) for loading / merging the folder into TinyNet."""
    errors = []
    try:
        lora_ext.load_adapter(TinyNet(), folder)
        errors.append(None)
    except (ValueError, FileNotFoundError) as e:
        errors.append(str(e))
    out = str(tmp_path / "merged.pt")
    try:
        lora_ext._C.merge_adapter_into_script_file(str(tmp_path / "base.pt"), folder, out)
        errors.append(None)
    except (RuntimeError, ValueError) as e:
        assert not os.path.exists(out)
        errors.append(str(e))
    return errors


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_both_readers_refuse_the_same_adapters(tmp_path, case):
    cfg, tensors, patterns = BAD_ADAPTERS[case]
    py, cpp = _outcomes(tmp_path, _peft_style_folder(tmp_path, cfg, tensors))
    assert py is not None and py.startswith("lora_ext.load_adapter: "), f"Python accepted it: {py}"
    assert cpp is not None and cpp.startswith("lora_ext::"), f"C++ accepted it: {cpp}"
    for p in patterns:
        assert re.search(p, py), f"Python's message does not match {p!r}: {py}"
        assert re.search(p, cpp), f"C++'s message does not match {p!r}: {cpp}"


@pytest.mark.parametrize("case", list(GOOD_ADAPTERS))
def test_both_readers_accept_the_same_adapters(tmp_path, case):
    assert _outcomes(tmp_path, _peft_style_folder(tmp_path, *GOOD_ADAPTERS[case])) == [None, None]
