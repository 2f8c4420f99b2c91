"""TRL's SFTTrainer on the real SmolLM2-135M (issue 25): stock PEFT, PEFT with the lora_ext backend, a native
lora_ext model and the frozen floor, in the same trainer with TRL's defaults (bf16 autocast on the CPU).

Variants (each in its own process; rounds alternate the order):
- ``floor``: every parameter frozen but the final norm (so the Trainer has something to step), the backward
  reaching the input embeddings (``enable_input_require_grads``): the network's own forward + backward.
- ``peft``: ``peft.get_peft_model`` with stock PEFT layers.
- ``peft+lora_ext``: the same call after ``lora_ext.integrations.peft.use_lora_ext()``.
- ``lora_ext``: ``lora_ext.inject_adapter`` (a plain model: Trainer checkpoints it whole).

LoRA r=8, alpha 16, dropout 0.05 on all 210 linear layers; batch 4 x 128 tokens of the main job's "docs" task,
the same windows in the same order for every variant; AdamW lr 2e-3; 2 threads. Step time: median over the
steps after ``--warmup`` (a callback around each optimizer step); peak RSS above the RSS after the trainer is
built (sampled every 5 ms); the logged loss of every step. Prints a Markdown table with the range over rounds.

    bash scripts/run.sh benchmarks/bench_trainer.py [--rounds 3] [--steps 12] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ("floor", "peft", "peft+lora_ext", "lora_ext")
ROWS, SEQ, LR = 4, 128, 2e-3


def _model(variant: str, model):
    import peft

    import lora_ext
    import lora_ext.integrations.peft

    for p in model.parameters():
        p.requires_grad_(False)
    if variant == "floor":
        model.model.norm.weight.requires_grad_(True)
        model.enable_input_require_grads()
        return model
    if variant == "lora_ext":
        return lora_ext.inject_adapter(
            model, lora_ext.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
        )
    lora_ext.integrations.peft.use_lora_ext(variant == "peft+lora_ext")
    return peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    )


def child(variant: str, steps: int, warmup: int, threads: int) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback

    from lora_ext_dev import llm_train, seed_methods, smollm2

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tokenizer = smollm2.load_smollm2(torch.float32)
    windows = llm_train.task_data(tokenizer, "docs", SEQ, 1)["train"]
    g = torch.Generator().manual_seed(0)
    chosen = windows[torch.randperm(len(windows), generator=g)[: ROWS * steps]]
    model = _model(variant, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = trl.SFTConfig(
        output_dir="/tmp/bench_trainer_out",
        max_steps=steps,
        per_device_train_batch_size=ROWS,
        learning_rate=LR,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
        train_dataset=datasets.Dataset.from_dict({"input_ids": chosen.tolist()}),
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    rss = seed_methods.PeakRSS().start()
    trainer.train()
    peak = rss.stop()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(
        variant=variant,
        step_s=statistics.median(times[warmup:]),
        times=times,
        losses=losses,
        peak_rss_increase=peak,
        trainable=trainable,
        bf16=args.bf16,
    )


def _run(variant: str, steps: int, warmup: int, threads: int) -> dict:
    from lora_ext_dev import timing

    return timing.run_child(
        __file__,
        ["--child", variant, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)],
        f"bench_trainer: {variant}",
    )


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def table(rounds: list[dict], variants: list[str]) -> str:
    lines = [
        "| variant | trainable | step (s) | / PEFT | / floor | / native lora_ext | peak RSS above the model | "
        "/ PEFT's | loss vs PEFT's, max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        rows = [r[v] for r in rounds]

        def ratio(other, key="step_s"):
            if other not in variants or other == v:
                return "-"
            return _range([x[key] / r[other][key] for x, r in zip(rows, rounds)], "{:.2f}x")

        loss = (
            "-"
            if v == "peft" or "peft" not in variants or v == "floor"
            else _range(
                [max(abs(a - b) for a, b in zip(x["losses"], r["peft"]["losses"])) for x, r in zip(rows, rounds)],
                "{:.3f}",
            )
        )
        lines.append(
            f"| {v} | {rows[0]['trainable']:,} | {_range([x['step_s'] for x in rows], '{:.2f}')} | "
            f"{ratio('peft')} | {ratio('floor')} | {ratio('lora_ext')} | "
            f"{_range([x['peak_rss_increase'] / 2**20 for x in rows], '{:.0f} MiB')} | "
            f"{ratio('peft', 'peak_rss_increase') if v != 'floor' else '-'} | {loss} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.warmup, a.threads)))
        return
    variants = a.variants.split(",")
    rounds = []
    for i in range(a.rounds):
        order = variants if i % 2 == 0 else variants[::-1]
        rounds.append({v: _run(v, a.steps, a.warmup, a.threads) for v in order})
        print(f"round {i + 1}: " + ", ".join(f"{v} {rounds[-1][v]['step_s']:.2f} s" for v in order), flush=True)
    print(table(rounds, variants))
    for v in variants:
        print(f"{v} losses (round 1): " + " ".join(f"{x:.3f}" for x in rounds[0][v]["losses"]))
    if a.out:
        Path(a.out).write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
