"""The steps of the main job (``finetune_llm.py``) on a Hugging Face causal LM, reusable by the benchmarks and
tested in ``tests/test_llm_main_job.py``: data, held-out perplexity in per-row batches, training several
adapters at once on one frozen base, per-row generation, the PEFT round trip, plots."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lora_ext
from lora_ext import BASE

from . import corpora


def add_lora_args(parser, lr: float) -> None:
    """The LLM examples' shared options: ``--seq-len``, ``--lr`` (default ``lr``) and the LoRA config's
    ``--r``, ``--alpha``, ``--dropout``, ``--targets`` (read back with :func:`lora_config`)."""
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", default="all-linear", help='"all-linear" or a comma list, e.g. q_proj,v_proj')


def lora_config(args) -> lora_ext.LoraConfig:
    """The ``LoraConfig`` of the options :func:`add_lora_args` added."""
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    return lora_ext.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets)


def task_data(tokenizer, task: str, seq_len: int, eval_windows: int) -> dict:
    """Training windows (all) and ``eval_windows`` held-out windows spread over the held-out documents."""
    train, heldout = corpora.task_split(task)
    return {
        "train": corpora.token_windows(tokenizer, train, seq_len),
        "heldout": corpora.spread(corpora.token_windows(tokenizer, heldout, seq_len), eval_windows),
        "train_docs": len(train),
        "heldout_docs": len(heldout),
    }


def row_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-row sum of next-token negative log-likelihoods (``[rows]``, float32), and ``ids.shape[1] - 1``
    tokens predicted per row."""
    logp = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return logp.view(ids.shape[0], -1).sum(1)


def has_lora(model) -> bool:
    return next(lora_ext.lora_layers(model), None) is not None


def nll_sums(
    model, windows: dict[str, torch.Tensor], batch_rows: int = 8, desc: str = "eval", progress: bool = True
) -> tuple[dict[str, float], dict[str, int]]:
    """The parts of :func:`perplexity`: per named adapter (``BASE``: none), the summed next-token negative
    log-likelihood over its windows and the number of tokens predicted, all evaluated in mixed batches of
    ``batch_rows`` rows, each row through its own adapter (``lora_ext.adapter_batch``). A model without
    lora_ext layers takes only ``BASE``. Ranks that each evaluate their share of the windows add these up."""
    rows = [(name, w) for name, ws in windows.items() for w in ws]
    nll = {name: 0.0 for name in windows}
    per_row = has_lora(model)
    if not per_row and set(windows) != {BASE}:
        raise ValueError(f"perplexity: a model without lora_ext adapters takes only {BASE!r}, got {list(windows)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(rows), desc=desc, unit="seq", leave=False, disable=not progress) as bar:
            for i in range(0, len(rows), batch_rows):
                chunk = rows[i : i + batch_rows]
                ids = torch.stack([w for _, w in chunk])
                if per_row:
                    with lora_ext.adapter_batch(model, [name for name, _ in chunk]):
                        logits = model(input_ids=ids).logits
                else:
                    logits = model(input_ids=ids).logits
                for (name, _), v in zip(chunk, row_nll(logits, ids).tolist()):
                    nll[name] += v
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return nll, {name: ws.shape[0] * (ws.shape[1] - 1) for name, ws in windows.items()}


def to_perplexity(nll: dict[str, float], tokens: dict[str, int]) -> dict[str, float]:
    """``exp(nll / tokens)`` per name; a diverged model: an infinite (mean loss above ~709 nats) or NaN
    perplexity, not an OverflowError."""
    mean = {name: nll[name] / tokens[name] for name in nll}
    return {name: math.inf if v > 700 else math.exp(v) for name, v in mean.items()}


def perplexity(model, windows: dict[str, torch.Tensor], batch_rows: int = 8, desc: str = "eval") -> dict[str, float]:
    """Held-out perplexity of ``model`` with each named adapter (``BASE``: none) on its windows, all
    evaluated in mixed batches of ``batch_rows`` rows, each row through its own adapter
    (``lora_ext.adapter_batch``). A model without lora_ext layers takes only ``BASE``."""
    return to_perplexity(*nll_sums(model, windows, batch_rows, desc))


def adapter_parameters(model, adapter_name: str) -> int:
    """How many parameters one adapter has."""
    return sum(
        w.numel()
        for _, layer in lora_ext.lora_layers(model)
        if layer.has_adapter(adapter_name)
        for w in layer.adapter_weights(adapter_name)
    )


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_for_step(windows: dict[str, torch.Tensor], rows: int, generator: torch.Generator):
    """``(input_ids [rows * n_tasks, T], adapter name per row)``: ``rows`` random training windows per task."""
    ids, names = [], []
    for name, ws in windows.items():
        ids.append(ws[torch.randint(0, ws.shape[0], (rows,), generator=generator)])
        names += [name] * rows
    return torch.cat(ids), names


def train_per_row(
    model,
    windows: dict[str, torch.Tensor],
    steps: int,
    rows: int,
    lr: float,
    seed: int = 0,
    warmup: Optional[int] = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train the adapters named in ``windows`` at once: each step takes ``rows`` windows per adapter, runs
    the whole batch with every row through its own adapter, and minimises the sum of the adapters' mean
    token losses (so each adapter's gradient is the one it would get alone). Returns the loss curves."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_per_row: the model has no trainable parameters (set_adapter(model, names) first)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10) if warmup is None else warmup
    generator = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = {name: [] for name in windows}
    seq_len = next(iter(windows.values())).shape[1]
    model.train()
    t0 = time.perf_counter()
    with tqdm(range(steps), desc="train", unit="step", disable=not progress) as bar:
        for step in bar:
            ids, names = batch_for_step(windows, rows, generator)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            with lora_ext.adapter_batch(model, names):
                logits = model(input_ids=ids).logits
            per_row = row_nll(logits, ids) / (seq_len - 1)
            losses = {name: per_row[i * rows : (i + 1) * rows].mean() for i, name in enumerate(windows)}
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
            for name, v in losses.items():
                curves[name].append(v.item())
            tok_s = (step + 1) * ids.numel() / (time.perf_counter() - t0)
            bar.set_postfix({**{f"loss_{n}": f"{c[-1]:.3f}" for n, c in curves.items()}, "tok/s": f"{tok_s:.0f}"})
    model.eval()
    return curves


def generate_per_row(model, tokenizer, prompts: dict[str, str], new_tokens: int) -> dict:
    """Greedy generation from each task's prompt with the base and with the task's adapter, all rows in one
    batch with per-row adapters; each row is checked against the same batch generated with only that row's
    adapter active (``set_adapter``) or with adapters disabled. Leaves the last adapter active, in inference
    mode."""
    rows = [(task, name) for task in prompts for name in (BASE, task)]
    tokenizer.padding_side = "left"
    enc = tokenizer([prompts[task] for task, _ in rows], return_tensors="pt", padding=True)
    kwargs = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    n_in = enc["input_ids"].shape[1]
    names = list(dict.fromkeys(name for _, name in rows))
    with tqdm(total=1 + len(names), desc="generate", unit="batch", leave=False) as bar:
        t = time.perf_counter()
        with lora_ext.adapter_batch(model, [name for _, name in rows]):
            out = model.generate(**enc, **kwargs)[:, n_in:]
        seconds = time.perf_counter() - t
        bar.update()
        alone = {}
        for name in names:
            if name == BASE:
                with lora_ext.disable_adapters(model):
                    alone[name] = model.generate(**enc, **kwargs)[:, n_in:]
            else:
                lora_ext.set_adapter(model, name, inference_mode=True)
                alone[name] = model.generate(**enc, **kwargs)[:, n_in:]
            bar.update()
    result = {"seconds_per_row_batch": seconds, "rows": []}
    for i, (task, name) in enumerate(rows):
        result["rows"].append(
            {
                "task": task,
                "adapter": name,
                "prompt": prompts[task],
                "text": tokenizer.decode(out[i], skip_special_tokens=True),
                "tokens": out[i].tolist(),
                "equals_adapter_alone": bool(torch.equal(out[i], alone[name][i])),
            }
        )
    return result


# Equal logits, for fp32 through 30 layers computed in another order (merged weights, PEFT's modules):
# |a - b| <= ATOL + RTOL * |b| elementwise (logits are O(10); measured differences are ~1e-4), and the same
# greedy token at every position.
RTOL, ATOL = 1e-4, 1e-3


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "max_abs_logit": b.abs().max().item(),
        "allclose": bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL)),
        "same_argmax": bool(torch.equal(a.argmax(-1), b.argmax(-1))),
    }


def describe_comparison(what: str, d: dict) -> str:
    return (
        f"{what}: max |logit diff| {d['max_abs_diff']:.2e} (logits up to {d['max_abs_logit']:.1f}), "
        f"equal within rtol {RTOL:g}/atol {ATOL:g}: {d['allclose']}, same argmax everywhere: {d['same_argmax']}"
    )


def peft_round_trip(model, folder: Path, names, ids: torch.Tensor, log=None) -> dict:
    """Save ``names`` in PEFT's format under ``folder/<name>``, load them into a fresh base with PEFT, compare
    logits on ``ids`` per adapter; then merge: the first adapter with lora_ext's ``merge_and_unload`` (on
    ``model``, which ends as a plain merged model) and the last with PEFT's, each against lora_ext's
    unmerged logits."""
    from peft import PeftModel

    from . import smollm2

    say = log.say if log is not None else print
    out = {"adapters": {}}
    for name in names:
        path = Path(lora_ext.save_adapter(model, str(folder), name))
        files = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
        out["adapters"][name] = {"path": str(path), "bytes": sum(files.values()), "files": files}
        say(f"saved {name!r}: {path} ({sum(files.values()) / 2**20:.2f} MiB: {', '.join(sorted(files))})")
    ours = {}
    model.eval()
    with torch.no_grad():
        for name in names:
            lora_ext.set_adapter(model, name, inference_mode=True)
            ours[name] = model(input_ids=ids).logits
        fresh, _ = smollm2.load_smollm2()
        peft_model = PeftModel.from_pretrained(fresh, str(folder / names[0]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(folder / name), adapter_name=name)
        peft_model.eval()
        for name in names:
            peft_model.set_adapter(name)
            out[f"peft_vs_lora_ext_{name}"] = d = compare_logits(peft_model(input_ids=ids).logits, ours[name])
            say(describe_comparison(f"PEFT PeftModel.from_pretrained({name!r}) vs lora_ext", d))
        first, last = names[0], names[-1]
        lora_ext.set_adapter(model, first, inference_mode=True)
        merged = lora_ext.merge_and_unload(model)
        out[f"lora_ext_merged_{first}"] = d = compare_logits(merged(input_ids=ids).logits, ours[first])
        say(describe_comparison(f"lora_ext.merge_and_unload({first!r}) vs unmerged", d))
        peft_model.set_adapter(last)
        merged_peft = peft_model.merge_and_unload()
        out[f"peft_merged_{last}"] = d = compare_logits(merged_peft(input_ids=ids).logits, ours[last])
        say(describe_comparison(f"PEFT merge_and_unload({last!r}) vs lora_ext unmerged", d))
    return out


def plot_losses(
    curves: dict[str, list[float]], path: Path, heldout: Optional[dict[str, tuple[float, float]]] = None
) -> None:
    """Per-adapter training loss per step (and its running mean) into ``path`` (PNG); ``heldout``: each
    adapter's held-out perplexity on its own task ``(base, after training)``, drawn as its loss (ln ppl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, c in curves.items():
        (line,) = ax.plot(range(1, len(c) + 1), c, alpha=0.35, label=f"{name} (per step)")
        k = max(1, len(c) // 10)
        smooth = [sum(c[max(0, i - k + 1) : i + 1]) / len(c[max(0, i - k + 1) : i + 1]) for i in range(len(c))]
        ax.plot(range(1, len(c) + 1), smooth, color=line.get_color(), label=f"{name} (mean of {k})")
        if heldout and name in heldout:
            before, after = (math.log(v) for v in heldout[name])
            ax.plot(
                [0, len(c)],
                [before, after],
                "o--",
                color=line.get_color(),
                linewidth=2,
                label=f"{name}: held-out loss, base -> adapter",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Two LoRA adapters trained at once on one frozen SmolLM2-135M")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


class Logger:
    """Prints phases and lines without breaking tqdm's bars; prints nothing when not ``enabled`` (the
    ranks other than 0 of a distributed run)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def phase(self, text: str) -> None:
        self.say(f"\n== {text}")

    def say(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def table(self, table: dict[str, dict[str, float]], base_before: dict[str, float]) -> None:
        tasks = list(table)
        self.say(f"{'held-out perplexity':<22}" + "".join(f"{t:>16}" for t in tasks))
        for name in next(iter(table.values())):
            label = "base" if name == BASE else f"{name} adapter"
            cells = []
            for t in tasks:
                v = table[t][name]
                cells.append(f"{v:8.2f} ({100 * (v / base_before[t] - 1):+5.1f}%)")
            self.say(f"{label:<22}" + "".join(f"{c:>16}" for c in cells))

    def generations(self, gen: dict) -> None:
        for row in gen["rows"]:
            label = "base" if row["adapter"] == BASE else f"{row['adapter']} adapter"
            self.say(f"--- {row['task']} prompt, {label} (equals that adapter alone: {row['equals_adapter_alone']})")
            self.say(repr(row["text"]))

    def summary(self, results: dict, out: Path) -> None:
        table, base = results["perplexity"]["table"], results["perplexity"]["base_before_training"]
        self.say("\n== summary")
        for task, drop in results["own_task_drop"].items():
            self.say(
                f"{task} adapter on held-out {task}: perplexity {base[task]:.2f} -> {table[task][task]:.2f} "
                f"({100 * drop:.1f}% lower)"
            )
        sizes = ", ".join(f"{n} {a['bytes'] / 2**20:.2f} MiB" for n, a in results["interop"]["adapters"].items())
        self.say(
            f"trainable per adapter: {results['trainable']['per_adapter_percent']:.2f}% of the base; "
            f"adapter files: {sizes}; base bit-identical after training: {results['base_unchanged']}"
        )
        t = results["timings_s"]
        self.say("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
        self.say(f"wrote {out / 'results.json'}, {out / 'loss.png'}, {out / 'adapters'}/")
