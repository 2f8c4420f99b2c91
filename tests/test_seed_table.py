"""benchmarks/seed_table.py's parts (dev/lora_ext_dev/seed_methods.py): the seq_bn adapter's size and identity at
init, the computed table's counts against the real SmolLM2-135M, the forgetting KL, the run plan."""

import copy

import pytest
import torch

from lora_ext_dev import load_example, smollm2
from lora_ext_dev import seed_methods as sm

seed_table = load_example("seed_table", "benchmarks")


def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("gguf", reason="the real model needs `pip install gguf` (scripts/run.sh installs it)")
    try:
        smollm2.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    torch.set_num_threads(2)
    return smollm2.load_smollm2()[0]


def test_seq_bn_parameter_count_and_identity_at_init():
    assert sm.SEQ_BN_PARAMS_135M == 1_262_520 == sm.seq_bn_parameters(576, 30)
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        s = sm.setup("adapters", model)
        assert sum(p.numel() for p in s.params) == sm.seq_bn_parameters(64, 2) == 2 * (64 * 4 * 2 + 4 + 64)
        assert all(not p.requires_grad for p in model.parameters()) and all(p.requires_grad for p in s.params)
        assert torch.equal(model(input_ids=ids).logits, base)  # up projection zero: exactly the base model
        s.extra.blocks[1].up.bias.fill_(0.1)  # the hook really runs: a nonzero up projection changes the output
        assert not torch.allclose(model(input_ids=ids).logits, base)
        s.extra.remove()
        assert torch.equal(model(input_ids=ids).logits, base)
    # the base weights' hash does not see the adapters
    assert smollm2.base_weights_hash(model) == smollm2.base_weights_hash(tiny_llama())


def test_bottleneck_hook_handles_tuple_outputs():
    block = sm.Bottleneck(8, reduction=4)
    with torch.no_grad():
        block.up.bias.fill_(1.0)
    hook = sm.SeqBnAdapters._hook(block)
    h = torch.zeros(1, 3, 8)
    out = hook(None, (), (h, "cache"))
    assert isinstance(out, tuple) and out[1] == "cache" and torch.equal(out[0], torch.ones(1, 3, 8))
    assert torch.equal(hook(None, (), h), torch.ones(1, 3, 8))


def test_computed_counts_match_the_real_model(real):
    cfg = real.config
    shape = sm.SHAPES["SmolLM2-135M"]
    assert {k: getattr(cfg, k) for k in shape} == shape
    for method in sm.METHODS:
        model = copy.deepcopy(real, memo={id(p): p for p in real.parameters()})  # new modules, the same weights
        n_base = sm.unique_parameters(model)
        s = sm.setup(method, model, prompt_init="RANDOM")
        trainable = sum(p.numel() for p in s.params)
        assert trainable == sum(p.numel() for p in s.params if p.requires_grad)
        c = sm.computed_counts(shape, method)
        assert (c["base"], c["trainable"]) == (n_base, trainable), method
    # and against the counts by hand: r * (in + out) per adapted linear, 20 virtual tokens x hidden
    h, kv, inter, r = 576, 192, 1536, 8
    by_hand = {
        "full": 134_515_008,  # the tied lm_head counted once
        "adapters": sm.SEQ_BN_PARAMS_135M,
        "prompt": 20 * h,
        "peft_lora": 30 * r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter)),
        "lora_ext_all": 30 * r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter)),
        "lora_ext_qv": 30 * r * ((h + h) + (h + kv)),
    }
    assert {m: sm.computed_counts(shape, m)["trainable"] for m in sm.METHODS} == by_hand


def test_computed_bytes_convention():
    c = {"base": 1000, "trainable": 10}
    assert sm.computed_bytes({"base": 1000, "trainable": 1000}, "full") == {
        "weights": 2000,
        "gradients": 2000,
        "optimizer": 12000,
        "total": 16000,
    }
    assert sm.computed_bytes(c, "lora_ext_all") == {"weights": 2040, "gradients": 40, "optimizer": 80, "total": 2160}


def test_forgetting_kl_zero_for_base_and_positive_when_perturbed():
    model = tiny_llama()
    seqs = [torch.randint(0, 101, (3, 16)), torch.randint(0, 101, (1, 7))]
    with torch.no_grad():
        base_logits = [model(input_ids=s).logits for s in seqs]
        assert sm.forgetting_kl(model, seqs, base_logits) == pytest.approx(0.0, abs=1e-12)
        w = model.model.layers[0].mlp.down_proj.weight
        w.add_(0.05 * torch.randn_like(w))
        kl = sm.forgetting_kl(model, seqs, base_logits)
        tuned = model(input_ids=seqs[1]).logits[0, 3]
    assert kl > 1e-6
    p = torch.log_softmax(base_logits[1][0, 3].double(), -1)  # KL(p || q) by hand at one position
    q = torch.log_softmax(tuned.double(), -1)
    assert sm.kl_per_position(base_logits[1][0, 3], tuned).item() == pytest.approx(
        float((p.exp() * (p - q)).sum()), rel=1e-9
    )


def test_drop_virtual_tokens_keeps_the_input_positions():
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 5))
    s = sm.setup("prompt", model, prompt_init="RANDOM")
    assert sum(p.numel() for p in s.params) == sm.NUM_VIRTUAL_TOKENS * 64
    assert s.net(input_ids=ids).logits.shape == (2, 5, 101)


def test_plan_interleaves_methods_and_times_inference_once_per_method():
    args = seed_table.parse_args([])
    runs = seed_table.plan(args)
    assert len(runs) == len(seed_table.SWEEP["full"]) * len(sm.METHODS)
    assert [m for m, _, _ in runs[:6]] == list(sm.METHODS) and [m for m, _, _ in runs[6:12]] == list(sm.METHODS)[::-1]
    assert sorted(m for m, _, infer in runs if infer) == sorted(sm.METHODS)
    for m in sm.METHODS:
        assert [lr for mm, lr, _ in runs if mm == m] == list(seed_table.SWEEP[m])
    quick = seed_table.plan(seed_table.parse_args(["--quick"]))
    assert [(m, lr) for m, lr, _ in quick] == [(m, seed_table.SWEEP[m][1]) for m in sm.METHODS]
