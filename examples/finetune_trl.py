"""The main job's "docs" task on the real SmolLM2-135M through TRL's ``SFTTrainer``, with lora_ext as PEFT's
LoRA backend and bf16 autocast (TRL's default), writing a PEFT adapter.

    bash scripts/run.sh examples/finetune_trl.py [--steps 48] [--out runs/finetune_trl]

For a PEFT user, three lines differ from stock PEFT + TRL: ``import lora_ext.integrations.peft``,
``lora_ext.integrations.peft.use_lora_ext()``, and (on a CPU) ``use_cpu=True`` in the config, which transformers asks
for whenever bf16 runs on a CPU. Everything else is PEFT's and TRL's own code: ``get_peft_model``, ``SFTTrainer``
with a default ``SFTConfig``, ``save_model``. Then the held-out perplexity before and after, in fp32, and the
saved adapter loaded by stock PEFT and by ``lora_ext.load_adapter`` into fresh bases, their logits compared.
Exits non-zero if the adapter does not lower the held-out perplexity by 10% or the loaders disagree.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import lora_ext  # noqa: E402
import lora_ext.integrations.peft  # noqa: E402
from lora_ext_dev import llm_train, smollm2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--rows", type=int, default=4, help="windows per step")
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/finetune_trl")
    llm_train.add_lora_args(p, lr=2e-3)
    return p.parse_args(argv)


@torch.no_grad()
def heldout_ppl(model, windows: torch.Tensor, rows: int = 8) -> float:
    """Perplexity of next-token prediction over ``windows`` in fp32 (no autocast)."""
    model.eval()
    nll, tokens = 0.0, 0
    for i in range(0, len(windows), rows):
        ids = windows[i : i + rows]
        nll += llm_train.row_nll(model(input_ids=ids).logits, ids).sum().item()
        tokens += ids.numel() - ids.shape[0]
    return math.exp(nll / tokens)


def main(argv=None) -> int:
    import datasets
    import peft
    import trl

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tokenizer = smollm2.load_smollm2()
    data = llm_train.task_data(tokenizer, "docs", args.seq_len, args.eval_windows)
    heldout = data["heldout"]
    base_ppl = heldout_ppl(model, heldout)
    print(
        f"base model: held-out perplexity {base_ppl:.2f} ({len(data['train'])} training windows of "
        f"{args.seq_len} tokens)"
    )

    lora_ext.integrations.peft.use_lora_ext()  # PEFT now builds lora_ext's layers
    config = peft.LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=llm_train.lora_config(args).target_modules,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    layers = sum(isinstance(m, lora_ext.integrations.peft.LoraExtLinear) for m in model.modules())
    model.print_trainable_parameters()
    train = datasets.Dataset.from_dict({"input_ids": data["train"].tolist()})
    sft = trl.SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.rows,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 12),
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
    )  # bf16 is TRL's default; on a CPU transformers asks for use_cpu
    trainer = trl.SFTTrainer(model=model, args=sft, train_dataset=train, processing_class=tokenizer)
    t1 = time.time()
    result = trainer.train()
    train_s = time.time() - t1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.save_model(str(out / "adapter"))
    files = sorted(p.name for p in (out / "adapter").iterdir())

    # fresh bases: stock PEFT and lora_ext's own loader read the adapter TRL wrote
    lora_ext.integrations.peft.use_lora_ext(False)
    stock = peft.PeftModel.from_pretrained(smollm2.load_smollm2()[0], str(out / "adapter"))
    native = smollm2.load_smollm2()[0]
    lora_ext.load_adapter(native, str(out / "adapter"))
    tuned_ppl = heldout_ppl(native, heldout)
    with torch.no_grad():
        ids = heldout[:2]
        a, b = stock(input_ids=ids).logits, native(input_ids=ids).logits
    agree = llm_train.compare_logits(a, b)
    results = dict(
        base_ppl=base_ppl,
        tuned_ppl=tuned_ppl,
        drop=1 - tuned_ppl / base_ppl,
        steps=args.steps,
        lora_ext_layers=layers,
        bf16=sft.bf16,
        train_s=train_s,
        s_per_step=train_s / args.steps,
        train_loss=result.training_loss,
        logged_losses=losses,
        adapter_files=files,
        stock_peft_vs_lora_ext=agree,
        total_s=time.time() - t0,
    )
    print(
        f"trained {args.steps} steps of {args.rows}x{args.seq_len} tokens in {train_s:.0f} s "
        f"({train_s / args.steps:.2f} s/step, bf16 autocast: {sft.bf16}, {layers} lora_ext layers)"
    )
    print(f"logged losses: {' '.join(f'{v:.3f}' for v in losses)}")
    print(f"held-out perplexity: base {base_ppl:.2f} -> adapter {tuned_ppl:.2f} ({-100 * results['drop']:+.1f}%)")
    print(f"saved {out / 'adapter'}: {', '.join(files)}")
    print(llm_train.describe_comparison("stock PeftModel.from_pretrained vs lora_ext.load_adapter", agree))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    ok = results["drop"] >= 0.10 and agree["allclose"]
    print("OK" if ok else "FAILED: expected >= 10% lower held-out perplexity and equal loaders")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
