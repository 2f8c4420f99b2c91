"""requires_grad follows "active and used in forward" after every adapter call, as in PEFT.

(Regression: after inject "a" + add_adapter "b", the active adapter a was frozen and the inactive
b trainable, so a training loop silently optimised an adapter the forward never used; and a layer
that only the new adapter targets ran it although it was not active.)
"""

import copy
import warnings

import peft
import pytest
import torch

import lora_ext
from lora_ext import LoraConfig
from models import llama_inputs, logits, tiny_llama

PEFT_PREFIX = "base_model.model."
CFG_A = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
CFG_B = dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], init_lora_weights=False)
CFG_C = dict(r=3, lora_alpha=3, target_modules=["k_proj"], bias="lora_only", init_lora_weights=False)


def _flags(model, strip=""):
    return {n[len(strip) :] if n.startswith(strip) else n: p.requires_grad for n, p in model.named_parameters()}


def _assert_same_flags(pm, ours, step, skip=()):
    theirs, mine = _flags(pm, PEFT_PREFIX), _flags(ours)
    for n in skip:
        theirs[n] = mine[n]
    assert set(theirs) == set(mine), (step, set(theirs) ^ set(mine))
    diff = {n: (theirs[n], mine[n]) for n in theirs if theirs[n] != mine[n]}
    assert not diff, f"after {step}: (PEFT, lora_ext) requires_grad differ: {diff}"
    assert any(mine.values()), step


def _ours_adapter_trainable(model, name):
    return {
        t.requires_grad
        for _, layer in lora_ext.lora_layers(model)
        if layer.has_adapter(name)
        for t in layer.adapter_weights(name)
    }


def test_requires_grad_matches_peft_after_each_call(tmp_path):
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CFG_A), adapter_name="a")
    ours = lora_ext.inject_adapter(copy.deepcopy(base), LoraConfig(**CFG_A), "a")
    _assert_same_flags(pm, ours, "inject a")

    pm.add_adapter("b", peft.LoraConfig(**CFG_B))
    lora_ext.add_adapter(ours, LoraConfig(**CFG_B), "b")
    _assert_same_flags(pm, ours, "add_adapter b")
    assert _ours_adapter_trainable(ours, "a") == {True} and _ours_adapter_trainable(ours, "b") == {False}
    # b is not active anywhere, also not in down_proj, which only b targets
    ids = llama_inputs()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    for names in ("b", "a", ["a", "b"], "b"):
        pm.base_model.set_adapter(names)
        lora_ext.set_adapter(ours, names)
        _assert_same_flags(pm, ours, f"set_adapter {names}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn that the active adapter was deleted
        pm.delete_adapter("b")
        lora_ext.delete_adapter(ours, "b")
    # PEFT 0.21 leaves the modules_to_save copy of the new active adapter frozen here (its
    # delete_adapter re-activates only the LoRA layers); it is active and used in forward, so it trains.
    stale = ["lm_head.modules_to_save.a.weight"]
    _assert_same_flags(pm, ours, "delete_adapter b (the active one)", skip=stale)
    assert ours.lm_head.modules_to_save["a"].weight.requires_grad
    assert lora_ext.model.active_adapters(ours) == pm.active_adapters == ["a"]

    src = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CFG_C), adapter_name="c")
    src.save_pretrained(str(tmp_path))
    pm.load_adapter(str(tmp_path / "c"), adapter_name="c", is_trainable=True)  # PEFT saves "c" in c/
    lora_ext.load_adapter(ours, str(tmp_path / "c"), adapter_name="c", is_trainable=True)
    # PEFT makes an adapter loaded with is_trainable=True trainable although it is not active (the
    # forward does not use it: under DDP an unused-parameter error); lora_ext keeps it frozen until
    # set_adapter activates it, which makes it trainable.
    c_keys = [n for n in _flags(ours) if ".c." in n]
    _assert_same_flags(pm, ours, "load_adapter c (trainable, inactive)", skip=stale + c_keys)
    assert _ours_adapter_trainable(ours, "c") == {False} and _ours_adapter_trainable(ours, "a") == {True}
    pm.base_model.set_adapter("c")
    lora_ext.set_adapter(ours, "c")
    _assert_same_flags(pm, ours, "set_adapter c (bias='lora_only')")


def test_training_updates_the_active_adapter_only():
    model = lora_ext.inject_adapter(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a"
    )
    lora_ext.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=llama_inputs()).logits.pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".a." in n for n in changed), changed
    assert all(p.grad is None for n, p in model.named_parameters() if ".b." in n or "lora" not in n)


def test_inference_mode_and_frozen_loads(tmp_path):
    model = lora_ext.inject_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lora_ext.set_adapter(model, "a", inference_mode=True)
    assert lora_ext.trainable_parameters(model)[0] == 0
    lora_ext.set_adapter(model, "a")
    assert _ours_adapter_trainable(model, "a") == {True}
    lora_ext.save_adapter(model, str(tmp_path), "a")
    tmp_path = tmp_path / "a"
    fresh = tiny_llama()
    lora_ext.load_adapter(fresh, str(tmp_path))  # the first adapter, loaded frozen: inference mode
    assert lora_ext.trainable_parameters(fresh)[0] == 0
    lora_ext.add_adapter(fresh, LoraConfig(r=2, target_modules=["v_proj"]), "b")
    assert lora_ext.trainable_parameters(fresh)[0] == 0  # adding does not change what trains
    trained = tiny_llama()
    lora_ext.load_adapter(trained, str(tmp_path), is_trainable=True)
    assert _ours_adapter_trainable(trained, "default") == {True}


@pytest.mark.parametrize("step", ["set_adapter", "delete_adapter"])
def test_switching_unmerges_only_when_the_active_set_changes(step):
    model = lora_ext.inject_adapter(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a"
    )
    lora_ext.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    ids = llama_inputs()
    want = logits(model, ids)
    lora_ext.merge(model)
    lora_ext.set_adapter(model, "a")  # unchanged: stays merged
    assert all(layer.merged for _, layer in lora_ext.lora_layers(model))
    if step == "set_adapter":
        lora_ext.set_adapter(model, "b")
        lora_ext.set_adapter(model, "a")
    else:
        lora_ext.delete_adapter(model, "b")
    merged = {layer.merged for _, layer in lora_ext.lora_layers(model)}
    assert merged == ({False} if step == "set_adapter" else {True})  # deleting inactive b keeps a merged
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=1e-5)
