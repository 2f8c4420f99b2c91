"""lora_ext as PEFT's LoRA backend (issue 25, part 2): ``use_lora_ext()``, then stock PEFT calls build
``LoraExtLinear`` layers (PEFT's own ``lora.Linear`` with lora_ext's forward). Against stock PEFT from the same
seed: the same parameters, logits, gradients and files; PEFT's own behaviour for every call; PEFT's forward
where lora_ext does not compute the option (never a silently different model)."""

from __future__ import annotations

import copy
import json
import os

import peft  # noqa: E402  (a test dependency, installed by scripts/run.sh)
import pytest
import torch
from safetensors.torch import load_file

import lora_ext
from lora_ext import ops, peft_backend
from lora_ext.integrations.peft import LoraExtLinear
from models import LLAMA_TARGETS, llama_inputs, tiny_llama

pytestmark = pytest.mark.numerics


@pytest.fixture
def backend():
    peft_backend.use_lora_ext()
    yield
    peft_backend.use_lora_ext(False)


@pytest.fixture
def op_calls(monkeypatch):
    """How often the layers called lora_ext's ops (the fast path) rather than PEFT's forward."""
    calls = {"lora_linear": 0, "lora_linear_multi": 0}
    for name in calls:
        real = getattr(ops, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, counted)
    return calls


def _config(**kw):
    return peft.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, "init_lora_weights": False, **kw}
    )


def _pair(config=None, seed=0):
    """(stock PEFT, PEFT with the lora_ext backend) on the same base from the same seed."""
    base = tiny_llama()
    config = config or _config()
    torch.manual_seed(seed)
    was = peft_backend.lora_ext_enabled()
    peft_backend.use_lora_ext(False)
    stock = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    peft_backend.use_lora_ext()
    try:
        torch.manual_seed(seed)
        ours = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    finally:
        peft_backend.use_lora_ext(was)
    return stock, ours


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _sgd(model, steps=3, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = llama_inputs()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()


def test_same_seed_gives_the_same_peft_model_logits_gradients_and_files(tmp_path, op_calls):
    stock, ours = _pair()
    assert isinstance(ours, peft.PeftModel) and not peft_backend.lora_ext_enabled()
    layers = [m for m in ours.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(layers) == 2 * len(LLAMA_TARGETS) and all(type(m) is LoraExtLinear for m in layers)
    assert not any(isinstance(m, LoraExtLinear) for m in stock.modules())
    theirs_params, ours_params = dict(stock.named_parameters()), dict(ours.named_parameters())
    assert theirs_params.keys() == ours_params.keys()
    assert all(torch.equal(theirs_params[k], ours_params[k]) for k in theirs_params)  # PEFT's own init
    ids = llama_inputs()
    logits_t, grads_t = _loss_and_grads(stock, ids)
    logits_o, grads_o = _loss_and_grads(ours, ids)
    assert op_calls["lora_linear"] == len(layers)  # every layer ran lora_ext's op
    torch.testing.assert_close(logits_o, logits_t, rtol=1e-5, atol=1e-5)
    assert grads_o.keys() == grads_t.keys() and len(grads_o) == 2 * len(layers)
    for k in grads_o:
        torch.testing.assert_close(grads_o[k], grads_t[k], rtol=1e-4, atol=1e-6, msg=k)
    _sgd(stock)
    _sgd(ours)
    stock.save_pretrained(str(tmp_path / "stock"))
    ours.save_pretrained(str(tmp_path / "ours"))
    assert (
        sorted(os.listdir(tmp_path / "ours"))
        == sorted(os.listdir(tmp_path / "stock"))
        == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    )
    with open(tmp_path / "ours" / "adapter_config.json") as f, open(tmp_path / "stock" / "adapter_config.json") as g:
        assert json.load(f) == json.load(g)
    t_sd, o_sd = (
        load_file(tmp_path / "stock" / "adapter_model.safetensors"),
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
    )
    assert t_sd.keys() == o_sd.keys()
    for k in t_sd:
        torch.testing.assert_close(o_sd[k], t_sd[k], rtol=1e-4, atol=1e-5, msg=k)
    # the files load anywhere: stock PEFT, the backend, lora_ext's own loader
    want = ours(input_ids=ids).logits
    for loader in ("stock", "backend", "lora_ext"):
        base = tiny_llama()
        if loader == "lora_ext":
            lora_ext.load_adapter(base, str(tmp_path / "ours"))
            got = base(input_ids=ids).logits
        else:
            if loader == "backend":
                peft_backend.use_lora_ext()
            try:
                m = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))
            finally:
                peft_backend.use_lora_ext(False)
            assert any(isinstance(x, LoraExtLinear) for x in m.modules()) == (loader == "backend")
            got = m(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=loader)


def test_peft_calls_behave_as_in_stock_peft(backend, op_calls):
    stock, ours = _pair()
    ids = llama_inputs()
    for m in (stock, ours):
        m.eval()
        torch.manual_seed(5)  # the same random init in both
        m.add_adapter("second", _config(r=2, lora_alpha=4))
    with torch.no_grad():

        def both(fn):
            return [fn(m) for m in (stock, ours)]

        base = tiny_llama()(input_ids=ids).logits
        for m in (stock, ours):  # disable_adapter(): the base model, in both
            with m.disable_adapter():
                torch.testing.assert_close(m(input_ids=ids).logits, base)
        for name in ("second", "default"):
            a, b = both(lambda m: (m.set_adapter(name), m(input_ids=ids).logits)[1])
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
        # per-row adapters (PEFT's adapter_names) through lora_linear_multi
        rows = ["default", "second"]
        calls = op_calls["lora_linear_multi"]
        a, b = both(lambda m: m(input_ids=ids, adapter_names=rows).logits)
        assert op_calls["lora_linear_multi"] == calls + 2 * len(LLAMA_TARGETS)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        a, b = both(lambda m: m(input_ids=ids, adapter_names=["__base__", "second"]).logits)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b[:1], base[:1], rtol=1e-5, atol=1e-5)
        gen = both(lambda m: m.generate(input_ids=ids, adapter_names=rows, max_new_tokens=4, do_sample=False))
        assert torch.equal(gen[0], gen[1])
        # several active adapters: PEFT's forward (lora_ext computes one)
        calls = op_calls["lora_linear"]
        for m in (stock, ours):
            m.base_model.set_adapter(["default", "second"])
        a, b = both(lambda m: m(input_ids=ids).logits)
        assert op_calls["lora_linear"] == calls
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for m in (stock, ours):
            m.set_adapter("default")
        # weighted merges and deletion are PEFT's own code on the same parameters
        for m in (stock, ours):
            m.add_weighted_adapter(["default", "second"], [0.7, 0.3], "mix", combination_type="cat")
            m.set_adapter("mix")
            m.delete_adapter("second")
        a, b = both(lambda m: m(input_ids=ids).logits)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert both(lambda m: sorted(m.peft_config)) == [["default", "mix"]] * 2
    assert both(lambda m: m.get_nb_trainable_parameters()) == [stock.get_nb_trainable_parameters()] * 2
    ours.print_trainable_parameters()
    ours.enable_input_require_grads()
    merged = [m.merge_and_unload() for m in (stock, ours)]
    assert not any(isinstance(x, peft.tuners.lora.LoraLayer) for m in merged for x in m.modules())
    torch.testing.assert_close(merged[1](input_ids=ids).logits, merged[0](input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_per_row_adapter_gradients_come_from_each_adapters_own_rows(backend, op_calls):
    stock, ours = _pair()
    for m in (stock, ours):
        torch.manual_seed(5)  # the same random init in both
        m.add_adapter("second", _config(r=2, lora_alpha=4))
        for n, p in m.named_parameters():  # PEFT trains the active adapter only; both here
            if "lora_" in n:
                p.requires_grad_(True)
    ids = llama_inputs(batch=4)
    rows = ["second", "default", "__base__", "second"]
    grads = []
    for m in (stock, ours):
        m.train()  # PEFT refuses adapter_names in training mode; so does the backend (PEFT's own check)
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
            m(input_ids=ids, labels=ids, adapter_names=rows)
        m.eval()  # gradients still flow in eval mode (no dropout): each adapter's from its own rows
        m.zero_grad()
        m(input_ids=ids, labels=ids, adapter_names=rows).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert op_calls["lora_linear_multi"] == 2 * len(LLAMA_TARGETS)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 2 * len(LLAMA_TARGETS)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("option", ["use_dora", "lora_bias", "dropout module"])
def test_options_lora_ext_does_not_compute_run_peft_forward(option, op_calls):
    kw = {"use_dora": dict(use_dora=True), "lora_bias": dict(lora_bias=True), "dropout module": {}}[option]
    stock, ours = _pair(_config(**kw))
    if option == "dropout module":  # a dropout PEFT did not create: PEFT's forward
        for m in ours.modules():
            if isinstance(m, LoraExtLinear):
                m.lora_dropout["default"] = torch.nn.AlphaDropout(0.0)
        for m in stock.modules():
            if isinstance(m, peft.tuners.lora.Linear):
                m.lora_dropout["default"] = torch.nn.AlphaDropout(0.0)
    ids = llama_inputs()
    logits_t, grads_t = _loss_and_grads(stock, ids)
    logits_o, grads_o = _loss_and_grads(ours, ids)
    assert op_calls["lora_linear"] == 0
    assert torch.equal(logits_o, logits_t)  # PEFT's own code: bit for bit
    assert all(torch.equal(grads_o[k], grads_t[k]) for k in grads_t)


def test_dropout_and_autocast_through_the_backend(backend):
    stock, ours = _pair(_config(lora_dropout=0.1))
    ids = llama_inputs()
    ours.train()
    torch.manual_seed(1)
    a = ours(input_ids=ids).logits
    torch.manual_seed(1)
    b = ours(input_ids=ids).logits
    torch.manual_seed(2)
    c = ours(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)  # lora_ext's seeded masks
    ours.eval()
    stock.eval()
    for m in (stock, ours):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            m._out = m(input_ids=ids).logits
    assert ours._out.dtype == stock._out.dtype
    torch.testing.assert_close(ours._out.float(), stock._out.float(), atol=0.1, rtol=0.05)


def test_use_lora_ext_is_reversible_and_leaves_other_layer_types_to_peft():
    import peft.tuners.lora.model as lora_model

    original = lora_model.LoraModel.__dict__["_create_new_module"]
    peft_backend.use_lora_ext()
    peft_backend.use_lora_ext()  # idempotent
    try:
        assert peft_backend.lora_ext_enabled()
        net = torch.nn.ModuleDict(
            {"lin": torch.nn.Linear(4, 4), "emb": torch.nn.Embedding(5, 4), "conv": torch.nn.Conv2d(2, 2, 1)}
        )
        m = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["lin", "emb", "conv"]))
        kinds = {n.split(".")[-1]: type(x) for n, x in m.named_modules() if isinstance(x, peft.tuners.lora.LoraLayer)}
        assert kinds == {"lin": LoraExtLinear, "emb": peft.tuners.lora.Embedding, "conv": peft.tuners.lora.Conv2d}
    finally:
        peft_backend.use_lora_ext(False)
    assert lora_model.LoraModel.__dict__["_create_new_module"] is original and not peft_backend.lora_ext_enabled()


def _trainer(model, out, max_steps, resume=None, bf16=True):
    from transformers import Trainer, TrainingArguments

    ids = llama_inputs(batch=8, seq=9)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(out),
        bf16=bf16,
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        logging_steps=1,
        seed=3,
        data_seed=3,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _backend_model(dropout=0.1):
    base = tiny_llama()
    peft_backend.use_lora_ext()
    try:
        torch.manual_seed(0)
        return peft.get_peft_model(
            base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=dropout)
        )
    finally:
        peft_backend.use_lora_ext(False)


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_bf16_checkpoints_hold_the_adapter_only_and_resume_bit_identically(tmp_path, op_calls):
    """Trainer's defaults as users run them (bf16 autocast, gradient checkpointing, save_steps, dropout): a PEFT
    model with lora_ext layers gets adapter-only checkpoints, resumes to the uninterrupted run bit for bit, and
    its save_model() loads in stock PEFT and in lora_ext."""
    straight = _backend_model()
    _trainer(straight, tmp_path / "straight", 4)
    assert op_calls["lora_linear"] > 0
    ckpt = tmp_path / "straight" / "checkpoint-2"
    files = sorted(os.listdir(ckpt))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), files
    assert os.path.getsize(ckpt / "adapter_model.safetensors") < 0.2 * sum(
        p.numel() * 4 for p in tiny_llama().parameters()
    )
    resumed = _backend_model()
    trainer = _trainer(resumed, tmp_path / "resumed", 4, resume=str(ckpt))
    want, got = _adapter(straight), _adapter(resumed)
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "resume differs from the uninterrupted run"
    assert not all(torch.equal(got[k], v) for k, v in _adapter(_backend_model()).items())  # it trained
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")  # PEFT's keys, without the adapter name
    assert {k.replace(".default.", ".") for k in got} == set(saved)
    assert all(torch.equal(saved[k.replace(".default.", ".")], v) for k, v in got.items())
    ids = llama_inputs()
    with torch.no_grad():  # (the trained model's forward stays wrapped in accelerate's autocast: fresh loads)
        stock = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final"))
        native = tiny_llama()
        lora_ext.load_adapter(native, str(tmp_path / "final"))
        torch.testing.assert_close(native(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_lora_ext_model_becomes_a_peft_model_and_back_sharing_every_tensor():
    model = tiny_llama()
    cfg = lora_ext.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_TARGETS,
        init_lora_weights=False,
        rank_pattern={"v_proj": 2},
        lora_dropout=0.1,
    )
    lora_ext.inject_adapter(model, cfg)
    lora_ext.add_adapter(model, cfg.replace(r=2, lora_alpha=2, rank_pattern={}), "other")
    ids = llama_inputs()
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
    storages = {p.data_ptr() for p in model.parameters()}
    pm = peft_backend.to_peft(model)
    assert isinstance(pm, peft.PeftModel) and sorted(pm.peft_config) == ["default", "other"]
    assert pm.active_adapters == ["default"]
    assert {p.data_ptr() for p in pm.parameters()} == storages  # no tensor copied, none added
    assert all(type(m) is LoraExtLinear for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    with torch.no_grad():
        torch.testing.assert_close(pm.eval()(input_ids=ids).logits, want, rtol=0, atol=0)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    back = peft_backend.from_peft(pm)
    assert not isinstance(back, peft.PeftModel) and {p.data_ptr() for p in back.parameters()} == storages
    assert sorted(lora_ext.model.adapter_configs(back)) == ["default", "other"]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, want, rtol=0, atol=0)


def test_conversions_refuse_what_the_other_side_cannot_hold():
    model = lora_ext.inject_adapter(tiny_llama(), lora_ext.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match=r"to_peft: expected LoRA on nn.Linear layers only"):
        peft_backend.to_peft(model)
    merged = lora_ext.inject_adapter(tiny_llama(), lora_ext.LoraConfig(r=2, target_modules=["q_proj"]))
    lora_ext.merge(merged)
    with pytest.raises(ValueError, match=r"to_peft: .* have merged adapters; lora_ext.unmerge\(model\) first"):
        peft_backend.to_peft(merged)
    dora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        peft_backend.from_peft(dora)


def test_save_pretrained_of_an_injected_transformers_model_refuses_instead_of_loading_wrong(tmp_path):
    """The issue's silent wrong load: save_pretrained wrote base_layer.* keys and from_pretrained re-initialised
    the attention weights randomly. Now it refuses and says what to do; Trainer's state_dict saves still work."""
    import pickle

    model = lora_ext.inject_adapter(tiny_llama(), lora_ext.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"from_pretrained\(\) does not load .* lora_ext.save_adapter\(model, path\)"):
        model.save_pretrained(str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    copied = copy.deepcopy(model)  # the guard follows copies
    with pytest.raises(ValueError, match="lora_ext.save_adapter"):
        copied.save_pretrained(str(tmp_path / "refused"))
    pickle.loads(pickle.dumps(model))  # and does not break pickling
    sd = model.state_dict()  # what Trainer passes: saved as transformers does, and loads back into the model
    model.save_pretrained(str(tmp_path / "trainer"), state_dict=sd)
    again = lora_ext.inject_adapter(tiny_llama(), lora_ext.LoraConfig(r=2, target_modules=["q_proj"]))
    missing, unexpected = again.load_state_dict(load_file(tmp_path / "trainer" / "model.safetensors"), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # the tied head is saved once
    merged = lora_ext.merge_and_unload(model)  # the plain model saves and loads as transformers' own
    merged.save_pretrained(str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    ids = llama_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits)
