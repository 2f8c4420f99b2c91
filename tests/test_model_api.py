"""Model-level API on a tiny Llama: targeting, freezing, adapters, merge, unload."""

import copy
import os

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraConfig
from models import LLAMA_TARGETS, llama_inputs, logits, tiny_llama

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets


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
    assert sorted(n for n, _ in lora_ext.lora_layers(m)) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
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
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"v_proj": 32},
        use_rslora=True,
    )
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


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lora_dropout=1.0), r"LoraConfig: expected a number 0 <= lora_dropout < 1, got 1.0"),
        (dict(lora_dropout=float("nan")), r"LoraConfig: expected a number 0 <= lora_dropout < 1, got nan"),
        (dict(r=2.5), r"LoraConfig: expected an integer r >= 1, got 2.5"),
        (dict(target_modules=5), r"LoraConfig: expected target_modules to be a list of names or a regex string, got 5"),
        (dict(rank_pattern={"q": 0}), r"LoraConfig: rank_pattern\['q'\] must be an integer >= 1, got 0"),
        (dict(rank_pattern=[("q", 2)]), r"LoraConfig: expected rank_pattern to be a dict of regex -> value"),
        (dict(use_rslora="yes"), r"LoraConfig: expected use_rslora to be true or false, got 'yes'"),
        (dict(extra={"peft_type": "IA3"}), r"LoraConfig: expected peft_type 'LORA', got 'IA3'"),
    ],
    ids=[
        "dropout 1",
        "dropout nan",
        "r 2.5",
        "target_modules int",
        "rank_pattern 0",
        "rank_pattern list",
        "use_rslora str",
        "peft_type IA3",
    ],
)
def test_config_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_unknown_or_missing_names_in_model_calls(tmp_path):
    with pytest.raises(
        ValueError, match="LoraConfig.target_modules is None: name the modules to adapt, or use 'all-linear'"
    ):
        lora_ext.inject_adapter(_small(), LoraConfig(r=2))
    model = lora_ext.inject_adapter(_small(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"lora_ext.delete_adapter: unknown adapter\(s\) \['nope'\]; have \['default'\]"
    ):
        lora_ext.delete_adapter(model, "nope")
    with pytest.raises(ValueError, match=r"lora_ext.merge: unknown adapter\(s\) \['nope'\]; have \['default'\]"):
        lora_ext.merge(model, ["nope"])
    with pytest.raises(ValueError, match=r"lora_ext.save_adapter: unknown adapter 'nope'; have \['default'\]"):
        lora_ext.save_adapter(model, str(tmp_path), "nope")
    assert not os.listdir(tmp_path)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


def test_add_weighted_adapter_bad_input():
    model = lora_ext.inject_adapter(_small(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    lora_ext.add_adapter(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), "b")
    lora_ext.add_adapter(model, LoraConfig(r=2, target_modules="2", init_lora_weights=False), "regex")
    with pytest.raises(ValueError, match="lora_ext.add_weighted_adapter: expected 2 weights, got 1"):
        lora_ext.add_weighted_adapter(model, ["default", "b"], [1.0], "mix")
    with pytest.raises(
        ValueError,
        match=r"lora_ext.add_weighted_adapter: combination_type must be one of \('linear', "
        r"'cat', 'svd'\), got 'bogus'",
    ):
        lora_ext.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "mix", combination_type="bogus")
    with pytest.raises(
        ValueError,
        match=r"lora_ext.add_weighted_adapter: 'linear' needs equal ranks, got "
        r"\{'default': 2, 'b': 4\}",
    ):
        lora_ext.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="lora_ext.add_weighted_adapter: cannot combine list and regex target_modules"):
        lora_ext.add_weighted_adapter(model, ["default", "regex"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="lora_ext.add_weighted_adapter: adapter 'b' already exists"):
        lora_ext.add_weighted_adapter(model, ["default"], [1.0], "b")
    assert sorted(lora_ext.model.adapter_configs(model)) == ["b", "default", "regex"]


def test_lora_dropout_none_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="LoraConfig: expected a number 0 <= lora_dropout < 1, got None"):
        LoraConfig(lora_dropout=None)
    from safetensors.torch import save_file  # the same value in a PEFT-style file

    save_file(
        {
            "base_model.model.0.lora_A.weight": torch.zeros(2, 12),
            "base_model.model.0.lora_B.weight": torch.zeros(10, 2),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "target_modules": ["0"], "lora_dropout": null}'
    )
    with pytest.raises(ValueError, match="LoraConfig: expected a number 0 <= lora_dropout < 1, got None"):
        lora_ext.load_adapter(_small(), str(tmp_path))


def test_merge_takes_a_single_adapter_name():
    model = lora_ext.inject_adapter(_small(), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    lora_ext.merge(model, "default")
    assert all(layer.merged for _, layer in lora_ext.lora_layers(model))


def test_inject_adapter_refuses_a_non_config():
    with pytest.raises(TypeError, match="lora_ext.inject_adapter: expected a lora_ext.LoraConfig, got dict"):
        lora_ext.inject_adapter(_small(), {"r": 2, "target_modules": ["0"]})


def test_set_adapter_refuses_a_non_name():
    model = lora_ext.inject_adapter(_small(), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(
        (TypeError, ValueError), match="lora_ext.set_adapter: expected an adapter name or a list of names, got 5"
    ):
        lora_ext.set_adapter(model, 5)


def test_add_weighted_adapter_refuses_non_finite_weights():
    model = lora_ext.inject_adapter(_small(), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    with pytest.raises(
        ValueError, match=r"lora_ext.add_weighted_adapter: expected finite numbers as weights, got \[nan\]"
    ):
        lora_ext.add_weighted_adapter(model, ["default"], [float("nan")], "mix", combination_type="cat")
