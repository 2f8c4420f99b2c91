"""Model-level API on a tiny Llama: targeting, freezing, adapters, merge, unload."""
import copy

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraConfig
from models import LLAMA_TARGETS, llama_inputs, logits, tiny_llama


def _train(model, steps=3, lr=1e-2):
    ids = llama_inputs()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


def test_config_validation_and_peft_dict_round_trip():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"v_proj": 2})
    d = cfg.to_dict()
    assert d["peft_type"] == "LORA" and d["r"] == 4 and d["rank_pattern"] == {"v_proj": 2}
    d["some_future_peft_key"] = {"x": 1}
    back = LoraConfig.from_dict(d)
    assert back.to_dict() == d  # unknown keys survive
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig.from_dict({**d, "use_dora": True})
    with pytest.raises(ValueError, match="r >= 1"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(bias="some")
    import peft

    theirs = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).to_dict()
    ours = LoraConfig.from_dict({k: (sorted(v) if isinstance(v, set) else v) for k, v in theirs.items()})
    assert ours.r == 4 and ours.target_modules == ["q_proj"] and ours.extra["peft_version"] == theirs["peft_version"]


def test_inject_targets_freezes_and_counts():
    model = tiny_llama()
    ids = llama_inputs()
    ref = logits(model, ids)
    same = lora_ext.inject_adapter(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    assert same is model
    names = [n for n, _ in lora_ext.lora_layers(model)]
    assert len(names) == 2 * 7 and all(n.split(".")[-1] in LLAMA_TARGETS for n in names)
    torch.testing.assert_close(logits(model, ids), ref)  # B = 0 at init
    assert not any(m.training for m in model.modules())  # injected layers keep the model's eval mode
    trainable, total = lora_ext.trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert 0 < trainable < 0.2 * total


def test_target_forms_and_errors():
    m = tiny_llama()
    lora_ext.inject_adapter(m, LoraConfig(target_modules=r".*\.0\.self_attn\.(q|v)_proj"))
    assert sorted(n for n, _ in lora_ext.lora_layers(m)) == ["model.layers.0.self_attn.q_proj",
                                                             "model.layers.0.self_attn.v_proj"]
    m = tiny_llama()
    lora_ext.inject_adapter(m, LoraConfig(target_modules="all-linear", exclude_modules=["down_proj"]))
    names = [n for n, _ in lora_ext.lora_layers(m)]
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names) and len(names) == 12
    with pytest.raises(ValueError, match="matches no module.*q_proj"):
        lora_ext.inject_adapter(tiny_llama(), LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="already exists"):
        lora_ext.inject_adapter(m, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="modules_to_save=.*matches no module"):
        lora_ext.inject_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["nohead"]))


def test_rank_and_alpha_patterns():
    m = tiny_llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
                     alpha_pattern={"v_proj": 32}, use_rslora=True)
    lora_ext.inject_adapter(m, cfg)
    q1 = m.get_submodule("model.layers.1.self_attn.q_proj")
    q0 = m.get_submodule("model.layers.0.self_attn.q_proj")
    v0 = m.get_submodule("model.layers.0.self_attn.v_proj")
    assert q1.r["default"] == 2 and q0.r["default"] == 4
    assert q0.scaling["default"] == 8 / 2 and v0.scaling["default"] == 32 / 2 and q1.scaling["default"] == 8 / 2**0.5


def test_adapters_switch_disable_merge_unload():
    model = tiny_llama()
    base = copy.deepcopy(model)
    ids = llama_inputs()
    ref = logits(model, ids)
    lora_ext.inject_adapter(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    lora_ext.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "two")
    y_default = logits(model, ids)
    assert not torch.allclose(y_default, ref)
    lora_ext.set_adapter(model, "two")
    y_two = logits(model, ids)
    assert not torch.allclose(y_two, y_default)
    assert all(("lora_" in n and ".two." in n) == p.requires_grad for n, p in model.named_parameters())
    with lora_ext.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), ref)
    torch.testing.assert_close(logits(model, ids), y_two)
    lora_ext.set_adapter(model, "default")
    lora_ext.merge(model)
    assert all(layer.merged for _, layer in lora_ext.lora_layers(model))
    torch.testing.assert_close(logits(model, ids), y_default, atol=1e-5, rtol=1e-5)
    lora_ext.unmerge(model)
    lora_ext.delete_adapter(model, "two")
    assert all("two" not in layer.lora_A for _, layer in lora_ext.lora_layers(model))
    with pytest.raises(ValueError, match="unknown adapter"):
        lora_ext.set_adapter(model, "two")
    merged = lora_ext.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, lora_ext.LoraLayer) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(merged, ids), y_default, atol=1e-5, rtol=1e-5)
    plain = lora_ext.unload(model)
    torch.testing.assert_close(logits(plain, ids), ref)
    for (n1, p1), (n2, p2) in zip(plain.state_dict().items(), base.state_dict().items()):
        assert n1 == n2  # fp32 merge/unmerge round trip: equal up to rounding
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6)


def test_training_only_moves_adapters():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_ext.inject_adapter(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.1))
    _train(model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        orig = n.replace(".base_layer", "")
        assert torch.equal(p, before[orig]), n
    assert any(torch.count_nonzero(layer.lora_B["default"].weight) for _, layer in lora_ext.lora_layers(model))
