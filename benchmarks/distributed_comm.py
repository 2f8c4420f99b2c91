"""Communication of distributed LoRA training: DDP, FSDP2 and tensor parallel, measured on 2 gloo ranks.

Run it with the project's virtual env, with ``-P`` so the source folder ``lora_ext/`` does not
shadow the installed package::

    .venv/bin/python -P benchmarks/distributed_comm.py            # about 20 s on 2 cores
    .venv/bin/python -P benchmarks/distributed_comm.py --quick    # smoke run (about 10 s): fewer steps, smaller batch

A fixed small model: 2 pre-norm transformer blocks (d=256, 4 heads of 64, causal attention with
q/k/v/o ``Linear(256, 256)``, an MLP ``Linear(256, 1024)`` -> GELU -> ``Linear(1024, 256)``, frozen
LayerNorms) and a final LayerNorm; LoRA r=8 (``lora_alpha`` 16, random B: ``init_lora_weights=False``)
on q, k, v, o, up and down of both blocks; fp32. Two ranks (``lora_ext_dev.dist_harness.run_ranks``: forked
processes, gloo on localhost, ``torch.set_num_threads(1)`` each) train the adapters with MSE on a
random target: 3 SGD (lr 0.05) then 3 AdamW (lr 1e-3) steps (``--quick``: 1 + 1), in four modes:

- DDP: ``DDP(model)``, each rank half of the batch;
- FSDP2: ``lora_ext.distributed.shard_lora_model(model, reshard_after_forward=True / False)``,
  each rank half of the batch;
- tensor parallel: ``parallelize_module`` with ``LoraColwiseParallel`` on q/k/v/up and
  ``LoraRowwiseParallel`` on o/down, ``reduce_replicated_grads`` after backward; every rank the
  whole batch (TP ranks share the data), a local half of the heads and of the MLP.

What is measured (nothing is asserted; the numbers are for reading, progress goes to stderr and
the report, markdown, to stdout):

1. Bytes communicated per optimizer step, by collective, each rank's *input* tensors: FSDP2's
   ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` and DTensor's collectives are counted by a
   ``TorchDispatchMode`` (c10d and ``_c10d_functional`` ops pass through the dispatcher), DDP's
   bucket all-reduces by a comm hook (the mode sees them too; a note lists whatever else it saw).
   An all-gather's input is the rank's shard (the gathered output is world-size times that), a
   reduce-scatter's and an all-reduce's input is the whole (padded) gradient. Every step is
   counted; a note says when steps differed. For tensor parallel, also the same model without LoRA under torch's own
   ``ColwiseParallel`` / ``RowwiseParallel`` (biases trainable, so that its backward needs the same
   input gradients): what torch's TP does anyway, and what LoRA adds. One-off collectives when the
   model is wrapped (DDP's broadcast, ``distribute_tensor``'s scatter/broadcast from rank 0) are
   listed separately.
2. Bytes gathered by the collective ``lora_ext.save_adapter`` on the FSDP2 (and the TP) model vs
   ``full_tensor()`` of every parameter (gathering the whole model), and whether the saved file is
   byte-identical (sha256) to a single-process save of the same values.
3. max |delta| of the trained adapters vs single-process training on the concatenated batch (the
   same schedule, one process, one thread), after the SGD steps and at the end, next to how far
   training moved them; and a control: one process whose step gradient is the mean of the gradients
   of the ranks' two halves of the batch (DDP's arithmetic without communication).
4. Wall time per step (forward, backward, collectives, optimizer step), in separate runs without the
   counting mode: per step the slower rank, median of the steps after the first. 2 gloo ranks on a
   shared 2-core VM: noisy, and the ranks compete for the cores with each other.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_ext  # noqa: E402
from lora_ext import LoraConfig  # noqa: E402
from lora_ext_dev.dist_harness import run_ranks  # forked gloo ranks

D, HEAD_DIM, FF, R, WORLD = 256, 64, 1024, 8, 2
TARGETS = ["q", "k", "v", "o", "up", "down"]
COLWISE = ("q", "k", "v", "up")  # LoraColwiseParallel; o and down: LoraRowwiseParallel
LORA = dict(r=R, lora_alpha=2 * R, target_modules=TARGETS, init_lora_weights=False)


# -- the model ------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape

        def heads(y):  # [b, heads, t, 64]; under tensor parallel the rank's local heads
            return y.view(b, t, -1, HEAD_DIM).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(D), Attention(), nn.LayerNorm(D)
        self.mlp = nn.ModuleDict({"up": nn.Linear(D, FF), "down": nn.Linear(FF, D)})

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.down(F.gelu(self.mlp.up(self.norm2(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])  # "blocks.<i>": shard_lora_model's per-block rule
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def make_model(lora: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    if lora:
        lora_ext.inject_adapter(model, LoraConfig(**LORA))
    return model.train()


def tp_plan(lora: bool) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lora_ext.distributed import LoraColwiseParallel, LoraRowwiseParallel

    col, row = (LoraColwiseParallel, LoraRowwiseParallel) if lora else (ColwiseParallel, RowwiseParallel)
    where = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "up": "mlp", "down": "mlp"}
    return {f"blocks.*.{where[n]}.{n}": (col() if n in COLWISE else row()) for n in TARGETS}


def make_batches(cfg: dict) -> list:
    g = torch.Generator().manual_seed(7)
    shape = (cfg["batch"], cfg["seq"], D)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(cfg["steps"])]


def optimizer_for(step: int, params, opt, cfg: dict):
    if step == 0:
        return torch.optim.SGD(params, lr=0.05)
    if step == cfg["sgd_steps"]:
        return torch.optim.AdamW(params, lr=1e-3)
    return opt


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def trainable_values(model) -> dict:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


# -- counting collectives -----------------------------------------------------------------------------
def kind_of(name: str) -> str:
    flat = name.replace("_", "")
    for kind in ("allreduce", "allgather", "reducescatter", "broadcast", "scatter", "alltoall"):
        if kind in flat:
            return {
                "allreduce": "all-reduce",
                "allgather": "all-gather",
                "reducescatter": "reduce-scatter",
                "alltoall": "all-to-all",
            }.get(kind, kind)
    return name


def flat(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in flat(item)] if isinstance(x, (list, tuple)) else []


class Collectives(TorchDispatchMode):
    """Each collective run while active as ``(phase, kind, input bytes)``. DTensor ops are let through
    first (``NotImplemented``): DTensor turns them into functional collectives on local tensors, which
    come back here. The input is the first argument, except for c10d ops whose first argument is
    their output (``_allgather_base_(output, input)``, ``scatter_(outputs, inputs)``, ...): their second."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, str, int]] = []
        self.phase = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if (
            ns in ("c10d", "_c10d_functional")
            and not name.startswith(("wait", "_wrap"))
            and name not in ("barrier", "monitored_barrier")
        ):
            first = func._schema.arguments[0].name
            given = args[1] if ns == "c10d" and first.startswith("output") else args[0]
            self.log.append((self.phase, kind_of(name), sum(nbytes(t) for t in flat(given))))
        return func(*args, **(kwargs or {}))

    def by_kind(self, phases=None) -> dict:
        out: dict[str, list[int]] = {}
        for phase, kind, n in self.log:
            if phases is None or phase in phases:
                out.setdefault(kind, []).append(n)
        return out


def _ddp_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state["all-reduce"].append(nbytes(bucket.buffer()))
    return allreduce_hook(None, bucket)


# -- the ranks ----------------------------------------------------------------------------------------
def wrap(mode: str, mesh):
    """``(module to call, inner model, collectives while wrapping)``."""
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(lora=mode != "tp plain")
    setup = Collectives()
    with setup:
        if mode == "ddp":
            wrapped = DDP(model)
        elif mode.startswith("fsdp"):
            wrapped = lora_ext.distributed.shard_lora_model(model, reshard_after_forward=mode == "fsdp reshard")
        else:
            wrapped = parallelize_module(model, mesh, tp_plan(lora=mode == "tp"))
    if mode == "tp plain":  # torch's TP of the base layers; the biases train, as LoRA's factors would
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") and "norm" not in name)
    return wrapped, model, setup.by_kind()


def train(mode: str, rank: int, mesh, cfg: dict, *, count: bool, steps: int) -> dict:
    from lora_ext.distributed import reduce_replicated_grads

    wrapped, model, setup = wrap(mode, mesh)
    per = cfg["batch"] // WORLD
    rows = slice(None) if mode.startswith("tp") else slice(rank * per, (rank + 1) * per)  # TP: all the data
    hook = {"all-reduce": []}
    if mode == "ddp" and count:
        wrapped.register_comm_hook(hook, _ddp_hook)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = make_batches(cfg)
    opt, times, per_step = None, [], []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt = optimizer_for(step, params, opt, cfg)
        hook["all-reduce"] = []
        comm = Collectives() if count else argparse.Namespace()  # the timed runs: phases set, nothing counted
        dist.barrier()
        start = time.perf_counter()
        with comm if count else nullcontext():
            comm.phase = "forward"
            loss = F.mse_loss(wrapped(x[rows]), y[rows])
            comm.phase = "backward"
            loss.backward()
            comm.phase = "reduce"
            if mode == "tp":
                reduce_replicated_grads(model)
            comm.phase = "step"
            if mode != "tp plain":
                opt.step()
                opt.zero_grad()
        times.append(time.perf_counter() - start)
        if count and step == cfg["sgd_steps"] - 1 and mode != "tp plain":
            after_sgd = trainable_values(model)
        if count:
            if mode == "ddp":
                per_step.append({"hook": list(hook["all-reduce"]), "mode": comm.by_kind()})
            else:
                per_step.append(
                    {"all": comm.by_kind(), "base": comm.by_kind(("forward", "backward"))}
                    | {p: comm.by_kind((p,)) for p in ("forward", "backward", "reduce", "step")}
                )
        if mode == "tp plain":
            break
    out = dict(times=times, comm=per_step, setup=setup)
    if count and mode != "tp plain":
        out["trained"], out["after sgd"] = trainable_values(model), after_sgd
    return out | dict(model=model)


def file_hashes(folder: str) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            out[name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def saves(model, folder: str) -> dict:
    """Collectives of a collective ``save_adapter`` and of ``full_tensor()`` of every parameter."""
    c = Collectives()
    with c:
        files = file_hashes(lora_ext.save_adapter(model, folder))
    whole = Collectives()
    with whole, torch.no_grad():
        for p in model.parameters():
            full(p)
    adapter = sum(nbytes(t) for t in lora_ext.io.adapter.adapter_state_dict(model, "default").values())
    return dict(save=c.by_kind(), whole=whole.by_kind(), files=files, adapter_bytes=adapter)


def world(rank: int, world_size: int, cfg: dict, tmp: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for mode in ("ddp", "fsdp reshard", "fsdp keep", "tp", "tp plain"):
        say(rank, f"{mode}: counting run")
        run = train(mode, rank, mesh, cfg, count=True, steps=cfg["steps"])
        model = run.pop("model")
        if mode in ("fsdp keep", "tp"):
            run["saves"] = saves(model, os.path.join(tmp, mode.replace(" ", "_")))
        out[mode] = run
        del model
    for mode in ("ddp", "fsdp reshard", "fsdp keep", "tp"):
        say(rank, f"{mode}: timing run")
        out[mode]["timed"] = train(mode, rank, mesh, cfg, count=False, steps=cfg["timing_steps"])["times"]
    return out


def say(rank: int, text: str) -> None:
    if rank == 0:
        print(f"[distributed_comm] {text}", file=sys.stderr, flush=True)


# -- the single-process reference ---------------------------------------------------------------------
def single_process(cfg: dict, steps: int, halves: bool = False) -> dict:
    """One process training on the whole batch: the adapters at the start, after the SGD steps and
    after all ``cfg["steps"]`` steps (``steps`` >= that: the rest only times), and the step times.
    ``halves``: the control, each step's gradient the mean of the gradients of the ranks' halves of
    the batch (DDP's arithmetic, in one process)."""
    model, opt = make_model(), None
    params = [p for p in model.parameters() if p.requires_grad]
    batches = make_batches(cfg)
    per = cfg["batch"] // WORLD
    out = {"initial": trainable_values(model), "times": []}
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt = optimizer_for(step, params, opt, cfg)
        start = time.perf_counter()
        if halves:
            grads = []
            for rank in range(WORLD):
                rows = slice(rank * per, (rank + 1) * per)
                F.mse_loss(model(x[rows]), y[rows]).backward()
                grads.append([p.grad for p in params])
                opt.zero_grad()
            for p, *gs in zip(params, *grads):
                p.grad = sum(gs) / WORLD
        else:
            F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        out["times"].append(time.perf_counter() - start)
        if step == cfg["sgd_steps"] - 1:
            out["after sgd"] = trainable_values(model)
        if step == cfg["steps"] - 1:
            out["trained"] = trainable_values(model)
    return out


def single_process_files(trained: dict, folder: str) -> dict:
    """sha256 of the files one process saves with these adapter values."""
    model = make_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trained:
                p.copy_(trained[name])
    return file_hashes(lora_ext.save_adapter(model, folder))


# -- the report -----------------------------------------------------------------------------------------
TRAINED = ("ddp", "fsdp reshard", "fsdp keep", "tp")


def B(n: int) -> str:
    return f"{n:,} B"


def count(values: list, what: str) -> str:
    return f"{len(values)} {what}{'s' if len(values) != 1 else ''}"


def ms(times: list) -> str:
    return f"{statistics.median(times[1:] or times) * 1e3:.0f}"


def delta(runs: list, want: dict) -> str:
    """max |delta| after the SGD steps and at the end, over the runs (ranks) and every adapter element, and
    how many elements of a run are outside the tests' tolerance (rtol 1e-5, atol 1e-6) at the end."""
    worst = [
        max(float((run[key][n] - w).abs().max()) for run in runs for n, w in want[key].items())
        for key in ("after sgd", "trained")
    ]
    outside = max(
        sum(int((~torch.isclose(run["trained"][n], w, rtol=1e-5, atol=1e-6)).sum()) for n, w in want["trained"].items())
        for run in runs
    )
    return f"{worst[0]:.1e} / {worst[1]:.1e}" + (f" ({outside} †)" if outside else "")


def comm_table(ranks: list, cfg: dict, want: dict, control: dict, ref_times: list, sizes: dict, notes: list) -> list:
    r0 = ranks[0]
    timed = {m: [max(t) for t in zip(*(r[m]["timed"] for r in ranks))] for m in TRAINED}  # the slower rank
    sizes_cells = f"{B(sizes['trainable'])} | {B(sizes['total'])}"
    lines = [
        "| mode | all-reduce | all-gather | reduce-scatter | trainable | total parameters "
        "| max abs Δ vs 1 process | ms / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ddp = r0["ddp"]["comm"]
    if any(s["hook"] != ddp[0]["hook"] for s in ddp):
        notes.append(f"DDP: the bucket all-reduces differed between steps: {[s['hook'] for s in ddp]}")
    for step, s in enumerate(ddp):  # the dispatch mode sees DDP's all-reduces too, and whatever else DDP sends
        if s["mode"].get("all-reduce", []) != s["hook"] or set(s["mode"]) - {"all-reduce"}:
            extra = {k: B(sum(v)) for k, v in s["mode"].items() if k != "all-reduce"}
            notes.append(
                f"DDP, step {step + 1}: the dispatch mode also saw {extra or s['mode']} (bucket "
                f"all-reduces: {B(sum(s['hook']))})"
            )
    lines.append(
        f"| DDP (each rank {cfg['batch'] // WORLD} sequences) | {B(sum(ddp[0]['hook']))} "
        f"({count(ddp[0]['hook'], 'bucket')}) | - | - | {sizes_cells} | "
        f"{delta([r['ddp'] for r in ranks], want)} | {ms(timed['ddp'])} |"
    )
    for mode, label in (
        ("fsdp reshard", "FSDP2, `reshard_after_forward=True`"),
        ("fsdp keep", "FSDP2, `reshard_after_forward=False`"),
    ):
        steps = r0[mode]["comm"]
        if any(s["all"] != steps[0]["all"] for s in steps):
            notes.append(f"{label}: steps differed: {[s['all'] for s in steps]}")
        c = steps[0]["all"]
        ag, rs, ar = c.get("all-gather", []), c.get("reduce-scatter", []), c.get("all-reduce", [])
        fwd, bwd = (len(steps[0][p].get("all-gather", [])) for p in ("forward", "backward"))
        lines.append(
            f"| {label} | {B(sum(ar)) if ar else '-'} | {B(sum(ag))} ({fwd} gathers in forward, {bwd} in "
            f"backward) | {B(sum(rs))} ({count(rs, 'group')}) | {sizes_cells} | "
            f"{delta([r[mode] for r in ranks], want)} | {ms(timed[mode])} |"
        )
        if set(c) - {"all-gather", "reduce-scatter", "all-reduce"}:
            notes.append(f"{label}: also {c}")
    plain = r0["tp plain"]["comm"][0]["base"].get("all-reduce", [])
    tp_steps = r0["tp"]["comm"]
    if any(s["all"] != tp_steps[0]["all"] for s in tp_steps):
        notes.append(f"TP: steps differed: {[s['all'] for s in tp_steps]}")
    tp = tp_steps[0]
    base, added = tp["base"].get("all-reduce", []), tp["reduce"].get("all-reduce", [])
    if tp["base"] != r0["tp plain"]["comm"][0]["base"]:
        notes.append(f"TP: forward/backward collectives with LoRA {tp['base']} differ from torch's plain TP's")
    if tp["step"] or set(tp["all"]) - {"all-reduce"}:
        notes.append(f"TP: also {tp}")
    lines.append(
        f"| TP, torch's own collectives (the same model without LoRA, torch's Colwise/RowwiseParallel) | "
        f"{B(sum(plain))} ({len(plain)} x {B(plain[0]) if plain else '-'}) | - | - | - | "
        f"{B(sizes['total'] - sizes['trainable'])} | - | - |"
    )
    lines.append(
        f"| TP with LoRA (`LoraColwiseParallel` q/k/v/up, `LoraRowwiseParallel` o/down, "
        f"`reduce_replicated_grads`) | {B(sum(base) + sum(added))} = {B(sum(base))} forward/backward "
        f"+ **{B(sum(added))}** added by LoRA ({len(added)} x {B(added[0]) if added else '-'}) | - | - | "
        f"{sizes_cells} | {delta([r['tp'] for r in ranks], want)} | {ms(timed['tp'])} |"
    )
    lines.append(f"| single process (1 thread, whole batch) | - | - | - | {sizes_cells} | 0 | {ms(ref_times)} |")
    lines.append(
        f"| control: single process, gradient = mean of the two half-batch gradients | - | - | - | "
        f"{sizes_cells} | {delta([control], want)} | - |"
    )
    return lines


def save_table(ranks: list, files_single: dict) -> list:
    lines = [
        "| gathering | all-gather inputs per rank | gathered (sum over ranks) | other collectives "
        "| file = single-process save (sha256) |",
        "|---|---|---|---|---|",
    ]
    for mode, label in (("fsdp keep", "FSDP2"), ("tp", "TP")):
        identical = all(r[mode]["saves"]["files"] == files_single[mode] for r in ranks)
        for key, what in (
            ("save", f"collective `lora_ext.save_adapter` ({label} model)"),
            ("whole", f"`full_tensor()` of every parameter ({label} model)"),
        ):
            c = ranks[0][mode]["saves"][key]
            gathered = sum(sum(r[mode]["saves"][key].get("all-gather", [])) for r in ranks)
            rest = ", ".join(f"{k} {B(sum(v))}" for k, v in c.items() if k != "all-gather") or "-"
            same = ("yes" if identical else "NO") if key == "save" else ""
            lines.append(
                f"| {what} | {B(sum(c.get('all-gather', [])))} ({count(c.get('all-gather', []), 'tensor')}) "
                f"| {B(gathered)} | {rest} | {same} |"
            )
    return lines


def report(ranks: list, cfg: dict, ref: dict, control: dict, files_single: dict, elapsed: float) -> str:
    model = make_model()
    sizes = {
        "total": sum(nbytes(p) for p in model.parameters()),
        "trainable": sum(nbytes(p) for p in model.parameters() if p.requires_grad),
    }
    want = {"after sgd": ref["after sgd"], "trained": ref["trained"]}
    moved = max(float((w - ref["initial"][n]).abs().max()) for n, w in want["trained"].items())
    largest = max(float(w.abs().max()) for w in want["trained"].values())
    vs_control = {
        m: max(float((r[m]["trained"][n] - w).abs().max()) for r in ranks for n, w in control["trained"].items())
        for m in TRAINED
    }
    notes: list[str] = []
    lines = [
        f"2 pre-norm blocks (d={D}, 4 heads, MLP {FF}), LoRA r={R} on q/k/v/o/up/down, fp32: trainable "
        f"{B(sizes['trainable'])}, total parameters {B(sizes['total'])} ({sizes['total'] // 4:,} parameters). "
        f"Global batch {cfg['batch']} x {cfg['seq']} tokens; {cfg['sgd_steps']} SGD + "
        f"{cfg['steps'] - cfg['sgd_steps']} AdamW steps; world size {WORLD} (gloo, CPU). Bytes are each rank's "
        "collective inputs per optimizer step.",
        "",
    ]
    lines += comm_table(ranks, cfg, want, control, ref["times"], sizes, notes)
    lines += [
        "",
        f"max abs Δ: after the SGD steps / at the end, over both ranks and every adapter element, vs one "
        f"process on the concatenated batch. Training moved the adapters by up to {moved:.1e}; the largest "
        f"adapter element is {largest:.2f}; {sizes['trainable'] // 4:,} adapter elements. (n †): n elements "
        "of a rank outside the tests' tolerance (rtol 1e-5, atol 1e-6) at the end. At the end, vs the control "
        "instead: " + ", ".join(f"{m} {v:.1e}" if v else f"{m} 0 (bitwise equal)" for m, v in vs_control.items()) + ".",
        "",
    ]
    lines += save_table(ranks, files_single)
    lines += [
        "",
        f"Adapter bytes: {B(ranks[0]['fsdp keep']['saves']['adapter_bytes'])}; whole model {B(sizes['total'])}.",
        "",
    ]
    setup = [
        f"{label}: "
        + (", ".join(f"{k} {B(sum(v))} ({count(v, 'call')})" for k, v in ranks[0][mode]["setup"].items()) or "none")
        for mode, label in (
            ("ddp", "`DDP(model)`"),
            ("fsdp keep", "`shard_lora_model`"),
            ("tp", "`parallelize_module`"),
        )
    ]
    lines += [
        "One-off collectives when wrapping (rank 0's inputs: what it scatters or broadcasts): "
        + "; ".join(setup)
        + ".",
        "",
    ]
    lines.append(
        f"Wall time per step: the slower rank's, median of {cfg['timing_steps'] - 1} steps after the first; "
        f"2 gloo ranks (1 thread each) on a shared 2-core VM, noisy (load average {cfg['load']:.1f} at the "
        f"start). Whole script: {elapsed:.0f} s."
    )
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 SGD + 1 AdamW step, batch 4 x 16, 4 timed steps")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)
    if args.quick:
        cfg = dict(batch=4, seq=16, sgd_steps=1, steps=2, timing_steps=4)
    else:
        cfg = dict(batch=8, seq=64, sgd_steps=3, steps=6, timing_steps=20)
    cfg["load"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_ranks(world, WORLD, cfg, tmp, timeout=600)  # first: no threads started in this process yet
        print("[distributed_comm] single-process reference and control", file=sys.stderr, flush=True)
        ref = single_process(cfg, cfg["timing_steps"])
        control = single_process(cfg, cfg["steps"], halves=True)
        # each mode's file against a single-process save of the values that mode trained
        files_single = {
            m: single_process_files(ranks[0][m]["trained"], os.path.join(tmp, f"single_{i}"))
            for i, m in enumerate(("fsdp keep", "tp"))
        }
    print(report(ranks, cfg, ref, control, files_single, time.perf_counter() - start))


if __name__ == "__main__":
    main()
