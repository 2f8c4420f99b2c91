"""The main job's "docs" adapter trained on several processes under FSDP2, saved once, checked in one process.

    torchrun --nproc-per-node 2 examples/distributed_finetune.py [--steps 10] [--rows 2] [--out DIR] ...

gloo on CPU (each rank takes its share of the cores: ``--threads``), NCCL with one GPU per rank when CUDA is
available; ``python examples/distributed_finetune.py`` runs a world of one process.

1. every rank loads SmolLM2-135M-Instruct (``lora_ext_dev/smollm2.py``) and the task's data (``llm_train.task_data``),
   injects a LoRA adapter with its own seed, takes rank 0's initial adapter (``broadcast_adapters``: FSDP2
   does not broadcast) and shards the model (``lora_ext.distributed.shard_lora_model``: ``fully_shard`` on
   each ``model.layers.<i>``, then the root);
2. held-out perplexity of the base, each rank evaluating its share of the held-out windows (sums added up);
3. training (``llm_train.train_per_row``): each rank draws its rows from its own share of the training
   windows; FSDP2 averages the adapter's gradients over the ranks, so a step sees ``rows x world`` rows;
4. held-out perplexity with the adapter, as in 2;
5. the collective ``lora_ext.save_adapter`` (only the adapter is gathered; rank 0 writes PEFT's files);
6. the sharded model's logits on a few held-out windows (each rank its share, gathered on rank 0); rank 0
   loads the saved folder into a fresh, unsharded model, with ``lora_ext.load_adapter`` and with PEFT's
   ``PeftModel.from_pretrained``, and compares logits;
7. rank 0 writes ``OUT/results.json`` and prints the checks; every rank exits 1 when one failed.

:func:`finetune` is steps 1-6 on a given model and data (``tests/test_distributed_example.py`` runs it on
a tiny Llama in 2 ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import lora_ext  # noqa: E402
from lora_ext import BASE  # noqa: E402
from lora_ext_dev import corpora, llm_train, smollm2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(smollm2.REPO_ROOT / "runs" / "distributed_finetune"), help="output folder")
    p.add_argument("--task", default="docs", choices=corpora.TASKS)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--rows", type=int, default=2, help="training rows per rank and step")
    llm_train.add_lora_args(p, lr=3e-3)
    p.add_argument(
        "--eval-windows",
        type=int,
        default=24,
        help="held-out windows for perplexity (rounded down to a multiple of the world size)",
    )
    p.add_argument(
        "--check-windows",
        type=int,
        default=2,
        help="held-out windows whose logits are compared (rounded up to a multiple of the world size)",
    )
    p.add_argument(
        "--reshard-after-forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FSDP2: free the gathered block weights after the forward (gather them again for the "
        "backward); --no-reshard-after-forward keeps them, trading memory for communication",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per rank (default: the cores divided by the ranks on this machine)",
    )
    p.add_argument(
        "--min-drop",
        type=float,
        default=0.05,
        help="the check: the adapter lowers the held-out perplexity by at least this share",
    )
    return p.parse_args(argv)


def share(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of ``t``'s rows; ``t.shape[0]`` must divide by ``world`` (every rank
    of an FSDP2 model must run the same forwards)."""
    if t.shape[0] % world:
        raise ValueError(f"share: expected a row count divisible by the world size {world}, got {t.shape[0]}")
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def _perplexity(model, name: str, windows: torch.Tensor, rank: int, world: int, desc: str) -> float:
    """Held-out perplexity of adapter ``name`` on all ``windows``, each rank evaluating its share."""
    nll, tokens = llm_train.nll_sums(model, {name: share(windows, rank, world)}, desc=desc, progress=rank == 0)
    sums = torch.tensor([nll[name], tokens[name]], dtype=torch.float64, device=windows.device)
    dist.all_reduce(sums)
    return llm_train.to_perplexity({name: sums[0].item()}, {name: int(sums[1].item())})[name]


def finetune(model, make_fresh: Callable[[], torch.nn.Module], data: dict, args, log=None) -> dict:
    """Steps 1-6 of the module docstring on ``model`` (an unsharded causal LM in eval mode on this rank's
    device, the same pre-trained weights on every rank) and ``data`` (``{"train": [n, T], "heldout": [m, T]}``
    token windows on that device, the same on every rank). ``make_fresh()`` builds the unsharded model again
    (on rank 0, for the single-process check). Needs an initialized process group; every rank calls it and
    gets the same results (``results["checks"]``: name -> passed)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    log = log or llm_train.Logger(enabled=rank == 0)
    device = data["train"].device
    out = Path(args.out)
    task = args.task
    results: dict = {"args": vars(args), "world_size": world, "backend": dist.get_backend(), "timings_s": {}}
    timings = results["timings_s"]

    # 1. adapter, same on every rank, then shard -----------------------------------------------------------------
    n_base = sum(p.numel() for p in model.parameters())
    kind = type(model).__name__  # before fully_shard makes it FSDP<kind>
    config = llm_train.lora_config(args)
    torch.manual_seed(args.seed + rank)  # each rank its own initial adapter and dropout masks
    lora_ext.inject_adapter(model, config, adapter_name=task)
    lora_ext.distributed.broadcast_adapters(model, src=0)  # rank 0's initial adapter everywhere
    trainable, _ = lora_ext.trainable_parameters(model)
    blocks = [path for path, _ in lora_ext.distributed.transformer_blocks(model)]
    lora_ext.distributed.shard_lora_model(model, reshard_after_forward=args.reshard_after_forward)
    results["model"] = {"parameters": n_base, "trainable": trainable, "fsdp_blocks": len(blocks)}
    log.say(
        f"{world} rank(s), backend {dist.get_backend()}, {torch.get_num_threads()} thread(s) per rank; "
        f"{kind} with {n_base / 1e6:.1f}M parameters, LoRA r={args.r} alpha={args.alpha:g} "
        f"dropout={args.dropout:g} on {args.targets}: {trainable:,} trainable "
        f"({100 * trainable / n_base:.2f}%)"
    )
    log.say(
        f"FSDP2: fully_shard on {len(blocks)} blocks ({blocks[0]} ... {blocks[-1]}) + the root"
        if blocks
        else "FSDP2: no blocks found by the naming rule: fully_shard on the root only"
    )

    # 2. base perplexity, each rank its share ----------------------------------------------------------------------
    heldout = data["heldout"][: data["heldout"].shape[0] // world * world]
    log.phase(
        f"2. held-out perplexity of the base: {heldout.shape[0]} windows of {heldout.shape[1]} tokens, "
        f"{heldout.shape[0] // world} per rank"
    )
    t = time.perf_counter()
    base_ppl = _perplexity(model, BASE, heldout, rank, world, "base")
    timings["base_eval"] = time.perf_counter() - t
    log.say(f"base: {base_ppl:.2f} ({timings['base_eval']:.0f} s)")

    # 3. train, each rank on its own rows ---------------------------------------------------------------------------
    train = data["train"][rank::world]  # this rank's training windows
    log.phase(
        f"3. train {task!r} under FSDP2: {args.steps} steps x {args.rows} rows x {world} rank(s) of "
        f"{data['train'].shape[1]} tokens (each rank draws from its own {train.shape[0]} windows)"
    )
    t = time.perf_counter()
    # train_per_row gives its optimizer model.parameters(): after a forward with reshard_after_forward=False
    # (the evaluation above) those are FSDP2's gathered copies, which each all-gather overwrites and whose
    # gradients it moves to the shards: nothing would train. Back to the sharded parameters first.
    lora_ext.distributed.reshard(model)
    curve = llm_train.train_per_row(
        model, {task: train}, steps=args.steps, rows=args.rows, lr=args.lr, seed=args.seed, progress=rank == 0
    )[task]
    timings["train"] = time.perf_counter() - t
    losses = torch.tensor(curve, dtype=torch.float64, device=device)
    dist.all_reduce(losses)
    results["loss_curve"] = (losses / world).tolist()  # the mean over ranks: the loss of the whole step's batch
    tokens = args.steps * args.rows * world * data["train"].shape[1]
    log.say(
        f"trained in {timings['train']:.0f} s ({timings['train'] / args.steps:.2f} s/step, "
        f"{tokens / timings['train']:.0f} tokens/s over all ranks); loss (mean over ranks) "
        + " ".join(f"{v:.3f}" for v in results["loss_curve"])
    )

    # 4. adapter perplexity ------------------------------------------------------------------------------------------
    log.phase("4. held-out perplexity with the adapter")
    t = time.perf_counter()
    ppl = _perplexity(model, task, heldout, rank, world, task)
    timings["eval"] = time.perf_counter() - t
    drop = 1 - ppl / base_ppl
    results["perplexity"] = {"base": base_ppl, "adapter": ppl, "drop": drop}
    log.say(f"held-out {task} perplexity: base {base_ppl:.2f} -> adapter {ppl:.2f} ({100 * drop:.1f}% lower)")

    # 5. collective save ---------------------------------------------------------------------------------------------
    log.phase("5. lora_ext.save_adapter on the sharded model (collective: rank 0 writes)")
    t = time.perf_counter()
    path = Path(lora_ext.save_adapter(model, str(out / "adapter"), task))
    timings["save"] = time.perf_counter() - t
    files = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()} if rank == 0 else {}
    results["adapter"] = {"path": str(path), "files": files}
    log.say(
        f"saved {path} ({sum(files.values()) / 2**20:.2f} MiB: {', '.join(sorted(files))}) in {timings['save']:.1f} s"
    )

    # 6. sharded logits, gathered, against one process reading the saved folder -------------------------------------
    n_check = -(-args.check_windows // world) * world
    check = corpora.spread(heldout, n_check)
    log.phase(
        f"6. logits of the sharded model on {check.shape[0]} held-out windows vs a fresh unsharded model "
        "loading the saved folder"
    )
    t = time.perf_counter()
    with torch.no_grad():
        mine = model(input_ids=share(check, rank, world)).logits.contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
    dist.gather(mine, parts, dst=0)
    checks = None
    if rank == 0:
        sharded = torch.cat(parts)
        comparisons = {}
        with torch.no_grad():
            fresh = make_fresh()
            lora_ext.load_adapter(fresh, str(path), task)
            comparisons["lora_ext.load_adapter"] = llm_train.compare_logits(fresh(input_ids=check).logits, sharded)
            del fresh
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(make_fresh(), str(path)).eval()
            comparisons["PEFT from_pretrained"] = llm_train.compare_logits(peft_model(input_ids=check).logits, sharded)
            del peft_model
        for what, d in comparisons.items():
            log.say(llm_train.describe_comparison(f"unsharded + {what} vs sharded (gathered)", d))
        results["single_process"] = comparisons
        checks = {
            **{
                f"one process ({what}) reproduces the sharded model's logits": d["allclose"] and d["same_argmax"]
                for what, d in comparisons.items()
            },
            f"held-out perplexity >= {100 * args.min_drop:g}% lower than the base's": drop >= args.min_drop,
        }
    timings["check"] = time.perf_counter() - t
    box = [checks, results.get("single_process")]
    dist.broadcast_object_list(box, src=0)  # every rank returns (and exits with) rank 0's verdict
    results["checks"], results["single_process"] = box
    return results


def _init_process_group(device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:  # plain python: a world of one
        fd, path = tempfile.mkstemp(prefix="lora_ext-dist-")
        os.close(fd)
        store = dist.FileStore(path, 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_ranks))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    _init_process_group(device)
    try:
        rank = dist.get_rank()
        log = llm_train.Logger(enabled=rank == 0)
        log.phase("1. load SmolLM2-135M-Instruct and the data on every rank, inject, broadcast, shard")
        t = time.perf_counter()
        model, tokenizer = smollm2.load_smollm2()
        data = llm_train.task_data(tokenizer, args.task, args.seq_len, args.eval_windows)
        data = {k: data[k].to(device) for k in ("train", "heldout")}
        load_s = time.perf_counter() - t
        Path(args.out).mkdir(parents=True, exist_ok=True)
        results = finetune(model.to(device), lambda: smollm2.load_smollm2()[0].to(device), data, args, log)
        results["timings_s"] = {"load": load_s, **results["timings_s"], "total": time.perf_counter() - t_start}
        log.say("\n== summary")
        log.say("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items()))
        for what, ok in results["checks"].items():
            log.say(f"[{'ok' if ok else 'FAILED'}] {what}")
        if rank == 0:
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=float))
        return results
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(0 if all(main()["checks"].values()) else 1)
