"""Full fine-tuning vs adapter layers vs prompt tuning vs LoRA (PEFT, lora_ext) on the real SmolLM2-135M.

    nice -n 10 python -P benchmarks/seed_table.py [--quick] [--computed-only] [--out runs/seed_table/results.json]

Same model, data ("docs": the Python reference manual, ``dev/lora_ext_dev/corpora.py``), token budget (steps x 4 rows x
128 tokens), AdamW schedule (``llm_train.lr_at``), seed and sequence of training windows for every method. Each
(method, learning rate) run is its own process (``--worker``), one at a time, 2 threads; a first process
(``--prep``) builds the data, the forgetting set (CPython's LICENSE.txt windows + fixed chat prompts with the
base model's greedy answers) and the base model's logits on it. Printed: the measured table (best learning rate
of each method's sweep), the sweep, and the computed table for larger LLaMA shapes (meta device, never
downloaded); everything goes to ``--out`` as JSON. See ``dev/lora_ext_dev/seed_methods.py`` for the methods.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lora_ext  # noqa: E402
from lora_ext import BASE  # noqa: E402
from lora_ext_dev import corpora, llm_train, smollm2
from lora_ext_dev import seed_methods as sm

# A fourth, larger rate per method was added after the first full run found the third best for every method.
SWEEP = {
    "full": (1e-5, 3e-5, 1e-4, 3e-4),
    "adapters": (3e-4, 1e-3, 3e-3, 1e-2),
    "prompt": (3e-3, 1e-2, 3e-2, 1e-1),
    "peft_lora": (3e-4, 1e-3, 3e-3, 1e-2),
    "lora_ext_all": (3e-4, 1e-3, 3e-3, 1e-2),
    "lora_ext_qv": (3e-4, 1e-3, 3e-3, 1e-2),
}
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
)
# Seconds measured by a --quick run on this project's 2-core machine with nothing else running (for the
# estimate printed at the start): a training step (4 x 128 tokens) per method, a no-grad forward of 4 x 128, a
# run's fixed cost (process start, imports, model load, set-up, hashes, checkpoint), the prep's fixed cost.
STEP_S = {"full": 3.7, "adapters": 2.3, "prompt": 3.0, "peft_lora": 2.9, "lora_ext_all": 2.5, "lora_ext_qv": 2.1}
FORWARD_S, RUN_OVERHEAD_S, PREP_OVERHEAD_S = 1.0, 8.0, 15.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps, the middle learning rate only, 4 eval windows")
    p.add_argument("--computed-only", action="store_true", help="only the computed table")
    p.add_argument("--out", default=str(smollm2.REPO_ROOT / "runs" / "seed_table" / "results.json"))
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 24; --quick 3)")
    p.add_argument("--eval-windows", type=int, help="held-out windows of 128 tokens (default 24; --quick 4)")
    p.add_argument("--text-windows", type=int, help="LICENSE windows for forgetting (default 8; --quick 2)")
    p.add_argument(
        "--chat-prompts", type=int, help=f"chat prompts for forgetting (default {len(CHAT_PROMPTS)}; --quick 2)"
    )
    p.add_argument("--infer-reps", type=int, help="timed forwards after one warm-up (default 5; --quick 2)")
    p.add_argument("--methods", default=",".join(sm.METHODS))
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32, help="greedy answer tokens per chat prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--resume",
        metavar="RESULTS_JSON",
        help="keep the runs of an earlier full run (same settings) and do only the (method, lr) pairs it "
        "lacks, e.g. after the sweep was extended",
    )
    # internal: one process per run
    p.add_argument("--prep", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--worker", metavar="METHOD", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--time-inference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be >= 1")
    defaults = dict(
        steps=(3, 24), eval_windows=(4, 24), text_windows=(2, 8), chat_prompts=(2, len(CHAT_PROMPTS)), infer_reps=(2, 5)
    )
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    a.methods = a.methods.split(",")
    return a


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- prep: data, forgetting set, base model figures ----------------------------------------------------------


def safe_perplexity(net, heldout: torch.Tensor, adapter_name) -> float:
    try:
        return llm_train.perplexity(net, {adapter_name or BASE: heldout}, desc="held-out")[adapter_name or BASE]
    except OverflowError:  # a diverged run
        return math.inf


def prep(args) -> dict:
    folder = Path(args.prep)
    model, tokenizer = smollm2.load_smollm2()
    data = llm_train.task_data(tokenizer, "docs", args.seq_len, args.eval_windows)
    license_path, text = sm.unrelated_text()
    text_windows = corpora.token_windows(tokenizer, {"license": text}, args.seq_len)
    text_windows = corpora.spread(text_windows, args.text_windows)
    say(
        f"prep: forgetting set: {text_windows.shape[0]} windows of {license_path}, {args.chat_prompts} chat prompts "
        f"+ the base model's greedy {args.new_tokens}-token answers"
    )
    chats, answers = sm.chat_sequences(model, tokenizer, CHAT_PROMPTS[: args.chat_prompts], args.new_tokens)
    with torch.no_grad():
        base_text = torch.cat([model(input_ids=text_windows[i : i + 1]).logits for i in range(text_windows.shape[0])])
        base_chat = [model(input_ids=c).logits for c in chats]
    torch.save(
        {
            "train": data["train"],
            "heldout": data["heldout"],
            "text": text_windows,
            "base_text": base_text,
            "chats": chats,
            "base_chat": base_chat,
        },
        folder / "prep.pt",
    )
    ppl = safe_perplexity(model, data["heldout"], None)
    times, _ = sm.time_forward(model, data["heldout"][: args.rows], args.infer_reps)
    say(f"prep: base held-out perplexity {ppl:.3f}")
    return {
        "data": {
            "train_windows": data["train"].shape[0],
            "heldout_windows": data["heldout"].shape[0],
            "train_docs": data["train_docs"],
            "heldout_docs": data["heldout_docs"],
        },
        "forgetting_set": {
            "text_file": license_path,
            "text_windows": text_windows.shape[0],
            "chat": [
                {"prompt": p, "base_answer": a, "tokens": c.shape[1]} for p, a, c in zip(CHAT_PROMPTS, answers, chats)
            ],
        },
        "base": {
            "parameters": sm.unique_parameters(model),
            "perplexity": ppl,
            "infer_s": times,
            "infer_median_s": statistics.median(times),
            "sha256": smollm2.base_weights_hash(model),
        },
    }


# -- one (method, learning rate) run ------------------------------------------------------------------------


def _median_after_warmup(xs: list[float]) -> float:
    return statistics.median(xs[2:] if len(xs) > 2 else xs)


def train(s: sm.Setup, windows: torch.Tensor, args, lr: float) -> dict:
    """``args.steps`` AdamW steps on ``args.rows`` training windows each (the same windows for every run), the
    peak RSS increase sampled meanwhile, gradient and optimizer bytes after the first step."""
    opt = torch.optim.AdamW(s.params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)  # the same windows in the same order for every run
    warmup = max(1, args.steps // 10)
    losses, step_s, step_cpu_s = [], [], []
    s.net.train()
    sampler = sm.PeakRSS().start()
    for step in range(args.steps):
        ids, _ = llm_train.batch_for_step({"docs": windows}, args.rows, generator)
        t, c = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = llm_train.lr_at(step, args.steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss = (llm_train.row_nll(s.net(input_ids=ids).logits, ids) / (ids.shape[1] - 1)).mean()
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t)
        step_cpu_s.append(time.process_time() - c)  # all threads' CPU time: less sensitive to other load
        losses.append(loss.item())
        if step == 0:
            grad_bytes, opt_bytes = sm.grad_and_optimizer_bytes(s.params, opt)
        say(f"  {args.worker} lr={lr:g} step {step + 1}/{args.steps}: loss {losses[-1]:.4f}, {step_s[-1]:.2f} s")
    peak = sampler.stop()
    s.net.eval()
    return {
        "losses": losses,
        "step_s": step_s,
        "median_step_s": _median_after_warmup(step_s),
        "step_cpu_s": step_cpu_s,
        "median_step_cpu_s": _median_after_warmup(step_cpu_s),
        "rss_before_bytes": sampler.before,
        "peak_rss_increase_bytes": peak,
        "rss_samples": sampler.samples,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": opt_bytes,
        "grad_plus_optimizer_bytes": grad_bytes + opt_bytes,
    }


def worker(args) -> dict:
    method, lr, load_start = args.worker, args.lr, os.getloadavg()
    phases, t = {}, time.perf_counter()

    def phase(name):
        nonlocal t
        phases[name], t = time.perf_counter() - t, time.perf_counter()

    d = torch.load(Path(args.dir) / "prep.pt")
    model, _ = smollm2.load_smollm2()
    n_base = sm.unique_parameters(model)
    hash_before = smollm2.base_weights_hash(model)
    torch.manual_seed(args.seed)
    s = sm.setup(method, model)
    trainable = sum(p.numel() for p in s.params)
    r = {
        "method": method,
        "lr": lr,
        "steps": args.steps,
        "base_parameters": n_base,
        "trainable": trainable,
        "trainable_percent": 100 * trainable / n_base,
    }
    phase("setup")
    r.update(train(s, d["train"], args, lr))
    phase("train")
    r["perplexity"] = safe_perplexity(s.net, d["heldout"], s.adapter_name)
    phase("eval")
    r["kl_text"] = sm.forgetting_kl(s.net, [d["text"]], [d["base_text"]])
    r["kl_chat"] = sm.forgetting_kl(s.net, d["chats"], d["base_chat"])
    phase("forgetting")
    r["base_sha256_after"] = smollm2.base_weights_hash(s.base)
    r["base_changed"] = r["base_sha256_after"] != hash_before
    with tempfile.TemporaryDirectory(prefix="seed_table_ckpt_") as tmp:
        s.save(Path(tmp))
        r["checkpoint_files"] = sm.folder_bytes(Path(tmp))
    r["checkpoint_bytes"] = sum(r["checkpoint_files"].values())
    phase("hash_checkpoint")
    if args.time_inference:
        ids = d["heldout"][: args.rows]
        r["infer_unmerged_s"], logits = sm.time_forward(s.net, ids, args.infer_reps)
        r["infer_unmerged_median_s"] = statistics.median(r["infer_unmerged_s"])
        if s.merge is not None:
            r["infer_merged_s"], merged_logits = sm.time_forward(s.merge(), ids, args.infer_reps)
            r["infer_merged_median_s"] = statistics.median(r["infer_merged_s"])
            r["merged_max_abs_logit_diff"] = (merged_logits - logits).abs().max().item()
        phase("inference")
    r["phases_s"], r["wall_s"] = phases, sum(phases.values())
    r["loadavg_start"], r["loadavg_end"] = load_start, os.getloadavg()
    return r


# -- the driver ---------------------------------------------------------------------------------------------


def plan(args) -> list[tuple[str, float, bool]]:
    """(method, lr, time inference?) in run order: round-robin over the methods for each learning-rate index,
    the direction alternating between rounds, so slow drift of the machine does not hit one method. Inference
    (which does not depend on the weights' values) is timed once per method, in its middle-lr run."""
    n = 1 if args.quick else len(next(iter(SWEEP.values())))
    runs = []
    for i in range(n):
        order = args.methods if i % 2 == 0 else args.methods[::-1]
        for m in order:
            lrs = SWEEP[m][1:2] if args.quick else SWEEP[m]
            runs.append((m, lrs[i], i == len(lrs) // 2 or args.quick))
    return runs


def estimate_s(args, runs) -> float:
    """Seconds the runs should take on an otherwise idle machine (see :data:`STEP_S`)."""
    fwd = FORWARD_S * args.rows / 4 * args.seq_len / 128
    forgetting = args.text_windows + args.chat_prompts / 2  # chat sequences are ~70 tokens
    t = PREP_OVERHEAD_S + fwd / args.rows * (args.eval_windows + forgetting) + fwd * (args.infer_reps + 1)
    for m, _, infer in runs:
        t += RUN_OVERHEAD_S + args.steps * STEP_S[m] * fwd / FORWARD_S
        t += fwd / args.rows * (args.eval_windows + forgetting)
        t += fwd * (args.infer_reps + 1) * (2 if m in sm.LORA_TARGETS else 1) if infer else 0
    return t


def subprocess_json(flags: list[str], path: Path, args) -> dict:
    cmd = [
        sys.executable,
        "-P",
        str(Path(__file__).resolve()),
        *flags,
        "--dir",
        str(path.parent),
        "--steps",
        str(args.steps),
        "--eval-windows",
        str(args.eval_windows),
        "--text-windows",
        str(args.text_windows),
        "--chat-prompts",
        str(args.chat_prompts),
        "--infer-reps",
        str(args.infer_reps),
        "--rows",
        str(args.rows),
        "--seq-len",
        str(args.seq_len),
        "--new-tokens",
        str(args.new_tokens),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if proc.returncode != 0 or not path.exists():
        return {"error": f"exit status {proc.returncode}", "command": cmd}
    return json.loads(path.read_text())


# -- tables -------------------------------------------------------------------------------------------------


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Per method, the run with the lowest held-out perplexity, with the inference times of the method's run
    that timed them."""
    best = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        ok = [r for r in runs if r["method"] == m and "error" not in r]
        if not ok:
            continue
        b = dict(min(ok, key=lambda r: r["perplexity"]))
        for r in ok:
            b.update({k: v for k, v in r.items() if k.startswith(("infer_", "merged_"))})
        best[m] = b
    return best


def _mib(b) -> str:
    return f"{b / 2**20:,.1f}" if b >= 2**20 else f"{b / 2**20:.3f}"


def _gib(b) -> str:
    return f"{b / 2**30:,.2f}"


def _cell(r: dict, key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(r[key]) if key in r else "n/a"


def report(results: dict) -> str:
    a, lines = results["args"], []
    if "best" in results:
        best, base = results["best"], results["prep"]["base"]
        full_step = best.get("full", {}).get("median_step_s")
        loads = [r[k][0] for r in results["runs"] for k in ("loadavg_start", "loadavg_end") if k in r] or [math.nan]
        lines += [
            f"### Measured: SmolLM2-135M-Instruct, fp32, CPU ({a['threads']} threads), task 'docs', "
            f"{a['steps']} steps x {a['rows']} x {a['seq_len']} tokens, best learning rate of each sweep",
            "",
            f"Load average (1 min) at the runs' starts and ends: {min(loads):.1f} to {max(loads):.1f} on "
            f"{os.cpu_count()} cores; the time columns compare methods only while it stays near the "
            f"{a['threads']} threads used here.",
            "",
            "| method | trainable | trainable % | peak RSS increase (MiB) | grads + AdamW state (MiB) | "
            "median step, s (CPU s) | step / full FT | checkpoint (MiB) | base weights changed | "
            "held-out ppl | KL text | KL chat | inference unmerged (s) | inference merged (s) |",
            "|" + "---|" * 14,
            f"| base model, no training | 0 | 0 | | | | | | | {base['perplexity']:.3f} | 0 | 0 | "
            f"{base['infer_median_s']:.2f} | |",
        ]
        for m, r in best.items():
            ratio = f"{r['median_step_s'] / full_step:.2f}x" if full_step else "n/a"
            lines.append(
                f"| {m} | {r['trainable']:,} | {r['trainable_percent']:.3g} | {_mib(r['peak_rss_increase_bytes'])} | "
                f"{_mib(r['grad_plus_optimizer_bytes'])} | {r['median_step_s']:.2f} ({r['median_step_cpu_s']:.1f}) | "
                f"{ratio} | {_mib(r['checkpoint_bytes'])} | {'yes' if r['base_changed'] else 'no'} | "
                f"{r['perplexity']:.3f} (lr {r['lr']:g}) | {r['kl_text']:.4f} | {r['kl_chat']:.4f} | "
                f"{_cell(r, 'infer_unmerged_median_s')} | {_cell(r, 'infer_merged_median_s')} |"
            )
        lrs = max(len(SWEEP[m]) for m in best)
        lines += [
            "",
            "### Learning-rate sweep: held-out perplexity (final training loss); * = best",
            "",
            "| method |" + "".join(f" lr {i + 1} |" for i in range(lrs)),
            "|---|" + "---|" * lrs,
        ]
        for m in best:
            cells = []
            for r in (r for r in results["runs"] if r["method"] == m):
                if "error" in r:
                    cells.append(f"{r['lr']:g}: failed")
                else:
                    star = "*" if r["lr"] == best[m]["lr"] else ""
                    cells.append(f"{r['lr']:g}: {r['perplexity']:.3f}{star} ({r['losses'][-1]:.3f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    c = results["computed"]
    lines += [
        "",
        "### Computed, not measured: parameters and bytes of weights + gradients + AdamW state",
        "",
        "Models built on the meta device from their configs, each method set up on them. Optimizer "
        "state: the AdamW moments, plus the fp32 master weights for full fine-tuning. Precision: "
        f"{c['precision']}.",
        "",
        "| model | method | parameters | trainable | trainable % | weights (GiB) | gradients (GiB) | "
        "optimizer state (GiB) | total (GiB) |",
        "|" + "---|" * 9,
    ]
    for r in c["rows"]:
        b = r["bytes"]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['total']:,} | {r['trainable']:,} | "
            f"{r['trainable_percent']:.3g} | {_gib(b['weights'])} | {_gib(b['gradients'])} | "
            f"{_gib(b['optimizer'])} | {_gib(b['total'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.prep or args.worker:
        result = prep(args) if args.prep else worker(args)
        name = "prep.json" if args.prep else f"{args.worker}_{args.lr:g}.json"
        Path(args.dir or args.prep, name).write_text(json.dumps(result, indent=1, default=float))
        return result
    out = Path(args.out)
    results = {"args": vars(args), "torch": torch.__version__, "lora_ext": lora_ext.__version__}
    if not args.computed_only:
        runs = plan(args)
        say(
            f"seed_table: {len(runs)} runs of {args.steps} steps x {args.rows} x {args.seq_len} tokens, one process "
            f"each, {args.threads} threads; estimated {estimate_s(args, runs) / 60:.1f} min on an otherwise idle "
            "2-core machine like this project's (another busy process makes it several times longer)"
        )
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="seed_table_") as tmp:
            say("[prep] data, forgetting set, base model")
            results["prep"] = subprocess_json(["--prep", tmp], Path(tmp) / "prep.json", args)
            if "error" in results["prep"]:
                raise SystemExit(f"seed_table: the prep process failed: {results['prep']}")
            results["runs"] = []
            if args.resume:
                earlier = json.loads(Path(args.resume).read_text())
                keep = ("steps", "eval_windows", "text_windows", "chat_prompts", "rows", "seq_len", "seed", "threads")
                if any(earlier["args"][k] != getattr(args, k) for k in keep):
                    raise SystemExit(
                        f"seed_table --resume: {args.resume} was run with other settings "
                        f"{ {k: earlier['args'][k] for k in keep} }"
                    )
                results["runs"] = [r for r in earlier["runs"] if "error" not in r]
                # the base model's row is the earlier prep's (the base does not change; a run's prep figures are
                # from the same conditions as the runs they are compared with)
                results["prep_resumed"] = results["prep"]
                results["prep"] = {**results["prep"], "base": earlier["prep"]["base"]}
                results["resumed_from_total_s"] = earlier.get("total_s")
                done = {(r["method"], r["lr"]) for r in results["runs"]}
                timed = {r["method"] for r in results["runs"] if any(k.startswith("infer_") for k in r)}
                runs = [(m, lr, infer and m not in timed) for m, lr, infer in runs if (m, lr) not in done]
                say(f"--resume: {len(results['runs'])} runs kept from {args.resume}; {len(runs)} to do")
            for k, (m, lr, infer) in enumerate(runs):
                say(f"[{k + 1}/{len(runs)}] {m} lr={lr:g} ({(time.perf_counter() - t0) / 60:.1f} min so far)")
                r = subprocess_json(
                    ["--worker", m, "--lr", repr(lr)] + (["--time-inference"] if infer else []),
                    Path(tmp) / f"{m}_{lr:g}.json",
                    args,
                )
                results["runs"].append({"method": m, "lr": lr, **r})
                say(
                    "    -> "
                    + (
                        r["error"]
                        if "error" in r
                        else f"held-out ppl {r['perplexity']:.3f}, median step "
                        f"{r['median_step_s']:.2f} s, {r['wall_s']:.0f} s in all"
                    )
                )
        results["total_s"] = time.perf_counter() - t0
        results["best"] = best_runs(results["runs"])
    say("computing the table for larger shapes on the meta device")
    results["computed"] = {"precision": sm.PRECISION, "rows": sm.computed_table()}
    text = report(results)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    out.with_suffix(".md").write_text(text)
    took = f"; the runs took {results['total_s'] / 60:.1f} min" if "total_s" in results else ""
    say(f"wrote {out} and {out.with_suffix('.md')}{took}")
    return results


if __name__ == "__main__":
    main()
