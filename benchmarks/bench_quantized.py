"""LoRA training and decoding on a quantized frozen base (issue 15), against the fp32 base.

Variants (SmolLM2-135M-Instruct, real weights; LoRA r=8 on the 7 projections, batch 4 x 128, AdamW):
  fp32   transformers' model dequantized from the GGUF (dev/lora_ext_dev/smollm2.py; the floor of every comparison)
  q4_1   lora_ext.quant.gguf.load_gguf_llama: the GGUF file's Q4_1 projections and Q8_0 embedding, as stored
  int8   the fp32 model with its projections quantized to int8 (one scale per row)
  nf4    the fp32 model with its projections quantized to QLoRA's nf4

Modes (each prints a markdown table; figures are measured, nothing is asserted):
  (default)  per variant in its own process (MALLOC_MMAP_THRESHOLD_=131072, so that RSS is what the allocator
             holds; --glibc-default to drop it): bytes of the base weights held, RSS above the process before
             loading once loaded and at the training peak, and weights + the allocator's training peak;
             then, all variants loaded in one process, interleaved rounds in
             alternating order: training step time and batch-1 decode time (one token with a KV cache),
             reported as ranges of the ratio to fp32 measured in the same round.
  --ppl      held-out perplexity of both of the main job's adapters after its training budget (48 steps of
             2 + 2 rows, per-row adapters) for each variant.
  --llama1b  a 1B-class LLaMA (TinyLlama-1.1B's shape) with RANDOM weights, memory and speed only: peak RSS
             of 3 LoRA training steps with an fp32 base and a q4_0 / nf4 / int8 base (projections built straight
             into the format), each in its own process.

    bash scripts/run.sh benchmarks/bench_quantized.py [--rounds 5] [--ppl] [--llama1b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ("fp32", "q4_1", "int8", "nf4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS, SEQ, LR = 4, 128, 2e-4


def load(variant: str, tiny: bool = False):
    """(model, tokenizer) of a variant, in eval mode, nothing trainable yet."""
    import lora_ext
    from lora_ext.quant.gguf import load_gguf_llama
    from lora_ext_dev import smollm2

    if tiny:
        return _tiny(variant), None
    if variant == "q4_1":
        return load_gguf_llama(smollm2.gguf_path()), _tokenizer()
    model, tok = smollm2.load_smollm2(torch.float32)
    with torch.no_grad():  # own the weights: not views of the cache file's memory map, which RSS counts once read
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    if variant in ("int8", "nf4"):
        lora_ext.quantize_linear_layers(model, variant)
    elif variant != "fp32":
        raise ValueError(f"bench_quantized: expected a variant in {VARIANTS}, got {variant!r}")
    return model, tok


def _tokenizer():
    """The tokenizer alone, from the fp32 model's cache (main() makes sure it exists)."""
    from transformers import AutoTokenizer

    from lora_ext_dev import smollm2

    return AutoTokenizer.from_pretrained(smollm2.cache_dir())


def _tiny(variant: str):
    """--quick: a 2-layer random LLaMA (hidden 64) standing in for the real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_ext

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    if variant != "fp32":
        lora_ext.quantize_linear_layers(model, "q4_1" if variant == "q4_1" else variant)
    return model.eval()


def base_bytes(model) -> int:
    """Bytes of the frozen base held: parameters, buffers (quantized bytes included), each tensor once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


def batches(tok, n: int, vocab: int, tiny: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if tiny:
        return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]
    from lora_ext_dev import llm_train

    windows = llm_train.task_data(tok, "docs", SEQ, eval_windows=1)["train"]
    return [windows[torch.randint(0, len(windows), (ROWS,), generator=g)] for _ in range(n)]


def with_lora(model):
    import lora_ext

    torch.manual_seed(0)
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def train_step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def child_memory(variant: str, steps: int, tiny: bool) -> dict:
    """Memory of one variant in this process: the base weights held, and RSS above the process before loading
    (imports done) once loaded and at the peak of `steps` training steps. Freed heap is returned to the system
    (malloc_trim) before training, so quantizing an fp32 model in place is not charged for the fp32 load."""
    import ctypes
    import gc
    import tempfile

    import gguf  # noqa: F401  (imports first: the figures count the model and its training, not modules)
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    from lora_ext_dev import (
        llm_train,  # noqa: F401
        seed_methods,
    )

    rss = seed_methods.PeakRSS()
    before = rss.rss()
    model, tok = load(variant, tiny)
    held = base_bytes(model)
    data = batches(tok, steps, model.config.vocab_size, tiny)
    opt = with_lora(model)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss.start()
    loaded = rss.before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        losses = [train_step(model, opt, ids) for ids in data]
    peak = rss.stop() + loaded
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    alloc = max(
        (
            e["args"]["Total Allocated"]
            for e in events
            if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0
        ),
        default=0,
    )
    return dict(
        variant=variant,
        base_bytes=held,
        loaded_rss=loaded - before,
        peak_rss=peak - before,
        alloc_peak=alloc,
        losses=losses,
    )


def run_child(args: list[str], mmap_threshold: bool = True) -> dict:
    # glibc keeps freed heap (the adaptive mmap threshold moves large blocks into the heap), so RSS overstates what
    # the allocator holds; a fixed threshold returns large blocks to the system as they are freed.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if mmap_threshold else None
    out = subprocess.run([sys.executable, "-P", __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bench_quantized {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_s(model, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds per generated token at batch 1 (greedy, KV cache), LoRA unmerged."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / tokens


def speed(variants, rounds: int, tiny: bool) -> dict:
    """Interleaved rounds in one process: {variant: [(step_s, decode_s) per round]}."""
    models = {}
    for v in variants:
        model, tok = load(v, tiny)
        models[v] = (model, with_lora(model), tok)
    data = batches(next(iter(models.values()))[2], 2, models[variants[0]][0].config.vocab_size, tiny)
    prompt = data[0][:1, :32]
    res = {v: [] for v in variants}
    for k in range(rounds + 1):  # round 0 warms up
        order = list(variants) if k % 2 == 0 else list(reversed(variants))
        for v in order:
            model, opt, _ = models[v]
            model.train()
            start = time.perf_counter()
            for ids in data:
                train_step(model, opt, ids)
            step = (time.perf_counter() - start) / len(data)
            model.eval()
            dec = decode_s(model, prompt, 8 if tiny else 24)
            if k:
                res[v].append((step, dec))
    return res


def _range(vals, fmt="{:.2f}") -> str:
    lo, hi = min(vals), max(vals)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def main_default(args) -> None:
    variants = args.variants.split(",")
    if not args.quick:
        from lora_ext_dev import smollm2

        smollm2.load_smollm2()  # builds the cache the children read the tokenizer from
    mem = {
        v: run_child(
            ["--child", v, "--steps", str(args.mem_steps)] + (["--quick"] if args.quick else []), not args.glibc_default
        )
        for v in variants
    }
    sp = speed(variants, args.rounds, args.quick)
    f = mem.get("fp32")
    print(
        f"\n## bench_quantized: SmolLM2-135M{' (--quick: tiny random LLaMA)' if args.quick else ''}, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds\n"
    )
    print(
        "| base | bytes/weight (projections) | base weights MB | × fp32 | RSS loaded MB | peak RSS MB (train) "
        "| × fp32 | weights + allocator peak MB | × fp32 | step s | step × fp32 | decode ms/token "
        "| decode × fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bpw = {"fp32": 4.0, "q4_1": 20 / 32, "int8": 1 + 4 / 1536, "nf4": 0.5 + 4 / 64, "q4_0": 18 / 32}
    for v in variants:
        m = mem[v]
        rounds = sp[v]
        step_ratio = [s / sp["fp32"][i][0] for i, (s, _) in enumerate(rounds)] if "fp32" in sp else [1]
        dec_ratio = [d / sp["fp32"][i][1] for i, (_, d) in enumerate(rounds)] if "fp32" in sp else [1]
        print(
            f"| {v} | {bpw.get(v, 0):.3f} | {m['base_bytes'] / 2**20:.0f} | "
            f"{m['base_bytes'] / f['base_bytes']:.3f} | {m['loaded_rss'] / 2**20:.0f} | "
            f"{m['peak_rss'] / 2**20:.0f} | "
            f"{m['peak_rss'] / f['peak_rss']:.2f} | {(m['base_bytes'] + m['alloc_peak']) / 2**20:.0f} | "
            f"{(m['base_bytes'] + m['alloc_peak']) / (f['base_bytes'] + f['alloc_peak']):.2f} | "
            f"{_range([s for s, _ in rounds])} | {_range(step_ratio)} | "
            f"{_range([d * 1e3 for _, d in rounds], '{:.1f}')} | {_range(dec_ratio)} |"
        )
    print("\nlosses of the memory runs:", {v: [round(x, 4) for x in mem[v]["losses"]] for v in variants})


def main_ppl(args) -> None:
    from lora_ext_dev import load_example

    finetune_llm = load_example("finetune_llm")
    import lora_ext
    from lora_ext_dev import llm_train

    ma = finetune_llm.parse_args([])
    print(
        f"\n## held-out perplexity after the main job's budget ({ma.steps} steps, {ma.rows}+{ma.rows} rows, "
        f"seq {ma.seq_len}, r={ma.r}, dropout {ma.dropout})\n"
    )
    print("| base | docs ppl (base → adapter) | code ppl (base → adapter) | train s/step |")
    print("|---|---|---|---|")
    for v in args.variants.split(","):
        model, tok = load(v)
        data = {t: llm_train.task_data(tok, t, ma.seq_len, ma.eval_windows) for t in finetune_llm.TASKS}
        held = {t: data[t]["heldout"] for t in finetune_llm.TASKS}
        torch.manual_seed(ma.seed)
        for t in finetune_llm.TASKS:
            lora_ext.add_adapter(model, llm_train.lora_config(ma), t)
        lora_ext.set_adapter(model, list(finetune_llm.TASKS))
        start = time.perf_counter()
        llm_train.train_per_row(
            model,
            {t: data[t]["train"] for t in finetune_llm.TASKS},
            steps=ma.steps,
            rows=ma.rows,
            lr=ma.lr,
            seed=ma.seed,
            progress=False,
        )
        per = (time.perf_counter() - start) / ma.steps
        after = llm_train.perplexity(model, held, desc="adapters")
        base_t = {
            t: llm_train.perplexity(model, {lora_ext.BASE: held[t]}, desc="base")[lora_ext.BASE]
            for t in finetune_llm.TASKS
        }
        print(
            f"| {v} | {base_t['docs']:.2f} → {after['docs']:.2f} | {base_t['code']:.2f} → {after['code']:.2f} "
            f"| {per:.2f} |",
            flush=True,
        )


def child_1b(variant: str, steps: int) -> dict:
    """A TinyLlama-1.1B-shaped LLaMA with random weights, its projections built straight into `variant`
    (never a whole fp32 model when quantized): peak RSS of `steps` LoRA training steps, and their times."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_ext
    from lora_ext.quant import quantize
    from lora_ext_dev import seed_methods

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    import ctypes
    import gc

    rss = seed_methods.PeakRSS()
    before = rss.rss()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    for name, m in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if isinstance(m, torch.nn.Linear):
            w = torch.randn(m.out_features, m.in_features) * 0.02
            new = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            new.weight.data = w
            if variant != "fp32" and leaf != "lm_head":
                new = lora_ext.QuantLinear(quantize(w, variant))
            setattr(model.get_submodule(parent), leaf, new)
        elif isinstance(m, torch.nn.Embedding):
            setattr(model.get_submodule(parent), leaf, torch.nn.Embedding(m.num_embeddings, m.embedding_dim))
        elif hasattr(m, "weight") and isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.is_meta:
            m.weight = torch.nn.Parameter(torch.ones(m.weight.shape))
    held = base_bytes(model)
    model.requires_grad_(False)
    opt = with_lora(model)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the quantizer's temporaries are not training memory
    rss.start()
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=g)
        start = time.perf_counter()
        train_step(model, opt, ids)
        times.append(time.perf_counter() - start)
    peak = rss.stop() + rss.before
    return dict(variant=variant, base_bytes=held, loaded_rss=rss.before - before, peak_rss=peak - before, times=times)


def main_1b(args) -> None:
    res = [run_child(["--child-1b", v, "--steps", "3"]) for v in ("fp32", "q4_0", "nf4", "int8")]
    print(
        "\n## 1B-class LLaMA (TinyLlama-1.1B shape), RANDOM weights: memory and speed only; r=8 on the 7 "
        "projections, batch 1 x 128, 3 steps; embedding and lm_head stay fp32\n"
    )
    print("| base | base weights MB | RSS built MB | peak RSS MB (train) | × fp32 | step s (last) |")
    print("|---|---|---|---|---|---|")
    for r in res:
        print(
            f"| {r['variant']} | {r['base_bytes'] / 2**20:.0f} | {r['loaded_rss'] / 2**20:.0f} | "
            f"{r['peak_rss'] / 2**20:.0f} | "
            f"{r['peak_rss'] / res[0]['peak_rss']:.2f} | {r['times'][-1]:.1f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--glibc-default",
        action="store_true",
        help="memory children without MALLOC_MMAP_THRESHOLD_=131072 (RSS then includes glibc's retention)",
    )
    p.add_argument("--ppl", action="store_true")
    p.add_argument("--llama1b", action="store_true")
    p.add_argument("--quick", action="store_true", help="a tiny random LLaMA, 1 round (CI's smoke run)")
    p.add_argument("--child")
    p.add_argument("--child-1b")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args.child, args.steps, args.quick)))
    elif args.child_1b:
        print(json.dumps(child_1b(args.child_1b, args.steps)))
    elif args.ppl:
        main_ppl(args)
    elif args.llama1b:
        main_1b(args)
    else:
        if args.quick:
            args.rounds = 1
        main_default(args)


if __name__ == "__main__":
    main()
