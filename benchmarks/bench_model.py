"""Whole-model LoRA training step on the real SmolLM2-135M: lora_ext against PEFT and the frozen floor (issue 14).

    bash scripts/run.sh benchmarks/bench_model.py              # 4 rounds, dropout 0 and 0.05 (~25 min idle)
    bash scripts/run.sh benchmarks/bench_model.py --quick      # 1 round, 3 timed steps (~4 min)
    bash scripts/run.sh benchmarks/bench_model.py --curve 50   # + PEFT, lora_ext and lora_ext+int8 loss curves
    bash scripts/run.sh benchmarks/bench_model.py --memory     # where the memory goes; the allocator's peak

The model is the main job's (dev/lora_ext_dev/smollm2.py: the GGUF's Q4_1 weights dequantized to float32), LoRA r=8,
alpha 16 on q/k/v/o/gate/up/down, batch 4 x 128 tokens of the "docs" training windows, AdamW, fp32, 2 threads.
Variants (``--variants``):

- ``floor``: every parameter frozen, backpropagating only to the input embeddings: the same network's forward
  and backward through every layer, no weight gradient, no optimizer. What any LoRA step costs at least.
- ``peft`` / ``lora_ext``: LoRA by PEFT (``get_peft_model``) / by lora_ext (``inject_adapter``).
- ``peft+ckpt`` / ``lora_ext+ckpt``: the same with transformers' per-block activation checkpointing
  (``gradient_checkpointing_enable``, non-reentrant).
- ``lora_ext+bf16`` / ``lora_ext+int8``: lora_ext with ``compress_saved_inputs("bf16" / "int8")`` around the
  forward: the input each LoRA layer keeps for the A gradient is saved in bfloat16 / int8 with a per-row scale.
- ``floor+compile`` / ``peft+compile`` / ``lora_ext+compile``: ``torch.compile(model)`` (inductor); the first
  ``--warmup`` steps include compilation and are untimed.
- ``full``: full fine-tuning (every parameter trains); ``full+compile`` the same compiled.

Each run is its own process (no allocator or cache state carries over), the order alternates between rounds,
and every figure is reported as the range over rounds. Step time: the median of the timed steps after
``--warmup`` untimed ones. Memory: the peak resident set size above the loaded, set-up model, sampled every 5 ms
(``dev/lora_ext_dev/seed_methods.py``'s PeakRSS); LoRA's own memory is the variant's increase minus the floor's.
This VM's whole-model steps vary by +-15% between runs: read ratios from the same round only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = (
    "floor",
    "peft",
    "lora_ext",
    "peft+ckpt",
    "lora_ext+ckpt",
    "lora_ext+bf16",
    "lora_ext+int8",
    "floor+compile",
    "peft+compile",
    "lora_ext+compile",
    "full",
    "full+compile",
)
ROWS, SEQ, LR, SEED = 4, 128, 2e-4, 0


def _batches(tokenizer, n: int) -> list[torch.Tensor]:
    from lora_ext_dev import llm_train

    windows = llm_train.task_data(tokenizer, "docs", SEQ, eval_windows=1)["train"]
    g = torch.Generator().manual_seed(SEED)
    return [windows[torch.randint(0, len(windows), (ROWS,), generator=g)] for _ in range(n)]


def _setup(variant: str, model, dropout: float):
    """(the module to call, the parameters that train)."""
    base = variant.split("+")[0]
    if "+ckpt" in variant.split("+"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if base == "full":
        return model, list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    if base == "floor":
        return model, []
    if base == "peft":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
        return net, [p for p in net.parameters() if p.requires_grad]
    if base == "lora_ext":
        import lora_ext

        lora_ext.inject_adapter(
            model, lora_ext.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
        )
        return model, [p for p in model.parameters() if p.requires_grad]
    raise ValueError(f"bench_model: expected a variant in {VARIANTS}, got {variant!r}")


def _compressed(variant: str):
    import contextlib

    mode = next((m for m in ("bf16", "int8") if m in variant.split("+")), None)
    if mode is None:
        return contextlib.nullcontext()
    import lora_ext

    return lora_ext.compress_saved_inputs(mode)


def _train_step(variant: str, net, embed, ids: torch.Tensor, opt) -> torch.Tensor:
    """One training step; returns the (detached) loss."""
    with _compressed(variant):
        if variant.startswith("floor"):
            x = embed(ids).detach().requires_grad_(True)  # the backward reaches every layer, no weight gradient
            loss = net(inputs_embeds=x, labels=ids).loss
        else:
            loss = net(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def _prepare(variant: str, dropout: float, threads: int, steps: int):
    """(model, ``steps`` batches, the module to call, the trainable parameters), in training mode."""
    from lora_ext_dev import smollm2

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    model, tokenizer = smollm2.load_smollm2(torch.float32)
    batches = _batches(tokenizer, steps)
    net, params = _setup(variant, model, dropout)
    net.train()
    return model, batches, net, params


def child(variant: str, dropout: float, steps: int, warmup: int, threads: int) -> dict:
    """One variant in this process: ``steps`` training steps; times, losses and the peak RSS increase."""
    from lora_ext_dev import seed_methods

    model, batches, net, params = _prepare(variant, dropout, threads, steps)
    if "compile" in variant.split("+"):
        net = torch.compile(net)
    opt = torch.optim.AdamW(params, lr=LR) if params else None
    embed = model.get_input_embeddings()
    rss = seed_methods.PeakRSS().start()
    times, losses = [], []
    for ids in batches:
        start = time.perf_counter()
        loss = _train_step(variant, net, embed, ids, opt)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = rss.stop()
    return dict(
        variant=variant,
        dropout=dropout,
        step_s=statistics.median(times[warmup:]),
        times=times,
        losses=losses,
        peak_rss_increase=peak,
        trainable=sum(p.numel() for p in params),
    )


def _category(stack: list) -> str:
    """Where a tensor saved for backward comes from, by the modules running when it was saved."""
    names = [type(m).__name__ for m in stack]
    mods = [type(m).__module__ for m in stack]
    if any(n == "LoraLinear" or (n == "Linear" and "peft" in mod) for n, mod in zip(names, mods)):
        return "LoRA layers (inputs for the A gradient, dropout, h)"
    for key, label in (
        ("RMSNorm", "norms"),
        ("Attention", "attention (q/k/v, softmax)"),
        ("MLP", "MLP (gate/up/act)"),
        ("Embedding", "embeddings"),
    ):
        if any(key in n for n in names[-1:]) or (names and key in names[-1]):
            return label
    if any("Attention" in n for n in names):
        return "attention (q/k/v, softmax)"
    if any("MLP" in n for n in names):
        return "MLP (gate/up/act)"
    return (
        "head, logits and loss" if not names or names[-1] in ("Linear", "LlamaForCausalLM") else f"other ({names[-1]})"
    )


def breakdown(variant: str, dropout: float, threads: int) -> dict:
    """Bytes saved for backward in one training step, by where they were saved (unique storages, parameters
    excluded), plus gradients and AdamW state of the trainable parameters."""
    from lora_ext_dev import smollm2

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    model, tokenizer = smollm2.load_smollm2(torch.float32)
    ids = _batches(tokenizer, 1)[0]
    net, params = _setup(variant, model, dropout)
    net.train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack, seen, by_cat = [], set(), {}

    def pre(module, args):
        stack.append(module)

    def post(module, args, out):
        stack.pop()

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in param_storages:
            seen.add(key)
            cat = _category(stack)
            by_cat[cat] = by_cat.get(cat, 0) + t.untyped_storage().nbytes()
        return t

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _compressed(variant):
            if variant.startswith("floor"):
                x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                loss = net(inputs_embeds=x, labels=ids).loss
            else:
                loss = net(input_ids=ids, labels=ids).loss
    finally:
        h1.remove()
        h2.remove()
    loss.backward()
    trainable = sum(p.numel() * p.element_size() for p in params)
    by_cat["gradients of the trainable parameters"] = trainable
    by_cat["AdamW state (2 moments)"] = 2 * trainable
    return dict(variant=variant, dropout=dropout, bytes=by_cat)


def allocator_peak(variant: str, dropout: float, threads: int, steps: int = 2) -> int:
    """The CPU allocator's peak during the first ``steps`` training steps, above the loaded, set-up model
    (bytes; from the profiler's memory events, so gradients and AdamW state are included)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    model, batches, net, params = _prepare(variant, dropout, threads, steps)
    opt = torch.optim.AdamW(params, lr=LR) if params else None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for ids in batches:
            _train_step(variant, net, model.get_input_embeddings(), ids, opt)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0
    ]
    return max(totals, default=0)


def _run(variant: str, dropout: float, steps: int, warmup: int, threads: int) -> dict:
    from lora_ext_dev import timing

    return timing.run_child(
        __file__,
        [
            "--child",
            variant,
            "--dropout",
            str(dropout),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--threads",
            str(threads),
        ],
        f"bench_model: {variant} (dropout {dropout})",
    )


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return (
        fmt.format(lo) if len(values) == 1 or fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"
    )


def table(rounds: list[dict], variants: list[str], dropouts: list[float]) -> str:
    lines = [
        "| variant | dropout | step (s) | / PEFT | / floor | peak RSS above the model | above the floor | "
        "/ PEFT's above the floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in dropouts:
        for v in variants:
            if v == "floor" and p != dropouts[0]:
                continue
            rows = [r[(v, p if v != "floor" else dropouts[0])] for r in rounds]
            floors = [r[("floor", dropouts[0])] for r in rounds] if "floor" in variants else None
            pefts = [r[("peft", p)] for r in rounds] if "peft" in variants else None
            step = _range([x["step_s"] for x in rows], "{:.2f}")
            vs_peft = _range([x["step_s"] / y["step_s"] for x, y in zip(rows, pefts)], "{:.2f}x") if pefts else "-"
            vs_floor = _range([x["step_s"] / y["step_s"] for x, y in zip(rows, floors)], "{:.2f}x") if floors else "-"
            mem = _range([x["peak_rss_increase"] / 2**30 for x in rows], "{:.2f} GiB")
            above = [x["peak_rss_increase"] - y["peak_rss_increase"] for x, y in zip(rows, floors)] if floors else None
            above_s = _range([a / 2**30 for a in above], "{:.2f} GiB") if above and v != "floor" else "-"
            ratio = "-"
            if above and pefts and v != "floor":
                peft_above = [y["peak_rss_increase"] - f["peak_rss_increase"] for y, f in zip(pefts, floors)]
                ratio = _range([a / b for a, b in zip(above, peft_above) if b > 0], "{:.2f}x")
            lines.append(
                f"| {v} | {p if v != 'floor' else '-'} | {step} | {vs_peft} | {vs_floor} | {mem} | "
                f"{above_s} | {ratio} |"
            )
    return "\n".join(lines)


def _print_breakdown(threads: int) -> None:
    runs = [("floor", 0.0)] + [
        (v, p) for p in (0.0, 0.05) for v in ("peft", "lora_ext", "lora_ext+bf16", "lora_ext+int8")
    ]
    got = []
    for v, p in runs:
        cmd = [sys.executable, "-P", __file__, "--breakdown", v, "--dropout", str(p), "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench_model: breakdown of {v} failed:\n{out.stderr[-3000:]}")
        got.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{v} (dropout {p}): allocator peak +{got[-1]['allocator_peak'] / 2**20:.1f} MiB", flush=True)
    cats = sorted({c for g in got for c in g["bytes"]})
    print(
        "\nMiB saved for backward in one step (unique storages, parameters excluded), plus gradients and AdamW "
        "state; and the CPU allocator's peak over the first 2 steps above the loaded model; batch 4 x 128, "
        "fp32\n"
    )
    print("| | " + " | ".join(f"{g['variant']} (dropout {g['dropout']})" for g in got) + " |")
    print("|---|" + "---|" * len(got))
    for c in cats:
        print(f"| {c} | " + " | ".join(f"{g['bytes'].get(c, 0) / 2**20:.1f}" for g in got) + " |")
    floor = next(g for g in got if g["variant"] == "floor")

    def above(g, key):
        return (
            (sum(g["bytes"].values()) - sum(floor["bytes"].values()))
            if key == "saved"
            else g["allocator_peak"] - floor["allocator_peak"]
        )

    print("| **saved total** | " + " | ".join(f"{sum(g['bytes'].values()) / 2**20:.1f}" for g in got) + " |")
    print("| **allocator peak** | " + " | ".join(f"{g['allocator_peak'] / 2**20:.1f}" for g in got) + " |")
    for key in ("saved", "allocator"):
        cells = []
        for g in got:
            peft = next(x for x in got if x["variant"] == "peft" and x["dropout"] == g["dropout"])
            mib, ratio = above(g, key) / 2**20, above(g, key) / above(peft, key)
            cells.append("-" if g is floor else f"{mib:.1f} ({ratio:.2f}x)")
        print(f"| {key} above the floor (/ PEFT's) | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dropouts", default="0,0.05")
    ap.add_argument("--variants", default="floor,peft,lora_ext,peft+ckpt,lora_ext+ckpt")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 round, 4 steps (2 timed), dropout 0.05 only")
    ap.add_argument("--curve", type=int, default=0, help="also N-step loss curves of PEFT and lora_ext")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_model.json"))
    ap.add_argument("--memory", action="store_true", help="only: where the memory of one step goes, by variant")
    ap.add_argument("--breakdown", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dropout, args.steps, args.warmup, args.threads)))
        return
    if args.breakdown:
        got = breakdown(args.breakdown, args.dropout, args.threads)
        got["allocator_peak"] = allocator_peak(args.breakdown, args.dropout, args.threads)
        print(json.dumps(got))
        return
    if args.memory:
        _print_breakdown(args.threads)
        return
    if args.quick:
        args.rounds, args.steps, args.dropouts = 1, 4, "0.05"
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"bench_model: expected variants from {VARIANTS}, got {bad}")
    dropouts = [float(p) for p in args.dropouts.split(",")]
    runs = [(v, p) for p in dropouts for v in variants if not (v == "floor" and p != dropouts[0])]
    rounds = []
    start = time.time()
    for r in range(args.rounds):
        order = runs if r % 2 == 0 else runs[::-1]
        got = {}
        for v, p in order:
            got[(v, p)] = _run(v, p, args.steps, args.warmup, args.threads)
            print(
                f"round {r + 1}: {v:14s} dropout {p}: {got[(v, p)]['step_s']:.2f} s/step, peak RSS +"
                f"{got[(v, p)]['peak_rss_increase'] / 2**30:.2f} GiB",
                flush=True,
            )
        rounds.append(got)
    print(
        f"\nSmolLM2-135M fp32, LoRA r=8 on {len(TARGETS)} projections, batch {ROWS}x{SEQ}, AdamW, "
        f"{args.threads} threads; {args.rounds} round(s) of {args.steps} steps ({args.warmup} untimed), "
        f"{time.time() - start:.0f} s\n"
    )
    if rounds:
        print(table(rounds, variants, dropouts))
    result = {"rounds": [{f"{v}@{p}": x for (v, p), x in r.items()} for r in rounds], "args": vars(args)}
    if args.curve:
        curves = {
            v: _run(v, 0.05, args.curve, 0, args.threads)["losses"] for v in ("peft", "lora_ext", "lora_ext+int8")
        }
        print(f"\nloss curves over {args.curve} steps (dropout 0.05, same seed and data)\n")
        print("| step | " + " | ".join(curves) + " |")
        print("|---|" + "---|" * len(curves))
        for i in sorted({0, *range(9, args.curve, 10), args.curve - 1}):
            print(f"| {i + 1} | " + " | ".join(f"{c[i]:.4f}" for c in curves.values()) + " |")
        for v in ("lora_ext", "lora_ext+int8"):
            worst = max(abs(a - b) / abs(b) for a, b in zip(curves[v], curves["peft"]))
            print(f"max relative difference {v} vs PEFT over the {args.curve} steps: {worst:.2e}")
        result["curves"] = curves
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
