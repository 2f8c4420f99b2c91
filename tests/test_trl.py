"""TRL's trainers with their defaults on a PEFT model built by the lora_ext backend (issue 25, part 3):
``SFTTrainer`` with the default ``SFTConfig`` (bf16 autocast on), and ``DPOTrainer(ref_model=None)``, whose
reference is the policy with its adapter disabled (no second model in memory). A tiny Llama and a word-level
tokenizer built here (offline)."""

from __future__ import annotations

import gc
import os

import datasets  # test dependencies, installed by scripts/run.sh (TRL and its datasets)
import peft
import pytest
import torch
import trl

import lora_ext
import lora_ext.integrations.peft as peft_backend
from models import LLAMA_TARGETS, tiny_llama

WORDS = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(100)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _text(g, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (n,), generator=g))


def _model():
    peft_backend.use_lora_ext()
    try:
        torch.manual_seed(0)
        return peft.get_peft_model(
            tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.05)
        )
    finally:
        peft_backend.use_lora_ext(False)


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def op_calls(monkeypatch):
    calls = {"n": 0}
    real = lora_ext.ops.lora_linear

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(lora_ext.ops, "lora_linear", counted)
    return calls


def test_sft_trainer_with_its_default_config_trains_and_checkpoints_the_adapter_only(tmp_path, op_calls):
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"text": [_text(g, 10) for _ in range(16)]})
    model = _model()
    before = _adapter(model)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], save_steps=1, use_cpu=True
    )  # use_cpu: transformers asks for it for bf16 on a CPU
    assert args.bf16  # TRL's default
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
    trainer.train()
    assert op_calls["n"] > 0
    after = _adapter(model)
    assert all(not torch.equal(after[k], before[k]) for k in after if "lora_A" in k)
    files = sorted(os.listdir(tmp_path / "checkpoint-2"))
    assert "adapter_model.safetensors" in files and not any(f.startswith("model") for f in files), files


@pytest.mark.parametrize("given", ["peft_config", "PeftModel"])
def test_dpo_trainer_references_the_policy_itself_without_a_second_model(given, tmp_path, monkeypatch, op_calls):
    """``ref_model=None``. Given a base model and ``peft_config`` (TRL builds the PEFT model; with the backend on,
    of LoraExtLinear layers), the reference is the policy with its adapter disabled. Given a PeftModel (an adapter
    that may be trained already), TRL keeps a copy of the initial adapter as "ref". Either way one base model."""
    g = torch.Generator().manual_seed(1)
    data = datasets.Dataset.from_dict(
        {
            "prompt": [_text(g, 4) for _ in range(8)],
            "chosen": [_text(g, 3) for _ in range(8)],
            "rejected": [_text(g, 3) for _ in range(8)],
        }
    )
    disabled = {"n": 0}
    real = peft.PeftModel.disable_adapter

    def counting(self):
        disabled["n"] += 1
        return real(self)

    monkeypatch.setattr(peft.PeftModel, "disable_adapter", counting)
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    kw = dict(ref_model=None, args=args, train_dataset=data, processing_class=_tokenizer())
    gc.collect()
    alive = {id(o) for o in gc.get_objects() if type(o).__name__ == "LlamaForCausalLM"}  # other tests' models
    if given == "peft_config":
        peft_backend.use_lora_ext()
        try:
            torch.manual_seed(0)
            trainer = trl.DPOTrainer(
                model=tiny_llama(),
                peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.05),
                **kw,
            )
        finally:
            peft_backend.use_lora_ext(False)
    else:
        trainer = trl.DPOTrainer(model=_model(), **kw)
    model = trainer.model
    assert isinstance(model, peft.PeftModel) and trainer.ref_model is None
    assert any(isinstance(m, peft_backend.LoraExtLinear) for m in model.modules())
    gc.collect()
    llamas = [o for o in gc.get_objects() if type(o).__name__ == "LlamaForCausalLM" and id(o) not in alive]
    assert len(llamas) == 1  # the policy's base only: no reference copy
    before = _adapter(model)
    trainer.train()
    assert op_calls["n"] > 0
    if given == "peft_config":
        assert disabled["n"] > 0 and "ref" not in model.peft_config
    else:
        assert disabled["n"] == 0 and "ref" in model.peft_config
    after = _adapter(model)
    assert any(not torch.equal(after[k], before[k]) for k in after)
