"""PEFT <-> lora_ext adapter files on tiny GPT-2 (Conv1D, fan_in_fan_out), BERT (with embedding
LoRA) and T5, both directions, plus merge_and_unload against PEFT's merged weights."""

import copy

import peft
import pytest
import torch

import lora_ext
from lora_ext import LoraConfig
from models import llama_inputs, run, tiny_bert, tiny_gpt2, tiny_t5, train_steps

CASES = {
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], dict(fan_in_fan_out=True)),
    "bert": (tiny_bert, ["query", "key", "value", "dense", "word_embeddings"], {}),
    "t5": (tiny_t5, ["q", "k", "v", "o", "wi", "wo"], {}),
}


def _peft_cfg(targets, extra, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_peft_to_lora_ext(name, tmp_path):
    factory, targets, extra = CASES[name]
    base = factory()
    ids = llama_inputs()
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_cfg(targets, extra, use_rslora=True))
    train_steps(pm, ids)
    pm.save_pretrained(str(tmp_path))
    model = copy.deepcopy(base)
    lora_ext.load_adapter(model, str(tmp_path))
    torch.testing.assert_close(run(model, ids), run(pm, ids), atol=1e-5, rtol=1e-5)
    ours = lora_ext.merge_and_unload(model).state_dict()
    theirs = pm.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_lora_ext_to_peft(name, tmp_path):
    factory, targets, extra = CASES[name]
    base = factory()
    ids = llama_inputs()
    model = copy.deepcopy(base)
    lora_ext.inject_adapter(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            init_lora_weights=False,
            rank_pattern={"value": 2, "c_fc": 2, "wi": 2},
        ),
    )
    train_steps(model, ids)
    lora_ext.save_adapter(model, str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(run(pm, ids), run(model, ids), atol=1e-5, rtol=1e-5)


def test_gpt2_sets_fan_in_fan_out_with_a_warning():
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        lora_ext.inject_adapter(model, LoraConfig(target_modules=["c_attn"]))
    assert lora_ext.model.adapter_configs(model)["default"].fan_in_fan_out


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_modules_to_save_and_bias_round_trip_both_ways(bias, tmp_path):
    base = tiny_bert()
    ids = llama_inputs()
    targets, extra = ["query", "value"], dict(modules_to_save=["pooler.dense"], bias=bias)
    # PEFT -> lora_ext
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_cfg(targets, extra))
    train_steps(pm, ids)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, str(tmp_path / "peft"))
    with torch.no_grad():
        want = pm(input_ids=ids).pooler_output
        torch.testing.assert_close(ours(input_ids=ids).pooler_output, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(ours, ids), run(pm, ids), atol=1e-5, rtol=1e-5)
    # lora_ext -> PEFT
    model = copy.deepcopy(base)
    lora_ext.inject_adapter(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("pooler.dense.modules_to_save.default" in n for n in trainable)
    assert (bias != "none") == any(n.endswith("bias") and "pooler" not in n for n in trainable)
    train_steps(model, ids)
    lora_ext.save_adapter(model, str(tmp_path / "ours"))
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(
            pm2(input_ids=ids).pooler_output, model(input_ids=ids).pooler_output, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(run(pm2, ids), run(model, ids), atol=1e-5, rtol=1e-5)
    with lora_ext.disable_adapters(model):
        if bias == "none":  # trained biases live in the base model, as in PEFT
            torch.testing.assert_close(run(model, ids), run(base, ids))
    plain = lora_ext.unload(model)
    assert not any(type(m).__name__ == "ModulesToSave" for m in plain.modules())


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(kind, tmp_path):
    from models import LLAMA_TARGETS, tiny_llama

    base = tiny_llama()
    ids = llama_inputs()
    r2 = 4 if kind == "linear" else 2
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False),
        adapter_name="a",
    )
    pm.add_adapter(
        "b", peft.LoraConfig(r=r2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    lora_ext.load_adapter(ours, str(tmp_path / "a"), adapter_name="a")  # non-default names live in subfolders
    lora_ext.load_adapter(ours, str(tmp_path / "b"), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=kind)
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "mix", combination_type=kind)
    pm.set_adapter("mix")
    lora_ext.set_adapter(ours, "mix")
    torch.testing.assert_close(run(ours, ids), run(pm, ids), atol=1e-4, rtol=1e-4)
    assert lora_ext.model.adapter_configs(ours)["mix"].r == {"linear": 4, "cat": 6, "svd": 4}[kind]
    with pytest.raises(ValueError, match="unknown adapter"):
        lora_ext.add_weighted_adapter(ours, ["zzz"], [1.0], "mix2")
